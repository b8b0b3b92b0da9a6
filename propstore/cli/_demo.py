"""The demo's workload: readers with two budgets and a read-your-writes writer, checked live.

:func:`run_demo` migrates and loads a sandbox cluster, runs the threads, pauses replay on one
shard's replicas for the middle half of the run and returns a :class:`DemoReport`; the
``propstore demo`` command (``_demo_command``) only starts the sandbox and draws.

A read *violates* its budget when it returns a version older than the newest version that
was acknowledged more than ``budget`` seconds before the read started (or, for the writer's
read-your-writes check, older than the version it just wrote). The writer keeps each user's
recent acknowledged ``(time, version)`` pairs in memory, so the check is independent of the
store's own arithmetic and bounded by the number of users.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg

from propstore._durations import format_duration
from propstore.cli._demo_stats import DemoEvent, DemoReport, LatencyHistogram, ReaderStats
from propstore.config import Topology
from propstore.errors import ConfigError, PropStoreError
from propstore.metrics import StoreMetrics
from propstore.migrate import upgrade
from propstore.monitor import lag_report
from propstore.sandbox import LocalCluster, LocalNode
from propstore.store import PropertyStore

TENANT = "demo"
_ACKS_KEPT = 8  # per user; older acknowledgements can only lower the floor a read must meet

# One statement per shard: the users, their buckets and documents as three arrays.
_LOAD = (
    "INSERT INTO user_properties AS u (tenant_id, user_id, bucket, props)"
    " SELECT %s, t.user_id, t.bucket, t.props::jsonb"
    " FROM unnest(%s::text[], %s::int[], %s::text[]) AS t(user_id, bucket, props)"
    " ON CONFLICT (tenant_id, user_id) DO UPDATE SET props = EXCLUDED.props,"
    " version = u.version + 1, updated_at = now()"
    " RETURNING user_id, version"
)


class _Ledger:
    """Acknowledged versions per user: ``(ack time, version)``, the newest few kept."""

    def __init__(self) -> None:
        self._acks: dict[str, deque[tuple[float, int]]] = {}
        self._lock = threading.Lock()

    def acknowledged(self, user: str, at: float, version: int) -> None:
        with self._lock:
            acks = self._acks.get(user)
            if acks is None:
                acks = self._acks[user] = deque(maxlen=_ACKS_KEPT)
            acks.append((at, version))

    def floor(self, user: str, acknowledged_before: float) -> int:
        """The newest version acknowledged before the given time (0 when none)."""
        with self._lock:
            return max((v for t, v in self._acks.get(user, ()) if t < acknowledged_before),
                       default=0)

    def latest(self, user: str) -> int:
        """The newest version acknowledged."""
        with self._lock:
            acks = self._acks.get(user)
            return acks[-1][1] if acks else 0


@dataclass(frozen=True, slots=True)
class _Budget:
    name: str
    seconds: float
    options: Mapping[str, Any]


class _Pacer:
    """Spaces a thread's operations ``1/rate`` s apart (no catching up after a stall)."""

    def __init__(self, rate: float, stop: threading.Event) -> None:
        self._period = 1.0 / rate if rate > 0 else 0.0
        self._stop = stop
        self._next = time.monotonic()

    def wait(self) -> None:
        if not self._period:
            return
        now = time.monotonic()
        self._next = max(self._next + self._period, now - self._period)
        self._stop.wait(max(0.0, self._next - now))


