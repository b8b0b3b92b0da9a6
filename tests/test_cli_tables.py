"""The CLI's tables fit the terminal: at 80 columns the columns an operator needs are whole,
the rest are dropped by priority and named; wider terminals get more; ``--wide`` all."""

from __future__ import annotations

import io
import math
import re

import pytest
from click.testing import CliRunner
from rich.console import Console
from rich.console import RenderableType as Renderable

from propstore import PropertyStore, Topology
from propstore.cli import main
from propstore.cli._context import wait_settled
from propstore.cli._demo_stats import DemoEvent, DemoReport, ReaderStats
from propstore.cli._demo_view import stats_table, summary
from propstore.cli._lag import LagLine, current_report, lag_columns, lag_table
from propstore.cli._shards import topology_table
from propstore.cli._table import Column, FittedTable
from propstore.lsn import LSN
from propstore.monitor import LagReport, LagRow
from propstore.sandbox import LocalCluster
from tests.test_cli import own_cli_monitor, pause_shard0_and_write  # noqa: F401 - fixture

ESSENTIAL = ["shard", "node", "role", "state", "staleness", "personalisation (5.00s)",
             "workflow (500.0ms)"]


def render(renderable: Renderable, width: int) -> list[str]:
    """What a terminal of ``width`` columns shows, line by line (no colour)."""
    console = Console(width=width, color_system=None, record=True, file=io.StringIO())
    console.print(renderable)
    return [line.rstrip() for line in console.export_text().splitlines()]


def _row(shard: str, node: str, role: str, state: str = "up", bound: float = 0.0113,
         port: int = 40000) -> LagRow:
    primary = role == "primary"
    return LagRow(
        shard=shard, node=node, address=f"127.0.0.1:{port}", configured_role=role,  # type: ignore[arg-type]
        role=role, state=state, state_seconds=5.04, lsn=LSN(0xEF6A00),  # type: ignore[arg-type]
        receive_lsn=None if primary else LSN(0xEF6A00), bytes_behind=0 if primary else 216,
        staleness_bound=0.0 if primary else bound,
        receive_replay_gap=None if primary else 216,
        eligible={} if primary else {"personalisation": bound <= 5, "workflow": bound <= 0.5},
        serves_replica_reads=not primary, last_error=None,
    )


def paused_report() -> LagReport:
    """Two shards of a primary and two replicas; shard0's replicas are paused, one with an
    unprovable bound, the other 3.07 s stale; shard1 is healthy."""
    rows = (
        _row("shard0", "shard0-primary", "primary", port=52599),
        _row("shard0", "shard0-replica1", "replica", "paused", math.inf, 47159),
        _row("shard0", "shard0-replica2", "replica", "paused", 3.07, 45267),
        _row("shard1", "shard1-primary", "primary", port=56001),
        _row("shard1", "shard1-replica1", "replica", port=37169),
        _row("shard1", "shard1-replica2", "replica", port=46699),
    )
    return LagReport(at=1.0, rows=rows, profiles={"personalisation": 5.0, "workflow": 0.5})


def line_of(lines: list[str], node: str) -> list[str]:
    (line,) = [ln for ln in lines if re.search(rf"(^|\s){re.escape(node)}(\s|$)", ln)]
    return re.split(r"\s{2,}", line.strip())


def test_lag_table_at_80_columns_keeps_every_essential_column_whole() -> None:
    table = lag_table(paused_report(), state_time=True)
    assert table.visible(80)[:len(ESSENTIAL)] == ESSENTIAL
    lines = render(table, 80)
    assert all(len(line) <= 80 for line in lines), lines
    assert not any("…" in line for line in lines), lines
    assert line_of(lines, "shard0-replica1")[:4] == ["shard0-replica1", "replica", "paused",
                                                     "unproven"]
    assert line_of(lines, "shard0-replica2")[:4] == ["shard0-replica2", "replica", "paused",
                                                     "3.07s"]
    assert line_of(lines, "shard0-primary")[0] == "shard0"
    assert "hidden: address, for, lsn, behind, recv-replay, proofs (--wide shows them)" in lines


def test_lag_table_at_120_columns_adds_lsn_behind_and_state_time() -> None:
    table = lag_table(paused_report(), state_time=True)
    shown = table.visible(120)
    assert {"for", "lsn", "behind"} <= set(shown) and "address" not in shown
    lines = render(table, 120)
    assert all(len(line) <= 120 for line in lines) and not any("…" in ln for ln in lines)
    cells = line_of(lines, "shard0-replica2")
    assert cells[2:7] == ["paused", "5.04s", "0/EF6A00", "216 B", "3.07s"]


def test_lag_table_at_200_columns_shows_every_column_as_wide_does() -> None:
    table = lag_table(paused_report(), state_time=True)
    every = [column.heading for column in table.columns]
    assert table.visible(200) == every
    lines = render(table, 200)
    assert not any(line.startswith("hidden:") for line in lines)
    assert line_of(lines, "shard0-replica1")[:3] == ["shard0-replica1", "127.0.0.1:47159",
                                                     "replica"]
    assert lag_table(paused_report(), wide=True).visible(80) == [
        c.heading for c in lag_table(paused_report()).columns]


