"""Degrading without an outage, against the real cluster (issue: degrade).

No refusal while the primary is healthy; under overload budgeted reads give way and token
and strong reads never do; ``Degrade.wait`` and ``Degrade.serve_stale`` answer with true
bounds; a refusal says what happened and is counted; the limiter's memory stays flat.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
import tracemalloc
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest

from propstore import (
    Degrade,
    PropertyStore,
    PropStoreError,
    ShardUnavailableError,
    StaleReadError,
    Topology,
)
from propstore.sandbox import LocalCluster
from tests._workload import Workload
from tests.conftest import users_on_shard
from tests.test_store import wait_for


def with_routing(topology: Topology, **changes: Any) -> Topology:
    return replace(topology, routing=replace(topology.routing, **changes))


def pause_all_replicas(cluster: LocalCluster) -> None:
    for replica in cluster.shards[0].replicas:
        replica.pause_replay()


class OwnWrites:
    """Read-your-writes users: each thread writes its own user and reads it back with the
    token at once; a read older than the write it follows is a violation."""

    def __init__(self, store: PropertyStore, users: list[str], *, strong: bool = False
                 ) -> None:
        self.store, self.strong = store, strong
        self.reads = self.violations = 0
        self.errors: Counter[str] = Counter()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(u,), daemon=True)
                         for u in users]

    def __enter__(self) -> OwnWrites:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
            assert not thread.is_alive()

    def _run(self, user: str) -> None:
        seq = 0
        while not self._stop.is_set():
            try:
                seq += 1
                token = self.store.replace("acme", user, {"seq": seq})
                for _ in range(3):
                    result = (self.store.read("acme", user, consistency="strong") if self.strong
                              else self.store.read("acme", user, after=token))
                    self.reads += 1
                    if (result.props or {}).get("seq") != seq:
                        self.violations += 1
            except PropStoreError as exc:
                self.errors[type(exc).__name__] += 1


def test_no_read_is_refused_while_the_primary_is_healthy_and_replicas_are_paused(
    cluster: LocalCluster, topology: Topology
) -> None:
    users = users_on_shard(topology, topology.shards[0].name, 24, prefix="surge")
    own = users_on_shard(topology, topology.shards[0].name, 2, prefix="ryw")
    with PropertyStore(topology) as store:  # default routing: adaptive limiter, no ceiling
        for user in users:
            store.replace("acme", user, {"seq": 0})
        cluster.wait_caught_up()
        with Workload(store, users, readers=4) as load, OwnWrites(store, own) as ryw:
            load.wait(0.5)
            pause_all_replicas(cluster)
            load.wait(3.0)
            for replica in cluster.shards[0].replicas:
                replica.resume_replay()
            load.wait(0.5)
            report = load.stop()
            ryw.stop()
        refusals = sum(store.stats.refusals.values())
    primary_reads = report.reads - report.replica_reads
    print(f"healthy primary, replicas paused: {report.reads} budgeted reads "
          f"({primary_reads} on the primary), {ryw.reads} token reads, {refusals} refusals",
          *report.examples[:1])
    assert report.reads > 0 and primary_reads > 0 and ryw.reads > 0
    assert report.error_count == 0 and refusals == 0, report.examples
    assert not ryw.errors and ryw.violations == 0
    assert report.violations == 0, report.examples


def test_overload_sheds_budgeted_reads_and_never_token_or_strong_reads(
    cluster: LocalCluster, topology: Topology
) -> None:
    # A low configured ceiling stands in for an overloaded primary.
    tight = with_routing(topology, primary_fallback_max_concurrency=2)
    users = users_on_shard(topology, topology.shards[0].name, 16, prefix="shed")
    own = users_on_shard(topology, topology.shards[0].name, 3, prefix="shedryw")
    strong = users_on_shard(topology, topology.shards[0].name, 1, prefix="shedstrong")
    with PropertyStore(tight) as store:
        for user in users:
            store.replace("acme", user, {"seq": 0})
        pause_all_replicas(cluster)
        store.replace("acme", users[0], {"seq": 1})
        wait_for(lambda: not store.route("acme", users[0], max_staleness=0.1).candidates)
        with Workload(store, users, readers=8, writers=1, budgets=(0.1,)) as load, \
                OwnWrites(store, own) as ryw, OwnWrites(store, strong, strong=True) as rs:
            load.wait(3.0)
            report = load.stop()
            ryw.stop()
            rs.stop()
        refusals = dict(store.stats.refusals)
    refused = report.errors["read:StaleReadError"]
    print(f"overload (ceiling 2 in flight): {report.reads} budgeted reads served, {refused} "
          f"refused; {ryw.reads} token and {rs.reads} strong reads, none refused")
    assert refused > 0 and report.reads > 0
    assert refusals == {("shard0", "max_staleness", "fallback_ceiling"): refused}
    assert ryw.reads > 0 and rs.reads > 0
    assert not ryw.errors and not rs.errors
    assert ryw.violations == 0 and rs.violations == 0 and report.violations == 0


def pause_behind_a_write(store: PropertyStore, cluster: LocalCluster, users: list[str]
                         ) -> None:
    """Write ``users``, let the replicas catch up, pause them, and write once more: from
    then on no replica proves a 0.1 s budget, and their reads fall back."""
    for user in users:
        store.replace("acme", user, {"seq": 0})
    cluster.wait_caught_up()
    pause_all_replicas(cluster)
    store.replace("acme", users[0], {"seq": 1})
    wait_for(lambda: not store.route("acme", users[0], max_staleness=0.1).candidates)


class TurnReaders:
    """Readers of one budget (0.1 s, replicas paused: their reads fall back) under degrade
    policies, counting where each read was served and timing the stale answers, and the
    most budgeted reads of ours on the primary at once (sampled every millisecond)."""

    def __init__(self, store: PropertyStore, users: list[str]) -> None:
        self.store, self.users = store, users
        self.served: Counter[str] = Counter()
        #: Seconds each stale answer took, from the call.
        self.stale: list[float] = []
        self.most_in_flight = self.most_queued = 0
        self._stop = threading.Event()

    def read(self, policy: str, user: str) -> None:
        began = time.monotonic()
        try:
            result = self.store.read("acme", user, max_staleness=0.1, degrade=policy)
        except StaleReadError:
            self.served[f"{policy}: refused"] += 1
        except PropStoreError as exc:
            self.served[f"{policy}: {type(exc).__name__}"] += 1
        else:
            took = time.monotonic() - began
            where = "primary" if not result.from_replica else (
                "stale" if not result.within_budget else "replica")
            self.served[f"{policy}: {where}"] += 1
            if where == "stale":
                self.stale.append(took)

    def sample(self, shard: str) -> None:
        while not self._stop.is_set():
            state = self.store.fallback_states()[shard]
            self.most_in_flight = max(self.most_in_flight, state.in_flight)
            self.most_queued = max(self.most_queued, state.queued)
            time.sleep(0.001)

    def run(self, seconds: float, readers: dict[str, int]) -> None:
        """``readers[policy]`` threads reading under each policy for ``seconds``, each its
        own user (in turn, from ``users``)."""
        def loop(policy: str, i: int) -> None:
            while not self._stop.is_set():
                self.read(policy, self.users[i % len(self.users)])

        placed = [(policy, i) for policy, count in readers.items() for i in range(count)]
        threads = [threading.Thread(target=self.sample, args=("shard0",), daemon=True)]
        threads += [threading.Thread(target=loop, args=(policy, n), daemon=True)
                    for n, (policy, _) in enumerate(placed)]
        for thread in threads:
            thread.start()
        self._stop.wait(seconds)
        self._stop.set()
        for thread in threads:
            thread.join(timeout=30)
            assert not thread.is_alive()


def test_reads_beyond_the_limit_queue_for_their_turn_and_a_waiting_reader_is_served_first(
    cluster: LocalCluster, topology: Topology
) -> None:
    # A ceiling of 2 reads in flight stands in for a primary whose limit binds; 8 readers
    # that would rather wait than get an error, 8 that would rather get a stale answer.
    tight = with_routing(topology, primary_fallback_max_concurrency=2)
    users = users_on_shard(topology, topology.shards[0].name, 16, prefix="turn")
    with PropertyStore(tight) as store:
        pause_behind_a_write(store, cluster, users)
        readers = TurnReaders(store, users)
        readers.run(2.0, {"wait(300ms)": 8, "serve_stale": 8})
        state = store.fallback_states()["shard0"]
    served = readers.served
    print(f"turns (2 in flight, 16 readers): {dict(served)}; at most "
          f"{readers.most_in_flight} in flight and {readers.most_queued} queued")
    # Every waiting reader was served by the primary, in its turn, within its wait: none
    # refused (before turns, each rechecked the primary's room at the monitor's next
    # observations and lost it to the reads arriving meanwhile).
    # (A replica that replayed a little more before its pause took hold proves the budget
    # again for a while once the primary's LSN stays put: those reads are true answers.)
    assert served["wait(300ms): primary"] > 100 and served["wait(300ms): refused"] == 0
    assert set(served) <= {f"{policy}: {where}" for policy in ("wait(300ms)", "serve_stale")
                           for where in ("primary", "replica", "stale")}
    assert served["serve_stale: primary"] + served["serve_stale: stale"] > 100
    # The ceiling held: turns are granted places, never more; and reads did queue.
    assert readers.most_in_flight <= 2 and readers.most_queued > 2
    assert state.queued == 0 and state.in_flight == 0


def test_async_reads_queued_for_their_turn_are_woken_in_their_loop(
    cluster: LocalCluster, topology: Topology
) -> None:
    import asyncio

    from propstore import AsyncPropertyStore

    tight = with_routing(topology, primary_fallback_max_concurrency=1)
    users = users_on_shard(topology, topology.shards[0].name, 8, prefix="aturn")
    served: Counter[str] = Counter()

    async def reader(store: AsyncPropertyStore, policy: str, user: str, until: float) -> None:
        while time.monotonic() < until:
            try:
                result = await store.read("acme", user, max_staleness=0.1, degrade=policy)
            except StaleReadError:
                served[f"{policy}: refused"] += 1
            else:
                served[f"{policy}: {'stale' if not result.within_budget else 'served'}"] += 1

    async def main() -> None:
        async with AsyncPropertyStore(tight) as store:
            for user in users:
                await store.replace("acme", user, {"seq": 0})
            await asyncio.to_thread(cluster.wait_caught_up)
            pause_all_replicas(cluster)
            await store.replace("acme", users[0], {"seq": 1})
            while store.route("acme", users[0], max_staleness=0.1).candidates:
                await asyncio.sleep(0.02)
            until = time.monotonic() + 1.5
            await asyncio.gather(*(reader(store, policy, user, until)
                                   for policy in ("wait(300ms)", "serve_stale")
                                   for user in users[:6]))

    asyncio.run(main())
    print(f"async turns (1 in flight, 12 readers): {dict(served)}")
    assert served["wait(300ms): served"] > 50 and served["wait(300ms): refused"] == 0
    assert served["serve_stale: refused"] == 0


def test_a_serve_stale_read_whose_turn_would_come_too_late_is_answered_stale_at_once(
    cluster: LocalCluster, topology: Topology
) -> None:
    # One read in flight at most, and 96 readers that would rather wait (1 s) than get an
    # error keep the queue for it long: a turn comes every read's time (~0.4 ms here), so
    # the last of them waits tens of milliseconds, past a serve-stale read's 20 ms.
    tight = with_routing(topology, primary_fallback_max_concurrency=1)
    users = users_on_shard(topology, topology.shards[0].name, 100, prefix="late")
    with PropertyStore(tight) as store:
        pause_behind_a_write(store, cluster, users)
        readers = TurnReaders(store, users)
        readers.run(1.5, {"wait(1s)": 96, "serve_stale": 4})
    served, stale = readers.served, sorted(readers.stale)
    median = stale[len(stale) // 2] if stale else math.nan
    print(f"late turns (1 in flight, 96 waiting, 4 serve-stale readers): {dict(served)}; "
          f"serve-stale answers' median {median * 1000:.1f} ms")
    assert served["wait(1s): primary"] > 100 and served["wait(1s): refused"] == 0
    assert set(served) <= {"wait(1s): primary", "wait(1s): replica", "serve_stale: primary",
                           "serve_stale: replica", "serve_stale: stale"}
    assert served["serve_stale: refused"] == 0 and len(stale) > 50
    # Answered at once, not after 20 ms in a queue whose turn would not have come.
    assert median < 0.01


def shed_everything(topology: Topology) -> Topology:
    """A primary whose fallback ceiling admits nothing more (one token, then none)."""
    return with_routing(topology, primary_fallback_rate=1e-6)


def test_wait_policy_answers_from_the_replica_once_it_catches_up_within_max_wait(
    cluster: LocalCluster, topology: Topology
) -> None:
    (user,) = users_on_shard(topology, topology.shards[0].name, 1, prefix="wait")
    with PropertyStore(shed_everything(topology)) as store:
        store.set("acme", user, {"v": 1})
        cluster.wait_caught_up()
        assert store.read("acme", user, max_staleness=5).from_replica
        pause_all_replicas(cluster)
        store.set("acme", user, {"v": 2})
        wait_for(lambda: not store.route("acme", user, max_staleness=0.3).candidates)
        store.read("acme", user, max_staleness=0.3)  # takes the one token the ceiling has

        started = time.monotonic()
        with pytest.raises(StaleReadError, match=r"wait\(250.0ms\)"):
            store.read("acme", user, max_staleness=0.3, degrade=Degrade.wait(0.25))
        assert 0.25 <= time.monotonic() - started < 1.0

        outcome: list[Any] = []
        reader = threading.Thread(target=lambda: outcome.append(store.read(
            "acme", user, max_staleness=0.3, degrade="wait(10s)")))
        started = time.monotonic()
        reader.start()
        time.sleep(0.3)  # the read is waiting: let it wait a while before replay resumes
        for replica in cluster.shards[0].replicas:
            replica.resume_replay()
        reader.join(timeout=15)
        elapsed = time.monotonic() - started
        (result,) = outcome
    print(f"wait: answered {elapsed * 1000:.0f} ms after asking, replay resumed at 300 ms")
    assert result.from_replica and result.within_budget and result.props == {"v": 2}
    assert result.staleness_bound <= 0.3
    assert 0.3 <= elapsed < 5.0  # woken by the monitor, not at max_wait
    assert sum(store.stats.waits.values()) == 1


def test_serve_stale_answers_with_the_freshest_replica_and_its_true_bound(
    cluster: LocalCluster, topology: Topology
) -> None:
    (user,) = users_on_shard(topology, topology.shards[0].name, 1, prefix="stale")
    with PropertyStore(shed_everything(topology)) as store:
        store.set("acme", user, {"v": 1})
        cluster.wait_caught_up()
        pause_all_replicas(cluster)
        store.set("acme", user, {"v": 2})
        acked = time.monotonic()  # v2, which the replicas lack, was acknowledged by now
        # Until 0.2 s after v2's acknowledgement a replica may still prove a 0.2 s budget
        # (a primary sample from before v2, delivered late, e.g. by a shared agent's
        # history): past it, no true fact can, so the reads below must degrade.
        wait_for(lambda: time.monotonic() - acked > 0.2
                 and not store.route("acme", user, max_staleness=0.2).candidates)
        store.read("acme", user, max_staleness=0.2)  # takes the one token
        started = time.monotonic()
        result = store.read("acme", user, max_staleness=0.2,
                            degrade=Degrade.wait(0.1) | Degrade.serve_stale())
        with pytest.raises(StaleReadError):
            store.read("acme", user, max_staleness=0.2, degrade=Degrade.refuse())
    assert result.from_replica and not result.within_budget and result.props == {"v": 1}
    # True: the answer lacks a write acknowledged (started - acked) before the read began.
    assert result.staleness_bound >= started - acked and result.staleness_bound > 0.2
    assert result.proof == "pipeline"


def test_a_refusal_names_shard_budget_primary_state_and_what_was_tried_and_is_counted(
    cluster: LocalCluster, topology: Topology
) -> None:
    from propstore.metrics import StoreMetrics

    (user,) = users_on_shard(topology, topology.shards[0].name, 1, prefix="refuse")
    with PropertyStore(shed_everything(topology)) as store:
        metrics = StoreMetrics(store)
        store.set("acme", user, {"v": 1})
        pause_all_replicas(cluster)
        store.set("acme", user, {"v": 2})
        wait_for(lambda: not store.route("acme", user, profile="workflow").candidates)
        store.read("acme", user, profile="workflow")  # takes the one token
        with pytest.raises(StaleReadError) as caught:
            store.read("acme", user, profile="workflow", degrade="wait(50ms)")
        explained = store.route("acme", user, profile="workflow", degrade="wait(50ms)").explain()
        assert "primary fallback: healthy" in explained
        assert "if the primary sheds it: wait(50.0ms), then StaleReadError" in explained
        assert "never shed" in store.route("acme", user, consistency="strong").explain()
        metrics.close()
        sample = metrics.registry.get_sample_value(
            "propstore_reads_refused_total",
            {"shard": "shard0", "profile": "workflow", "reason": "fallback_ceiling"},
        )
    error = caught.value
    text = str(error)
    print(f"refusal: {text}")
    assert error.shard == "shard0" and "shard0" in text
    assert "profile workflow" in text and "500.0ms" in error.budget
    assert "shard0-primary" in text and "configured fallback ceiling" in text
    assert error.reason == "fallback_ceiling"
    assert [t.split(" ")[0] for t in error.tried] == ["replicas", "primary", "wait(50.0ms):"]
    assert sample == 1.0


def test_limiter_memory_stays_flat_over_thousands_of_fallback_reads(
    cluster: LocalCluster, topology: Topology
) -> None:
    users = users_on_shard(topology, topology.shards[0].name, 400, prefix="mem")
    with PropertyStore(topology) as store:
        pause_all_replicas(cluster)  # so that every read below falls back to the primary
        tokens = [store.set("acme", user, {"v": 2}) for user in users]
        wait_for(lambda: not store.route("acme", users[0], max_staleness=0.05).candidates)
        rng = random.Random(7)

        def burst(n: int) -> None:
            for i in range(n):
                store.read("acme", users[i % len(users)], max_staleness=rng.uniform(0, 0.05))
                store.read("acme", users[i % len(users)], after=tokens[i % len(tokens)])

        burst(200)
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            burst(1500)
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        state = store._core.primary_limiters[0].state()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename")
                if stat.traceback[0].filename.endswith(("_limiter.py", "_degrade.py")))
    print(f"limiter after 3000 fallback reads: {state}; grew {grown} bytes")
    assert state.in_flight == 0 and state.recent is not None
    assert grown < 4096


def test_async_wait_policy_is_woken_by_the_monitor_without_blocking_the_loop(
    cluster: LocalCluster, topology: Topology
) -> None:
    import asyncio

    from propstore import AsyncPropertyStore

    (user,) = users_on_shard(topology, topology.shards[0].name, 1, prefix="await")

    async def main() -> tuple[Any, float, int]:
        async with AsyncPropertyStore(shed_everything(topology)) as store:
            await store.set("acme", user, {"v": 1})
            pause_all_replicas(cluster)
            await store.set("acme", user, {"v": 2})
            while store.route("acme", user, max_staleness=0.3).candidates:
                await asyncio.sleep(0.02)
            await store.read("acme", user, max_staleness=0.3)  # takes the one token
            ticks = 0

            async def ticker() -> None:  # proves the loop keeps running while the read waits
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            beat = asyncio.create_task(ticker())
            started = time.monotonic()
            read = asyncio.create_task(store.read("acme", user, max_staleness=0.3,
                                                  degrade=Degrade.wait(10)))
            await asyncio.sleep(0.3)
            await asyncio.to_thread(lambda: [r.resume_replay()
                                             for r in cluster.shards[0].replicas])
            result = await asyncio.wait_for(read, 15)
            beat.cancel()
            return result, time.monotonic() - started, ticks

    result, elapsed, ticks = asyncio.run(main())
    assert result.from_replica and result.within_budget and result.props == {"v": 2}
    assert 0.3 <= elapsed < 5.0 and ticks >= 20


def test_a_budgeted_read_whose_primary_is_down_follows_its_degrade_policy(
    cluster: LocalCluster, topology: Topology
) -> None:
    (user,) = users_on_shard(topology, topology.shards[0].name, 1, prefix="primdown")
    primary = cluster.shards[0].primary
    with PropertyStore(topology) as store:
        store.set("acme", user, {"v": 1})
        cluster.wait_caught_up()
        pause_all_replicas(cluster)
        store.set("acme", user, {"v": 2})
        acked = time.monotonic()  # v2, which the replicas lack, was acknowledged by now
        primary.kill()
        wait_for(lambda: not store.route("acme", user, max_staleness=0.2).candidates)
        began = time.monotonic()
        with pytest.raises(StaleReadError) as refused:
            store.read("acme", user, max_staleness=0.2)
        # Once the monitor sees the primary down, budgeted reads do not wait for its pool
        # to reconnect (up to primary_deadline): their policy answers at once.
        wait_for(lambda: store.shard_views()[0].nodes[0].state == "down", timeout=10)
        started = time.monotonic()
        stale = store.read("acme", user, max_staleness=0.2, degrade=Degrade.serve_stale())
        took_stale = time.monotonic() - started
        print(f"primary down: refused after {started - began:.3f}s, served stale after "
              f"{took_stale:.3f}s")
        with pytest.raises(ShardUnavailableError):
            store.read("acme", user, consistency="strong")
        refusals = dict(store.stats.refusals)
        # wait(): answered once the primary is back (a restart takes about a second).
        restart = threading.Thread(target=primary.start)
        restart.start()
        asked = time.monotonic()
        waited = store.read("acme", user, max_staleness=0.2, degrade=Degrade.wait(30))
        took = time.monotonic() - asked
        restart.join()
    error = refused.value
    print(f"primary down, budgeted read: {error}")
    # Tried and failed, or already seen down by the monitor (then not tried): either way
    # the read's policy, and the message says why.
    assert error.reason == "primary_unavailable"
    if error.__cause__ is not None:
        assert isinstance(error.__cause__, ShardUnavailableError)
        assert "did not answer" in str(error)
    else:
        assert "shard0-primary observed down" in str(error)
    assert [t.split(" ")[0] for t in error.tried] == ["replicas", "primary"]
    assert refusals == {("shard0", "max_staleness", "primary_unavailable"): 1}
    # Served stale with its true bound: it lacks a write acknowledged (started - acked)
    # before the read began.
    assert stale.from_replica and not stale.within_budget and stale.props == {"v": 1}
    assert stale.staleness_bound >= started - acked and stale.staleness_bound > 0.2
    assert took_stale < topology.routing.primary_deadline
    print(f"primary down: wait(30s) answered after {took:.2f}s by {waited.node}")
    assert waited.within_budget and waited.props == {"v": 2} and took < 30


def test_no_serve_stale_read_fails_while_the_primary_restarts_and_every_bound_is_true(
    cluster_factory: Any,
) -> None:
    from propstore.migrate import upgrade

    private = cluster_factory(shards=1, replicas=1)
    upgrade(private.shards[0].primary.dsn)
    private.wait_caught_up()
    assert private.config_path is not None
    topology = Topology.load(private.config_path)
    users = [f"restart-{i}" for i in range(20)]
    budgets = (0.1, 0.5)
    policy = Degrade.serve_stale()
    with PropertyStore(topology) as store, Workload(
            store, users, budgets=budgets, degrade=policy, expect_write_errors=True) as load:
        load.wait_until_every_budget_checked()
        before = load.report.reads
        private.shards[0].primary.restart()  # in place: a fast shutdown, then start
        wait_for(lambda: store.shard_views()[0].primary is not None, timeout=30)
        load.wait(1.0)
        report = load.stop()
    print(f"primary restart under serve_stale readers: {report.summary()}; "
          f"{report.reads - before} reads since the restart began; errors "
          f"{dict(report.errors)}; expected {dict(report.expected_errors)}")
    report.check(budgets=budgets, errors_allowed=True)
    # Budgeted reads: never an error (served stale with a bound true on the data instead:
    # a false bound counts as a violation, checked by report.check()). Token reads, which
    # only the primary can serve while the replica lacks the write, may say it is down.
    assert not [k for k in report.errors if k.startswith(f"read({policy})")], report.examples
    assert set(report.errors) <= {"read:ShardUnavailableError"}, report.examples
    assert report.stale_reads > 0, "no read met the restart: nothing was tested"


#: Stop-go schedule of the stalled replicas: each stall outlasts a poll timeout plus an
#: interval (so a poll is left unanswered) and a dozen read deadlines, and is shorter than
#: the monitor's silence limit; each run lets the late answers in.
STALL, RUN, BURSTS = 0.6, 0.4, 4


def test_replicas_stalled_in_bursts_shorter_than_the_silence_limit_are_never_marked_down(
    cluster: LocalCluster, topology: Topology
) -> None:
    """SIGSTOP/SIGCONT bursts of every replica of a shard stand in for a starved machine:
    polls and reads miss their deadlines, answers come late. A late answer is no new proof,
    not a failure: the replicas stay up, and serve-stale reads (their primary sheds them
    all) are served by a replica whenever one runs."""
    from structlog.testing import capture_logs

    users = users_on_shard(topology, topology.shards[0].name, 4, prefix="burst")
    replicas = cluster.shards[0].replicas
    served: list[tuple[float, float]] = []  # (time, proven bound) of each served read
    failed = Counter[str]()
    crashed: list[BaseException] = []
    stop = threading.Event()
    with capture_logs() as logs, PropertyStore(shed_everything(topology)) as store:
        for user in users:
            store.set("acme", user, {"v": 1})
        cluster.wait_caught_up()
        names = {r.name for r in replicas}
        wait_for(lambda: all(n.up for n in store.shard_views()[0].nodes if n.name in names))

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            try:
                while not stop.is_set():
                    try:
                        result = store.read("acme", rng.choice(users), max_staleness=0.1,
                                            degrade=Degrade.serve_stale())
                    except StaleReadError as exc:
                        failed[exc.reason] += 1
                        continue
                    assert result.props == {"v": 1}, result
                    if result.from_replica:  # (the ceiling's one token may go to the primary)
                        served.append((time.monotonic(), result.staleness_bound))
            except BaseException as exc:  # fails the test below
                crashed.append(exc)

        threads = [threading.Thread(target=reader, args=(i,), daemon=True) for i in range(2)]
        for thread in threads:
            thread.start()
        late, runs = 0, []
        try:
            for _ in range(BURSTS):  # the fault's own schedule, not a wait for a condition
                for replica in replicas:
                    replica.freeze()
                time.sleep(STALL)
                late += sum(n.unanswered_since is not None
                            for n in store.shard_views()[0].nodes if n.name in names)
                for replica in replicas:
                    replica.thaw()
                began = time.monotonic()
                time.sleep(RUN)
                runs.append((began, time.monotonic()))
        finally:
            for replica in replicas:
                replica.thaw()
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
    downs = [e for e in logs if e["event"] == "node_state_changed" and e["new"] == "down"
             and e["node"] in names]
    in_runs = [sum(a <= t <= b for t, _ in served) for a, b in runs]
    print(f"replicas stalled {BURSTS} x {STALL}s: {len(served)} served stale, failed "
          f"{dict(failed)}, late polls seen {late}, served per run {in_runs}, downs {downs}")
    assert not crashed and not any(t.is_alive() for t in threads), crashed
    assert downs == [], downs
    assert late > 0, "no poll was left unanswered: nothing was tested"
    assert sum(failed.values()) > 0, "no read met a stall: nothing was tested"
    assert all(in_runs), in_runs  # served whenever the replicas ran
    assert all(math.isfinite(bound) for _, bound in served)


def test_refusals_are_counted_per_profile_and_reason_in_lag_and_route(
    cluster: LocalCluster, topology: Topology
) -> None:
    from datetime import UTC, datetime

    from click.testing import CliRunner

    from propstore.cli import main
    from propstore.cli._lag import current_report, lag_document, lag_refusals, refusals_of

    (user,) = users_on_shard(topology, topology.shards[0].name, 1, prefix="lagrefuse")
    raised: Counter[tuple[str, str]] = Counter()
    with PropertyStore(shed_everything(topology)) as store:
        store.set("acme", user, {"v": 1})
        pause_all_replicas(cluster)
        store.set("acme", user, {"v": 2})
        wait_for(lambda: not store.route("acme", user, profile="workflow").candidates)
        store.read("acme", user, max_staleness=0.2)  # takes the one token
        for options in [{"profile": "workflow"}] * 3 + [{"max_staleness": 0.2}] * 2:
            try:
                store.read("acme", user, degrade=Degrade.refuse(), **options)
            except StaleReadError as exc:
                raised[(str(options.get("profile", "max_staleness")), exc.reason)] += 1
        refusals = refusals_of(store)
        document = lag_document(current_report(store), None, datetime.now(UTC), refusals)
    text = lag_refusals(refusals)
    print(f"refused: {dict(raised)}; lag: {text}")
    assert raised == {("workflow", "fallback_ceiling"): 3, ("max_staleness", "fallback_ceiling"): 2}
    shard0 = {"max_staleness": {"fallback_ceiling": 2}, "workflow": {"fallback_ceiling": 3}}
    assert refusals == {"shard0": shard0, "shard1": {}}
    assert document["refusals"] == refusals
    assert text is not None and text.plain == (
        "shard0: reads refused by this process: max_staleness: fallback_ceiling 2; "
        "workflow: fallback_ceiling 3")
    # The CLI's own store refused nothing, and says so; route prints the line too.
    route = CliRunner().invoke(main, ["--config", topology.source, "route", "acme", user,
                                      "--profile", "workflow"])
    assert route.exit_code == 0, route.output
    assert "  reads refused by this process: none" in route.stdout
    # lag's one-shot store shows the host's totals once it follows the agent, which a
    # store following it meanwhile keeps from ending idle (an agent spawned at a load of
    # 30-55 took up to 5 s to answer).
    with PropertyStore(topology) as keeper:
        wait_for(lambda: getattr(keeper.monitor, "source", "") == "agent", timeout=30)
        lag = CliRunner().invoke(main, ["--config", topology.source, "lag", "--json"])
    document = json.loads(lag.stdout)
    # Sharing (the default): lag shows the host's totals, reported by every store that
    # shares the agent, this test's too (tests/test_agent.py checks them); every shard listed.
    assert document["refusals_scope"] == "host"
    assert set(document["refusals"]) == {"shard0", "shard1"}
