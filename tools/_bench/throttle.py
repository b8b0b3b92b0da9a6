"""An injected slow primary: a PostgreSQL server (postmaster, its backends and every backend
forked later) held to a fraction of one CPU with a cgroup v1 CPU quota.

On a shared 2-core machine the Python client, not the primary, is otherwise the first thing
to run out of CPU, and a benchmark of how the primary is protected would measure the
client. With the primary held to a small quota it is the bottleneck by construction, and
its capacity is measured as such. Linux only, as root; :func:`throttled` yields False (and
changes nothing) where the cgroup cannot be made.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
#: A short period: the quota is enforced every 10 ms, so a throttled backend stalls for at
#: most a few ms, not for most of the default 100 ms period.
PERIOD_US = 10_000


def _descendants(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += parents.get(pid, [])
    return found


def _group() -> Path:
    return CGROUP_CPU / f"propstore-bench-{os.getpid()}"


def throttle_stat() -> tuple[int, int] | None:
    """``(periods, throttled periods)`` of the group :func:`throttled` holds now (None
    outside it): a period in which the server used up its quota was a throttled one, so a
    server that is the bottleneck is throttled in nearly every period."""
    try:
        fields = dict(line.split() for line in (_group() / "cpu.stat").read_text().splitlines())
        return int(fields["nr_periods"]), int(fields["nr_throttled"])
    except (OSError, KeyError, ValueError):
        return None


@contextmanager
def throttled(postmaster: int | None, cpu_fraction: float) -> Iterator[bool]:
    """Hold the server under ``postmaster`` to ``cpu_fraction`` of one CPU while inside."""
    group = _group()
    if postmaster is None or not CGROUP_CPU.is_dir():
        yield False
        return
    try:
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text(str(max(1000, int(PERIOD_US * cpu_fraction))))
        for pid in _descendants(postmaster):  # the postmaster's children follow it
            try:
                (group / "cgroup.procs").write_text(str(pid))
            except OSError:
                continue
    except OSError:
        yield False
        return
    try:
        yield True
    finally:
        for line in (group / "cgroup.procs").read_text().split():
            try:
                (CGROUP_CPU / "cgroup.procs").write_text(line)
            except OSError:
                continue
        group.rmdir()