def test_a_declared_column_lands_by_its_priority() -> None:
    # What issue 11/12/13 columns do: one more Column, shown when the width allows.
    report = paused_report()
    extra: Column[LagLine] = Column("pooler", lambda line: "transaction", priority=6)
    columns = [*lag_columns(report.profiles), extra]
    wider = FittedTable(columns, [[LagLine(row, True, (5.0, 0.5)) for row in report.rows]])
    assert "pooler" not in wider.visible(80) and "pooler" in wider.visible(200)


def _reader(name: str, budget: str, reads: int, replica: int) -> ReaderStats:
    stats = ReaderStats(name, budget, reads=reads, replica_reads=replica)
    stats.reasons["replica_stale"] = reads - replica
    for i in range(100):
        stats.latency.add(0.0009 + i * 0.0001)
    return stats


def demo_report() -> DemoReport:
    readers = (_reader("personalisation", "5.00s", 21345, 21345),
               _reader("workflow", "500.0ms", 21012, 13456),
               _reader("writer (read-your-writes)", "after token", 10977, 10912))
    return DemoReport(elapsed=60.0, duration=60.0, users=5000, paused_shard="shard0",
                      paused_nodes=("shard0-replica1", "shard0-replica2"), readers=readers,
                      writes=10977, write_errors={},
                      events=(DemoEvent(0.0, "5000 users loaded"),), lag=paused_report())


@pytest.mark.parametrize("width", [80, 120, 200])
def test_demo_summary_shows_counts_latency_and_violations_whole(width: int) -> None:
    lines = render(stats_table(demo_report().readers), width)
    assert all(len(line) <= width for line in lines) and not any("…" in ln for ln in lines)
    header = re.split(r"\s+", lines[0].strip()) if width > 80 else []
    cells = line_of(lines, "workflow")
    assert cells[:3] == ["workflow", "500.0ms", "21012"]
    assert re.fullmatch(r"\d+(\.\d+)?(µs|ms)", cells[-3]) and cells[-1] == "0"  # p99, violations
    if width >= 120:
        assert "fallback" in header and "errors" in header
    whole = render(summary(demo_report()), width)
    assert any("Budget violations: 0" in line for line in whole)


def test_shards_table_at_80_columns_and_wide() -> None:
    topology = Topology.from_dict({
        "shards": [{"name": f"shard{i}", "buckets": [f"{i * 2048}-{i * 2048 + 2047}"],
                    "primary": f"host=127.0.0.1 port={54000 + i} dbname=propstore",
                    "replicas": [f"host=127.0.0.1 port={55000 + i} dbname=propstore"]}
                   for i in range(2)],
    })
    lines = render(topology_table(topology), 80)
    assert all(len(line) <= 80 for line in lines)
    assert line_of(lines, "shard0-primary")[:3] == ["shard0", "0-2047", "2048"]


def test_lag_at_80_columns_on_the_cluster_shows_the_paused_replicas(
    topology: Topology, cluster: LocalCluster, store: PropertyStore
) -> None:
    pause_shard0_and_write(cluster, store, topology)
    with PropertyStore(topology) as watcher:
        wait_settled(watcher)
        report = current_report(watcher)
    lines = render(lag_table(report), 80)
    assert all(len(line) <= 80 for line in lines), lines
    for replica in cluster.shards[0].replicas:
        assert line_of(lines, replica.name)[1:3] == ["replica", "paused"], lines
    for replica in cluster.shards[1].replicas:
        assert line_of(lines, replica.name)[1:3] == ["replica", "up"], lines
    piped = CliRunner().invoke(main, ["--config", topology.source, "lag"])
    assert "recv-replay" in piped.stdout and "hidden:" not in piped.stdout  # piped: all


@pytest.mark.usefixtures("own_cli_monitor")
def test_an_unprovable_bound_is_spelled_unproven_by_lag_and_route(
    topology: Topology, cluster: LocalCluster, store: PropertyStore
) -> None:
    from tests.conftest import users_on_shard

    pause_shard0_and_write(cluster, store, topology)
    (user,) = users_on_shard(topology, topology.shards[0].name, 1)
    lag = CliRunner().invoke(main, ["--config", topology.source, "lag"])
    route = CliRunner().invoke(main, ["--config", topology.source, "route", "acme", user,
                                      "--profile", "workflow"])
    assert lag.exit_code == 0 and route.exit_code == 0, (lag.output, route.output)
    paused = [line for line in route.stdout.splitlines() if "rejected  shard0-replica" in line]
    assert len(paused) == 2 and all(line.endswith("bound unproven") for line in paused), paused
    assert "unproven" in lag.stdout
    assert "∞" not in lag.stdout + route.stdout
