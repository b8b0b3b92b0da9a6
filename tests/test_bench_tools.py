"""The benchmark harness's pure parts: the contenders' rotation, the results file, and the
generated README tables (no servers: tools/ is imported as the bench runs it)."""

from __future__ import annotations

import importlib
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))

import readme_tables  # noqa: E402
from _bench import document, probe, render  # noqa: E402
from _bench.results import Bar, ScenarioResult, reported  # noqa: E402
from _bench.timing import Rotation, due  # noqa: E402

Positions = dict[tuple[int, ...], Counter[tuple[int, int]]]


def _positions(everys: list[int], iterations: int) -> Positions:
    """For each distinct set of due contenders: how often (contender, position) occurred."""
    rotation = Rotation()
    seen: Positions = {}
    for iteration in range(iterations):
        active = due(everys, iteration)
        order = rotation.order(active)
        assert sorted(order) == active  # each due contender exactly once
        counts = seen.setdefault(tuple(active), Counter())
        for position, index in enumerate(order):
            counts[(index, position)] += 1
    return seen


@pytest.mark.parametrize("everys", [[1, 1], [1, 1, 1], [1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 2, 2],
                                    [1, 3], [1, 1, 1, 1, 1, 7, 7]])
@pytest.mark.parametrize("iterations", [1, 2, 3, 7, 10, 11, 101])
def test_every_contender_takes_every_position(everys: list[int], iterations: int) -> None:
    for active, counts in _positions(everys, iterations).items():
        runs = sum(counts.values()) // len(active)  # iterations this set was due
        for index in active:
            taken = [counts[(index, position)] for position in range(len(active))]
            # Balanced to within one: exact when the set ran a multiple of its size.
            assert max(taken) - min(taken) <= 1, (active, index, taken)
            if runs >= len(active):
                assert min(taken) >= 1, (active, index, taken)


def test_odd_iterations_rotate_too() -> None:
    """The old shared counter gave the two-contender set shift 1 on every odd iteration."""
    counts = _positions([1, 1, 2, 2, 2], 40)[(0, 1)]
    assert counts[(0, 0)] == counts[(1, 0)] == 10


def _result(name: str, value: float) -> dict[str, object]:
    result = ScenarioResult(name, f"{name} described")
    result.bars += [Bar(f"{name} ratio", value, 1.25, budget="1 s", text=f"{value:.2f}x"),
                    reported(f"{name} extra", 3.0, budget="none", readme=False)]
    return result.as_dict()


def test_merge_replaces_by_name_keeps_others_and_drops_unused_runs() -> None:
    doc = document.merge(document.empty(), "r1", {"command": "a"},
                         [_result("b", 1.0), _result("a", 1.0)], order=["a", "b"])
    assert [s["name"] for s in doc["scenarios"]] == ["a", "b"]
    doc = document.merge(doc, "r2", {"command": "b"}, [_result("b", 2.0)], order=["a", "b"])
    assert [(s["name"], s["run"]) for s in doc["scenarios"]] == [("a", "r1"), ("b", "r2")]
    assert set(doc["runs"]) == {"r1", "r2"}
    doc = document.merge(doc, "r3", {"command": "c"}, [_result("a", 1.0)], order=["a", "b"])
    assert set(doc["runs"]) == {"r2", "r3"}
    assert json.loads(document.dump(doc)) == doc


def test_readme_table_comes_from_the_file_and_counts_misses() -> None:
    doc = document.merge(document.empty(), "r1", {"command": "python tools/bench.py",
                                                 "commit": "abc1234"},
                         [_result("a", 1.5), _result("b", 1.0)], order=["a", "b"])
    table = render.readme_benchmarks(doc)
    assert "| a | a ratio | 1 s | <= 1.25x | 1.50x | **missed** |" in table
    assert "| b | b ratio | 1 s | <= 1.25x | 1.00x | met |" in table
    assert "extra" not in table  # readme=False stays in RESULTS.md only
    assert "Bars missed in these runs: 1 (a: a ratio)" in table
    assert "`python tools/bench.py` at propstore `abc1234`" in table
    assert "a extra" in render.results_markdown(doc)


