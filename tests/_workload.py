"""A mixed read/write workload that checks every read against its budget while it runs.

Writers own disjoint users and write an increasing ``seq``; each acknowledgement is recorded
with the time ``replace`` returned (at or after the real acknowledgement, so the check errs
on the lenient side only by the return latency). A read with budget ``b`` started at ``s``
must return a ``seq`` at least as new as every write acknowledged before ``s - b``, else it
is a *violation*; a token read (``after=token``, done by the writers) must return at least
the token's ``seq``.

The acknowledgement history is bounded by *time*, not by count: a user's acknowledgements
are dropped only once they are older than every read still in flight minus the largest
budget (keeping the newest such one as the floor), so every read is checked against every
write acknowledged before its cut-off, and memory is bounded by the largest budget's window.

Failures are loud: an exception other than :class:`PropStoreError` in any thread stops the
workload and is re-raised by :meth:`Workload.stop` (a dead thread fails the test), and
:meth:`WorkloadReport.check` asserts that the workload did work (reads, writes, replica
reads where replicas should serve) and that every budget was checked against a real write.

Typical use::

    with Workload(store, users) as load:
        load.wait_until_every_budget_checked()   # ~ the largest budget: 5 s
        ...inject a fault, load.wait(2.0), undo it...
    load.report.check()                          # raises AssertionError with examples
"""

from __future__ import annotations

import bisect
import contextlib
import math
import random
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from propstore import Degrade, PropertyStore, PropStoreError, Token
from tests.claims import WORKLOAD_BUDGETS

BUDGETS = WORKLOAD_BUDGETS
#: How many writes in one writer thread are followed by a token read of that write.
TOKEN_READ_SHARE = 0.25


class WorkloadCrashed(AssertionError):
    """A workload thread raised something other than a :class:`PropStoreError`."""


@dataclass
class WorkloadReport:
    """What a workload saw. ``checked[b]`` counts reads with budget ``b`` that had a write
    acknowledged before their cut-off to be checked against (a read whose cut-off precedes
    every write proves nothing)."""

    reads: int = 0
    writes: int = 0
    token_reads: int = 0
    replica_reads: int = 0
    violations: int = 0
    #: Budget reads answered past their budget under ``Degrade.serve_stale``
    #: (``within_budget=False``): each checked against its own staleness bound instead.
    stale_reads: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    expected_errors: Counter[str] = field(default_factory=Counter)
    worst_read: float = 0.0
    #: The slowest acknowledged write (seconds): a write the store retried while its
    #: primary restarted shows its delay here.
    worst_write: float = 0.0
    reasons: Counter[str] = field(default_factory=Counter)
    nodes: Counter[str] = field(default_factory=Counter)
    checked: Counter[float] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    #: (elapsed seconds, node, fallback reason) of the slowest reads, slowest first.
    slowest: list[tuple[float, str, str]] = field(default_factory=list)

    @property
    def error_count(self) -> int:
        """All unexpected errors of every kind."""
        return sum(self.errors.values())

    @property
    def replica_share(self) -> float:
        """Share of reads a replica served."""
        return self.replica_reads / self.reads if self.reads else 0.0

    def summary(self) -> str:
        """One line for ``pytest -s`` output."""
        return (f"{self.reads} reads ({self.replica_share:.0%} from replicas, "
                f"{self.token_reads} token reads), {self.writes} writes, "
                f"{self.error_count} errors, {self.violations} violations, "
                f"{self.stale_reads} served stale, "
                f"worst read {self.worst_read * 1000:.1f} ms, checked per budget "
                f"{dict(sorted(self.checked.items()))}, reasons {dict(self.reasons)}")

    def check(self, *, budgets: Iterable[float] = BUDGETS, replicas_serve: bool = True,
              errors_allowed: bool = False) -> WorkloadReport:
        """Assert the workload did work and found nothing wrong; returns ``self``.

        ``replicas_serve``: some reads must have been served by a replica (False where the
        test makes every replica ineligible). ``errors_allowed``: unexpected errors are only
        counted, not failed (a test that asserts on them itself).
        """
        assert self.reads > 0, f"no read completed: {self.summary()} {self.examples}"
        assert self.writes > 0, f"no write completed: {self.summary()} {self.examples}"
        assert self.token_reads > 0, f"no token read completed: {self.summary()}"
        if replicas_serve:
            assert self.replica_reads > 0, f"no replica served a read: {self.summary()}"
        unchecked = [b for b in budgets if not self.checked[b]]
        assert not unchecked, f"budgets never checked against a write: {unchecked}"
        assert self.violations == 0, self.examples
        if not errors_allowed:
            assert self.error_count == 0, (dict(self.errors), self.examples)
        return self


