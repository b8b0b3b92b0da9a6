"""``propstore demo``: it runs to the end, stops what it started, and no read breaks its budget."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner

from propstore.cli import main
from propstore.cli._demo import DemoReport, LatencyHistogram, run_demo
from propstore.sandbox import LocalCluster


def test_demo_run_reports_no_violation_and_primary_fallbacks_while_paused(
    cluster: LocalCluster, migrated_cluster: LocalCluster
) -> None:
    snapshots: list[DemoReport] = []
    report = run_demo(cluster, duration=6, users=500, show=snapshots.append, refresh=0.5)
    assert report.violations == 0, [r.examples for r in report.readers]
    assert report.errors == 0, [r.examples for r in report.readers]
    assert report.paused_shard == "shard0" and len(report.paused_nodes) == 2
    assert [e.text.split()[1] for e in report.events[1:]] == ["paused", "resumed"]
    workflow = report.reader("workflow")
    personalisation = report.reader("personalisation")
    # 500 ms budget, replay paused for 3 s: shard0's workflow reads must have gone to its
    # primary for a while; the 5 s personalisation budget is never exceeded in 3 s.
    assert workflow.fallbacks_by_shard["shard0"] > 0
    assert workflow.reasons["replica_stale"] > 0
    assert personalisation.reasons["replica_stale"] == 0 and personalisation.replica_reads > 0
    assert report.reader("writer (read-your-writes)").reads == report.writes > 0
    assert workflow.p50 is not None and workflow.p99 is not None
    assert workflow.p50 <= workflow.p99 < 2.0
    assert len(snapshots) >= 6 and snapshots[-1] is report
    for replica in cluster.shards[0].replicas:
        assert not replica.is_replay_paused()


def test_demo_command_for_10_seconds_completes_and_stops_its_sandbox() -> None:
    result = CliRunner().invoke(main, ["demo", "--duration", "10", "--users", "1000"],
                                env={"PROPSTORE_CONFIG": None})
    assert result.exit_code == 0, result.output
    assert "Budget violations: 0" in result.stdout
    assert "replay paused on shard0-replica1, shard0-replica2" in result.stdout
    assert "Sandbox stopped." in result.stdout
    # Piped, the summary still shows the last lag table, every node in it.
    final = result.stdout[result.stdout.index("Lag at the end:"):]
    assert all(f"shard{s}-{n}" in final for s in (0, 1) for n in ("primary", "replica1"))
    (started,) = re.findall(r"\) in (\S+); loading", result.stdout)
    assert not Path(started).exists()  # its temporary folder is gone with the servers


def test_latency_quantiles_are_within_a_bucket_of_the_truth() -> None:
    histogram = LatencyHistogram()
    for i in range(1, 1001):
        histogram.add(i / 1000)  # 1 ms .. 1 s
    p50, p99 = histogram.quantile(0.5), histogram.quantile(0.99)
    assert p50 is not None and p99 is not None
    assert 0.5 <= p50 <= 0.5 * 1.1 and 0.99 <= p99 <= 0.99 * 1.1
    assert LatencyHistogram().quantile(0.5) is None
