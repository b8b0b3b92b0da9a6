"""A restart-context setting rolled over the primaries in place (issue 13), under readers.

``propstore config apply`` (the library's ``ConfigRollout``, with the sandbox's node
controller: ``CHECKPOINT``, ``pg_ctl stop -m fast``, start) restarts ``max_connections`` on
the replicas once, then on every primary ``ROUNDS`` times, then puts every node back, while
readers with budgets 0.1, 0.5, 1 and 5 s (the default ``refuse()`` policy) and a writer whose
writes are read back with their tokens run on shard 0's users. Every read is checked against
the acknowledgement times of the writes (:class:`AckLog`). Last, a lag-raising reload-context
change (``recovery_min_apply_delay`` beyond ``--max-lag``) on shard 0's replicas is reverted
by the tool, ``REVERTS`` times.

The bars are the issue's: 0 read errors, 0 write errors and 0 budget violations while the
primaries restart. Reported: each primary's unavailability, the longest read and write, the
reads a retry served, the revert time.
"""

from __future__ import annotations

import itertools
import time
from typing import Literal

import psycopg
from propstore import PropertyStore, PropStoreError
from propstore.migrate import ConfigChange, ConfigRollout, plan_config_change
from propstore.sandbox import LocalNodeController

from _bench.env import BenchEnv, pin_cluster
from _bench.options import Options
from _bench.results import Bar, ScenarioResult, reported
from _bench.scenarios._common import picker
from _bench.workload import (
    BUDGET_OLDER,
    BUDGET_PAST,
    BUDGET_READS,
    BY_PRIMARY,
    ERRORS,
    RYW_MISSED,
    RYW_READS,
    AckLog,
    Tally,
    Workers,
)

BUDGETS = (0.1, 0.5, 1.0, 5.0)
ROUNDS = 3
REVERTS = 2
READERS = 4
USERS = 40
MAX_LAG = 1.0
BAKE = 0.5
READ = "read during the primary restarts"
WRITE = "write during the primary restarts"


def primary_restart(env: BenchEnv, options: Options) -> ScenarioResult:
    """Primaries restarted in place by a rolled-out ``max_connections`` under readers."""
    result = ScenarioResult(
        "primary-restart",
        f"max_connections rolled over every primary in place {ROUNDS} times (config apply, "
        f"bake {BAKE:g} s) under {READERS} readers (budgets 0.1-5 s, refuse()) and a writer "
        "with token reads on shard 0; then a lag-raising change reverted by the tool")
    env.local_node(env.topology.shards[0].primary.name)  # Skip without a local sandbox
    cluster = env.cluster
    assert cluster is not None
    controller = LocalNodeController(cluster)
    topology = env.topology
    primaries = {shard.primary.name for shard in topology.shards}
    base = int(_setting(env.primary_dsn(0), "max_connections"))
    store = env.open_store()
    tally = Tally()
    downs: list[float] = []
    began = time.monotonic()

    def roll(value: int, role: Literal["all", "primaries", "replicas"]) -> None:
        change = ConfigChange({"max_connections": str(value)}, role=role)
        plan = plan_config_change(topology, change, can_restart=True)
        report = ConfigRollout(topology, plan, controller, max_lag=2.0, bake=BAKE).run()
        if not report.complete:
            raise RuntimeError(f"rollout of max_connections={value} stopped: {report}")
        if role == "primaries":
            downs.extend(r.unavailable for r in report.results
                         if r.node in primaries and r.unavailable is not None)

    try:
        # The standbys first, above every value the primaries take (the hot-standby rule).
        roll(base + 10 * (ROUNDS + 1), "replicas")
        retried_before = sum(store.stats.retried.values())
        workers = _start(env, store, tally)
        time.sleep(options.warmup)
        try:
            for value in range(base + 10, base + 10 * (ROUNDS + 1), 10):
                roll(value, "primaries")
        finally:
            workers.stop()
        retried = sum(store.stats.retried.values()) - retried_before
        roll(base, "all")  # every node back as it was (primaries lowered first)
        reverts = _reverts(env)
    finally:
        store.close()
        if options.pin:
            pin_cluster(cluster)  # restarted servers are new processes: pin them again
    result.duration = time.monotonic() - began
    result.add_series(*tally.series.values())
    reads = tally.series.get(READ)
    writes = tally.series.get(WRITE)
    read_errors = tally.counts["read errors"]
    write_errors = tally.counts["write errors"]
    total_reads = tally.counts[BUDGET_READS] + tally.counts[RYW_READS]
    result.bars += [
        Bar("read errors while the primaries restart", read_errors, 0, unit="",
            text=f"{read_errors} of {total_reads:,}", budget="0.1-5 s and token reads"),
        Bar("write errors while the primaries restart", write_errors, 0, unit="",
            text=f"{write_errors} of {tally.counts['writes']:,}"),
        Bar("budget violations while the primaries restart", tally.violations, 0, unit="",
            text=f"{tally.violations} of {total_reads:,}", budget="each read's own"),
        reported("primary unavailable per restart", max(downs, default=float("nan")),
                 unit="s", text=_span(downs), detail=f"{len(downs)} restarts"),
        reported("longest read during the primary restarts",
                 max(reads.values) * 1000 if reads else float("nan"), unit="ms",
                 budget="0.1-5 s and token reads"),
        reported("longest write during the primary restarts",
                 max(writes.values) * 1000 if writes else float("nan"), unit="ms"),
        reported("revert of a lag-raising reload-context change",
                 max(reverts, default=float("nan")), unit="s", text=_span(reverts),
                 detail=f"{len(reverts)} reverts"),
    ]
    result.facts.update(tally.facts())
    result.facts["reads served by a retry"] = retried
    result.facts["primary unavailable (s)"] = [round(d, 3) for d in downs]
    result.facts["revert (s)"] = [round(r, 3) for r in reverts]
    result.notes += tally.examples
    return result


