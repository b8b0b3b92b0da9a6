"""Starting the host's agent: one per herd of stores (``docs/architecture.md``, "Fleets").

A store that finds no agent answering asks its :class:`Spawner` for one. The spawner
starts ``python -m propstore.monitor._agent`` (topology on its stdin, so no DSN shows in
``ps``) only when no agent holds the agent lock and no other store holds the spawn lock,
which it keeps until its agent answers: a herd of stores that lost one agent (or that start
at once) starts one, not one each. An agent that ends without answering backs spawning off.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import structlog

import propstore
from propstore.config import Topology
from propstore.monitor._messages import topology_document
from propstore.monitor._place import AgentPaths

log = structlog.get_logger("propstore.monitor")

#: What :meth:`Spawner.spawn` did: started an agent; found another store starting one (it
#: holds the spawn lock until its agent answers); found an agent holding its lock that did
#: not answer (starting without a store's spawn, or stuck); or none of these (ours is still
#: starting, or spawning is backed off or failed).
Spawned = Literal["spawned", "starting", "running", "none"]


class Spawner:
    """One store's side of starting the host's agent for its topology."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._agent_proc: subprocess.Popen[bytes] | None = None
        #: Agents this store spawned that ended before anyone joined them in a row, and
        #: when it may spawn again (an agent that cannot start is not retried every second).
        self._failures = 0
        self._next_spawn = 0.0
        #: The spawn lock, held from spawning an agent until it answers (or ends).
        self._spawn_fd: int | None = None
        #: Whether the agent this store spawned answered: its end later (killed, say) is
        #: not a failure to start, and backs nothing off.
        self._answered = False

    def joined(self) -> None:
        """The store joined an agent: spawning is no longer backed off, the lock is free."""
        self._failures = 0
        # One agent holds the lock: while ours runs, it is the one that answered.
        self._answered = self._agent_proc is not None and self._agent_proc.poll() is None
        self.release()

    def release(self) -> None:
        """Let another store spawn (the store joined an agent, or closes)."""
        if self._spawn_fd is not None:
            os.close(self._spawn_fd)
            self._spawn_fd = None

    def spawn(self, paths: AgentPaths) -> Spawned:
        """Start an agent unless one holds its lock, another store is starting one, or
        ours is still starting (see :data:`Spawned`)."""
        proc = self._agent_proc
        if proc is not None and proc.poll() is None:
            if not self._answered:
                return "none"  # ours is still starting (or stuck: then we poll ourselves)
            # Ours answered and runs (stuck, say): its lock, below, makes it "running".
        elif proc is not None:
            if self._answered:
                # It ran and ended (killed, say): not a failure to start, so nothing backs
                # off this store's start of the replacement (a herd's first to ask).
                log.info("monitor_agent_ended", pid=proc.pid, exit_code=proc.returncode)
            elif proc.returncode != 0:
                self._failures += 1
                self._next_spawn = time.monotonic() + min(60.0, 2.0 ** self._failures)
                log.warning("monitor_agent_failed", pid=proc.pid, exit_code=proc.returncode,
                            log=str(paths.log.with_suffix(".err")))
            self._agent_proc, self._answered = None, False
            self.release()
        if time.monotonic() < self._next_spawn:
            return "none"
        spawn_fd = os.open(paths.spawn_lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(spawn_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(spawn_fd)
            return "starting"  # another store is starting one
        lock_fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(spawn_fd)
            return "running"  # an agent runs (starting, or stuck: then we poll ourselves)
        finally:
            os.close(lock_fd)
        try:
            self._agent_proc = _start_agent(self.topology, paths)
        except OSError as exc:
            os.close(spawn_fd)
            log.warning("monitor_agent_spawn_failed", error=str(exc))
            return "none"
        self._spawn_fd = spawn_fd
        log.info("monitor_agent_spawned", pid=self._agent_proc.pid)
        return "spawned"


def _start_agent(topology: Topology, paths: AgentPaths) -> subprocess.Popen[bytes]:
    package_root = str(Path(propstore.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (package_root, env.get("PYTHONPATH")) if p
    )
    # stderr: what the agent prints before its log is set up (a crash at start); one
    # run's worth, truncated at each start.
    with open(paths.log.with_suffix(".err"), "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "propstore.monitor._agent",
             str(paths.socket), str(paths.lock), str(paths.log)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err,
            # Its own session: a Ctrl-C meant for the worker that spawned it does not end
            # the host's agent; it ends by itself once idle.
            start_new_session=True, close_fds=True, env=env,
        )
    assert proc.stdin is not None
    with contextlib.closing(proc.stdin):
        proc.stdin.write(json.dumps(topology_document(topology)).encode())
    return proc


__all__ = ["Spawned", "Spawner"]