def test_check_fails_on_a_stale_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "RESULTS.json"
    document.save(results, document.merge(document.empty(), "r1", {"command": "x"},
                                          [_result("a", 1.0)]))
    readme = tmp_path / "README.md"
    readme.write_text("# t\n\n<!-- BEGIN GENERATED: benchmarks -->\nold\n"
                      "<!-- END GENERATED: benchmarks -->\n")
    monkeypatch.setattr(readme_tables, "README", readme)
    monkeypatch.setattr(readme_tables, "ROOT", tmp_path)
    monkeypatch.setattr(readme_tables, "RESULTS_JSON", results)
    monkeypatch.setattr(readme_tables, "FILES", {tmp_path / "RESULTS.md":
                                                 readme_tables.results_page})
    # Only the sections this test knows (the other tables have sources of their own).
    monkeypatch.setattr(readme_tables, "SECTIONS", {"benchmarks": readme_tables.benchmarks})
    assert readme_tables.main(["--check"]) == 1
    assert "old" in capsys.readouterr().out
    assert readme_tables.main([]) == 0
    assert readme_tables.main(["--check"]) == 0
    assert "| a | a ratio | 1 s |" in readme.read_text()
    # A figure changed in the results file makes the committed table stale again.
    document.save(results, document.merge(document.load(results), "r2", {"command": "y"},
                                          [_result("a", 1.1)]))
    assert readme_tables.main(["--check"]) == 1


def test_committed_tables_are_current() -> None:
    """What CI's `python tools/readme_tables.py --check` checks, as a test."""
    stale = [str(path) for path, (have, want) in readme_tables.targets().items()
             if have != want]
    assert not stale, f"stale generated files (run `python tools/readme_tables.py`): {stale}"


def _phase(mode: str, count: int, qps: float, conns: int, p99: float = 0.004) -> Any:
    fleet = importlib.import_module("_bench.scenarios.fleet")
    return fleet.Phase(
        mode=mode, count=count, idle_seconds=4, read_seconds=4, idle_monitor_qps=qps,
        monitor_qps=qps, monitor_qps_mean=qps, monitor_connections=1,
        client_connections=conns, server_monitor_cpu=1.0, client_cpu_idle=1.0,
        proxy_cpu=None, reads=100 * count, replica_reads=100 * count, errors=0, p50=0.002,
        p99=p99, first_error="", top=[])


def test_fleet_counts_monitoring_statements_apart_from_reads_and_its_own() -> None:
    from _bench.scenarios._fleet_servers import (
        PGPOOL_READ,
        ServerSnapshot,
        is_reader,
        monitoring_calls,
    )

    from propstore import _sql

    poll, get = _sql.STATEMENTS[_sql.POLL], _sql.STATEMENTS[_sql.GET]
    lsn, probe = _sql.STATEMENTS[_sql.REPLAY_LSN], "SELECT query FROM pg_stat_statements"
    before = ServerSnapshot({1: (poll, 10), 2: (get, 5), 3: (probe, 3), 7: ("SELECT 7", 50)},
                            {}, 0, 0)
    after = ServerSnapshot({1: ("", 30), 2: (get, 500), 4: (lsn, 400), 5: (PGPOOL_READ, 90),
                            3: (probe, 9), 6: ("SELECT pg_is_in_recovery()", 2),
                            7: ("SELECT 7", 4)}, {}, 0, 0)
    # The polls (text unreadable at the second look), a Pgpool-style check, and an entry
    # evicted and made anew (4 new calls, not -46); never the reads or the probe's own.
    assert monitoring_calls(before, after) == 20 + 2 + 4
    assert is_reader("propstore:shard0-replica1") and is_reader("fleet-reader")
    assert not is_reader("propstore-monitor") and not is_reader("")