def load_users(topology: Topology, count: int, tenant: str = TENANT
               ) -> dict[str, tuple[float, int]]:
    """Write ``count`` users straight to the shard primaries (one statement per shard),
    with the same bucket function as the store; returns ``{user: (ack time, version)}``."""
    rng = random.Random(count)
    users = [f"user-{i:05d}" for i in range(count)]
    by_shard: dict[int, list[str]] = {}
    for user in users:
        by_shard.setdefault(topology.shard_index_of(tenant, user), []).append(user)
    acked: dict[str, tuple[float, int]] = {}
    for index, members in by_shard.items():
        documents = [json.dumps({
            "plan": rng.choice(("free", "pro", "team")),
            "locale": rng.choice(("en", "fr", "de", "ja")),
            "theme": rng.choice(("light", "dark")),
        }) for _ in members]
        buckets = [topology.bucket_of(tenant, user) for user in members]
        dsn = topology.shards[index].primary.dsn
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            rows = conn.execute(_LOAD, (tenant, members, buckets, documents)).fetchall()
        done = time.monotonic()  # after the commit: the acknowledgement time
        acked.update((user, (done, version)) for user, version in rows)
    return acked


def run_demo(
    cluster: LocalCluster,
    *,
    config: str | None = None,
    duration: float = 60.0,
    users: int = 5000,
    rate: float = 200.0,
    show: Callable[[DemoReport], None] | None = None,
    refresh: float = 0.5,
    metrics_port: int | None = None,
) -> DemoReport:
    """Run the demo against a started sandbox cluster; returns what the readers saw.

    Args:
        cluster: a started :class:`~propstore.sandbox.LocalCluster` (its replicas are
            paused and resumed; nothing else is changed but the ``demo`` tenant's rows).
        config: topology file; default the cluster's own.
        duration: seconds the workload runs; replay is paused on one shard's replicas from
            1/4 to 3/4 of it.
        users: users loaded (tenant ``demo``).
        rate: operations per second per thread (readers and writer); 0 for no pacing.
        show: called every ``refresh`` seconds with a snapshot (the live view).
        metrics_port: also serve the store's Prometheus metrics on 127.0.0.1 at this port.
    """
    path = config or cluster.config_path
    if path is None:
        raise ConfigError("the cluster has no topology file; start it first")
    topology = Topology.load(path)
    shard = next((s for s in cluster.shards if s.replicas), None)
    if shard is None:
        raise ConfigError("the demo needs a shard with replicas to pause")
    missing = {"personalisation", "workflow"} - set(topology.profiles)
    if missing:
        raise ConfigError(f"{topology.source}: the demo needs profiles {sorted(missing)}")
    events: list[DemoEvent] = []
    for each in topology.shards:
        upgrade(each.primary.dsn)
    ledger = _Ledger()
    loaded = load_users(topology, users)
    for user, (at, version) in loaded.items():
        ledger.acknowledged(user, at, version)
    names = sorted(loaded)
    with PropertyStore(topology) as store:
        server = StoreMetrics(store).serve(metrics_port) if metrics_port is not None else None
        try:
            return _Run(store, topology, shard.name, shard.replicas, names, ledger, rate,
                        duration, events).run(show, refresh)
        finally:
            if server is not None:
                server.close()


