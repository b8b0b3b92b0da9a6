"""The host agent's health: what it counts about itself, the status document it answers
with, and :func:`agent_status`, the client that asks (``propstore agent status``, ``lag``).

Everything here is bounded by the topology, never by traffic or the size of the fleet: one
counter set and a 32-entry ring of poll times per node, one refusal tally per connected
store (at most :data:`~propstore.monitor._messages.MAX_COUNTS` counters each) plus one
for the stores that left.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from propstore.config import Topology
from propstore.monitor._messages import MAX_COUNTS, Ask, encode_request

if TYPE_CHECKING:
    from propstore.monitor._monitor import LagMonitor

#: Poll times kept per node for its recent poll rate.
RATE_WINDOW = 32

Refusals = dict[str, dict[str, dict[str, int]]]


def nested(counts: Iterable[tuple[tuple[str, str, str], int]]) -> Refusals:
    """``{shard: {profile: {reason: n}}}`` from ``((shard, profile, reason), n)`` pairs."""
    out: Refusals = {}
    for (shard, profile, reason), n in sorted(counts):
        out.setdefault(shard, {}).setdefault(profile, {})[reason] = n
    return out


@dataclass(slots=True)
class NodeCounter:
    """The agent's polls of one node: counts, the latest attempt, recent attempt times."""

    polls: int = 0
    failures: int = 0
    last_at: float | None = None
    last_error: str | None = None
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=RATE_WINDOW))

    def attempt(self, at: float, error: str | None) -> None:
        """Count one poll (``error``: it failed)."""
        if error is None:
            self.polls += 1
        else:
            self.failures += 1
        self.last_at, self.last_error = at, error
        self.recent.append(at)

    def rate(self, now: float) -> float:
        """Attempts per second over the recent window (0 before two)."""
        if len(self.recent) < 2:
            return 0.0
        # Up to now, not the last attempt: a node that stopped being polled reads lower.
        return (len(self.recent) - 1) / max(1e-9, now - self.recent[0])


class RefusalTally:
    """Host totals of the stores' refusal counters: each connected store's latest report,
    plus what the stores that left had reported (their counts stay in the totals)."""

    def __init__(self, shards: Iterable[str]) -> None:
        self._shards = frozenset(shards)
        self._stores: dict[object, dict[tuple[str, str, str], int]] = {}
        self._left: dict[tuple[str, str, str], int] = {}
        #: Stores that reported at least one refusal since the agent started.
        self.reporters = 0

    def report(self, store: object, counts: Iterable[tuple[str, str, str, int]]) -> None:
        """A store's counters so far (cumulative; unknown shards are ignored)."""
        mine = {(s, p, r): n for s, p, r, n in counts if s in self._shards}
        if len(mine) > MAX_COUNTS:
            mine = dict(sorted(mine.items())[:MAX_COUNTS])
        if mine and not self._stores.get(store):
            self.reporters += 1
        self._stores[store] = mine

    def leave(self, store: object) -> None:
        """The store disconnected: its last report joins the totals of those that left."""
        for key, n in self._stores.pop(store, {}).items():
            if key in self._left or len(self._left) < 4 * MAX_COUNTS:
                self._left[key] = self._left.get(key, 0) + n

    def totals(self) -> dict[tuple[str, str, str], int]:
        """Every store's counts summed, those that left included."""
        total = dict(self._left)
        for counts in self._stores.values():
            for key, n in counts.items():
                total[key] = total.get(key, 0) + n
        return total


#: Set (to anything) in an agent's environment to trace its memory (``tracemalloc``).
TRACE_MEMORY_ENV = "PROPSTORE_AGENT_TRACE_MEMORY"


def traced_bytes() -> int | None:
    """The traced memory after a full collection (None when not tracing)."""
    import gc
    import tracemalloc

    if not tracemalloc.is_tracing():
        return None
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def rss_bytes() -> int:
    """This process's resident set size (bytes; 0 where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass(frozen=True, slots=True)
class NodeHealth:
    """One node as the agent polls it."""

    shard: str
    node: str
    #: The node's state in the agent's own view (``propstore lag``'s states).
    state: str
    polls: int
    failures: int
    polls_per_second: float
    #: Seconds since the agent's latest poll (or failed attempt) of the node; None: none.
    last_poll_age_seconds: float | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class LeaderHealth:
    """One shard's HA manager (Patroni) as the agent asks it for its stores."""

    shard: str
    #: The running leader its latest answer names (None: none, or no answer).
    leader: str | None
    #: The endpoint that gave the latest answer (None: the latest ask found none).
    endpoint: str | None
    answers: int
    #: Asks no endpoint answered.
    misses: int
    #: Seconds since the latest ask was sent (None: none yet).
    last_answer_age_seconds: float | None
    #: Age past which the agent's stores stop trusting its answers and ask themselves.
    late_after_seconds: float


