"""``propstore demo``: start a sandbox, run :func:`~propstore.cli._demo.run_demo`, draw it.

A sandbox the demo starts is stopped however the demo ends: at the end of the run, on an
error, on Ctrl-C, SIGTERM or SIGHUP (a closed terminal); see :mod:`propstore.cli._signals`.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

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
from propstore.cli._signals import signals_as_interrupt

if TYPE_CHECKING:
    from rich.console import Console

    from propstore.cli._demo import DemoReport
    from propstore.sandbox import LocalCluster


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
@click.option("--json", "as_json", is_flag=True,
              help="Print the final summary as one JSON document on stdout (progress goes "
                   "to stderr).")
@click.option("--wide", is_flag=True, help=WIDE_HELP)
@pass_state
@click.pass_context
def demo_command(ctx: click.Context, state: CliState, duration: float, users: int,
                 base_dir: Path | None, rate: float, metrics_port: int | None, as_json: bool,
                 wide: bool) -> None:
    """Show the whole idea in about a minute, on a local cluster.

    Starts a sandbox (2 shards x 2 replicas; or uses the running one that --config or
    PROPSTORE_CONFIG names), migrates it, loads users and runs three threads: a
    personalisation reader (5 s budget), a workflow reader (500 ms) and a writer that reads
    each write back with its token. From 1/4 to 3/4 of the run, replay is paused on one
    shard's replicas. The live view shows the lag table and, per reader, reads served by
    replica vs primary, fallback reasons, p50/p99 latency and budget violations, which
    must stay 0. At the end it prints the last lag table and the per-reader summary (piped:
    a progress line every 2 s, then the same summary as plain text).

    A sandbox the demo started is stopped at the end, on an error, and on Ctrl-C, SIGTERM
    or SIGHUP (the terminal closed).

    Exit status 0 when there was no violation, 1 when there was one, 130 when interrupted.
    """
    # Here, not at the top: `demo --help` must not load the sandbox and the store.
    from rich.console import Console

    from propstore.cli._demo_view import demo_document, summary
    from propstore.sandbox import LocalCluster, SandboxError

    if state.config and base_dir is not None:
        raise click.UsageError("--dir is for a cluster the demo starts; --config names a "
                               "running one")
    # With --json stdout carries only the document; what people read goes to stderr.
    console = Console(stderr=True, highlight=False) if as_json else output_console(wide)
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
        _say(console, f"Using the running sandbox in {cluster.base_dir}")
    else:
        _say(console, "Starting a local cluster: 2 shards x 2 streaming replicas ...")
        cluster = LocalCluster(shards=2, replicas=2, base_dir=base_dir)
        owned = True
    # The whole run and its clean-up inside: a second signal must not cut cluster.stop().
    with signals_as_interrupt():
        try:
            if owned:
                cluster.start()
                _say(console, f"Cluster up in {cluster.startup_seconds or 0:.1f}s "
                              f"(PostgreSQL {cluster.pg_version}) in {cluster.base_dir}; "
                              f"loading {users} users ...")
            report = _run(console, cluster, state.config, duration, users, rate, metrics_port,
                          live=not as_json, wide=wide)
        except KeyboardInterrupt as exc:
            if owned:
                _say(console, f"Interrupted ({exc or 'Ctrl-C'}): stopping the sandbox ...")
            raise
        finally:
            if owned:
                cluster.stop()
                _say(console, "Sandbox stopped.")
    if as_json:
        click.echo(json.dumps(demo_document(report), indent=2))
    else:
        emit(console, summary(report, wide=wide))
    ctx.exit(EXIT_OK if report.violations == 0 else EXIT_CHECK_FAILED)


def _say(console: Console, text: str) -> None:
    """Print a progress line where the output still goes somewhere (after SIGHUP it is
    /dev/null, and a terminal that is going away may refuse the write)."""
    with contextlib.suppress(OSError):
        console.print(text)


def _run(console: Console, cluster: LocalCluster, config: str | None, duration: float,
         users: int, rate: float, metrics_port: int | None, *, live: bool, wide: bool
         ) -> DemoReport:
    from rich.live import Live

    from propstore.cli._demo import run_demo
    from propstore.cli._demo_view import live_view, progress_printer

    if metrics_port is not None:
        _say(console, f"Metrics: http://127.0.0.1:{metrics_port}/metrics")
    if not (live and console.is_terminal):
        return run_demo(cluster, config=config, duration=duration, users=users, rate=rate,
                        show=progress_printer(console), metrics_port=metrics_port)
    with Live(console=console, auto_refresh=False, transient=True) as display:

        def show(report: DemoReport) -> None:
            display.update(live_view(report, wide=wide), refresh=True)

        return run_demo(cluster, config=config, duration=duration, users=users, rate=rate,
                        show=show, metrics_port=metrics_port)