def _start(env: BenchEnv, store: PropertyStore, tally: Tally) -> Workers:
    tenant = env.tenant
    users = env.shard_users(0, USERS)
    log = AckLog(users)
    seqs = dict.fromkeys(users, 0)
    pick_w, pick_r = picker(users, 61), picker(users, 62)
    budgets = itertools.cycle(BUDGETS)
    workers = Workers()

    def writer() -> None:
        user = pick_w()
        seqs[user] += 1
        t0 = time.monotonic()
        try:
            token = store.set(tenant, user, {"seq": seqs[user]})
        except PropStoreError as exc:
            tally.count("write errors", ERRORS, example=f"write: {exc}")
            return
        acked = time.monotonic()
        log.acked(user, acked, seqs[user])
        tally.count("writes")
        tally.sample(WRITE, acked - t0, t0 - workers.zero)
        t0 = time.monotonic()
        try:
            result = store.read(tenant, user, after=token)
        except PropStoreError as exc:
            tally.count("read errors", ERRORS, example=f"token read: {exc}")
            return
        tally.sample(READ, time.monotonic() - t0, t0 - workers.zero)
        missed = ((result.props or {}).get("seq", 0) or 0) < seqs[user]
        tally.count(RYW_READS, *([RYW_MISSED] if missed else []),
                    example=f"missed own write: {result}" if missed else None)

    def reader() -> None:
        user, budget = pick_r(), next(budgets)
        t0 = time.monotonic()
        try:
            result = store.read(tenant, user, max_staleness=budget)
        except PropStoreError as exc:
            tally.count("read errors", ERRORS, example=f"read ({budget:g} s): {exc}")
            return
        tally.sample(READ, time.monotonic() - t0, t0 - workers.zero)
        seq = (result.props or {}).get("seq", 0) or 0
        past = result.staleness_bound > budget or seq < log.floor(user, t0 - budget)
        tally.count(BUDGET_READS, *([BY_PRIMARY] if not result.from_replica else []),
                    *([BUDGET_OLDER] if seq < log.floor(user, t0) else []),
                    *([BUDGET_PAST] if past else []),
                    example=f"older than its budget {budget:g} s: {result}" if past else None)

    workers.spawn("restart-writer", writer, tally)
    for index in range(READERS):
        workers.spawn(f"restart-reader-{index}", reader, tally)
    return workers


def _reverts(env: BenchEnv) -> list[float]:
    """Revert times (s) of ``recovery_min_apply_delay`` beyond ``MAX_LAG`` on shard 0's
    replicas, each under a writer on shard 0's primary (lag grows only while it writes)."""
    topology = env.topology
    shard = topology.shards[0].name
    change = ConfigChange({"recovery_min_apply_delay": f"{3 * MAX_LAG:g}s"}, role="replicas",
                          shards=(shard,))
    seconds: list[float] = []
    for _ in range(REVERTS):
        with psycopg.connect(env.primary_dsn(0), autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS bench_ticks (at timestamptz)")
            workers = Workers()
            workers.spawn("revert-ticker", lambda: _tick(conn), Tally())
            try:
                report = ConfigRollout(topology, plan_config_change(topology, change),
                                       max_lag=MAX_LAG, bake=5.0).run()
            finally:
                workers.stop()
            conn.execute("DROP TABLE bench_ticks")
        if not report.reverted or report.revert_seconds is None:
            raise RuntimeError(f"the lag-raising change was not reverted: {report}")
        seconds.append(report.revert_seconds)
        env.reset()
    return seconds


def _tick(conn: psycopg.Connection[object]) -> None:
    conn.execute("INSERT INTO bench_ticks VALUES (now())")
    time.sleep(0.02)


def _setting(dsn: str, name: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT setting FROM pg_settings WHERE name = %s", (name,)).fetchone()
    assert row is not None
    return str(row[0])


def _span(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{min(values):.2f}-{max(values):.2f} s"


__all__ = ["primary_restart"]
