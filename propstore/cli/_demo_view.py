"""What ``propstore demo`` shows: the live view, the progress lines when piped, the final
summary (the last lag table and the per-reader figures) and its ``--json`` document."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.text import Text

from propstore._durations import format_duration
from propstore.cli._demo_stats import DemoReport, ReaderStats
from propstore.cli._lag import lag_table
from propstore.cli._table import Column, FittedTable

_PIPED_EVERY = 2.0  # seconds between progress lines when the output is not a terminal


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(seconds)


def _percent(part: int, whole: int) -> str:
    return f"{part} ({100 * part / whole:.0f}%)" if whole else "0"


def _errors(reader: ReaderStats) -> Text:
    errors = sum(reader.errors.values())
    return Text(str(errors), style="yellow" if errors else "")


def _reasons(reader: ReaderStats) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in reader.reasons.most_common()) or "-"


#: Per reader. At 80 terminal columns: reader, budget, reads, replica, primary, p50, p99
#: and violations; errors and fallback reasons need more (`--wide`).
STATS_COLUMNS: tuple[Column[ReaderStats], ...] = (
    Column("reader", lambda r: r.name, shrink="wrap"),
    Column("budget", lambda r: r.budget, shrink="wrap"),
    Column("reads", lambda r: str(r.reads), justify="right"),
    Column("replica", lambda r: _percent(r.replica_reads, r.reads), shrink="wrap",
           justify="right"),
    Column("primary", lambda r: _percent(r.primary_reads, r.reads), shrink="wrap",
           justify="right"),
    Column("fallback reasons", _reasons, priority=2, shrink="wrap"),
    Column("p50", lambda r: _ms(r.p50), justify="right"),
    Column("p99", lambda r: _ms(r.p99), justify="right"),
    Column("errors", _errors, priority=1, justify="right"),
    Column("violations", lambda r: Text(str(r.violations), style="bold red" if r.violations
                                        else "bold green"), justify="right"),
)


def stats_table(readers: tuple[ReaderStats, ...], *, wide: bool = False
                ) -> FittedTable[ReaderStats]:
    """Per reader: reads by replica vs primary, fallback reasons, latency, violations."""
    return FittedTable(STATS_COLUMNS, [readers], wide=wide)


def _headline(report: DemoReport) -> str:
    paused = ", ".join(report.paused_nodes)
    third = report.duration / 4
    if report.elapsed < third:
        phase = f"all replicas replaying; replay pauses on {paused} at {third:.0f}s"
    elif report.elapsed < 3 * third:
        phase = (f"replay PAUSED on {paused}: its bound grows, reads whose budget it "
                 f"exceeds go to the primary")
    else:
        phase = f"replay resumed on {paused}"
    return (f"propstore demo {report.elapsed:5.1f}s / {report.duration:.0f}s - {phase}; "
            f"{report.writes} writes")


def live_view(report: DemoReport, *, wide: bool = False) -> RenderableType:
    """The whole screen: headline, lag table, reader stats."""
    parts: list[RenderableType] = [Text(_headline(report), style="bold")]
    if report.lag is not None:
        parts.append(lag_table(report.lag, state_time=True, wide=wide))
    parts.append(stats_table(report.readers, wide=wide))
    return Group(*parts)


def summary(report: DemoReport, *, wide: bool = False) -> RenderableType:
    """What to print at the end: what was done when, the last lag table, the per-reader
    figures and the verdict (the live view is gone from the screen by then)."""
    lines: list[RenderableType] = [
        Text(f"Demo finished: {report.elapsed:.1f}s, {report.users} users, "
             f"{report.writes} writes, replay paused on {report.paused_shard}'s replicas "
             f"for the middle half.", style="bold"),
    ]
    lines += [Text(f"  {event.at:6.1f}s  {event.text}") for event in report.events]
    if report.lag is not None:
        lines += [Text("Lag at the end:"), lag_table(report.lag, state_time=True, wide=wide)]
    lines.append(stats_table(report.readers, wide=wide))
    workflow = next((r for r in report.readers if r.name == "workflow"), None)
    if workflow is not None and workflow.fallbacks_by_shard:
        fallbacks = workflow.fallbacks_by_shard.get(report.paused_shard, 0)
        lines.append(Text(
            f"Workflow reads of {report.paused_shard} that its primary served rather than a "
            f"replica beyond {workflow.budget}: {fallbacks}."))
    for reader in report.readers:
        lines += [Text(f"  {reader.name}: {example}", style="yellow")
                  for example in reader.examples]
    if report.violations:
        lines.append(Text(f"Budget violations: {report.violations} - a read was older than "
                          f"its budget allowed.", style="bold red"))
    else:
        lines.append(Text("Budget violations: 0 - every read was at least as fresh as its "
                          "budget, whichever node served it.", style="bold green"))
    return Group(*lines)


def progress_printer(console: Console) -> Callable[[DemoReport], None]:
    """A ``show`` callback printing one line every couple of seconds (piped output)."""
    last = [0.0]

    def show(report: DemoReport) -> None:
        now = time.monotonic()
        if now - last[0] < _PIPED_EVERY:
            return
        last[0] = now
        reads = ", ".join(
            f"{r.name} {r.reads} (replica {r.replica_reads})" for r in report.readers)
        console.print(f"[{report.elapsed:5.1f}s] {reads}; writes {report.writes}; "
                      f"violations {report.violations}")

    return show


def _seconds(value: float | None) -> float | None:
    return None if value is None or math.isinf(value) else value


def demo_document(report: DemoReport) -> dict[str, Any]:
    """``demo --json``: the run's summary as one JSON document (docs/operating.md)."""
    return {
        "elapsed_seconds": round(report.elapsed, 3),
        "duration_seconds": report.duration,
        "users": report.users,
        "writes": report.writes,
        "write_errors": dict(report.write_errors),
        "paused_shard": report.paused_shard,
        "paused_nodes": list(report.paused_nodes),
        "events": [{"at_seconds": e.at, "text": e.text} for e in report.events],
        "readers": [
            {
                "name": r.name, "budget": r.budget, "reads": r.reads,
                "replica_reads": r.replica_reads, "primary_reads": r.primary_reads,
                "fallback_reasons": dict(r.reasons), "errors": dict(r.errors),
                "violations": r.violations, "p50_seconds": _seconds(r.p50),
                "p99_seconds": _seconds(r.p99), "examples": list(r.examples),
            }
            for r in report.readers
        ],
        "violations": report.violations,
        "lag": None if report.lag is None else [row.to_dict() for row in report.lag.rows],
    }


__all__ = ["demo_document", "live_view", "progress_printer", "stats_table", "summary"]
