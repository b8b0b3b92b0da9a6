"""``propstore migrate ...`` and ``propstore config diff``: parse, call
:mod:`propstore.migrate`, print.

The topology file comes from the root command's ``--config`` option (read from
``ctx.find_root().params``), else from ``ctx.obj``, else ``$PROPSTORE_CONFIG``. Server
setting rollouts (``config plan``/``apply``) live in :mod:`propstore.cli._config`. On a terminal
a rollout shows a live table (shard, step, lag, countdown); piped, one line per event
(:mod:`propstore.cli._live`). :mod:`propstore.migrate` (SQLAlchemy, alembic, psycopg) is
imported by the commands' bodies, so their ``--help`` does not load it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from propstore.cli._context import DURATION, EXIT_CHECK_FAILED, output_console
from propstore.cli._live import LiveRollout, replica_lag_text
from propstore.config import Topology
from propstore.errors import ConfigError, MigrationError

if TYPE_CHECKING:
    from rich.table import Table

    from propstore.migrate import MigrationEvent, MigrationReport, ShardMigrationStatus

F = TypeVar("F", bound=Callable[..., Any])
_SCRIPTS_KEY = "propstore.migrate.script_location"


def _config_path(ctx: click.Context) -> str | None:
    root = ctx.find_root()
    path = root.params.get("config")
    if path:
        return str(path)
    if isinstance(root.obj, Mapping) and root.obj.get("config"):
        return str(root.obj["config"])
    return os.environ.get("PROPSTORE_CONFIG") or None


def _topology(ctx: click.Context) -> Topology:
    root = ctx.find_root()
    if isinstance(root.obj, Topology):
        return root.obj
    path = _config_path(ctx)
    if path is None:
        raise click.UsageError("no topology file: pass --config FILE or set PROPSTORE_CONFIG")
    try:
        return Topology.load(path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc


def _scripts(ctx: click.Context) -> Path | None:
    location = ctx.meta.get(_SCRIPTS_KEY)
    return Path(location) if location else None


@click.group("migrate")
@click.option("--script-location", type=click.Path(file_okay=False, exists=True),
              envvar="PROPSTORE_MIGRATIONS", default=None,
              help="alembic script folder [default: propstore's own migrations].")
@click.pass_context
def migrate(ctx: click.Context, script_location: str | None) -> None:
    """Schema changes, rolled out shard by shard, gated on replica lag."""
    ctx.meta[_SCRIPTS_KEY] = script_location


@migrate.command("status")
@click.option("--shard", "shards", multiple=True, help="Only this shard (repeatable).")
@click.pass_context
def status_command(ctx: click.Context, shards: tuple[str, ...]) -> None:
    """Per shard: current revision vs head, and the replicas' lag now."""
    from propstore.migrate import shard_status

    try:
        rows = shard_status(_topology(ctx), script_location=_scripts(ctx),
                            shards=shards or None)
    except MigrationError as exc:
        raise click.ClickException(str(exc)) from exc
    console = output_console()
    if console.is_terminal:
        console.print(_status_table(rows))
    else:
        for row in rows:
            click.echo(str(row))
    if not all(row.reachable for row in rows):
        ctx.exit(EXIT_CHECK_FAILED)


def _status_table(rows: Sequence[ShardMigrationStatus]) -> Table:
    from rich.table import Table

    table = Table("shard", "revision", "head", "replicas (proven staleness)")
    for row in rows:
        current = (f"[red]unreachable: {row.error}[/]" if not row.reachable
                   else f"[green]{row.current}[/]" if row.at_head
                   else f"[yellow]{row.current or 'base'}[/]")
        table.add_row(row.shard, current, row.head or "base",
                      "\n".join(replica_lag_text(r) for r in row.replicas) or "-")
    return table


@migrate.command("plan")
@click.argument("revision", default="head")
@click.option("--sql", "with_sql", is_flag=True, help="Print alembic's offline SQL too.")
@click.option("--shard", "shards", multiple=True, help="Only this shard (repeatable).")
@click.pass_context
def plan_command(ctx: click.Context, revision: str, with_sql: bool,
                 shards: tuple[str, ...]) -> None:
    """What `migrate up REVISION` would run on each shard, in order."""
    from propstore.migrate import plan

    try:
        plans = plan(_topology(ctx), revision, sql=with_sql, shards=shards or None,
                     script_location=_scripts(ctx))
    except MigrationError as exc:
        raise click.ClickException(str(exc)) from exc
    for shard_plan in plans:
        click.echo(str(shard_plan))
        if shard_plan.sql:
            click.echo(f"-- offline SQL for {shard_plan.shard}\n{shard_plan.sql}")
    if any(p.error for p in plans):
        ctx.exit(EXIT_CHECK_FAILED)


