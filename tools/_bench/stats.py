"""Latency samples and the summaries the report prints: medians and p99 with their spread.

Absolute times on a shared 2-core machine are noise; what survives is a *paired* comparison.
Every sample therefore carries the block (a short slice of the run) it was taken in, and a
ratio between two contenders is computed block by block (both ran in the same block,
interleaved), then summarised as the median of the per-block ratios with their min and max.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

#: Consecutive segments a series is cut into to show how much its p99 moves over the run.
P99_SEGMENTS = 5


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values, by linear interpolation."""
    if not sorted_values:
        return math.nan
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    weight = position - low
    return sorted_values[low] * (1 - weight) + sorted_values[high] * weight


@dataclass
class Series:
    """Latencies (seconds) of one contender, each tagged with the block it was taken in and
    when it started (seconds into the run)."""

    name: str
    values: list[float] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)
    errors: int = 0

    def add(self, seconds: float, block: int, start: float = 0.0) -> None:
        """Record one operation's latency."""
        self.values.append(seconds)
        self.blocks.append(block)
        self.starts.append(start)

    def between(self, name: str, first: float, last: float = math.inf) -> Series:
        """The samples that started in ``[first, last)`` seconds, as a new series."""
        kept = Series(name)
        for value, block, start in zip(self.values, self.blocks, self.starts, strict=True):
            if first <= start < last:
                kept.add(value, block, start)
        return kept

    def by_block(self) -> dict[int, list[float]]:
        """Samples grouped by block."""
        groups: dict[int, list[float]] = {}
        for value, block in zip(self.values, self.blocks, strict=True):
            groups.setdefault(block, []).append(value)
        return groups

    def summary(self) -> Summary:
        """Median and p99 with their spread over the run."""
        return Summary.of(self)


@dataclass(frozen=True)
class Summary:
    """What the table shows for one contender (all times in seconds).

    ``median_lo``/``median_hi`` are the smallest and largest per-block medians;
    ``p99_lo``/``p99_hi`` the smallest and largest p99 of :data:`P99_SEGMENTS` consecutive
    segments of the run.
    """

    n: int
    errors: int
    median: float
    median_lo: float
    median_hi: float
    p99: float
    p99_lo: float
    p99_hi: float
    max: float
    mean: float

    @classmethod
    def of(cls, series: Series) -> Summary:
        """Summarise a series (NaNs when it is empty)."""
        values = sorted(series.values)
        if not values:
            nan = math.nan
            return cls(0, series.errors, nan, nan, nan, nan, nan, nan, nan, nan)
        medians = [statistics.median(v) for v in series.by_block().values()]
        segments = [sorted(s) for s in _segments(series.values, P99_SEGMENTS) if len(s) >= 20]
        p99s = [quantile(s, 0.99) for s in segments] or [quantile(values, 0.99)]
        return cls(
            n=len(values), errors=series.errors,
            median=quantile(values, 0.5), median_lo=min(medians), median_hi=max(medians),
            p99=quantile(values, 0.99), p99_lo=min(p99s), p99_hi=max(p99s),
            max=values[-1], mean=statistics.fmean(values),
        )

    def as_dict(self) -> dict[str, float | int]:
        """For the JSON output (seconds)."""
        return dict(self.__dict__)


def _segments(values: Sequence[float], count: int) -> Iterable[Sequence[float]]:
    size = max(1, math.ceil(len(values) / count))
    for start in range(0, len(values), size):
        yield values[start:start + size]


@dataclass(frozen=True)
class Ratio:
    """``numerator / denominator`` of median latencies, paired block by block.

    ``value`` is the median of the per-block ratios, ``lo``/``hi`` their extremes, ``blocks``
    how many blocks both contenders have samples in.
    """

    numerator: str
    denominator: str
    value: float
    lo: float
    hi: float
    blocks: int

    @classmethod
    def of(cls, numerator: Series, denominator: Series) -> Ratio:
        """The paired ratio of two series measured in the same blocks."""
        top, bottom = numerator.by_block(), denominator.by_block()
        ratios = [
            statistics.median(top[b]) / statistics.median(bottom[b])
            for b in sorted(set(top) & set(bottom))
        ]
        if not ratios:
            return cls(numerator.name, denominator.name, math.nan, math.nan, math.nan, 0)
        return cls(numerator.name, denominator.name, statistics.median(ratios), min(ratios),
                   max(ratios), len(ratios))

    def __str__(self) -> str:
        return f"{self.value:.2f}x [{self.lo:.2f}-{self.hi:.2f}]"

    def as_dict(self) -> dict[str, float | int | str]:
        """For the JSON output."""
        return dict(self.__dict__)
