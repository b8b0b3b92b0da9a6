"""An injected slow primary: a PostgreSQL server whose every read costs it real CPU, on a
CPU of its own.

On a shared 2-core machine the Python client, not the primary, is otherwise the first thing
to run out of CPU (a primary-key read costs the server some 30 us), and a benchmark of how
the primary is protected would measure the client. So the primary is given one CPU alone
(its postmaster and every backend, those forked later too: the other servers move off it)
and its configuration told to plan no index scans (its own, not the replicas'): each read
of a user then scans the table (~10,000 rows), a fixed piece of CPU work per read, and the
primary is the bottleneck by construction. It is a slow server, not a paused one: its
backends share their CPU as a real primary's do (the run queue, CFS), so a read waits
behind the reads in flight with it, and a limit on those is what bounds its latency.

Two earlier models measured the model, not the policy:

* A cgroup CPU quota (15 % of a CPU: 1.5 ms per 10 ms period; a quota cannot be under 1 ms)
  stalled every backend for the rest of a period whose quota ran out, ~8.5 ms, whenever a
  10 ms window held more than the average's work: every probe's p99 was ~10 ms at half the
  capacity already (14x the healthy one), whatever the reads in flight.
* A real-time burner taking 85 % of the primary's CPU in ~0.5 ms spins starved the
  kernel's own work on that CPU and the server's background processes with it: the
  healthy p99 rose to 7-12 ms, and the capacity measured before each load drifted 3.4x.

Writes still use the primary key (an ``ON CONFLICT`` arbiter is not a planned scan).
Linux only for the pinning; :func:`slowed` yields False (and changes nothing) where the
server cannot be pinned or its configuration altered.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import sql

from _bench import affinity

#: What the primary's configuration is told while slowed (put back after).
_PLANNER = ("enable_indexscan", "enable_indexonlyscan", "enable_bitmapscan")


_state: dict[str, int] = {}


def server_cpu_seconds() -> float | None:
    """CPU seconds the live processes of the server :func:`slowed` holds have run so far
    (the scheduler's own count, ``/proc/PID/schedstat``); None outside it. Its share of its
    CPU over a window is the difference over the window's length: near 1 when the server
    is the bottleneck."""
    postmaster = _state.get("postmaster")
    if postmaster is None:
        return None
    ns = 0
    for pid in affinity.descendants(postmaster):
        try:
            ns += int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return ns / 1e9


def _planner(dsn: str, scan_only: bool) -> None:
    # The server's own configuration (postgresql.auto.conf), not ALTER DATABASE: a
    # database's settings are a catalog row, which replicates, and every replica then
    # scanned the table too (checked: `SHOW enable_indexscan` on a replica said off), on
    # the CPU the client shares with them; its reads are what the surge sheds to.
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in _PLANNER:
            conn.execute(sql.SQL("ALTER SYSTEM SET {} = off" if scan_only else
                                 "ALTER SYSTEM RESET {}").format(sql.Identifier(name)))
        conn.execute("SELECT pg_reload_conf()")


@contextmanager
def slowed(postmaster: int | None, cpu: int, dsn: str) -> Iterator[bool]:
    """Hold the server under ``postmaster`` (database at ``dsn``) to CPU ``cpu``, its reads
    scanning the table, while inside; sessions opened inside see it."""
    if postmaster is None or not hasattr(os, "sched_setaffinity"):
        yield False
        return
    affinity.pin_servers([postmaster], {cpu})  # backends forked later inherit the CPU
    _planner(dsn, scan_only=True)
    _state["postmaster"] = postmaster
    try:
        yield True
    finally:
        _state.clear()
        _planner(dsn, scan_only=False)