def _rollout_options(function: F) -> F:
    options = [
        click.option("--max-lag", type=DURATION, default="1s", show_default=True,
                     help="Replicas must be proven at most this stale before a shard starts."),
        click.option("--wait-timeout", type=DURATION, default="60s", show_default=True,
                     help="How long a shard's pre-flight may wait for its replicas."),
        click.option("--catchup-timeout", type=DURATION, default="60s", show_default=True,
                     help="How long to wait for the replicas to replay the migration."),
        click.option("--canary", type=click.IntRange(min=1), default=None,
                     help="Stop after migrating this many shards."),
        click.option("--shard", "shards", multiple=True,
                     help="Only this shard (repeatable)."),
        click.option("--yes", is_flag=True, help="Do not ask for confirmation."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _show(display: LiveRollout) -> Callable[[MigrationEvent], None]:
    def show(event: MigrationEvent) -> None:
        done = {"shard_done": "done", "already_at_target": "at target",
                "shard_failed": f"FAILED at {event.step}"}.get(event.kind)
        display.show(event, event.shard, done or event.step)

    return show


def _rollout(ctx: click.Context, revision: str, direction: str, max_lag: float,
             wait_timeout: float, catchup_timeout: float, canary: int | None,
             shards: tuple[str, ...]) -> MigrationReport:
    from propstore.migrate import RollingMigration

    display = LiveRollout(output_console(), ("shard", "step", "status", "replica lag"))
    try:
        migration = RollingMigration(
            _topology(ctx), revision, max_lag=max_lag, wait_timeout=wait_timeout,
            catchup_timeout=catchup_timeout, canary=canary, shards=shards or None,
            direction="up" if direction == "up" else "down", on_event=_show(display),
            script_location=_scripts(ctx),
        )
        with display.running():
            return migration.run()
    except MigrationError as exc:
        raise click.ClickException(str(exc)) from exc


@migrate.command("up")
@click.argument("revision", default="head")
@_rollout_options
@click.pass_context
def up_command(ctx: click.Context, revision: str, max_lag: float, wait_timeout: float,
               catchup_timeout: float, canary: int | None, shards: tuple[str, ...],
               yes: bool) -> None:
    """Upgrade shard by shard to REVISION (default head), each gated on replica lag.

    Exit status 1 when a shard failed or a pre-flight timed out (the report says which);
    re-running continues where it stopped. --yes is accepted for symmetry with `down`
    (an upgrade does not ask).
    """
    report = _rollout(ctx, revision, "up", max_lag, wait_timeout, catchup_timeout, canary,
                      shards)
    click.echo(str(report))
    if not report.ok:
        ctx.exit(EXIT_CHECK_FAILED)


@migrate.command("down")
@click.argument("revision")
@_rollout_options
@click.pass_context
def down_command(ctx: click.Context, revision: str, max_lag: float, wait_timeout: float,
                 catchup_timeout: float, canary: int | None, shards: tuple[str, ...],
                 yes: bool) -> None:
    """Downgrade shard by shard to REVISION (an id, or base); asks first unless --yes."""
    from propstore.migrate import plan

    try:
        plans = plan(_topology(ctx), revision, direction="down", shards=shards or None,
                     script_location=_scripts(ctx))
    except MigrationError as exc:
        raise click.ClickException(str(exc)) from exc
    if all(p.nothing_to_do for p in plans):
        click.echo(f"Nothing to do: no shard is above {revision}.")
        return
    for shard_plan in plans:
        click.echo(str(shard_plan))
    if not yes:
        click.confirm("Downgrade these shards (data in dropped objects is lost)?",
                      abort=True)
    report = _rollout(ctx, revision, "down", max_lag, wait_timeout, catchup_timeout, canary,
                      shards)
    click.echo(str(report))
    if not report.ok:
        ctx.exit(EXIT_CHECK_FAILED)


@click.group("config")
def config_group() -> None:
    """Topology file changes (diff) and PostgreSQL server settings (plan, apply)."""


@config_group.command("diff")
@click.argument("old", type=click.Path(exists=True, dir_okay=False))
@click.argument("new", type=click.Path(exists=True, dir_okay=False))
@click.option("--no-check", is_flag=True,
              help="Do not connect to the databases (moves then count as unsafe).")
@click.pass_context
def diff_command(ctx: click.Context, old: str, new: str, no_check: bool) -> None:
    """Show what changes from topology file OLD to NEW; exit 1 if anything is unsafe."""
    from propstore.migrate import diff_topologies

    try:
        diff = diff_topologies(old, new, check=not no_check)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(str(diff))
    if not diff.safe:
        ctx.exit(EXIT_CHECK_FAILED)


# Registers `config plan` and `config apply` (their module imports the helpers above).
from propstore.cli import _config as _config  # noqa: E402

__all__ = ["config_group", "migrate"]
