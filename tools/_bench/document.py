"""The results file, ``tools/RESULTS.json``: what every generated table is rendered from.

Standard library only: ``tools/readme_tables.py --check`` reads it in CI without servers or
the bench extras. The file is committed; a run merges into it scenario by scenario, so a
``--scenario X`` run replaces X's entry and keeps the others (each entry names the run it came
from: date, exact command, propstore commit, machine).

Schema (``"schema": 1``)::

    {"schema": 1, "note": "...how to read the figures...",
     "runs": {"<run id>": {"date", "command", "commit", "dirty", "machine": {...}}},
     "scenarios": [{"name", "run": "<run id>", "description", "duration_s", "skipped",
                    "contenders": {label: summary (seconds)}, "ratios": [...],
                    "bars": [{"name", "budget", "target", "measured", "verdict", "readme",
                              "value", "limit", "unit", "met", "detail", ...}],
                    "facts": {...}, "notes": [...]}]}

A new scenario needs nothing here: whatever its ``ScenarioResult.as_dict()`` holds is kept,
and its bars appear in the tables. Keys may be added freely; renderers ignore what they do not
know. Bump ``SCHEMA`` only for a change that old renderers would misread.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

SCHEMA = 1

Document = dict[str, Any]


def empty(note: str = "") -> Document:
    """A document with no scenarios."""
    return {"schema": SCHEMA, "note": note, "runs": {}, "scenarios": []}


def load(path: Path) -> Document:
    """The document at ``path`` (an empty one when there is no file yet)."""
    if not path.exists():
        return empty()
    document: Document = json.loads(path.read_text())
    if document.get("schema") != SCHEMA:
        raise ValueError(f"{path}: results schema {document.get('schema')!r}, this code reads "
                         f"{SCHEMA}")
    return document


def merge(document: Document, run_id: str, run: Mapping[str, Any],
          scenarios: Iterable[Mapping[str, Any]], order: Sequence[str] = (),
          note: str | None = None) -> Document:
    """``document`` with ``scenarios`` (from run ``run_id``) replacing entries of the same name.

    Scenarios are kept in ``order`` (the registry's), unknown names after it in the order
    met; runs no scenario refers to any more are dropped.
    """
    merged: dict[str, dict[str, Any]] = {s["name"]: dict(s) for s in document["scenarios"]}
    for scenario in scenarios:
        merged[scenario["name"]] = {**scenario, "run": run_id}
    rank = {name: i for i, name in enumerate(order)}
    names = sorted(merged, key=lambda n: (rank.get(n, len(rank)), list(merged).index(n)))
    runs = {**document.get("runs", {}), run_id: dict(run)}
    used = {merged[n].get("run") for n in names}
    return {
        **document,
        "schema": SCHEMA,
        "note": note if note is not None else document.get("note", ""),
        "runs": {key: value for key, value in runs.items() if key in used},
        "scenarios": [merged[n] for n in names],
    }


def dump(document: Document) -> str:
    """The file's text (stable: sorted nowhere, indented, one trailing newline)."""
    return json.dumps(document, indent=2, default=str) + "\n"


def save(path: Path, document: Document) -> None:
    """Write ``document`` to ``path``."""
    path.write_text(dump(document))
