"""Showing results: a rich table on the terminal, the run's provenance, and a PNG chart.

The results file and the markdown rendered from it live in ``document`` and ``render``
(standard library only, so CI can check the README without servers).
"""

from __future__ import annotations

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
from _bench.render import HEADERS, contender_rows, fact_tables
from _bench.results import ScenarioResult

RATIO_NOTE = (
    "Contenders of a scenario run interleaved in one process (A B C, B C A, ...: every "
    "contender takes every position); compare the ratios, not the absolute times, which move "
    "with the machine's other load. Medians are "
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
        "load average at start (1/5/15 min)": " / ".join(
            f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else None,
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


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], capture_output=True, text=True, check=False,
                          cwd=Path(__file__).parent)
    return done.stdout.strip()


def run_info(command: str, machine: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """An id for this run and its provenance: date, exact command, propstore commit (and
    whether the library or the bench had uncommitted changes), machine."""
    now = datetime.now(UTC)
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ":/propstore",
                 ":/migrations", ":/tools/_bench", ":/tools/bench.py")
    return now.strftime("%Y-%m-%dT%H:%M:%SZ"), {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "commit": _git("rev-parse", "--short", "HEAD") or None,
        "dirty": bool(dirty),
        "machine": machine,
    }


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
            for row in contender_rows(result.as_dict()):
                table.add_row(*(escape(cell) for cell in row))
            console.print(table)
        else:
            console.print(f"[bold]{title}[/bold]")
        for bar in result.bars:
            colour = ("blue" if bar.limit is None
                      else {True: "green", False: "red", None: "yellow"}[bar.met])
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