class _Run:
    """One demo run: the threads, the pause schedule and the snapshots."""

    def __init__(self, store: PropertyStore, topology: Topology, shard: str,
                 paused: list[LocalNode], users: list[str], ledger: _Ledger, rate: float,
                 duration: float, events: list[DemoEvent]) -> None:
        self.store, self.topology, self.shard = store, topology, shard
        self.paused, self.users, self.ledger = paused, users, ledger
        self.is_paused = False
        self.rate, self.duration, self.events = rate, duration, events
        self.stop = threading.Event()
        self.started = time.monotonic()
        self.writes = 0
        self.write_errors: Counter[str] = Counter()
        self.budgets = [
            _Budget(name, topology.profiles[name].max_staleness, {"profile": name})
            for name in ("personalisation", "workflow")
        ]
        self.readers = [ReaderStats(b.name, format_duration(b.seconds)) for b in self.budgets]
        self.writer_reads = ReaderStats("writer (read-your-writes)", "after token")

    def note(self, text: str) -> None:
        self.events.append(DemoEvent(round(time.monotonic() - self.started, 3), text))

    def snapshot(self) -> DemoReport:
        views = self.store.shard_views()
        return DemoReport(
            elapsed=time.monotonic() - self.started, duration=self.duration,
            users=len(self.users), paused_shard=self.shard,
            paused_nodes=tuple(node.name for node in self.paused),
            readers=tuple(r.snapshot() for r in [*self.readers, self.writer_reads]),
            writes=self.writes, write_errors=dict(self.write_errors),
            events=tuple(self.events),
            lag=lag_report(views, self.topology.profiles, self.store.monitor.state.clock()),
        )

    def run(self, show: Callable[[DemoReport], None] | None, refresh: float) -> DemoReport:
        threads = [threading.Thread(target=self.read_loop, args=(b, s), daemon=True,
                                    name=f"demo-{b.name}")
                   for b, s in zip(self.budgets, self.readers, strict=True)]
        threads.append(threading.Thread(target=self.write_loop, daemon=True, name="demo-writer"))
        self.started = time.monotonic()
        self.note(f"{len(self.users)} users loaded; readers and writer started")
        for thread in threads:
            thread.start()
        schedule = [(self.duration / 4, self.pause), (3 * self.duration / 4, self.resume)]
        try:
            while (elapsed := time.monotonic() - self.started) < self.duration:
                if schedule and elapsed >= schedule[0][0]:
                    schedule.pop(0)[1]()
                    continue
                if show is not None:
                    show(self.snapshot())
                until = min([self.duration, *(at for at, _ in schedule[:1])])
                self.stop.wait(max(0.0, min(refresh, until - elapsed)))
        finally:
            self.stop.set()
            for thread in threads:
                thread.join(timeout=30)
            if self.is_paused:
                self.resume()
        report = self.snapshot()
        if show is not None:
            show(report)
        return report

    def pause(self) -> None:
        self.is_paused = True  # before the first call: a failure half-way still resumes all
        for node in self.paused:
            node.pause_replay()
        self.note(f"replay paused on {', '.join(n.name for n in self.paused)}")

    def resume(self) -> None:
        for node in self.paused:
            node.resume_replay()
        self.is_paused = False
        self.note(f"replay resumed on {', '.join(n.name for n in self.paused)}")

    def read_loop(self, budget: _Budget, stats: ReaderStats) -> None:
        rng = random.Random()
        pacer = _Pacer(self.rate, self.stop)
        while not self.stop.is_set():
            user = rng.choice(self.users)
            started = time.monotonic()
            try:
                result = self.store.read(TENANT, user, **budget.options)
            except PropStoreError as exc:
                stats.error(exc)
            else:
                seconds = time.monotonic() - started
                floor = self.ledger.floor(user, started - budget.seconds)
                version = result.version or 0
                violation = None
                if version < floor or result.staleness_bound > budget.seconds:
                    violation = (f"{user}: version {version} < {floor} acknowledged more than "
                                 f"{budget.seconds:g}s earlier ({result})")
                stats.record(result, seconds, violation)
            pacer.wait()

    def write_loop(self) -> None:
        rng = random.Random()
        pacer = _Pacer(self.rate, self.stop)
        while not self.stop.is_set():
            user = rng.choice(self.users)
            expected = self.ledger.latest(user) + 1  # this thread is the only writer
            try:
                token = self.store.set(TENANT, user, {"visits": expected})
            except PropStoreError as exc:
                self.write_errors[type(exc).__name__] += 1
                pacer.wait()
                continue
            self.ledger.acknowledged(user, time.monotonic(), expected)
            self.writes += 1
            started = time.monotonic()
            try:
                result = self.store.read(TENANT, user, after=token)
            except PropStoreError as exc:
                self.writer_reads.error(exc)
            else:
                version = result.version or 0
                violation = None if version >= expected else (
                    f"{user}: read after its write returned version {version} < {expected}")
                self.writer_reads.record(result, time.monotonic() - started, violation)
                if version > expected:  # a retried write applied twice: follow the truth
                    self.ledger.acknowledged(user, time.monotonic(), version)
            pacer.wait()


__all__ = ["DemoEvent", "DemoReport", "LatencyHistogram", "ReaderStats", "load_users",
           "run_demo"]
