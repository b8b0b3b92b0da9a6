"""CPU placement: the benchmark process on one CPU, the servers it started on the others.

Measured here (2 vCPUs): three identical raw psycopg connections to one replica, interleaved,
differ by up to 1.7x in median latency (about 45 us against 76 us per read), depending on
whether the scheduler runs each connection's server backend on the client's CPU or the other
one. That bias is larger than most of the effects being measured, and it lands on whichever
contender's connection happens to be placed well. Pinning the client to CPU 0 and every
server process (and Pgpool) to the remaining CPUs makes each round trip cross CPUs, as a
network hop would, and brings identical connections to 1.00x [1.00-1.00].
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

CLIENT_CPU = 0
#: The CPUs this process could use when it started (before :func:`pin_client` narrowed it).
_ALL_CPUS = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
    frozenset())


def available() -> bool:
    """Whether there are at least two CPUs to split (and the OS can pin)."""
    return hasattr(os, "sched_setaffinity") and CLIENT_CPU in _ALL_CPUS and len(_ALL_CPUS) >= 2


def server_cpus() -> set[int]:
    """Every CPU this process could use at start except the client's."""
    return set(_ALL_CPUS - {CLIENT_CPU}) or {CLIENT_CPU}


def pgpool_cpus(where: str) -> set[int]:
    """The CPUs for Pgpool: ``own`` takes the last CPU for Pgpool alone when at least three
    exist (client, servers, Pgpool: no hop shares a CPU); on two it falls back to the
    servers' CPU. ``servers``/``client`` share that CPU explicitly."""
    servers = sorted(server_cpus())
    if where == "client":
        return {CLIENT_CPU}
    if where == "own" and len(servers) >= 2:
        return {servers[-1]}
    return set(servers)


def database_cpus(pgpool_where: str) -> set[int]:
    """The servers' CPUs, without a CPU given to Pgpool alone (see :func:`pgpool_cpus`)."""
    servers = server_cpus()
    if pgpool_where == "own" and len(servers) >= 2:
        return servers - pgpool_cpus("own")
    return servers


def pin_client() -> None:
    """Pin the calling thread (and every thread it starts later) to :data:`CLIENT_CPU`.

    Call it before any thread starts: Linux applies it to the calling thread only, and
    new threads inherit it.
    """
    os.sched_setaffinity(0, {CLIENT_CPU})


def pin_servers(root_pids: Iterable[int], cpus: set[int]) -> int:
    """Pin each process in ``root_pids`` and all its descendants to ``cpus``; how many.

    Processes forked later (new backends) inherit the postmaster's affinity. A process
    that exits meanwhile is skipped.
    """
    children = _children()
    pinned = 0
    todo = list(root_pids)
    while todo:
        pid = todo.pop()
        try:
            os.sched_setaffinity(pid, cpus)
            pinned += 1
        except (ProcessLookupError, PermissionError):
            continue
        todo += children.get(pid, [])
    return pinned


def all_cpus() -> set[int]:
    """Every CPU this process could use when it started (where unpinned processes run)."""
    return set(_ALL_CPUS)


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, now."""
    children, found, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from ``/proc/<pid>/stat``."""
    found: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # Fields after the command name (which may contain spaces): state, ppid, ...
            parent = int(entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        found.setdefault(parent, []).append(int(entry.name))
    return found
