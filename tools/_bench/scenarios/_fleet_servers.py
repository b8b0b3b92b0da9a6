"""What the servers say a fleet costs them: statements, backends, their CPU.

Every figure comes from the servers themselves, never from the clients' own counters:
statements from ``pg_stat_statements`` (exact and immediate, unlike ``pg_stat_database``'s
per-backend flushes), connections from ``pg_stat_activity``, CPU from ``/proc/<pid>/stat``
of the backends. A backend is a *reader's* when its ``application_name`` is a store pool's
(``propstore:<node>``) or the Pgpool readers' (which Pgpool forwards); the probe's own
connections are ``fleet-bench``; every other client backend is monitoring (a store's own
monitor, a shared agent, Pgpool's lag checks).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from propstore import _sql

PROBE_NAME = "fleet-bench"
READER_NAME = "fleet-reader"
#: The Pgpool readers' query (the alias marks it as a read in ``pg_stat_statements``; no SQL
#: comment, which would stop Pgpool from load-balancing it). ``inet_server_port()`` says
#: which server answered.
PGPOOL_READ = ("SELECT props AS fleet_reader, inet_server_port() FROM user_properties"
               " WHERE tenant_id = %s AND user_id = %s")
#: The statements reads send (data, pipelined checks, a new connection's identity); every
#: other statement a server runs, but the probe's own, is monitoring.
READ_SQL = frozenset(_sql.STATEMENTS[name] for name in (
    _sql.GET, _sql.GET_MANY, _sql.REPLAY_LSN, _sql.IS_PRIMARY, _sql.IDENTITY))
_TICK = os.sysconf("SC_CLK_TCK")


def reads_sql(text: str) -> bool:
    """Whether a statement is part of a read (or the probe's own), not monitoring."""
    return (text in READ_SQL or "fleet_reader" in text or "pg_stat_statements" in text
            or "pg_stat_activity" in text)


def is_reader(application_name: str) -> bool:
    """Whether a backend serves reads (a store's pool, the Pgpool readers)."""
    return application_name.startswith("propstore:") or application_name == READER_NAME


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process so far (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


def processes_mentioning(text: str) -> list[int]:
    """Pids of the processes whose command line contains ``text`` (a shared agent, by the
    private folder its socket lives in)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def tree_cpu(roots: Iterable[int]) -> float:
    """CPU seconds of ``roots`` and every live descendant (a store's agent, Pgpool's
    children)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    total, todo, seen = 0.0, list(roots), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += cpu_seconds(pid) or 0.0
        todo.extend(parents.get(pid, []))
    return total


@dataclass
class ServerSnapshot:
    """One server at one instant."""

    #: ``queryid`` -> (text, calls). By id: a text can read as NULL while
    #: pg_stat_statements compacts its text file, and one text may have several entries.
    statements: dict[int, tuple[str, int]]
    monitor_cpu: dict[int, float]
    client_connections: int
    monitor_connections: int


@dataclass
class Probe:
    """One connection per server, named :data:`PROBE_NAME`, and the snapshots it takes."""

    dsns: dict[str, str]
    conns: dict[str, psycopg.Connection[Any]] = field(default_factory=dict)

    def __enter__(self) -> Probe:
        for name, dsn in self.dsns.items():
            self.conns[name] = psycopg.connect(dsn, autocommit=True,
                                               application_name=PROBE_NAME)
        return self

    def __exit__(self, *exc: object) -> None:
        for conn in self.conns.values():
            conn.close()

    def snapshot(self) -> dict[str, ServerSnapshot]:
        """Every server's statements, monitoring backends' CPU and connection counts."""
        taken = {}
        for name, conn in self.conns.items():
            statements = {int(i): (str(q or ""), int(c)) for i, q, c in conn.execute(
                "SELECT queryid, max(query), sum(calls) FROM pg_stat_statements"
                " GROUP BY queryid")}
            backends = conn.execute(
                "SELECT pid, coalesce(application_name, '') FROM pg_stat_activity"
                " WHERE backend_type = 'client backend' AND application_name <> %s",
                (PROBE_NAME,)).fetchall()
            monitors = [int(pid) for pid, app in backends if not is_reader(str(app))]
            cpu = {pid: used for pid in monitors if (used := cpu_seconds(pid)) is not None}
            taken[name] = ServerSnapshot(statements, cpu, len(backends), len(monitors))
        return taken


def _deltas(before: ServerSnapshot, after: ServerSnapshot) -> list[tuple[str, int]]:
    """(text, calls in between) of every monitoring statement. An entry whose count went
    down was evicted and made anew in between: all its calls are new."""
    found = []
    for queryid, (text, calls) in after.statements.items():
        text = text or before.statements.get(queryid, ("", 0))[0]
        if not text or reads_sql(text):
            continue
        old = before.statements.get(queryid, (text, 0))[1]
        found.append((text, calls - old if calls >= old else calls))
    return found


def evicted(before: ServerSnapshot, after: ServerSnapshot) -> int:
    """Entries whose count went down in between (pg_stat_statements evicted and remade
    them; their calls before the eviction are lost to the figures)."""
    return sum(1 for queryid, (_, calls) in after.statements.items()
               if calls < before.statements.get(queryid, ("", 0))[1])


def monitoring_calls(before: ServerSnapshot, after: ServerSnapshot) -> int:
    """Monitoring statements a server ran between two snapshots."""
    return sum(calls for _, calls in _deltas(before, after))


def top_monitoring(before: ServerSnapshot, after: ServerSnapshot, count: int = 3
                   ) -> list[tuple[str, int]]:
    """The monitoring statements that ran most between two snapshots (for the notes)."""
    return sorted((d for d in _deltas(before, after) if d[1] > 0), key=lambda d: -d[1])[:count]


def monitor_cpu(before: ServerSnapshot, after: ServerSnapshot) -> float:
    """CPU seconds the server's monitoring backends used between two snapshots (a backend
    that started in between counts from zero)."""
    return sum(used - before.monitor_cpu.get(pid, 0.0) for pid, used in after.monitor_cpu.items())
