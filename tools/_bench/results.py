"""What a scenario hands back: its series, ratios, bars (met or not), facts and notes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from _bench.stats import Ratio, Series


@dataclass(frozen=True)
class Bar:
    """One bar from the issue and the figure measured against it.

    ``limit`` is an upper bound unless ``at_least``; ``met`` is None when the figure could
    not be measured (a skipped contender, no samples).
    """

    name: str
    value: float
    limit: float
    at_least: bool = False
    unit: str = "x"
    detail: str = ""

    @property
    def met(self) -> bool | None:
        """Whether the bar is met (None: not measured)."""
        if math.isnan(self.value):
            return None
        return self.value >= self.limit if self.at_least else self.value <= self.limit

    @property
    def measured(self) -> str:
        """The measured figure with its unit."""
        return _fmt(self.value, self.unit)

    @property
    def target(self) -> str:
        """The bar itself, e.g. ``<= 1.25x``."""
        return f"{'>=' if self.at_least else '<='} {_fmt(self.limit, self.unit)}"

    @property
    def verdict(self) -> str:
        """``met``, ``MISSED`` or ``not measured``."""
        return {True: "met", False: "MISSED", None: "not measured"}[self.met]

    def __str__(self) -> str:
        text = f"{self.name}: {self.measured} (bar {self.target}) {self.verdict}"
        return f"{text}; {self.detail}" if self.detail else text

    def as_dict(self) -> dict[str, Any]:
        """For the JSON output."""
        return {"name": self.name, "value": self.value, "limit": self.limit,
                "at_least": self.at_least, "unit": self.unit, "met": self.met,
                "detail": self.detail}


def _fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "n/a"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "ms":
        return f"{value:.1f} ms"
    if unit == "%":
        return f"{value:.2f}%"
    return f"{value:g}{unit}"


@dataclass
class ScenarioResult:
    """Everything one scenario measured.

    Attributes:
        series: latency series by contender label (the table's rows, the plot's curves).
        ratios: paired ratios the bars are judged on.
        bars: the issue's bars with their verdicts.
        facts: other figures worth reporting (proof mix, stale reads, CPU, RSS ...).
        notes: one-line remarks (skipped contenders, how a figure was taken).
    """

    name: str
    description: str
    duration: float = 0.0
    series: dict[str, Series] = field(default_factory=dict)
    ratios: list[Ratio] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None

    def add_series(self, *series: Series) -> None:
        """Keep series for the table and plot."""
        for one in series:
            self.series[one.name] = one

    def ratio(self, numerator: str, denominator: str) -> Ratio:
        """The paired ratio of two kept series (also kept for the report)."""
        found = Ratio.of(self.series[numerator], self.series[denominator])
        self.ratios.append(found)
        return found

    def as_dict(self) -> dict[str, Any]:
        """For the JSON output (summaries, not raw samples)."""
        return {
            "name": self.name,
            "description": self.description,
            "duration_s": self.duration,
            "skipped": self.skipped,
            "contenders": {name: s.summary().as_dict() for name, s in self.series.items()},
            "ratios": [r.as_dict() for r in self.ratios],
            "bars": [b.as_dict() for b in self.bars],
            "facts": self.facts,
            "notes": self.notes,
        }
