"""Where the host's agent for a topology lives: its key, its private folder, its socket,
lock and log (``docs/architecture.md``, "Fleets"). Stores, the agent and ``propstore
agent`` all find it here, so they always agree.

The agent is keyed by a hash of what it polls and how (nodes, DSNs, monitor settings), the
OS user, the time namespace and the protocol version: stores that agree on all of them
share one agent, others never meet.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from propstore.config import Topology
from propstore.monitor._messages import VERSION, topology_document

#: Environment variable naming the folder of agents' sockets (default: a ``propstore``
#: folder in ``$XDG_RUNTIME_DIR``, else ``/tmp/propstore-<uid>``).
AGENT_DIR_ENV = "PROPSTORE_AGENT_DIR"


class AgentUnavailable(Exception):
    """No agent can be used (the socket folder is not private, or the clock differs)."""


def stale_after(interval: float) -> float:
    """Seconds of silence after which a reader takes its agent for stuck: the agent sends
    to each reader at least a heartbeat every tick of its pace, a quarter of this at the
    slowest (``_hub.paces``); four of them missing is not a scheduling hiccup."""
    return max(2.0, 20 * interval)


def answer_limit(topology: Topology, shard_index: int) -> float:
    """Seconds a store follows its agent's HA manager answers for a shard without a new
    one: the longest a store's own discovery goes between two asks, ``interval`` plus one
    timeout per endpoint and one for ``/history`` (infinite: a shard without endpoints).

    Past it the store asks Patroni itself (its own monitor), whose first answer takes at
    most one timeout per endpoint: so the answer a store's leader veto rests on is never
    older than the ``interval + (2 x endpoints + 1) x timeout`` its own discovery allows
    (docs/architecture.md, "Fleets")."""
    endpoints = len(topology.shards[shard_index].patroni_endpoints)
    if not endpoints:
        return math.inf
    d = topology.discovery
    # The loop sleeps fast_interval while unsettled: the longer of the two bounds it.
    return max(d.interval, d.fast_interval) + (endpoints + 1) * d.timeout


@dataclass(frozen=True, slots=True)
class AgentPaths:
    """Where the agent of one key listens, locks and logs."""

    socket: Path
    lock: Path
    spawn_lock: Path
    log: Path

    @classmethod
    def of(cls, topology: Topology) -> AgentPaths:
        """The paths for this topology's agent (the folder is created private)."""
        folder = agent_dir()
        key = agent_key(topology)
        return cls(folder / f"{key}.sock", folder / f"{key}.lock", folder / f"{key}.spawn",
                   folder / f"{key}.log")


def agent_dir() -> Path:
    """The private folder of this user's agents (created ``0700``); refuses a folder
    another user owns or can write, since anyone who can write there could feed this
    process facts."""
    configured = os.environ.get(AGENT_DIR_ENV)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if configured:
        folder = Path(configured)
    elif runtime:
        folder = Path(runtime) / "propstore"
    else:
        folder = Path(tempfile.gettempdir()) / f"propstore-{os.getuid()}"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or (
        info.st_mode & 0o077
    ):
        raise AgentUnavailable(
            f"{folder} must be a directory owned by uid {os.getuid()} with mode 0700 "
            f"(it is {oct(info.st_mode & 0o777)}, uid {info.st_uid})"
        )
    return folder


def agent_key(topology: Topology) -> str:
    """The key of the agent that may serve this topology (see the module doc)."""
    try:
        time_ns = os.readlink("/proc/self/ns/time")
    except OSError:
        time_ns = "none"
    data = json.dumps({
        "topology": topology_document(topology), "uid": os.getuid(), "time_ns": time_ns,
        "version": VERSION,
    }, sort_keys=True)
    # Not a secret (the DSNs are hashed so that no password appears in a file name).
    return hashlib.sha256(data.encode()).hexdigest()[:32]


__all__ = ["AGENT_DIR_ENV", "AgentPaths", "AgentUnavailable", "agent_dir", "agent_key",
           "answer_limit", "stale_after"]
