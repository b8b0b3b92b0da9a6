"""Markdown rendered from the results file: ``tools/RESULTS.md`` and the README's table.

Standard library only, and a pure function of the document (no clock, no machine look-up),
so ``tools/readme_tables.py --check`` can tell in CI whether the committed tables are what
the committed results produce.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from _bench.document import Document

HEADERS = ["contender", "n", "median ms", "block medians", "p99 ms", "p99 range", "max ms",
           "errors", "ratio"]


def cell(text: object) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None or math.isnan(seconds) else f"{seconds * 1000:.3f}"


def _range_ms(lo: float | None, hi: float | None) -> str:
    if lo is None or hi is None or math.isnan(lo):
        return "n/a"
    return f"{lo * 1000:.3f}-{hi * 1000:.3f}"


def ratio_text(ratio: Mapping[str, Any]) -> str:
    """``1.21x [1.20-1.28]`` from a ratio's JSON."""
    value, lo, hi = ratio["value"], ratio["lo"], ratio["hi"]
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.2f}x [{lo:.2f}-{hi:.2f}]"


def contender_rows(scenario: Mapping[str, Any]) -> list[list[str]]:
    """One row per contender: name, n, median, block range, p99, p99 range, max, errors and
    its first ratio (against what)."""
    first: dict[str, Mapping[str, Any]] = {}
    for ratio in scenario.get("ratios", []):
        first.setdefault(ratio["numerator"], ratio)
    table = []
    for name, s in scenario.get("contenders", {}).items():
        found = first.get(name)
        vs = f"{ratio_text(found)} vs {found['denominator']}" if found is not None else ""
        table.append([name, str(s["n"]), _ms(s["median"]), _range_ms(s["median_lo"],
                      s["median_hi"]), _ms(s["p99"]), _range_ms(s["p99_lo"], s["p99_hi"]),
                      _ms(s["max"]), str(s["errors"]), vs])
    return table


def fact_tables(facts: Mapping[str, Any]
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


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(cell(c) for c in row) + " |" for row in rows)]


def _run_line(run_id: str, run: Mapping[str, Any]) -> str:
    commit = run.get("commit") or "unknown"
    dirty = " (with uncommitted changes)" if run.get("dirty") else ""
    return f"`{run.get('command', '?')}` at propstore `{commit}`{dirty}, {run.get('date', run_id)}"


def _machine_summary(machine: Mapping[str, Any]) -> str:
    keys = ("cpus", "cpu model", "postgresql", "python", "psycopg", "pgpool", "cpu placement",
            "cluster", "conditions")
    return "; ".join(f"{k}: {machine[k]}" for k in keys if machine.get(k) not in (None, ""))


def results_markdown(document: Document) -> str:
    """``tools/RESULTS.md``: every scenario's tables, bars, facts and notes, with the runs
    (date, command, commit, machine) they came from."""
    runs: Mapping[str, Mapping[str, Any]] = document.get("runs", {})
    lines = [
        "# propstore benchmark results",
        "",
        "Generated from [RESULTS.json](RESULTS.json) by `tools/bench.py` (or "
        "`python tools/readme_tables.py`); do not edit by hand.",
        "",
        "## Runs",
        "",
    ]
    for run_id, run in runs.items():
        names = [s["name"] for s in document["scenarios"] if s.get("run") == run_id]
        lines.append(f"- {_run_line(run_id, run)}: {', '.join(names)}")
        lines += [f"  - {key}: {cell(value)}" for key, value in run.get("machine", {}).items()]
    lines += ["", document.get("note", ""), "", "## Bars and reported figures", ""]
    bar_rows = []
    for scenario in document["scenarios"]:
        if scenario.get("skipped"):
            bar_rows.append([scenario["name"], "(skipped)", "", "", "", "",
                             scenario["skipped"]])
        for bar in scenario.get("bars", []):
            bar_rows.append([scenario["name"], bar["name"], bar.get("budget", ""),
                             bar["target"], bar["measured"], bar["verdict"],
                             bar.get("detail", "")])
    lines += _table(["scenario", "figure", "budget", "bar", "measured", "verdict", "detail"],
                    bar_rows)
    for scenario in document["scenarios"]:
        if scenario.get("skipped"):
            continue
        lines += ["", f"## {scenario['name']}", "", scenario.get("description", ""), ""]
        if scenario.get("contenders"):
            lines += _table(HEADERS, contender_rows(scenario))
            lines.append("")
        tables, others = fact_tables(scenario.get("facts", {}))
        for columns, table_rows in tables:
            lines += _table(columns, table_rows)
            lines.append("")
        lines += [f"- {key}: {cell(value)}" for key, value in others.items()]
        lines += [f"- note: {cell(note)}" for note in scenario.get("notes", [])]
    return "\n".join(lines) + "\n"


def readme_benchmarks(document: Document) -> str:
    """The README's benchmark table (between its markers): every ``readme`` figure of every
    scenario, with its budget, bar and verdict, the runs it came from, and the misses."""
    runs: Mapping[str, Mapping[str, Any]] = document.get("runs", {})
    rows, missed = [], []
    for scenario in document["scenarios"]:
        if scenario.get("skipped"):
            rows.append([scenario["name"], "(skipped)", "", "", cell(scenario["skipped"]),
                         ""])
            continue
        for bar in scenario.get("bars", []):
            if bar.get("verdict") == "MISSED":
                missed.append(f"{scenario['name']}: {bar['name']}")
            if not bar.get("readme", True):
                continue
            verdict = {"met": "met", "MISSED": "**missed**"}.get(bar["verdict"], "")
            rows.append([scenario["name"], bar["name"], bar.get("budget", ""),
                         "" if bar["target"] == "reported" else bar["target"],
                         bar["measured"], verdict])
    lines = [
        "<!-- Generated by `python tools/readme_tables.py` from tools/RESULTS.json; do not "
        "edit by hand (CI runs `--check`). -->",
        "",
        "From " + "; ".join(f"{_run_line(rid, run)} ({', '.join(s['name'] for s in document['scenarios'] if s.get('run') == rid)})"  # noqa: E501
                            for rid, run in runs.items()) + ".",
    ]
    machines = {_machine_summary(run.get("machine", {})) for run in runs.values()}
    lines += [f"Machine: {m}." for m in sorted(machines) if m]
    lines += ["Budgets: the freshness each side of a comparison read at (raw clients and "
              "Pgpool give no bound; \"judged at\" is the budget a stale read is counted "
              "against).", ""]
    lines += _table(["scenario", "figure", "budget", "bar", "measured", "verdict"], rows)
    lines.append("")
    if missed:
        lines.append(f"Bars missed in these runs: {len(missed)} ({'; '.join(missed)}).")
    else:
        lines.append("Bars missed in these runs: none.")
    return "\n".join(lines)
