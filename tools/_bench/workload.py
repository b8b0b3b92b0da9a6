"""Threads of load and the bookkeeping that checks every read against acknowledged writes.

Each writer owns its users and writes an increasing ``seq``; :class:`AckLog` records when each
write was acknowledged. A read that began at ``t`` with budget ``b`` must return a ``seq`` at
least as new as every write acknowledged before ``t - b``; anything older is a violation.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from _bench.stats import Series

PACE = 0.003  # seconds between one thread's operations: load, not saturation


class AckLog:
    """When each write was acknowledged: ``(time, seq)`` per user, in bounded memory.

    Acknowledgements older than ``window`` seconds are dropped (the soak measures this
    process's memory, so the bookkeeping must not grow), keeping the newest dropped one as
    a floor. Writes to one user are sequential, so times and seqs only increase, and
    :meth:`floor` is exact for any ``before`` within the window: no budget may exceed it.
    """

    def __init__(self, users: list[str], window: float = 10.0) -> None:
        self._acks: dict[str, deque[tuple[float, int]]] = {u: deque() for u in users}
        self._dropped: dict[str, tuple[float, int]] = {}
        self._window = window
        self._lock = threading.Lock()

    def acked(self, user: str, at: float, seq: int) -> None:
        """Record that the write of ``seq`` to ``user`` was acknowledged at ``at``."""
        with self._lock:
            acks = self._acks[user]
            acks.append((at, seq))
            while acks[0][0] < at - self._window:
                self._dropped[user] = acks.popleft()

    def floor(self, user: str, before: float) -> int:
        """The newest ``seq`` acknowledged before ``before`` (0 if none).

        Raises ``ValueError`` when ``before`` is so old that the answer was dropped.
        """
        with self._lock:
            best = 0
            dropped = self._dropped.get(user)
            if dropped is not None:
                if before <= dropped[0]:
                    raise ValueError(f"{before} is older than the {self._window:g} s window")
                best = dropped[1]
            for at, seq in self._acks[user]:
                if at < before:
                    best = seq
            return best


#: Names of the counts a :class:`Tally` keeps (the keys of the facts in the report).
BUDGET_READS = "budget reads"
BUDGET_OLDER = "budget reads older than the newest acknowledged write"
BUDGET_PAST = "budget reads older than their budget"
RYW_READS = "read-your-writes reads"
RYW_MISSED = "read-your-writes reads missing the write"
BY_PRIMARY = "reads served by the primary"
ERRORS = "errors"


@dataclass
class Tally:
    """One contender's latency series and correctness counts.

    A *budget read* is older than it may be when it misses a write acknowledged more than
    its budget before it began (``BUDGET_PAST``); ``BUDGET_OLDER`` counts reads that miss
    any write acknowledged before they began (allowed within a budget; for a reader
    without one, such as Pgpool's, every such read is stale). A *read-your-writes* read
    must show the write just acknowledged.
    """

    series: dict[str, Series] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Keep at most this many samples per series (a uniform random subset), so that a long
    #: run's bookkeeping does not grow: the soak measures this process's memory.
    reservoir: int | None = None
    _seen: Counter[str] = field(default_factory=Counter)
    _rng: random.Random = field(default_factory=lambda: random.Random(5))

    def sample(self, name: str, seconds: float, at: float) -> None:
        """A latency of kind ``name`` that started ``at`` seconds into the run."""
        with self.lock:
            series = self.series.setdefault(name, Series(name))
            self._seen[name] += 1
            if self.reservoir is None or len(series.values) < self.reservoir:
                series.add(seconds, 0, at)
                return
            # Reservoir sampling (Algorithm R): every sample is kept with equal chance.
            slot = self._rng.randrange(self._seen[name])
            if slot < self.reservoir:
                series.values[slot], series.starts[slot] = seconds, at

    def count(self, *names: str, example: str | None = None) -> None:
        """Add one to each named count (and keep ``example`` among the first few)."""
        with self.lock:
            for name in names:
                self.counts[name] += 1
            if example is not None and len(self.examples) < 3:
                self.examples.append(example)

    def error(self, exc: BaseException) -> None:
        """Count an error (first few kept as examples)."""
        self.count(ERRORS, example=f"{type(exc).__name__}: {exc}")

    @property
    def violations(self) -> int:
        """Reads that broke their contract: past their budget or missing their own write."""
        return self.counts[BUDGET_PAST] + self.counts[RYW_MISSED]

    def facts(self) -> dict[str, int]:
        """Every count (zeros included), for the report."""
        names = (BUDGET_READS, BUDGET_OLDER, BUDGET_PAST, RYW_READS, RYW_MISSED, BY_PRIMARY,
                 ERRORS)
        return {name: self.counts[name] for name in names}


class Workers:
    """Threads running until :meth:`stop`; times are seconds since :attr:`zero`."""

    def __init__(self) -> None:
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.zero = time.monotonic()

    def now(self) -> float:
        """Seconds since the timed run began (negative during the warm-up)."""
        return time.monotonic() - self.zero

    def spawn(self, name: str, step: Callable[[], None], tally: Tally) -> None:
        """Run ``step`` in a loop, paced, counting its errors in ``tally``."""
        def loop() -> None:
            while not self.stop_event.is_set():
                try:
                    step()
                except Exception as exc:  # counted and reported; the run goes on
                    tally.error(exc)
                self.stop_event.wait(PACE)

        thread = threading.Thread(target=loop, name=f"bench-{name}", daemon=True)
        self.threads.append(thread)
        thread.start()

    def stop(self) -> None:
        """Stop and join every thread."""
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=180)
