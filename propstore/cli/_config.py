"""``propstore config plan|apply NAME=VALUE ...``: parse, call :mod:`propstore.migrate`'s
configuration rollout, print (a live table on a terminal, one line per event when piped,
``--json`` for programs). :mod:`propstore.migrate` is imported by the commands' bodies, so
their ``--help`` does not load it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from propstore.cli._context import DURATION, EXIT_CHECK_FAILED, output_console
from propstore.cli._live import LiveRollout
from propstore.cli._migrate import _config_path, _topology, config_group
from propstore.errors import ConfigError, MigrationError

if TYPE_CHECKING:
    from propstore.config import Topology
    from propstore.migrate import ConfigChange, ConfigEvent, ConfigPlan, NodeController

F = TypeVar("F", bound=Callable[..., Any])


def _change_options(function: F) -> F:
    options = [
        click.argument("assignments", nargs=-1, required=True, metavar="NAME=VALUE..."),
        click.option("--role", type=click.Choice(["all", "primaries", "replicas"]),
                     default="all", show_default=True, help="Which nodes to change."),
        click.option("--shard", "shards", multiple=True, help="Only this shard (repeatable)."),
        click.option("--node", "nodes", multiple=True, help="Only this node (repeatable)."),
        click.option("--restart-command", default=None, metavar="TEMPLATE",
                     help="How to restart a node for postmaster-context settings, e.g. "
                          "'ssh {host} sudo systemctl restart postgresql@15-main' "
                          "(placeholders {node} {host} {port} {address})."),
        click.option("--sandbox", is_flag=True,
                     help="Restart nodes of the local sandbox (its folder holds the "
                          "topology file)."),
        click.option("--journal", type=click.Path(dir_okay=False), default=None,
                     help="Where the values before are kept for resume and revert "
                          "[default: $XDG_STATE_HOME/propstore/config-rollouts/]."),
        click.option("--json", "as_json", is_flag=True, help="Print JSON."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _controller(ctx: click.Context, restart_command: str | None, sandbox: bool
                ) -> NodeController | None:
    if restart_command and sandbox:
        raise click.UsageError("pass --restart-command or --sandbox, not both")
    if restart_command:
        from propstore.migrate import CommandController

        try:
            return CommandController(restart_command)
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="--restart-command") from exc
    if not sandbox:
        return None
    from propstore.sandbox import LocalCluster, LocalNodeController, SandboxError

    path = _config_path(ctx)
    if path is None:
        raise click.UsageError("--sandbox needs the sandbox's topology file (--config)")
    try:
        return LocalNodeController(LocalCluster.attach(Path(path).parent))
    except (SandboxError, OSError, KeyError, ValueError) as exc:
        raise click.ClickException(f"no sandbox next to {path}: {exc}") from exc


def _journal(topology: Topology, change: ConfigChange, journal: str | None) -> Path:
    from propstore.migrate._config_plan import journal_path

    if journal:
        return Path(journal)
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return journal_path(state / "propstore" / "config-rollouts", change.key(topology))


def _plan(ctx: click.Context, assignments: tuple[str, ...], role: str,
          shards: tuple[str, ...], nodes: tuple[str, ...], controller: NodeController | None,
          journal: str | None) -> tuple[Topology, ConfigPlan, Path]:
    from propstore.migrate import ConfigChange, ConfigJournal, plan_config_change

    topology = _topology(ctx)
    try:
        change = ConfigChange.parse(assignments, role=role, shards=shards, nodes=nodes)
        path = _journal(topology, change, journal)
        originals = ConfigJournal(path).originals
        return topology, plan_config_change(topology, change, can_restart=controller
                                            is not None, originals=originals), path
    except (ConfigError, MigrationError) as exc:
        raise click.ClickException(str(exc)) from exc


def _plan_text(plan: ConfigPlan, journal: Path) -> str:
    """The plan, and which already-applied steps the run bakes again (their bake was cut
    short: the journal recorded the node and not the end of its bake)."""
    from propstore.migrate import ConfigJournal

    recorded = ConfigJournal(journal)
    again = [f"  step {step.number} ({step.node.name}): applied by a run that stopped during "
             "its bake; baked again before the next step"
             for step in plan.steps if step.applied and recorded.unbaked(step.node.name)]
    return "\n".join([str(plan), *again])


@config_group.command("plan")
@_change_options
@click.pass_context
def plan_command(ctx: click.Context, assignments: tuple[str, ...], role: str,
                 shards: tuple[str, ...], nodes: tuple[str, ...],
                 restart_command: str | None, sandbox: bool, journal: str | None,
                 as_json: bool) -> None:
    """Validate server settings on every node and show the rollout order; touches nothing.

    NAME=VALUE as in postgresql.conf (max_connections=200, work_mem=8MB, ...). A bad name
    or value is refused naming the node and what is allowed.
    """
    controller = _controller(ctx, restart_command, sandbox)
    plan, path = _plan(ctx, assignments, role, shards, nodes, controller, journal)[1:]
    if as_json:
        click.echo(json.dumps(plan.to_dict(), indent=2))
    else:
        click.echo(_plan_text(plan, path))


def _show(display: LiveRollout) -> Callable[[ConfigEvent], None]:
    def show(event: ConfigEvent) -> None:
        end = {"step_done": "done", "step_skipped": "already applied",
               "step_rebaking": "baking again", "reverted": "reverted",
               "step_failed": f"FAILED at {event.phase}"}.get(event.kind)
        display.show(event, event.node, end or event.phase)

    return show


@config_group.command("apply")
@_change_options
@click.option("--max-lag", type=DURATION, default="1s", show_default=True,
              help="Replicas must be proven at most this stale before, after and during "
                   "each step's bake.")
@click.option("--bake", type=DURATION, default="10s", show_default=True,
              help="How long each step is watched before the next one.")
@click.option("--wait-timeout", type=DURATION, default="60s", show_default=True,
              help="How long a step's pre-flight may wait for its replicas.")
@click.option("--settle-timeout", type=DURATION, default="60s", show_default=True,
              help="How long a changed node may take to be ready again (else: revert).")
@click.option("--canary", type=click.IntRange(min=1), default=None,
              help="Stop after this many steps (nodes) were applied and baked.")
@click.pass_context
def apply_command(ctx: click.Context, assignments: tuple[str, ...], role: str,
                  shards: tuple[str, ...], nodes: tuple[str, ...],
                  restart_command: str | None, sandbox: bool, journal: str | None,
                  as_json: bool, max_lag: float, bake: float, wait_timeout: float,
                  settle_timeout: float, canary: int | None) -> None:
    """Roll server settings out node by node: pre-flight lag gate, ALTER SYSTEM + reload
    (or restart), verify, bake; revert every changed node automatically on a regression.

    Exit status 1 when a step failed or the change was reverted (the report says why and
    what was restored); re-running continues where an interrupted run stopped.
    """
    from propstore.migrate import ConfigRollout

    controller = _controller(ctx, restart_command, sandbox)
    topology, plan, path = _plan(ctx, assignments, role, shards, nodes, controller, journal)
    display = LiveRollout(output_console(), ("node", "phase", "status", "shard's replicas"),
                          quiet=as_json)
    if not as_json:
        click.echo(_plan_text(plan, path))
    try:
        rollout = ConfigRollout(topology, plan, controller, max_lag=max_lag, bake=bake,
                                wait_timeout=wait_timeout, settle_timeout=settle_timeout,
                                canary=canary, journal=path, on_event=_show(display))
        with display.running():
            report = rollout.run()
    except MigrationError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else str(report))
    if not report.ok:
        ctx.exit(EXIT_CHECK_FAILED)


__all__ = ["apply_command", "plan_command"]
