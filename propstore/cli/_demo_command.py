"""``propstore demo``: start a sandbox, run :func:`~propstore.cli._demo.run_demo`, draw it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import click
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

from propstore._durations import format_duration
from propstore.cli._context import (
    DURATION,
    EXIT_CHECK_FAILED,
    EXIT_OK,
    CliState,
    emit,
    output_console,
    pass_state,
)
from propstore.cli._demo import DemoReport, ReaderStats, run_demo
from propstore.cli._lag import lag_table
from propstore.cli._signals import sigterm_as_interrupt
from propstore.cli._table import Column, FittedTable
from propstore.sandbox import LocalCluster, SandboxError

_PIPED_EVERY = 2.0  # seconds between progress lines when the output is not a terminal


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(seconds)


def _percent(part: int, whole: int) -> str:
    return f"{part} ({100 * part / whole:.0f}%)" if whole else "0"


def _errors(reader: ReaderStats) -> Text:
    errors = sum(reader.errors.values())
    return Text(str(errors), style="yellow" if errors else "")


def _reasons(reader: ReaderStats) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in reader.reasons.most_common()) or "-"


#: Per reader. At 80 terminal columns: reader, budget, reads, replica, primary, p50, p99
#: and violations; errors and fallback reasons need more (`--wide`).
STATS_COLUMNS: tuple[Column[ReaderStats], ...] = (
    Column("reader", lambda r: r.name, shrink="wrap"),
    Column("budget", lambda r: r.budget, shrink="wrap"),
    Column("reads", lambda r: str(r.reads), justify="right"),
    Column("replica", lambda r: _percent(r.replica_reads, r.reads), shrink="wrap",
           justify="right"),
    Column("primary", lambda r: _percent(r.primary_reads, r.reads), shrink="wrap",
           justify="right"),
    Column("fallback reasons", _reasons, priority=2, shrink="wrap"),
    Column("p50", lambda r: _ms(r.p50), justify="right"),
    Column("p99", lambda r: _ms(r.p99), justify="right"),
    Column("errors", _errors, priority=1, justify="right"),
    Column("violations", lambda r: Text(str(r.violations), style="bold red" if r.violations
                                        else "bold green"), justify="right"),
)


def stats_table(readers: tuple[ReaderStats, ...], *, wide: bool = False
                ) -> FittedTable[ReaderStats]:
    """Per reader: reads by replica vs primary, fallback reasons, latency, violations."""
    return FittedTable(STATS_COLUMNS, [readers], wide=wide)


def _headline(report: DemoReport) -> str:
    paused = ", ".join(report.paused_nodes)
    third = report.duration / 4
    if report.elapsed < third:
        phase = f"all replicas replaying; replay pauses on {paused} at {third:.0f}s"
    elif report.elapsed < 3 * third:
        phase = (f"replay PAUSED on {paused}: its bound grows, reads whose budget it "
                 f"exceeds go to the primary")
    else:
        phase = f"replay resumed on {paused}"
    return (f"propstore demo {report.elapsed:5.1f}s / {report.duration:.0f}s - {phase}; "
            f"{report.writes} writes")


def live_view(report: DemoReport) -> RenderableType:
    """The whole screen: headline, lag table, reader stats."""
    parts: list[RenderableType] = [Text(_headline(report), style="bold")]
    if report.lag is not None:
        parts.append(lag_table(report.lag, state_time=True))
    parts.append(stats_table(report.readers))
    return Group(*parts)


def summary(report: DemoReport) -> RenderableType:
    """What to print at the end."""
    lines: list[RenderableType] = [
        Text(f"Demo finished: {report.elapsed:.1f}s, {report.users} users, "
             f"{report.writes} writes, replay paused on {report.paused_shard}'s replicas "
             f"for the middle half.", style="bold"),
    ]
    lines += [Text(f"  {event.at:6.1f}s  {event.text}") for event in report.events]
    lines.append(stats_table(report.readers))
    workflow = next((r for r in report.readers if r.name == "workflow"), None)
    if workflow is not None and workflow.fallbacks_by_shard:
        fallbacks = workflow.fallbacks_by_shard.get(report.paused_shard, 0)
        lines.append(Text(
            f"Workflow reads of {report.paused_shard} that its primary served rather than a "
            f"replica beyond {workflow.budget}: {fallbacks}."))
    for reader in report.readers:
        lines += [Text(f"  {reader.name}: {example}", style="yellow")
                  for example in reader.examples]
    if report.violations:
        lines.append(Text(f"Budget violations: {report.violations} - a read was older than "
                          f"its budget allowed.", style="bold red"))
    else:
        lines.append(Text("Budget violations: 0 - every read was at least as fresh as its "
                          "budget, whichever node served it.", style="bold green"))
    return Group(*lines)


def _progress_printer(console: Console) -> Callable[[DemoReport], None]:
    last = [0.0]

    def show(report: DemoReport) -> None:
        now = time.monotonic()
        if now - last[0] < _PIPED_EVERY:
            return
        last[0] = now
        reads = ", ".join(
            f"{r.name} {r.reads} (replica {r.replica_reads})" for r in report.readers)
        console.print(f"[{report.elapsed:5.1f}s] {reads}; writes {report.writes}; "
                      f"violations {report.violations}")

    return show


@click.command("demo")
@click.option("--duration", type=DURATION, default="60s", show_default=True,
              help="How long the readers and the writer run.")
@click.option("--users", type=click.IntRange(1, 1_000_000), default=5000, show_default=True,
              help="Users loaded before the run (tenant 'demo').")
@click.option("--dir", "base_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Folder for the cluster the demo starts [default: a "
              "temporary folder, removed at the end].")
@click.option("--rate", type=click.FloatRange(min=0), default=200.0, show_default=True,
              help="Operations per second per thread (0: as fast as possible).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Also serve the demo store's Prometheus metrics on 127.0.0.1:PORT.")
@pass_state
@click.pass_context
def demo_command(ctx: click.Context, state: CliState, duration: float, users: int,
                 base_dir: Path | None, rate: float, metrics_port: int | None) -> None:
    """Show the whole idea in about a minute, on a local cluster.

    Starts a sandbox (2 shards x 2 replicas; or uses the running one that --config or
    PROPSTORE_CONFIG names), migrates it, loads users and runs three threads: a
    personalisation reader (5 s budget), a workflow reader (500 ms) and a writer that reads
    each write back with its token. From 1/4 to 3/4 of the run, replay is paused on one
    shard's replicas. The live view shows the lag table and, per reader, reads served by
    replica vs primary, fallback reasons, p50/p99 latency and budget violations, which
    must stay 0. A sandbox the demo started is stopped at the end.

    Exit status 0 when there was no violation, 1 when there was one.
    """
    if state.config and base_dir is not None:
        raise click.UsageError("--dir is for a cluster the demo starts; --config names a "
                               "running one")
    console = output_console()
    if state.config:
        folder = Path(state.config).absolute().parent
        try:
            cluster = LocalCluster.attach(folder)
        except SandboxError as exc:
            raise click.ClickException(
                f"the demo pauses replay, so it runs only on a sandbox and {state.config} is "
                f"not a sandbox's topology file ({exc}); without --config/PROPSTORE_CONFIG "
                f"it starts its own"
            ) from None
        owned = False
        console.print(f"Using the running sandbox in {cluster.base_dir}")
    else:
        console.print("Starting a local cluster: 2 shards x 2 streaming replicas ...")
        cluster = LocalCluster(shards=2, replicas=2, base_dir=base_dir)
        owned = True
    try:
        with sigterm_as_interrupt():
            if owned:
                cluster.start()
                console.print(f"Cluster up in {cluster.startup_seconds or 0:.1f}s "
                              f"(PostgreSQL {cluster.pg_version}) in {cluster.base_dir}; "
                              f"loading {users} users ...")
            report = _run(console, cluster, state.config, duration, users, rate, metrics_port)
    finally:
        if owned:
            cluster.stop()
            console.print("Sandbox stopped.")
    emit(console, summary(report))
    ctx.exit(EXIT_OK if report.violations == 0 else EXIT_CHECK_FAILED)


def _run(console: Console, cluster: LocalCluster, config: str | None, duration: float,
         users: int, rate: float, metrics_port: int | None) -> DemoReport:
    if metrics_port is not None:
        console.print(f"Metrics: http://127.0.0.1:{metrics_port}/metrics")
    if not console.is_terminal:
        return run_demo(cluster, config=config, duration=duration, users=users, rate=rate,
                        show=_progress_printer(console), metrics_port=metrics_port)
    with Live(console=console, auto_refresh=False, transient=True) as display:

        def show(report: DemoReport) -> None:
            display.update(live_view(report), refresh=True)

        return run_demo(cluster, config=config, duration=duration, users=users, rate=rate,
                        show=show, metrics_port=metrics_port)