class AckHistory:
    """Acknowledged ``seq`` per user, each with its acknowledgement time, kept by time."""

    def __init__(self, users: Iterable[str]) -> None:
        self._times: dict[str, deque[float]] = {u: deque() for u in users}
        self._seqs: dict[str, deque[int]] = {u: deque() for u in users}

    def add(self, user: str, at: float, seq: int) -> None:
        """Record that ``seq`` of ``user`` was acknowledged at ``at`` (monotonic seconds)."""
        self._times[user].append(at)
        self._seqs[user].append(seq)

    def floor(self, user: str, cutoff: float) -> int | None:
        """The newest ``seq`` acknowledged before ``cutoff``; None if there is none."""
        times = self._times[user]
        i = bisect.bisect_left(times, cutoff)
        return self._seqs[user][i - 1] if i else None

    def latest(self, user: str) -> int | None:
        """The newest acknowledged ``seq`` of ``user``."""
        seqs = self._seqs[user]
        return seqs[-1] if seqs else None

    def prune(self, user: str, before: float) -> None:
        """Forget what no cut-off at or after ``before`` needs (the newest older entry
        stays: it is the floor for such cut-offs)."""
        times, seqs = self._times[user], self._seqs[user]
        while len(times) > 1 and times[1] < before:
            times.popleft()
            seqs.popleft()

    def size(self) -> int:
        """Entries kept, over all users (to show the history stays bounded)."""
        return sum(len(t) for t in self._times.values())


