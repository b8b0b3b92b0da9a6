"""The fleet's client processes: forked workers that open a store (or connect through
Pgpool), idle, then read at a modest open-loop rate and report every read's latency.

Forked rather than spawned: 64 fresh interpreters importing propstore would cost more CPU
than the whole measurement on a 2-core machine. Each child opens its own connections after
the fork (nothing of the parent's is used), and leaves by ``os._exit`` (multiprocessing's
fork start method), so no inherited finalizer touches the parent's connections.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
import structlog
from propstore import PropertyStore, Topology

from _bench import affinity
from _bench.env import TENANT
from _bench.scenarios._fleet_servers import PGPOOL_READ, READER_NAME
from _bench.scenarios._fleet_trace import ReadTracer, trace_dir

_CTX = multiprocessing.get_context("fork")
#: Every CPU: the fleet, its servers and Pgpool run where the scheduler puts them (the
#: bench process itself is pinned to one CPU, which its forks would inherit).
EVERYWHERE = affinity.server_cpus() | {affinity.CLIENT_CPU}
#: Budget of each read (seconds): generous against a 100 ms monitor interval.
READ_BUDGET = 1.0


@dataclass
class ClientReport:
    """One process's reads from the start signal to the stop (errors and ``fallbacks``
    count all of them; :meth:`within` keeps the reads of a window)."""

    pid: int
    latencies: list[float]
    replica_reads: int
    errors: int
    first_error: str = ""
    #: Why reads went to the primary (``ReadResult.fallback_reason``), by reason.
    fallbacks: dict[str, int] = field(default_factory=dict)
    #: Per read (as ``latencies``): when it began (``time.monotonic``), and whether a
    #: replica served it.
    starts: list[float] = field(default_factory=list)
    on_replica: list[bool] = field(default_factory=list)

    def within(self, begin: float, end: float) -> ClientReport:
        """The reads that began between ``begin`` and ``end`` (monotonic)."""
        kept = [i for i, at in enumerate(self.starts) if begin <= at <= end]
        return ClientReport(self.pid, [self.latencies[i] for i in kept],
                            sum(self.on_replica[i] for i in kept), self.errors,
                            self.first_error, self.fallbacks, [self.starts[i] for i in kept],
                            [self.on_replica[i] for i in kept])


@dataclass
class Fleet:
    """``count`` client processes of one mode (``off``/``host``: a store with that sharing;
    ``pgpool``: one connection per shard through its Pgpool)."""

    mode: str
    count: int
    topology: dict[str, Any]
    users: list[str]
    rate: float
    pgpool_dsns: list[str] = field(default_factory=list)
    pgpool_primary_ports: list[int] = field(default_factory=list)
    processes: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._go, self._stop = _CTX.Event(), _CTX.Event()
        self._out: Any = _CTX.Queue()
        self._ready: list[Any] = []

    @property
    def pids(self) -> list[int]:
        """The client processes' pids."""
        return [p.pid for p in self.processes if p.pid is not None]

    def start(self, timeout: float) -> None:
        """Fork the processes and wait until each has opened its store (or connections).

        The bench's own heap (the cluster, the loaded users, alembic and everything else it
        imported) is frozen across the forks (``gc.freeze``, as Python's docs advise for
        fork without exec): a child's first full collection otherwise walked it all and
        wrote to every page of it, copying each (120-190 ms of CPU in one child, one of the
        two cores, while 63 other processes waited to read), which no worker of a real
        fleet pays."""
        gc.freeze()
        try:
            for index in range(self.count):
                ready = _CTX.Event()
                proc = _CTX.Process(target=_client, name=f"fleet-{self.mode}-{index}", args=(
                    self, index, ready, self._go, self._stop, self._out), daemon=True)
                proc.start()
                self.processes.append(proc)
                self._ready.append(ready)
        finally:
            gc.unfreeze()
        deadline = time.monotonic() + timeout
        for ready, proc in zip(self._ready, self.processes, strict=True):
            if not ready.wait(max(0.1, deadline - time.monotonic())):
                raise TimeoutError(f"{proc.name} did not open its store in {timeout:g}s")

    def read(self) -> None:
        """Every process starts reading."""
        self._go.set()

    def stop(self, timeout: float = 60.0) -> list[ClientReport]:
        """Stop reading, collect every report, and end the processes (by their pids)."""
        self._stop.set()
        self._go.set()  # a process still waiting to read reports nothing and exits
        reports: list[ClientReport] = []
        try:
            for _ in self.processes:
                reports.append(self._out.get(timeout=timeout))
        finally:
            self.kill()
        return reports

    def kill(self) -> None:
        """End every process (joined; SIGKILL by its pid after 10 s)."""
        self._stop.set()
        self._go.set()
        for proc in self.processes:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def _client(fleet: Fleet, index: int, ready: Any, go: Any, stop: Any, out: Any) -> None:
    # 64 processes' info events would drown the report; warnings still show.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if hasattr(os, "sched_setaffinity"):  # the bench process is pinned; a fleet is not
        os.sched_setaffinity(0, EVERYWHERE)
    rng = random.Random(index)
    tracer: ReadTracer | None = None
    if fleet.mode == "pgpool":
        topology = Topology.from_dict(fleet.topology)
        conns = [psycopg.connect(dsn, autocommit=True, application_name=READER_NAME)
                 for dsn in fleet.pgpool_dsns]

        def read(user: str) -> str | None:
            shard = topology.shard_index_of(TENANT, user)
            row = conns[shard].execute(PGPOOL_READ, (TENANT, user)).fetchone()
            on_replica = row is not None and int(row[1]) != fleet.pgpool_primary_ports[shard]
            return None if on_replica else "pgpool"

        def close() -> None:
            for conn in conns:
                conn.close()
    else:
        store = PropertyStore(Topology.from_dict(fleet.topology))

        def read(user: str) -> str | None:
            result = store.read(TENANT, user, max_staleness=READ_BUDGET)
            return None if result.from_replica else str(result.fallback_reason)

        close = store.close
        if trace_dir(fleet.mode, fleet.count) is not None:
            tracer = ReadTracer(store)
    try:
        ready.set()
        go.wait()
        report = _read_loop(read, fleet.users, fleet.rate, rng, stop, tracer)
        folder = trace_dir(fleet.mode, fleet.count)
        if tracer is not None and folder is not None:
            tracer.write(folder, index)
        out.put(report)
    finally:
        close()


