"""``propstore agent``: the host's lag agent, asked how it is (``status``) or run in the
foreground (``run``, e.g. under systemd).

The agent is the one a store spawns by itself (``docs/architecture.md``, "Fleets"); these
commands only ask it (``propstore.monitor._health.agent_status``) or run the same code
(``propstore.monitor._agent.run_foreground``). Both import the library in their body:
``agent --help`` loads neither.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import click

from propstore._durations import format_bytes, format_duration
from propstore.cli._context import (
    DURATION,
    EXIT_CHECK_FAILED,
    EXIT_OK,
    WIDE_HELP,
    CliState,
    emit,
    output_console,
    pass_state,
)

if TYPE_CHECKING:
    from rich.text import Text

    from propstore.cli._table import FittedTable
    from propstore.monitor._agent import Agent
    from propstore.monitor._health import AgentStatus, NodeHealth


@click.group("agent")
def agent_group() -> None:
    """The host's lag agent: its health (status) or the agent itself (run).

    The first store on a host starts an agent for its topology by itself, and it ends
    5 s after its last store; `agent run` runs the same agent in the foreground (stores
    find it the same way), and `agent status` asks whichever one runs.
    """


def refusal_lines(status: AgentStatus) -> list[str]:
    """One line per shard where the host's stores refused reads."""
    from propstore.cli._lag import refusal_text

    return [f"{shard}: {refusal_text(refused)}" for shard, refused in status.refusals.items()]


def _age(node: NodeHealth) -> str:
    age = node.last_poll_age_seconds
    return "never" if age is None else format_duration(age) + " ago"


def node_table(status: AgentStatus, wide: bool) -> FittedTable[NodeHealth]:
    """The agent's nodes: state in its view, poll rate, last poll, counts, last error."""
    from rich.text import Text

    from propstore.cli._table import Column, FittedTable

    def last(node: NodeHealth) -> str | Text:
        late = node.last_poll_age_seconds is None or (
            node.last_poll_age_seconds > status.late_after_seconds)
        return Text(_age(node), style="bold red") if late else _age(node)

    shards = list(dict.fromkeys(n.shard for n in status.nodes))
    sections = [[n for n in status.nodes if n.shard == s] for s in shards]
    firsts = {id(section[0]) for section in sections}
    columns: list[Column[NodeHealth]] = [
        Column("shard", lambda n: n.shard if id(n) in firsts else ""),
        Column("node", lambda n: n.node),
        Column("state", lambda n: n.state),
        Column("polls/s", lambda n: f"{n.polls_per_second:.1f}", justify="right"),
        Column("last poll", last, justify="right"),
        Column("polls", lambda n: str(n.polls), priority=2, justify="right"),
        Column("failures", lambda n: str(n.failures), priority=1, justify="right"),
        Column("last error", lambda n: n.last_error or "-", priority=3, shrink="wrap"),
    ]
    return FittedTable(columns, sections, wide=wide)


@agent_group.command("status")
@click.option("--json", "as_json", is_flag=True,
              help="Print the status document (field names in docs/operating.md).")
@click.option("--wide", is_flag=True, help=WIDE_HELP)
@pass_state
@click.pass_context
def status_command(ctx: click.Context, state: CliState, as_json: bool, wide: bool) -> None:
    """Say whether an agent runs for this topology, and how it is.

    Its pid, uptime, socket and key; the stores connected to it (pids); per node its state,
    poll rate, last poll and errors; per shard with Patroni endpoints, the leader Patroni
    names and when the agent last asked; its memory; the reads the host's stores refused. Exit
    status 0 when an agent runs and polls every node, 1 when none runs or some node has
    not been polled lately, 2 on an error.
    """
    from propstore.monitor._health import agent_status
    from propstore.monitor._place import AgentPaths

    topology = state.topology()
    status = agent_status(topology)
    if status is None:
        socket = AgentPaths.of(topology).socket
        if as_json:
            click.echo(json.dumps({"running": False, "socket": str(socket)}, indent=2))
        else:
            click.echo(f"no agent runs for this topology (it would listen on {socket}; "
                       "the first store starts one, or `propstore agent run`)")
        ctx.exit(EXIT_CHECK_FAILED)
    if as_json:
        click.echo(json.dumps({"running": True, **status.to_dict()}, indent=2))
    else:
        _print_status(status, wide)
    ctx.exit(EXIT_OK if status.healthy else EXIT_CHECK_FAILED)


def _print_status(status: AgentStatus, wide: bool) -> None:
    kind = "run in the foreground" if status.foreground else "started by a store"
    pids = ", ".join(map(str, status.stores)) or "none"
    click.echo(f"agent pid {status.pid} ({kind}), up {format_duration(status.uptime_seconds)}"
               f" since {status.started_at}, protocol {status.version}")
    click.echo(f"socket {status.socket}")
    click.echo(f"polls every {format_duration(status.interval_seconds)}; memory (RSS) "
               f"{format_bytes(status.rss_bytes)}")
    click.echo(f"stores: {len(status.stores)} connected (pids: {pids}); "
               f"{status.stores_total} joined since start, {status.stores_dropped} dropped")
    console = output_console(wide)
    emit(console, node_table(status, wide))
    for lead in status.leaders:
        age = lead.last_answer_age_seconds
        asked = "never asked" if age is None else f"asked {format_duration(age)} ago"
        click.echo(f"{lead.shard}: Patroni names {lead.leader or 'no running leader'} "
                   f"({lead.endpoint or 'no endpoint answered'}; {asked}; {lead.answers} "
                   f"answers, {lead.misses} unanswered; its stores ask Patroni themselves "
                   f"past {format_duration(lead.late_after_seconds)})")
    from propstore.cli._lag import refusal_cover

    click.echo(refusal_cover(status) + ":")
    for line in refusal_lines(status) or ["none"]:
        click.echo(f"  {line}")
    if status.healthy:
        console.print("healthy: every node polled within "
                      f"{format_duration(status.late_after_seconds)}", style="green")
    else:
        console.print("UNHEALTHY: " + "; ".join(status.problems), style="bold red")


@agent_group.command("run")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Also serve the agent's Prometheus metrics on this port (0: any free "
                   "port, printed at start).")
@click.option("--metrics-host", default="127.0.0.1", show_default=True,
              help="Address the metrics endpoint binds.")
@click.option("--idle-exit", type=DURATION, default=None,
              help="End this long after the last store left (default: run until SIGTERM "
                   "or Ctrl-C).")
@pass_state
def run_command(state: CliState, metrics_port: int | None, metrics_host: str,
                idle_exit: float | None) -> None:
    """Run the host's lag agent for this topology in the foreground.

    For operators who want it under a service manager (systemd): stores of this topology
    on this host, run by the same user with the same PROPSTORE_AGENT_DIR (or
    XDG_RUNTIME_DIR), find it exactly as they find an agent they started, and never start
    another while it runs. Refused (exit 2) when an agent already runs. Its events are
    logged to stderr.
    """
    from propstore.monitor._agent import AgentRunning, run_foreground

    state.show_events()
    servers = []

    def started(agent: Agent) -> None:
        click.echo(f"agent pid {os.getpid()} serving {agent.socket_path}", err=True)
        if metrics_port is not None:
            from propstore.metrics import AgentMetrics

            server = AgentMetrics(agent).serve(metrics_port, metrics_host)
            servers.append(server)
            click.echo(f"metrics at {server.url}", err=True)

    try:
        run_foreground(state.topology(), idle_grace=idle_exit, started=started)
    except AgentRunning as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        for server in servers:
            server.close()