class Workload:
    """Reader and writer threads on one store until :meth:`stop`.

    ``users`` must be fresh (never written before, or written with ``seq`` values the
    writers will exceed): a read is checked against this workload's own acknowledgements.
    """

    def __init__(self, store: PropertyStore, users: Sequence[str], *, writers: int = 2,
                 readers: int = 4, tenant: str = "acme", budgets: Sequence[float] = BUDGETS,
                 expect_write_errors: bool = False, degrade: Degrade | None = None) -> None:
        if not users or writers < 1 or readers < 1:
            raise ValueError("need users, at least one writer and one reader")
        self.store, self.tenant, self.budgets = store, tenant, tuple(budgets)
        #: The budget reads' degrade policy (None: the store's default). Their errors are
        #: counted as ``read(<policy>):<error>``, apart from the token reads'.
        self.degrade = degrade
        self._options: dict[str, Any] = {} if degrade is None else {"degrade": degrade}
        self._read_kind = "read" if degrade is None else f"read({degrade})"
        self.expect_write_errors = expect_write_errors
        self.report = WorkloadReport()
        self.acked = AckHistory(users)
        self._seq = dict.fromkeys(users, 0)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._inflight: dict[int, float] = {}
        self._crashes: list[tuple[str, BaseException, str]] = []
        owned = [list(users[i::writers]) for i in range(writers)]
        self._threads = [threading.Thread(target=self._run, args=(self._writer, mine),
                                          name=f"workload-writer-{i}", daemon=True)
                         for i, mine in enumerate(owned) if mine] + [
            threading.Thread(target=self._run, args=(self._reader, list(users), i),
                             name=f"workload-reader-{i}", daemon=True)
            for i in range(readers)]
        self._stopped = False

    def __enter__(self) -> Workload:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.stop()
        else:  # the test already failed: stop the threads, keep the original error
            with contextlib.suppress(AssertionError):
                self.stop()

    def stop(self) -> WorkloadReport:
        """Stop every thread; re-raise the first unexpected exception any of them raised."""
        if not self._stopped:
            self._stopped = True
            self._stop.set()
            for thread in self._threads:
                thread.join(timeout=30)
            hung = [t.name for t in self._threads if t.is_alive()]
            if hung:
                raise WorkloadCrashed(f"workload threads did not stop within 30 s: {hung}")
        if self._crashes:
            name, exc, text = self._crashes[0]
            raise WorkloadCrashed(f"{name} died: {exc!r}\n{text}") from exc
        return self.report

    def wait(self, seconds: float) -> None:
        """Let the workload run for ``seconds`` (the test's own clock); returns early, and
        raises, if a thread died."""
        if self._stop.wait(seconds):
            self.stop()

    def wait_until_every_budget_checked(self, timeout: float | None = None) -> None:
        """Run until a read of every budget was checked against an acknowledged write.

        Takes about the largest budget; ``timeout`` defaults to twice that plus 10 s.
        """
        limit = time.monotonic() + (timeout if timeout is not None
                                    else 2 * max(self.budgets) + 10)
        while True:
            with self._lock:
                missing = [b for b in self.budgets if not self.report.checked[b]]
            if not missing:
                return
            if time.monotonic() > limit:
                raise AssertionError(f"budgets {missing} never checked: {self.report.summary()}")
            self.wait(0.05)

    # ------------------------------------------------------------ threads

    def _run(self, body: Any, *args: Any) -> None:
        try:
            body(*args)
        except BaseException as exc:  # re-raised in the test by stop()
            with self._lock:
                self._crashes.append((threading.current_thread().name, exc,
                                      traceback.format_exc()))
            self._stop.set()

    def _example(self, text: str) -> None:
        if len(self.report.examples) < 5:
            self.report.examples.append(text)

    def _error(self, kind: str, exc: BaseException, expected: bool = False) -> None:
        with self._lock:
            counter = self.report.expected_errors if expected else self.report.errors
            counter[f"{kind}:{type(exc).__name__}"] += 1
            if not expected:
                self._example(f"{kind}: {exc}")

    def _writer(self, users: list[str]) -> None:
        rng = random.Random()
        while not self._stop.is_set():
            user = rng.choice(users)
            seq = self._seq[user] + 1
            began = time.monotonic()
            try:
                token = self.store.replace(self.tenant, user, {"seq": seq})
            except PropStoreError as exc:
                self._error("write", exc, expected=self.expect_write_errors)
                self._stop.wait(0.01)
                continue
            acked = time.monotonic()
            self._seq[user] = seq
            with self._lock:
                self.acked.add(user, acked, seq)
                self.report.writes += 1
                self.report.worst_write = max(self.report.worst_write, acked - began)
            if rng.random() < TOKEN_READ_SHARE:
                self._token_read(user, seq, token)

    def _token_read(self, user: str, seq: int, token: Token) -> None:
        try:
            result = self.store.read(self.tenant, user, after=token)
        except PropStoreError as exc:
            self._error("read", exc)  # a read like any other: tests allow errors by kind
            return
        got = (result.props or {}).get("seq", 0)
        with self._lock:
            self.report.token_reads += 1
            self.report.replica_reads += result.from_replica
            self.report.nodes[result.node] += 1
            if got < seq:
                self.report.violations += 1
                self._example(f"token violation: {user} seq {got} < {seq} {result}")

    def _reader(self, users: list[str], index: int) -> None:
        rng = random.Random(index)
        largest = max(self.budgets)
        while not self._stop.is_set():
            user, budget = rng.choice(users), rng.choice(self.budgets)
            with self._lock:  # read the clock under the lock: see the pruning below
                started = time.monotonic()
                self._inflight[index] = started
            try:
                result = self.store.read(self.tenant, user, max_staleness=budget,
                                         **self._options)
            except PropStoreError as exc:
                self._error(self._read_kind, exc)
                continue
            finally:
                with self._lock:
                    del self._inflight[index]
            elapsed = time.monotonic() - started
            seq = (result.props or {}).get("seq", 0)
            with self._lock:
                floor = self.acked.floor(user, started - budget)
                # No read in flight or to come has a cut-off before this point (a read
                # registers its start under the lock, so none can start earlier unseen).
                oldest = min(self._inflight.values(), default=started)
                self.acked.prune(user, min(oldest, started) - largest)
                report = self.report
                report.reads += 1
                report.replica_reads += result.from_replica
                report.nodes[result.node] += 1
                report.reasons[result.fallback_reason or "fresh"] += 1
                report.worst_read = max(report.worst_read, elapsed)
                report.slowest = sorted(
                    [*report.slowest, (elapsed, result.node, result.fallback_reason or "-")],
                    reverse=True)[:5]
                if not result.within_budget:
                    # Served stale on purpose: its own bound must be true on the data.
                    report.stale_reads += 1
                    bound = result.staleness_bound
                    floor = None if math.isinf(bound) else self.acked.floor(user,
                                                                            started - bound)
                    if floor is not None and seq < floor:
                        report.violations += 1
                        self._example(f"false stale bound: {user} seq {seq} < {floor} "
                                      f"{result}")
                    continue
                if floor is not None:
                    report.checked[budget] += 1
                if (floor is not None and seq < floor) or result.staleness_bound > budget:
                    report.violations += 1
                    self._example(f"violation: {user} seq {seq} < {floor} (budget {budget}) "
                                  f"{result}")
