"""Showing results: a rich table on the terminal, JSON, ``RESULTS.md`` and a PNG chart."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from _bench import pgpool
from _bench.results import ScenarioResult
from _bench.stats import Ratio, Summary

RATIO_NOTE = (
    "Figures are from one run on a shared machine, contenders interleaved in one process "
    "(A B A B ..., order rotating); compare the ratios, not the absolute times. Medians are "
    "over all samples with the range of per-block (~1 s) medians; p99 is over all samples "
    "with the range of p99 over 5 consecutive segments; ratios are medians of per-block "
    "ratios [min-max]."
)


def machine_info(server_dsn: str | None) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "cpu model": _cpu_model(),
        "python": platform.python_version(),
        "psycopg": psycopg.__version__,
        "libpq": psycopg.pq.version(),
        "os": platform.platform(),
        "pgpool": pgpool.version(),
        "propstore commit": _git_commit(),
    }
    if server_dsn is not None:
        with psycopg.connect(server_dsn) as conn:
            info["postgresql"] = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    return info


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git_commit() -> str | None:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False, cwd=Path(__file__).parent)
    return done.stdout.strip() or None


def _ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.3f}"


def _range_ms(lo: float, hi: float) -> str:
    return "n/a" if math.isnan(lo) else f"{lo * 1000:.3f}-{hi * 1000:.3f}"


def fact_tables(facts: dict[str, Any]
                ) -> tuple[list[tuple[list[str], list[list[str]]]], dict[str, Any]]:
    """Facts whose values are dicts with the same keys, as tables (one row per fact); the
    other facts as they are."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for key, value in facts.items():
        if isinstance(value, dict) and value:
            groups.setdefault(tuple(value), []).append(key)
    tables = []
    tabled: set[str] = set()
    for columns, keys in groups.items():
        if len(keys) < 2:
            continue
        tables.append((["", *columns],
                       [[key, *(str(facts[key][c]) for c in columns)] for key in keys]))
        tabled.update(keys)
    return tables, {k: v for k, v in facts.items() if k not in tabled}


def rows(result: ScenarioResult) -> list[list[str]]:
    """One row per contender: name, n, median, block range, p99, p99 range, max, ratio."""
    ratios: dict[str, Ratio] = {}
    for one in result.ratios:
        ratios.setdefault(one.numerator, one)
    table = []
    for name, series in result.series.items():
        s: Summary = series.summary()
        found = ratios.get(name)
        vs = f"{found} vs {found.denominator}" if found is not None else ""
        table.append([name, str(s.n), _ms(s.median), _range_ms(s.median_lo, s.median_hi),
                      _ms(s.p99), _range_ms(s.p99_lo, s.p99_hi), _ms(s.max), str(s.errors), vs])
    return table


HEADERS = ["contender", "n", "median ms", "block medians", "p99 ms", "p99 range", "max ms",
           "errors", "ratio"]


def print_report(results: Sequence[ScenarioResult], console: Console | None = None) -> None:
    """The tables, bars, facts and notes of every scenario, on the terminal."""
    # Wide enough for the table when the output is a file or a pipe (rich assumes 80).
    console = console or Console(width=None if Console().is_terminal else 180)
    for result in results:
        title = escape(f"{result.name}: {result.description}")
        if result.skipped:
            console.print(f"[bold]{title}[/bold]\n  [yellow]skipped:[/yellow] "
                          f"{escape(result.skipped)}")
            continue
        if result.series:
            table = Table(title=title, title_justify="left")
            for header in HEADERS:
                table.add_column(header, justify="left" if header in ("contender", "ratio")
                                 else "right")
            for row in rows(result):
                table.add_row(*(escape(cell) for cell in row))
            console.print(table)
        else:
            console.print(f"[bold]{title}[/bold]")
        for bar in result.bars:
            colour = {True: "green", False: "red", None: "yellow"}[bar.met]
            console.print(f"  [{colour}]{bar.verdict}[/{colour}] {escape(str(bar))}")
        tables, others = fact_tables(result.facts)
        for columns, table_rows in tables:
            facts = Table(*columns, show_header=True)
            for row in table_rows:
                facts.add_row(*(escape(cell) for cell in row))
            console.print(facts)
        for key, value in others.items():
            console.print(escape(f"  {key}: {value}"))
        for note in result.notes:
            console.print(f"  [dim]note: {escape(note)}[/dim]")
        console.print()


def write_json(path: Path, results: Sequence[ScenarioResult], machine: dict[str, Any],
               command: str) -> None:
    """Everything measured (summaries in seconds, not raw samples)."""
    document = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine,
        "note": RATIO_NOTE,
        "scenarios": [r.as_dict() for r in results],
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def markdown(results: Sequence[ScenarioResult], machine: dict[str, Any], command: str) -> str:
    """``RESULTS.md``: the tables, the bars, the machine, the date and the command line."""
    lines = [
        "# propstore benchmark results",
        "",
        "Generated by `tools/bench.py`; do not edit by hand.",
        "",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- command: `{command}`",
        *(f"- {key}: {value}" for key, value in machine.items()),
        "",
        RATIO_NOTE,
        "",
        "## Bars",
        "",
        "| scenario | figure | bar | measured | verdict | detail |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        if result.skipped:
            lines.append(f"| {result.name} | (skipped) | | | | {_cell(result.skipped)} |")
        for bar in result.bars:
            lines.append(f"| {result.name} | {_cell(bar.name)} | {bar.target} | "
                         f"{bar.measured} | {bar.verdict} | {_cell(bar.detail)} |")
    for result in results:
        if result.skipped:
            continue
        lines += ["", f"## {result.name}", "", result.description, ""]
        if result.series:
            lines += ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
            lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows(result)]
            lines.append("")
        tables, others = fact_tables(result.facts)
        for columns, table_rows in tables:
            lines += ["| " + " | ".join(_cell(c) for c in columns) + " |",
                      "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table_rows]
            lines.append("")
        lines += [f"- {key}: {_cell(str(value))}" for key, value in others.items()]
        lines += [f"- note: {_cell(note)}" for note in result.notes]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def plot(path: Path, results: Sequence[ScenarioResult]) -> None:
    """Latency distributions per contender, one panel per scenario.

    Each curve is the fraction of operations slower than x (both axes logarithmic), so the
    median (0.5) and the tail (p99 at 0.01, p99.9 at 0.001) are read off the same curve.
    """
    import matplotlib  # the bench extra; only needed with --plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if r.series]
    if not shown:
        return
    columns = 2 if len(shown) > 1 else 1
    rows_needed = math.ceil(len(shown) / columns)
    figure, axes = plt.subplots(rows_needed, columns, figsize=(7 * columns, 4.2 * rows_needed),
                                squeeze=False)
    for axis, result in zip(axes.flat, shown, strict=False):
        for name, series in result.series.items():
            values = sorted(v * 1000 for v in series.values)
            if not values:
                continue
            slower = [1 - i / len(values) for i in range(len(values))]
            axis.step(values, slower, where="post", label=f"{name} (n={len(values)})")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.axhline(0.5, color="grey", linewidth=0.6, linestyle=":")
        axis.axhline(0.01, color="grey", linewidth=0.6, linestyle=":")
        axis.set_xlabel("latency (ms)")
        axis.set_ylabel("fraction slower (0.5: median, 0.01: p99)")
        axis.set_title(result.name)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=6.5, loc="lower left")
    for axis in list(axes.flat)[len(shown):]:
        axis.set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
