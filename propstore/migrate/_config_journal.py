"""What an interrupted configuration rollout must remember: each node's values before it,
and which of its nodes finished their bake.

The servers say what was applied (a node whose ``pg_settings`` shows every new value and no
``pending_restart`` is done, so a re-run skips it); they cannot say what a value *was*
before ``ALTER SYSTEM`` overwrote it. That is the one thing kept here: a small JSON file,
written (atomically, fsync'd) *before* a node is touched, so a re-run after an interruption
can still revert every changed node to its original value. Why not the servers as the
journal alone: ``postgresql.auto.conf`` keeps only the newest value, and a custom GUC as a
memo would survive in the server's configuration forever.

Nor can the servers say whether a node's *bake* ended: a run interrupted while watching a
step leaves a node that shows its new values but was never proven harmless. So the journal
also lists the nodes whose bake passed; a node it recorded but does not list was touched by
a run that stopped before the end of that node's bake, and a re-run bakes it again.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from propstore.errors import MigrationError
from propstore.migrate._config_plan import ConfigStep

#: node -> setting -> (value before, came from postgresql.auto.conf)
Originals = dict[str, dict[str, tuple[str, bool]]]


class ConfigJournal:
    """The journal file of one change (None: an in-memory journal, nothing survives)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._originals, self._baked = self._load()

    def _load(self) -> tuple[Originals, set[str]]:
        if self.path is None or not self.path.exists():
            return {}, set()
        try:
            document = json.loads(self.path.read_text())
            originals = {node: {name: (str(v[0]), bool(v[1])) for name, v in settings.items()}
                         for node, settings in document["originals"].items()}
            # A journal without the list (older propstore): every node is baked again.
            baked = {str(node) for node in document.get("baked", [])}
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise MigrationError(f"unreadable rollout journal {self.path}: {exc}") from exc
        return originals, baked & set(originals)

    @property
    def originals(self) -> Mapping[str, Mapping[str, tuple[str, bool]]]:
        """Values recorded before each node was first touched."""
        return self._originals

    def record(self, step: ConfigStep) -> None:
        """Remember ``step``'s values before (the first record of a node wins)."""
        if step.node.name in self._originals:
            return
        self._originals[step.node.name] = {
            s.name: (s.before, s.before_in_auto_conf) for s in step.settings}
        self._write()

    def baked(self, node: str) -> None:
        """``node``'s step passed its bake."""
        if node in self._baked:
            return
        self._baked.add(node)
        self._write()

    def unbaked(self, node: str) -> bool:
        """A run touched ``node`` and stopped before its bake passed (a re-run must bake it
        again before going on)."""
        return node in self._originals and node not in self._baked

    def clear(self) -> None:
        """Forget everything (the rollout finished or was reverted)."""
        self._originals = {}
        self._baked = set()
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def _write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        document = {"originals": {node: {name: list(v) for name, v in settings.items()}
                                  for node, settings in self._originals.items()},
                    "baked": sorted(self._baked)}
        fd, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".journal-")
        with os.fdopen(fd, "w") as handle:
            json.dump(document, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)


__all__ = ["ConfigJournal", "Originals"]