@dataclass(frozen=True, slots=True)
class AgentStatus:
    """What the host's agent says about itself (``propstore agent status --json``)."""

    pid: int
    version: str
    key: str
    socket: str
    #: When the agent started (ISO 8601, UTC) and seconds since.
    started_at: str
    uptime_seconds: float
    interval_seconds: float
    #: A node whose latest poll is older than this is not being polled: unhealthy.
    late_after_seconds: float
    #: Pids of the stores connected now; stores joined since start; stores dropped for
    #: not reading.
    stores: tuple[int, ...]
    stores_total: int
    stores_dropped: int
    rss_bytes: int
    nodes: tuple[NodeHealth, ...]
    #: The host's stores' ``StaleReadError`` counts: ``{shard: {profile: {reason: n}}}``,
    #: the connected stores' latest reports plus those of stores that left.
    refusals: Refusals
    #: Stores that reported a refusal since the agent started.
    refusal_reporters: int
    #: False for an agent started by a store (it ends when idle), True for ``agent run``.
    foreground: bool = False
    #: Bytes the agent's Python objects hold after a collection, when it traces its memory
    #: (``PROPSTORE_AGENT_TRACE_MEMORY=1`` in its environment: tests); None otherwise.
    traced_bytes: int | None = None
    #: Per shard with Patroni endpoints: who leads, as the agent asks for its stores.
    leaders: tuple[LeaderHealth, ...] = ()

    @property
    def problems(self) -> tuple[str, ...]:
        """Why the agent is unhealthy (empty: healthy)."""
        out = []
        for node in self.nodes:
            age = node.last_poll_age_seconds
            if age is None:
                out.append(f"{node.node} never polled")
            elif age > self.late_after_seconds:
                out.append(f"{node.node} not polled for {age:.1f} s")
        for lead in self.leaders:
            age = lead.last_answer_age_seconds
            if age is None and self.uptime_seconds > lead.late_after_seconds:
                out.append(f"{lead.shard}: Patroni never asked")
            elif age is not None and age > lead.late_after_seconds:
                out.append(f"{lead.shard}: Patroni not asked for {age:.1f} s (its stores "
                           "ask it themselves)")
        return tuple(out)

    @property
    def healthy(self) -> bool:
        """Every node was polled (or tried) within :attr:`late_after_seconds`."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """The status document (``agent status --json``; field names in docs/operating.md)."""
        data = asdict(self)
        data["stores"] = list(self.stores)
        data["healthy"] = self.healthy
        data["problems"] = list(self.problems)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AgentStatus:
        """Read a status document (``ValueError`` on a malformed one)."""
        try:
            nodes = tuple(NodeHealth(**n) for n in data["nodes"])
            leaders = tuple(LeaderHealth(**n) for n in data.get("leaders", ()))
            fields = {k: data[k] for k in cls.__dataclass_fields__
                      if k not in ("nodes", "leaders")}
            fields["stores"] = tuple(int(p) for p in data["stores"])
            return cls(nodes=nodes, leaders=leaders, **fields)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed agent status: {exc}") from None


def encode_status(status: AgentStatus) -> bytes:
    """The status as the agent sends it: one line of JSON."""
    return (json.dumps(status.to_dict(), separators=(",", ":")) + "\n").encode()


def agent_status(topology: Topology, timeout: float = 3.0) -> AgentStatus | None:
    """Ask the host's agent for ``topology`` how it is (None: no agent answers).

    Raises :class:`~propstore.monitor._shared.AgentUnavailable` when the agents' folder
    is not private to this user (nothing there could be trusted).
    """
    from propstore.monitor._place import AgentPaths

    path = AgentPaths.of(topology).socket
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(encode_request(Ask()))
            data = b""
            while not data.endswith(b"\n"):
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
    except (OSError, TimeoutError):
        return None
    with contextlib.suppress(ValueError):
        return AgentStatus.from_dict(json.loads(data))
    return None


@dataclass(frozen=True, slots=True)
class FiguresSource:
    """Where a store's lag figures come from now: the host's agent or its own polls."""

    monitor: Literal["agent", "own"]
    #: The agent's pid (``agent``), and how many stores share it now (this one included;
    #: None when the agent did not answer the status request).
    agent_pid: int | None = None
    stores: int | None = None
    #: Why the store polls for itself (``own``).
    reason: str = ""
    #: The agent's status (None for ``own``, or when it did not answer).
    status: AgentStatus | None = None

    def describe(self) -> str:
        """One line for people."""
        if self.monitor == "own":
            return f"figures from this process's own monitor ({self.reason})"
        shared = "" if self.stores is None else (
            f", shared by {self.stores} store{'s' if self.stores != 1 else ''}")
        leaders = "" if self.status is None or not self.status.leaders else (
            "; Patroni's leader asked by the agent too")
        return f"figures from the host agent (pid {self.agent_pid}{shared}{leaders})"

    def to_dict(self) -> dict[str, Any]:
        """The ``source`` object of ``lag --json``."""
        return {"monitor": self.monitor, "agent_pid": self.agent_pid, "stores": self.stores,
                "reason": self.reason or None}


def figures_source(monitor: LagMonitor, topology: Topology) -> FiguresSource:
    """Where ``monitor``'s figures come from, asking the host's agent for the rest."""
    from propstore.monitor._shared import AgentUnavailable, SharedMonitor

    if not isinstance(monitor, SharedMonitor):
        return FiguresSource("own", reason='sharing = "off"')
    if monitor.source != "agent":
        return FiguresSource("own", reason=monitor.own_reason)
    pid = monitor.agent_pid
    try:
        status = agent_status(topology)
    except AgentUnavailable:
        status = None
    if status is None or status.pid != pid:
        return FiguresSource("agent", pid)
    return FiguresSource("agent", pid, len(status.stores), status=status)


def late_after(interval: float, max_backoff: float, poll_timeout: float) -> float:
    """Seconds after which a node the agent does not poll makes it unhealthy: a healthy
    agent tries every node every ``interval``, a down one at least every ``max_backoff``
    (plus the attempt's own timeout); twice that is not a hiccup."""
    return 2 * max(20 * interval, max_backoff + poll_timeout, 1.0)


__all__ = ["RATE_WINDOW", "TRACE_MEMORY_ENV", "AgentStatus", "FiguresSource", "LeaderHealth",
           "NodeCounter", "NodeHealth", "RefusalTally", "agent_status", "encode_status",
           "figures_source", "late_after", "nested", "rss_bytes", "traced_bytes"]