def test_fleet_bars_judge_the_shared_design_at_64_against_1_process() -> None:
    fleet = importlib.import_module("_bench.scenarios.fleet")
    result = ScenarioResult("fleet", "test")
    fleet._bars(result, [_phase("host", 1, 10.0, 2), _phase("host", 64, 19.0, 66),
                         _phase("off", 1, 10.0, 2), _phase("off", 64, 640.0, 128)])
    verdicts = {b.name: b.verdict for b in result.bars}
    assert verdicts["fleet (host): N=64 vs N=1, monitoring statements/s per server"] == "met"
    assert verdicts["fleet (host): N=64 vs N=1, client connections per server"] == "met"
    assert verdicts["fleet (off): N=64 vs N=1, monitoring statements/s per server"] == (
        "reported")  # today's design is shown beside, not judged
    worse = ScenarioResult("fleet", "test")
    fleet._bars(worse, [_phase("host", 1, 10.0, 2), _phase("host", 64, 21.0, 69, p99=0.009)])
    missed = {b.name for b in worse.bars if b.verdict == "MISSED"}
    assert missed == {"fleet (host): N=64 vs N=1, monitoring statements/s per server",
                      "fleet (host): N=64 vs N=1, client connections per server",
                      "fleet (host): N=64 vs N=1, read latency p99"}


def test_fleet_latency_bars_allow_what_sampling_moves_one_process_by_and_no_more() -> None:
    fleet = importlib.import_module("_bench.scenarios.fleet")
    one = _phase("host", 1, 10.0, 2)
    one.intervals = {"p50": (0.0019, 0.0021), "p99": (0.0036, 0.0045)}

    def p99_verdict(p99: float) -> str:
        result = ScenarioResult("fleet", "test")
        fleet._bars(result, [one, _phase("host", 64, 10.0, 66, p99=p99)])
        (bar,) = [b for b in result.bars if b.name.endswith("host): N=64 vs N=1, read latency p99")]
        return bar.verdict

    assert p99_verdict(0.0044) == "met"  # above N=1's 4 ms, within its interval
    assert p99_verdict(0.0046) == "MISSED"
    # An interval with no upper end (too few reads) falls back to N=1's own figure.
    one.intervals["p99"] = (0.0036, float("inf"))
    assert p99_verdict(0.0041) == "MISSED"


def test_fleet_quantile_intervals_cover_the_true_quantile_and_widen_with_few_samples() -> None:
    import random

    fleet = importlib.import_module("_bench.scenarios.fleet")
    rng = random.Random(7)
    covered = 0
    for _ in range(200):  # exponential samples: true p99 = ln(100)
        low, high = fleet.quantile_interval(sorted(rng.expovariate(1) for _ in range(500)),
                                            0.99)
        covered += low <= 4.60517 <= high
    assert covered >= 180  # a 95 % interval: about 190 of 200
    assert fleet.quantile_interval(sorted(rng.random() for _ in range(30)), 0.99)[1] == (
        float("inf"))


def test_fleet_reports_keep_the_reads_of_the_window_only() -> None:
    """Latency and replica share count the reads that began inside the reading window, not
    the first ones after the start signal (every process woken in the same instant)."""
    clients = importlib.import_module("_bench.scenarios._fleet_clients")
    report = clients.ClientReport(1, [0.009, 0.001, 0.002, 0.003], 3, 0, "", {"x": 1},
                                  [9.5, 10.0, 10.5, 12.5], [True, False, True, True])
    kept = report.within(10.0, 12.0)
    assert kept.latencies == [0.001, 0.002] and kept.starts == [10.0, 10.5]
    assert kept.replica_reads == 1 and kept.on_replica == [False, True]
    assert kept.fallbacks == {"x": 1}  # the reasons stay those of every read


def test_the_probes_tail_says_where_its_slowest_reads_waited() -> None:
    # 100 reads: 99 of 1 ms, one of 10 ms of which 8 ms its backend waited for the
    # primary's CPU and 1 ms the probe for its own.
    latencies = [0.001] * 99 + [0.010]
    primary, own = [0.0] * 99 + [0.008], [0.0] * 99 + [0.001]
    assert probe.tail(latencies, primary, own) == (
        "1 reads of >= 10.0 ms, 10.0 ms on average, of which 8.0 ms their backend waited "
        "for the primary's CPU and 1.0 ms the probe waited for its own")
    assert probe.tail(latencies, primary, own, times=[i / 50 for i in range(100)]).startswith(
        "1 reads of >= 10.0 ms at 2.0 s into the run, 10.0 ms on average")
    assert probe.tail(latencies, [], []).endswith("(where their time went: not counted here)")
    assert probe.tail([], [], []) == "no reads"