def _read_loop(read: Any, users: list[str], rate: float, rng: random.Random, stop: Any,
               tracer: ReadTracer | None = None) -> ClientReport:
    """Open loop: a read every ``1/rate`` s from a random phase, until ``stop``; ``read``
    returns None for a replica read, else why the primary served it."""
    latencies: list[float] = []
    starts: list[float] = []
    on_replica: list[bool] = []
    fallbacks: dict[str, int] = {}
    replica = errors = 0
    first = ""
    due = time.monotonic() + rng.uniform(0, 1 / rate)
    while not stop.is_set():
        wait = due - time.monotonic()
        if wait > 0:
            stop.wait(wait)
            continue
        due += 1 / rate
        user = users[rng.randrange(len(users))]
        if tracer is not None:
            tracer.before()
        began = time.monotonic()
        started = time.perf_counter()
        try:
            fallback = read(user)
        except Exception as exc:  # every error is reported, none ends the run
            errors += 1
            first = first or f"{type(exc).__name__}: {exc}"[:200]
            continue
        latencies.append(time.perf_counter() - started)
        starts.append(began)
        on_replica.append(fallback is None)
        if tracer is not None:
            tracer.after(began, latencies[-1])
        if fallback is None:
            replica += 1
        else:
            fallbacks[fallback] = fallbacks.get(fallback, 0) + 1
    return ClientReport(os.getpid(), latencies, replica, errors, first, fallbacks, starts,
                        on_replica)
