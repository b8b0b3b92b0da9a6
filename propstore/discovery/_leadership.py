"""What an HA manager says of one shard, as values; parsing Patroni's answers. No I/O.

Patroni's ``GET /cluster`` lists every member with its ``role`` (``leader``, ``replica``,
``sync_standby``, ``standby_leader``), ``state`` (``running``, ``streaming``, ``stopping``,
``stopped``, ``starting``, ``crashed``, ...), ``timeline``, ``lag`` (bytes) and address;
``GET /history`` lists ``[timeline, switch LSN, reason, time, new leader]`` for every
timeline that ended. A member maps to a topology node by name, else by ``host:port``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from propstore.config import NodeConfig
from propstore.lsn import LSN
from propstore.timeline import TimelineHistory


@dataclass(frozen=True, slots=True)
class MemberState:
    """One member as the HA manager reports it."""

    #: The topology node it is (None: a member the file does not name).
    node: str | None
    #: Patroni's name for it.
    name: str
    role: str
    state: str
    timeline: int | None = None
    #: Replay lag in bytes behind the leader, as Patroni reports it (None: unknown).
    lag: int | None = None

    def __str__(self) -> str:
        return f"patroni {self.role} {self.state}"


@dataclass(frozen=True, slots=True)
class Leadership:
    """One answer of the source: the running leader (a topology node name, or None while no
    member both holds the lock and runs) and every member's state."""

    leader: str | None
    members: tuple[MemberState, ...]
    #: The leader's timeline as the source reports it.
    timeline: int | None
    #: The endpoint that answered.
    endpoint: str
    #: When the request it answers was sent (``time.monotonic()`` seconds; None: not
    #: timed). The answer says how the cluster was at some moment after it, so its age is
    #: at most ``now - asked_at``: what a host agent's stores check before trusting it
    #: (``monitor._shared``).
    asked_at: float | None = None

    def admits(self, node: str) -> bool:
        """Whether ``node`` may be the primary: it is the running leader."""
        return self.leader == node

    def member(self, node: str) -> MemberState | None:
        """The member that is topology node ``node`` (None when the source does not list it)."""
        for member in self.members:
            if member.node == node:
                return member
        return None

    def __str__(self) -> str:
        members = ", ".join(f"{m.node or m.name} {m.role} {m.state}" for m in self.members)
        return f"{self.endpoint}: leader {self.leader or 'none'} ({members})"


def parse_cluster(doc: Mapping[str, Any], nodes: Sequence[NodeConfig], endpoint: str,
                  asked_at: float | None = None) -> Leadership:
    """A :class:`Leadership` from Patroni's ``/cluster`` document.

    Raises ``ValueError`` when the document is not one (so a wrong URL is never read as
    "no leader").
    """
    raw = doc.get("members") if isinstance(doc, Mapping) else None
    if not isinstance(raw, list):
        raise ValueError("not a Patroni /cluster answer (no members list)")
    by_name = {node.name: node.name for node in nodes}
    by_address = {node.address: node.name for node in nodes}
    members: list[MemberState] = []
    leader: str | None = None
    timeline: int | None = None
    for entry in raw:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            raise ValueError("not a Patroni /cluster answer (a member without a name)")
        name = str(entry["name"])
        node = by_name.get(name) or by_address.get(f"{entry.get('host')}:{entry.get('port')}")
        member = MemberState(
            node=node, name=name, role=str(entry.get("role", "")),
            state=str(entry.get("state", "")), timeline=_int(entry.get("timeline")),
            lag=_int(entry.get("lag")),
        )
        members.append(member)
        # Only a member that holds the lock *and* runs leads: "stopping", "stopped",
        # "starting" or "crashed" leaders accept no writes a reader could rely on.
        if member.role == "leader" and member.state == "running" and node is not None:
            leader, timeline = node, member.timeline
    return Leadership(leader, tuple(members), timeline, endpoint, asked_at)


def history_of(timeline: int, entries: Sequence[Any]) -> TimelineHistory:
    """Timeline ``timeline``'s history from Patroni's ``/history`` entries.

    Complete only when every earlier timeline is listed (Patroni may be configured to keep
    fewer, ``max_timelines_history``): a missing one stays undecided, never "lost".
    Raises ``ValueError`` on a malformed entry.
    """
    ancestors: dict[int, LSN] = {}
    for entry in entries:
        if not isinstance(entry, Sequence) or len(entry) < 2:
            raise ValueError(f"malformed Patroni history entry {entry!r:.80}")
        tli, switch = _int(entry[0]), _int(entry[1])
        if tli is None or switch is None or switch < 0:
            raise ValueError(f"malformed Patroni history entry {entry!r:.80}")
        if tli < timeline:
            ancestors[tli] = LSN(switch)
    complete = set(ancestors) == set(range(1, timeline))
    return TimelineHistory(timeline, tuple(sorted(ancestors.items())), complete=complete)


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


__all__ = ["Leadership", "MemberState", "history_of", "parse_cluster"]
