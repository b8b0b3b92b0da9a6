"""What an interrupted configuration rollout must remember: each node's values before it.

The servers say what was applied (a node whose ``pg_settings`` shows every new value and no
``pending_restart`` is done, so a re-run skips it); they cannot say what a value *was*
before ``ALTER SYSTEM`` overwrote it. That is the one thing kept here: a small JSON file,
written (atomically, fsync'd) *before* a node is touched, so a re-run after an interruption
can still revert every changed node to its original value. Why not the servers as the
journal alone: ``postgresql.auto.conf`` keeps only the newest value, and a custom GUC as a
memo would survive in the server's configuration forever.
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
        self._originals: Originals = self._load()

    def _load(self) -> Originals:
        if self.path is None or not self.path.exists():
            return {}
        try:
            document = json.loads(self.path.read_text())
            return {node: {name: (str(v[0]), bool(v[1])) for name, v in settings.items()}
                    for node, settings in document["originals"].items()}
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise MigrationError(f"unreadable rollout journal {self.path}: {exc}") from exc

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

    def clear(self) -> None:
        """Forget everything (the rollout finished or was reverted)."""
        self._originals = {}
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def _write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        document = {"originals": {node: {name: list(v) for name, v in settings.items()}
                                  for node, settings in self._originals.items()}}
        fd, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".journal-")
        with os.fdopen(fd, "w") as handle:
            json.dump(document, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)


__all__ = ["ConfigJournal", "Originals"]
