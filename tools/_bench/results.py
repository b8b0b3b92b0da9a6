"""What a scenario hands back: its series, ratios, bars (met or not), facts and notes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from _bench.stats import Ratio, Series


@dataclass(frozen=True)
class Bar:
    """One figure of a scenario: a bar from the issue and what was measured against it, or a
    figure only reported (``limit`` None).

    ``limit`` is an upper bound unless ``at_least``; ``met`` is None when there is no bar or
    the figure could not be measured (a skipped contender, no samples). ``budget`` says at
    which freshness budget each side of the comparison read (every comparison states it);
    ``text`` replaces the formatted ``value`` where a figure needs words ("0 of 12,696").
    Every bar lands in the results file; ``readme`` ones also in the README's table.
    """

    name: str
    value: float
    limit: float | None = None
    at_least: bool = False
    unit: str = "x"
    detail: str = ""
    budget: str = ""
    text: str = ""
    readme: bool = True

    @property
    def met(self) -> bool | None:
        """Whether the bar is met (None: no bar, or not measured)."""
        if self.limit is None or math.isnan(self.value):
            return None
        return self.value >= self.limit if self.at_least else self.value <= self.limit

    @property
    def measured(self) -> str:
        """The measured figure with its unit (or its words)."""
        return self.text or _fmt(self.value, self.unit)

    @property
    def target(self) -> str:
        """The bar itself, e.g. ``<= 1.25x`` (``reported`` when there is none)."""
        if self.limit is None:
            return "reported"
        return f"{'>=' if self.at_least else '<='} {_fmt(self.limit, self.unit)}"

    @property
    def verdict(self) -> str:
        """``met``, ``MISSED``, ``not measured`` or ``reported``."""
        if self.limit is None:
            return "reported"
        return {True: "met", False: "MISSED", None: "not measured"}[self.met]

    def __str__(self) -> str:
        text = f"{self.name}: {self.measured}"
        if self.limit is not None:
            text += f" (bar {self.target}) {self.verdict}"
        if self.budget:
            text += f" [budget: {self.budget}]"
        return f"{text}; {self.detail}" if self.detail else text

    def as_dict(self) -> dict[str, Any]:
        """For the JSON output: the numbers and the formatted cells the tables show."""
        return {"name": self.name, "value": self.value, "limit": self.limit,
                "at_least": self.at_least, "unit": self.unit, "met": self.met,
                "budget": self.budget, "measured": self.measured, "target": self.target,
                "verdict": self.verdict, "detail": self.detail, "readme": self.readme}


def reported(name: str, value: float, *, unit: str = "x", budget: str = "", text: str = "",
             detail: str = "", readme: bool = True) -> Bar:
    """A figure with no bar, only reported."""
    return Bar(name, value, None, unit=unit, budget=budget, text=text, detail=detail,
               readme=readme)


def _fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "n/a"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "ms":
        return f"{value:.1f} ms"
    if unit == "%":
        return f"{value:.2f}%"
    if unit == "":
        return f"{value:,.0f}" if float(value).is_integer() else f"{value:g}"
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
