"""A mixed read/write workload that checks every read against its budget while it runs.

Writers own disjoint users and write an increasing ``seq``; each acknowledgement is recorded
with its time. A read with budget ``b`` started at ``s`` must return a ``seq`` at least as
new as every write acknowledged before ``s - b`` (else it is a *violation*); a token read
must return at least the token's ``seq``. Bookkeeping is bounded (recent acknowledgements
per user), so the workload itself does not grow with time.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from propstore import PropertyStore, PropStoreError

BUDGETS = (0.1, 0.5, 1.0, 5.0)


@dataclass
class WorkloadReport:
    """What a workload saw."""

    reads: int = 0
    writes: int = 0
    replica_reads: int = 0
    violations: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    worst_read: float = 0.0
    reasons: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    @property
    def error_count(self) -> int:
        """All errors of every kind."""
        return sum(self.errors.values())


class Workload:
    """Reader and writer threads on one store until :meth:`stop`."""

    def __init__(self, store: PropertyStore, users: list[str], *, writers: int = 2,
                 readers: int = 4, tenant: str = "acme", budgets: tuple[float, ...] = BUDGETS,
                 expect_write_errors: bool = False) -> None:
        self.store, self.tenant, self.budgets = store, tenant, budgets
        self.expect_write_errors = expect_write_errors
        self.report = WorkloadReport()
        self._acked: dict[str, deque[tuple[float, int]]] = {u: deque(maxlen=64) for u in users}
        self._seq = dict.fromkeys(users, 0)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        owned = [users[i::writers] for i in range(writers)]
        self._threads = [threading.Thread(target=self._writer, args=(mine,), daemon=True)
                         for mine in owned] + [
            threading.Thread(target=self._reader, args=(users, i), daemon=True)
            for i in range(readers)]

    def __enter__(self) -> Workload:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> WorkloadReport:
        """Stop every thread and return the report."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        return self.report

    def wait(self, seconds: float) -> None:
        """Let the workload run (the test's own clock, not a sleep for a condition)."""
        self._stop.wait(seconds)

    def _error(self, kind: str, exc: BaseException) -> None:
        with self._lock:
            self.report.errors[f"{kind}:{type(exc).__name__}"] += 1
            if len(self.report.examples) < 5:
                self.report.examples.append(f"{kind}: {exc}")

    def _writer(self, users: list[str]) -> None:
        rng = random.Random()
        while not self._stop.is_set():
            user = rng.choice(users)
            seq = self._seq[user] + 1
            try:
                self.store.replace(self.tenant, user, {"seq": seq})
            except PropStoreError as exc:
                if not self.expect_write_errors:
                    self._error("write", exc)
                self._stop.wait(0.01)
                continue
            self._seq[user] = seq
            with self._lock:
                self._acked[user].append((time.monotonic(), seq))
                self.report.writes += 1

    def _reader(self, users: list[str], index: int) -> None:
        rng = random.Random(index)
        while not self._stop.is_set():
            user, budget = rng.choice(users), rng.choice(self.budgets)
            started = time.monotonic()
            try:
                result = self.store.read(self.tenant, user, max_staleness=budget)
            except PropStoreError as exc:
                self._error("read", exc)
                continue
            elapsed = time.monotonic() - started
            with self._lock:
                floor = max((s for t, s in self._acked[user] if t < started - budget), default=0)
                seq = (result.props or {}).get("seq", 0)
                report = self.report
                report.reads += 1
                report.replica_reads += result.from_replica
                report.worst_read = max(report.worst_read, elapsed)
                report.reasons[result.fallback_reason or "fresh"] += 1
                if seq < floor or result.staleness_bound > budget:
                    report.violations += 1
                    if len(report.examples) < 5:
                        report.examples.append(f"violation: {user} seq {seq} < {floor} {result}")
