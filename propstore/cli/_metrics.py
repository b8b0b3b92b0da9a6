"""``propstore metrics``: a Prometheus endpoint for the monitor's view of every node."""

from __future__ import annotations

import threading

import click

from propstore.cli._context import CliState, pass_state
from propstore.cli._signals import signals_as_interrupt


@click.command("metrics")
@click.option("--port", type=click.IntRange(0, 65535), default=9187, show_default=True,
              help="TCP port (0: any free port, printed at start).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0 for every interface).")
@pass_state
def metrics_command(state: CliState, port: int, host: str) -> None:
    """Serve Prometheus metrics at http://HOST:PORT/metrics until Ctrl-C.

    Per node: up, observed primary, state, replay LSN, bytes behind, proven staleness bound,
    received-but-not-replayed WAL, eligibility per profile. Read counters and latency
    histograms count reads made by a store in the same process, so here they stay empty;
    a service embedding propstore exports them with propstore.metrics.StoreMetrics. Metric
    names: docs/operating.md. State changes are logged to stderr.
    """
    from propstore.metrics import StoreMetrics  # not for `metrics --help`

    state.show_events()
    with state.open_store(settle=False) as store:
        server = StoreMetrics(store).serve(port, host)
        click.echo(f"serving {server.url} (Ctrl-C to stop)")
        try:
            with signals_as_interrupt():
                threading.Event().wait()
        except KeyboardInterrupt:
            pass
        finally:
            server.close()
