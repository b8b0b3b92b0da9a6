"""Process identities, liveness and freezing of a server's process tree (Linux ``/proc``).

A pid alone is not an identity: once a server dies its pid can be handed to an unrelated
process. Every pid the sandbox signals is paired with the process start time read from
``/proc/<pid>/stat`` and re-checked just before the signal.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from propstore.sandbox._errors import SandboxError

_PROC = Path("/proc")
# Fields of /proc/<pid>/stat counted from the one after the ")" that closes the command name.
_STATE, _PPID, _START_TIME = 0, 1, 19


@dataclass(frozen=True)
class ProcessId:
    """A pid together with its start time (clock ticks after boot), so reuse is detected."""

    pid: int
    start_time: int

    def __str__(self) -> str:
        return str(self.pid)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name is in parentheses and may itself contain spaces or parentheses.
    return text[text.rindex(")") + 2 :].split()


def identify(pid: int) -> ProcessId | None:
    """The identity of a running process, or None if there is no such pid."""
    fields = _stat_fields(pid)
    return None if fields is None else ProcessId(pid, int(fields[_START_TIME]))


def command_name(pid: int) -> str | None:
    """The kernel's short command name of ``pid`` (``postgres`` for every server process)."""
    try:
        return (_PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        return None


def state_of(proc: ProcessId) -> str | None:
    """The one-letter kernel state (``R``, ``S``, ``T``, ``Z`` ...), or None if gone/reused."""
    fields = _stat_fields(proc.pid)
    if fields is None or int(fields[_START_TIME]) != proc.start_time:
        return None
    return fields[_STATE]


def is_alive(proc: ProcessId) -> bool:
    """Whether this very process still exists and is not a zombie."""
    return state_of(proc) not in (None, "Z", "X")


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` in the parent tree, parents before their children."""
    if not _PROC.is_dir():
        raise SandboxError("freezing a server needs Linux /proc")
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[_PPID]), []).append(int(entry.name))
    found: list[int] = []
    pending = list(children.get(pid, []))
    while pending:
        child = pending.pop(0)
        found.append(child)
        pending.extend(children.get(child, []))
    return found


def signal_process(proc: ProcessId, signum: int) -> bool:
    """Send ``signum`` if the process is still the same one; report whether it was sent."""
    if state_of(proc) is None:
        return False
    try:
        os.kill(proc.pid, signum)
    except ProcessLookupError:
        return False
    return True


def freeze_tree(root: ProcessId, timeout: float = 5.0) -> list[ProcessId]:
    """SIGSTOP ``root`` and every descendant; return them in the order they were stopped.

    PostgreSQL backends are direct children of the postmaster and stay running when only the
    postmaster is stopped, so children go first. The postmaster may fork between the scan and
    its own stop (a new backend, an autovacuum worker), so the tree is rescanned once the
    postmaster is stopped until nothing new appears. Returns once all are really stopped.
    """
    stopped: list[ProcessId] = []
    seen: set[int] = set()

    def stop(pid: int) -> None:
        proc = identify(pid)
        if proc is not None and pid not in seen and signal_process(proc, signal.SIGSTOP):
            stopped.append(proc)
            seen.add(pid)

    for pid in descendants(root.pid):
        stop(pid)
    if not signal_process(root, signal.SIGSTOP):
        thaw(stopped)
        raise SandboxError(f"process {root.pid} is gone; nothing to freeze")
    stopped.append(root)
    seen.add(root.pid)
    for _ in range(10):
        late = [pid for pid in descendants(root.pid) if pid not in seen]
        if not late:
            break
        for pid in late:
            stop(pid)
    _await_stopped(stopped, timeout)
    return stopped


def _await_stopped(procs: list[ProcessId], timeout: float) -> None:
    # SIGSTOP is delivered asynchronously; a caller testing "does not answer" needs it done.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [state_of(p) for p in procs]
        if all(s in (None, "T", "t", "Z", "X") for s in states):
            return
        time.sleep(0.005)
    raise SandboxError(f"processes {[p.pid for p in procs]} did not stop within {timeout:g}s")


def thaw(stopped: list[ProcessId]) -> None:
    """SIGCONT the processes of :func:`freeze_tree` in reverse order (postmaster first)."""
    for proc in reversed(stopped):
        signal_process(proc, signal.SIGCONT)


def wait_gone(proc: ProcessId, timeout: float) -> bool:
    """Poll until the process has exited; report whether it did within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while is_alive(proc):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True
