"""What the demo measures: latency histograms, per-reader counts, and the report."""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from propstore.monitor import LagReport
from propstore.store import ReadResult


class LatencyHistogram:
    """Latencies in log-spaced buckets (10 % wide, 10 µs to ~100 s): bounded memory,
    quantiles accurate to a bucket's width."""

    _BASE = 1e-5
    _GROWTH = 1.1
    _BUCKETS = 170

    def __init__(self, counts: list[int] | None = None) -> None:
        self.counts = counts if counts is not None else [0] * self._BUCKETS

    def add(self, seconds: float) -> None:
        """Record one latency (seconds)."""
        index = 0 if seconds <= self._BASE else int(
            math.log(seconds / self._BASE, self._GROWTH)) + 1
        self.counts[min(index, self._BUCKETS - 1)] += 1

    def quantile(self, q: float) -> float | None:
        """The upper edge of the bucket holding quantile ``q`` (seconds); None when empty."""
        total = sum(self.counts)
        if not total:
            return None
        rank = q * total
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank and count:
                return self._BASE * self._GROWTH ** index
        return self._BASE * self._GROWTH ** (self._BUCKETS - 1)

    def copy(self) -> LatencyHistogram:
        """An independent copy."""
        return LatencyHistogram(list(self.counts))


@dataclass
class ReaderStats:
    """What one demo thread's reads saw.

    Attributes:
        name: ``personalisation``, ``workflow`` or ``writer (read-your-writes)``.
        budget: the budget for people (``5.00s``, ``after token``).
        reads: reads completed.
        replica_reads: reads a replica served.
        reasons: why the primary served, by fallback reason.
        fallbacks_by_shard: reads the primary served, by shard.
        errors: failed reads by error type.
        violations: reads older than their budget allowed (must be 0).
        latency: read latency (seconds) as the caller saw it.
        examples: the first few violations and errors, for the report.
    """

    name: str
    budget: str
    reads: int = 0
    replica_reads: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    fallbacks_by_shard: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    violations: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    examples: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def primary_reads(self) -> int:
        """Reads the primary served."""
        return self.reads - self.replica_reads

    @property
    def p50(self) -> float | None:
        """Median latency (seconds)."""
        return self.latency.quantile(0.5)

    @property
    def p99(self) -> float | None:
        """99th percentile latency (seconds)."""
        return self.latency.quantile(0.99)

    def record(self, result: ReadResult, seconds: float, violation: str | None) -> None:
        """Count one read; ``violation`` describes it when it broke its budget."""
        with self._lock:
            self.reads += 1
            self.latency.add(seconds)
            if result.from_replica:
                self.replica_reads += 1
            else:
                self.reasons[result.fallback_reason or "none"] += 1
                self.fallbacks_by_shard[result.shard] += 1
            if violation is not None:
                self.violations += 1
                self._example(f"violation: {violation}")

    def error(self, exc: BaseException) -> None:
        """Count a failed read."""
        with self._lock:
            self.errors[type(exc).__name__] += 1
            self._example(f"error: {type(exc).__name__}: {exc}")

    def _example(self, text: str) -> None:
        if len(self.examples) < 5:
            self.examples.append(text)

    def snapshot(self) -> ReaderStats:
        """A consistent copy (the thread keeps counting into this one)."""
        with self._lock:
            return replace(
                self, reasons=Counter(self.reasons),
                fallbacks_by_shard=Counter(self.fallbacks_by_shard), errors=Counter(self.errors),
                latency=self.latency.copy(), examples=list(self.examples),
                _lock=threading.Lock(),
            )


@dataclass(frozen=True, slots=True)
class DemoEvent:
    """Something the demo did, ``at`` seconds after the workload started."""

    at: float
    text: str


@dataclass(frozen=True)
class DemoReport:
    """The demo's state: passed to the ``show`` callback while it runs, returned at the end.

    Attributes:
        elapsed: seconds since the workload started.
        duration: planned length of the workload (seconds).
        users: users loaded.
        paused_shard: the shard whose replicas have replay paused for the middle half.
        paused_nodes: those replicas.
        readers: personalisation, workflow, and the writer's read-your-writes reads.
        writes: writes acknowledged.
        write_errors: failed writes by error type.
        events: what was done when (load, pause, resume).
        lag: the store's lag report at the time of this snapshot.
    """

    elapsed: float
    duration: float
    users: int
    paused_shard: str
    paused_nodes: tuple[str, ...]
    readers: tuple[ReaderStats, ...]
    writes: int
    write_errors: Mapping[str, int]
    events: tuple[DemoEvent, ...]
    lag: LagReport | None = None

    @property
    def violations(self) -> int:
        """Budget violations over every reader (the demo's claim: 0)."""
        return sum(reader.violations for reader in self.readers)

    @property
    def errors(self) -> int:
        """Failed reads and writes."""
        return sum(sum(r.errors.values()) for r in self.readers) + sum(
            self.write_errors.values())

    def reader(self, name: str) -> ReaderStats:
        """The stats of the reader called ``name`` (``KeyError`` when there is none)."""
        for stats in self.readers:
            if stats.name == name:
                return stats
        raise KeyError(name)


__all__ = ["DemoEvent", "DemoReport", "LatencyHistogram", "ReaderStats"]
