"""A read/write load that checks every read against what its ``ReadResult`` *claims*.

Writers replace a user's document with an increasing ``seq`` and record each
acknowledgement with its time and its token's LSN; a quarter of the writes are read back at
once with ``after=token``. Readers read with random budgets. For every read:

* **budget**: the data holds every write acknowledged before ``start - budget``;
* **no false claim** (replica reads): the data holds every write acknowledged before
  ``start - staleness_bound``, and every write whose token LSN is ``<= replay_lsn`` (a token
  LSN is read after the commit, so it is at or above the commit record);
* **read-your-writes**: a token read holds at least that write.

``start`` is taken before the store is called, so each check is, if anything, lenient by the
call's own latency, never strict by it. A thread that raises anything but a
``PropStoreError`` fails :meth:`ClaimsLoad.stop` (the threads are
:class:`propstore.sandbox._load.LoadThreads`, as the ``surge`` benchmark's are).
"""

from __future__ import annotations

import bisect
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from propstore import PropertyStore, PropStoreError
from propstore.sandbox._load import LoadThreads

BUDGETS = (0.1, 0.5, 1.0)


@dataclass
class ClaimsReport:
    """What a :class:`ClaimsLoad` saw."""

    reads: int = 0
    replica_reads: int = 0
    #: Budget reads (not token reads) a replica served.
    budget_replica_reads: int = 0
    token_reads: int = 0
    writes: int = 0
    budget_violations: int = 0
    false_claims: int = 0
    missed_own_writes: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    proofs: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    #: Log events captured while the load ran (``structlog.testing.capture_logs``).
    events: list[dict[str, Any]] = field(default_factory=list)
    #: Seconds into the load of the first and last ``replica_down`` fallback.
    down_window: tuple[float, float] | None = None

    @property
    def replica_share(self) -> float:
        """Share of reads (budget and token) a replica served."""
        total = self.reads + self.token_reads
        return self.replica_reads / total if total else 0.0

    @property
    def budget_replica_share(self) -> float:
        """Share of budget reads a replica served (token reads right after their write
        often need the primary: the replica may not have replayed it yet)."""
        return self.budget_replica_reads / self.reads if self.reads else 0.0

    def summary(self) -> str:
        """One line for test output."""
        return (f"{self.reads} reads + {self.token_reads} token reads "
                f"({self.replica_share:.0%} replica, budget reads "
                f"{self.budget_replica_share:.1%}), {self.writes} writes, "
                f"violations {self.budget_violations}, false claims {self.false_claims}, "
                f"missed own writes {self.missed_own_writes}, proofs {dict(self.proofs)}, "
                f"reasons {dict(self.reasons)}, errors {dict(self.errors)}, "
                f"replica_down between {self.down_window} s")


class _Acks:
    """Per user: acknowledged (time, seq, token LSN), in order; bounded by count (the tests
    run seconds, and every check looks back at most a few seconds)."""

    def __init__(self, users: Sequence[str]) -> None:
        self.times: dict[str, deque[float]] = {u: deque(maxlen=4096) for u in users}
        self.seqs: dict[str, deque[int]] = {u: deque(maxlen=4096) for u in users}
        self.lsns: dict[str, deque[int]] = {u: deque(maxlen=4096) for u in users}

    def add(self, user: str, at: float, seq: int, lsn: int) -> None:
        self.times[user].append(at)
        self.seqs[user].append(seq)
        self.lsns[user].append(lsn)

    def before(self, user: str, cutoff: float) -> int:
        i = bisect.bisect_left(self.times[user], cutoff)
        return self.seqs[user][i - 1] if i else 0

    def covered_by(self, user: str, replay_lsn: int) -> int:
        # Token LSNs of one user's writes increase with seq (each commit follows the last).
        i = bisect.bisect_right(self.lsns[user], replay_lsn)
        return self.seqs[user][i - 1] if i else 0


