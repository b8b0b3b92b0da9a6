"""The shard's primary as reads and writes find it: which node it is, the read on it with
its role check, and how its absence is described.

Writes and primary reads go to the node the monitor observes as the primary (with none, the
last one, which may be restarting). A primary read proves the node's role in the same round
trip unless a poll already proves it for the connection (``proof.primary_proven``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from typing import Any, NamedTuple

import psycopg

from propstore._wire import Arrival, DeadlineExceeded, Statement
from propstore.config import RoutingSettings
from propstore.errors import ShardUnavailableError
from propstore.monitor import MonitorState, NodeView, ShardView
from propstore.proof import primary_proven
from propstore.store._program import ConnState, Exec, Response
from propstore.store._statements import IS_PRIMARY


class PrimaryAnswer(NamedTuple):
    """A primary read's rows and how it went."""

    rows: Any
    #: The node that answered.
    node: str
    #: ``time.monotonic()`` when a connection was in hand: the read's wait for one of this
    #: store's connections ends there.
    connected: float
    #: From sending the statements to the answer's arrival at this host (the primary's own
    #: latency); None where the kernel does not say (``_wire.Arrival``).
    on_server: float | None


class PrimaryGone(DeadlineExceeded):
    """An attempt on the primary stopped (waiting for a connection, or before any I/O): the
    monitor no longer observes its node as the shard's primary (or observes none), or a
    read's replica now proves it. Retried where the monitor points."""


class PrimaryReads:
    """Reads served by a shard's primary (``strong``, tokens, fallbacks)."""

    def __init__(self, state: MonitorState, routing: RoutingSettings) -> None:
        self.state = state
        self.routing = routing

    def read(self, shard_index: int, data: Statement, deadline: float,
             valid: Callable[[], bool] | None = None,
             ) -> Generator[Exec, Response, PrimaryAnswer]:
        """Run ``data`` on the shard's primary by ``deadline`` (while waiting for a
        connection, giving up once ``valid`` says so).

        Raises :class:`~propstore.ShardUnavailableError` when it does not answer or is no
        longer a primary; its ``__cause__`` is the driver's error, or a :class:`PrimaryGone`
        when no node may be the primary now, from which ``_retry`` tells whether the read
        may be tried again.
        """
        view = self.state.view(shard_index)
        node = primary_node(view)
        if view.primary is None and view.ruled_out(node):
            # Observed in recovery (or not the HA manager's leader) and no primary seen
            # since: say so instead of blaming the node the file (or the last poll) named.
            seen = f"no primary observed ({observed_roles(view)})"
            raise ShardUnavailableError(view.name, seen) from PrimaryGone(seen)

        connected = 0.0
        arrival = Arrival()

        def plan(conn: ConnState) -> tuple[Sequence[Statement], bool]:
            nonlocal connected
            connected = time.monotonic()
            # A poll that saw this connection's server run as a primary after it opened
            # proves it (demotion needs a restart, which ends it); otherwise check in-line.
            if primary_proven(node.sightings, conn):
                return (data,), False
            return (IS_PRIMARY, data), False

        try:
            _conn, results = yield Exec(node.config, deadline, plan, valid, arrival)
        except (DeadlineExceeded, psycopg.Error) as exc:
            observed = self.state.view(shard_index)
            seen = "" if observed.primary is not None else (
                f" (no primary observed: {observed_roles(observed)})"
            )
            raise ShardUnavailableError(
                view.name, f"primary {node.name} ({node.config.address}) did not answer: "
                f"{describe(exc)}{seen}"
            ) from exc
        if len(results) == 2:
            if results[0].get_value(0, 0) != b"t":
                demoted = (f"{node.name} is no longer a primary (failover in progress; "
                           f"observed: {observed_roles(self.state.view(shard_index))})")
                raise ShardUnavailableError(view.name, demoted) from PrimaryGone(demoted)
            return PrimaryAnswer(results[1], node.name, connected, arrival.seconds)
        return PrimaryAnswer(results[0], node.name, connected, arrival.seconds)


def primary_node(view: ShardView) -> NodeView:
    """The observed primary; with none, the last one seen (or the file's)."""
    primary = view.primary
    if primary is not None:
        return primary
    index = view.primary_index if view.primary_index is not None else 0
    return view.nodes[index]


def still_primary(view: ShardView, name: str) -> bool:
    """Whether node ``name`` is still worth waiting for as the shard's primary."""
    primary = view.primary
    if primary is not None:
        return primary.name == name
    last = primary_node(view)  # down (maybe restarting), or not polled yet: keep waiting
    return last.name == name and not view.ruled_out(last)


def observed_roles(view: ShardView) -> str:
    """Every node's observed role and state, e.g. ``m1 replica up, m2 down``, with the HA
    manager's view of it when a source answers (``m1 primary wrong role, patroni replica
    stopping``)."""
    leadership = view.leadership
    return ", ".join(
        f"{node.name} ({node.config.address}) " + (
            node.state if node.role is None or node.state == "down"
            else f"{node.role} {node.state}"
        ) + ("" if leadership is None else f", {leadership.member(node.name) or 'not in patroni'}")
        for node in view.nodes
    )


def describe(exc: BaseException) -> str:
    """A failed attempt's error in one line, for the caller's error message."""
    if isinstance(exc, PrimaryGone):
        return str(exc)
    if isinstance(exc, DeadlineExceeded):
        return "deadline exceeded"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]