class ClaimsLoad:
    """Reader and writer threads on one store until :meth:`stop`."""

    def __init__(self, store: PropertyStore, users: Sequence[str], *, readers: int = 3,
                 writers: int = 2, tenant: str = "acme",
                 budgets: Sequence[float] = BUDGETS) -> None:
        self.store, self.tenant, self.budgets = store, tenant, tuple(budgets)
        self.report = ClaimsReport()
        self._acks = _Acks(users)
        self._lock = threading.Lock()
        self._load = LoadThreads("claims")
        self._stop = self._load.stopping
        self._began = time.monotonic()
        self._users, self._writers, self._readers = list(users), writers, readers

    def __enter__(self) -> ClaimsLoad:
        for i in range(self._writers):
            self._load.start(self._writer, self._users[i::self._writers], i)
        for i in range(self._readers):
            self._load.start(self._reader, self._users, i)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._load.__exit__(*exc)

    def wait(self, seconds: float) -> None:
        """Let the load run for ``seconds`` of the test's own clock."""
        self._stop.wait(seconds)

    def stop(self) -> ClaimsReport:
        """Stop every thread; fail (:class:`~propstore.sandbox._load.LoadCrashed`) if one died."""
        self._load.stop()
        return self.report

    def _note(self, text: str) -> None:
        if len(self.report.examples) < 8:
            self.report.examples.append(text)

    def _error(self, kind: str, exc: BaseException) -> None:
        with self._lock:
            self.report.errors[f"{kind}:{type(exc).__name__}"] += 1
            self._note(f"{kind}: {exc}")

    def _writer(self, users: list[str], index: int) -> None:
        rng = random.Random(1000 + index)
        seqs = dict.fromkeys(users, 0)
        while not self._stop.is_set():
            user = rng.choice(users)
            seq = seqs[user] + 1
            try:
                token = self.store.replace(self.tenant, user, {"seq": seq})
            except PropStoreError as exc:
                self._error("write", exc)
                self._stop.wait(0.01)
                continue
            seqs[user] = seq
            lsn = token.positions[0][1]
            with self._lock:
                self._acks.add(user, time.monotonic(), seq, int(lsn))
                self.report.writes += 1
            if rng.random() < 0.25:
                try:
                    result = self.store.read(self.tenant, user, after=token)
                except PropStoreError as exc:
                    self._error("token read", exc)
                    continue
                got = (result.props or {}).get("seq", 0)
                with self._lock:
                    self.report.token_reads += 1
                    self.report.replica_reads += result.from_replica
                    self.report.proofs[result.proof] += 1
                    if got < seq:
                        self.report.missed_own_writes += 1
                        self._note(f"missed own write: {user} seq {got} < {seq} {result}")
                    self._check_claim(user, got, result, time.monotonic())

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
            got = (result.props or {}).get("seq", 0)
            with self._lock:
                report = self.report
                report.reads += 1
                report.replica_reads += result.from_replica
                report.budget_replica_reads += result.from_replica
                report.proofs[result.proof] += 1
                report.reasons[result.fallback_reason or "fresh"] += 1
                if result.fallback_reason == "replica_down":
                    at = round(started - self._began, 3)
                    first = report.down_window[0] if report.down_window else at
                    report.down_window = (first, at)
                floor = self._acks.before(user, started - budget)
                if got < floor or result.staleness_bound > budget:
                    report.budget_violations += 1
                    self._note(f"budget violation: {user} seq {got} < {floor} {result}")
                self._check_claim(user, got, result, started)

    def _check_claim(self, user: str, got: int, result: Any, started: float) -> None:
        if not result.from_replica:
            return
        floor = self._acks.before(user, started - result.staleness_bound)
        if result.replay_lsn is not None:
            floor = max(floor, self._acks.covered_by(user, int(result.replay_lsn)))
        if got < floor:
            self.report.false_claims += 1
            self._note(f"false claim: {user} seq {got} < {floor} {result}")
