"""The vocabulary programs and drivers share: what a program asks for (:class:`Exec`), what
it gets back, and what a read returns (:class:`ReadResult`).

Kept apart from ``_core`` so the modules a read's program is built from (``_core``,
``_replica``, ``_primary``, ``_degrade``, ``_writes``) import it without importing each other.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from propstore._limiter import Turn
from propstore._wire import Arrival, Statement
from propstore.config import NodeConfig
from propstore.lsn import LSN
from propstore.proof import Connection, Proof
from propstore.router import FallbackReason

Props = dict[str, Any]


class ConnState(Connection, Protocol):
    """What a pooled connection knows about the server it is on (see ``proof``, ``_pool``)
    and which form of verified read it sends."""

    #: The verified read is one statement (migration 0002's function), not the pipeline.
    propstore_one_statement: bool
    #: Statements are prepared on it by name (else sent unnamed, with their Sync).
    propstore_named: bool


@dataclass(frozen=True, slots=True, init=False)
class ReadResult:
    """A read's answer and how it was served.

    Attributes:
        props: the user's properties, or None when the user has none.
        version: the document's version (increases on every change), None if absent.
        shard: the shard that holds the user.
        node: the node that served the read.
        from_replica: whether a replica served it.
        replay_lsn: the replica's replay LSN the read was proven against (None on primary).
        staleness_bound: proven upper bound, in seconds, on how stale the answer is: it
            includes every write acknowledged more than this long before the read began.
            0.0 when the primary served it.
        fallback_reason: why the primary (or a stale replica) served, when a fresh replica
            did not: ``replica_stale``, ``replica_down``, ``replica_timeout``,
            ``no_replica`` or ``strong``.
        proof: how freshness was established: ``pipeline`` (LSN read in the same round trip),
            ``monitor``, ``connection`` or ``run`` (an earlier observation that provably
            still holds: a poll, this connection's own verified read, or a read verified on
            another connection to the same server run),
            ``primary``, or ``unproven`` (a stale replica served under
            ``Degrade.serve_stale()`` with no provable bound).
        within_budget: False only for a stale replica served under ``Degrade.serve_stale()``
            (``on_stale="serve"``) because the primary shed the read.
    """

    props: Props | None
    version: int | None
    shard: str
    node: str
    from_replica: bool
    replay_lsn: LSN | None
    staleness_bound: float
    fallback_reason: FallbackReason | None
    proof: Proof
    within_budget: bool = True

    def __init__(self, props: Props | None, version: int | None, shard: str, node: str,
                 from_replica: bool, replay_lsn: LSN | None, staleness_bound: float,
                 fallback_reason: FallbackReason | None, proof: Proof,
                 within_budget: bool = True) -> None:
        # What the generated frozen __init__ does (every read builds one), through the
        # slots' own setters: 6 bytecodes a field instead of 8. Checked against the fields
        # below, at import.
        _SET_PROPS(self, props)
        _SET_VERSION(self, version)
        _SET_SHARD(self, shard)
        _SET_NODE(self, node)
        _SET_FROM_REPLICA(self, from_replica)
        _SET_REPLAY_LSN(self, replay_lsn)
        _SET_STALENESS_BOUND(self, staleness_bound)
        _SET_FALLBACK_REASON(self, fallback_reason)
        _SET_PROOF(self, proof)
        _SET_WITHIN_BUDGET(self, within_budget)


_FIELDS = [f.name for f in dataclasses.fields(ReadResult)]
if list(inspect.signature(ReadResult.__init__).parameters)[1:] != _FIELDS:
    raise TypeError(f"ReadResult.__init__ must take its fields in order: {_FIELDS}")
(_SET_PROPS, _SET_VERSION, _SET_SHARD, _SET_NODE, _SET_FROM_REPLICA, _SET_REPLAY_LSN,
 _SET_STALENESS_BOUND, _SET_FALLBACK_REASON, _SET_PROOF, _SET_WITHIN_BUDGET) = (
    getattr(ReadResult, name).__set__ for name in _FIELDS)


@dataclass(slots=True)  # not frozen: one per request, and frozen costs its __init__ 3x
class Exec:
    """A request from a program: run ``plan(conn)``'s statements on ``node`` by ``deadline``.

    ``plan`` sees the checked-out connection, so the program can pick the fast path when an
    observation valid for *that* connection already proves the budget. It returns the
    statements and whether they must never be sent twice (a write: when a pooler lost the
    prepared statements, a later statement of the batch may have run after the write).
    """

    node: NodeConfig
    deadline: float
    plan: Callable[[ConnState], tuple[Sequence[Statement], bool]]
    #: While waiting for a connection, the driver gives up (raising ``PrimaryGone``) as
    #: soon as this says the node is no longer worth waiting for.
    valid: Callable[[], bool] | None = None
    #: Where the driver notes when the statements went out and their answer came in (the
    #: primary's latency for its limiter, without this process's wait to run).
    arrival: Arrival | None = None


@dataclass(frozen=True, slots=True)
class Wait:
    """A request from a program: resume me at the monitor's next observation of the shard,
    when ``turn`` (a place queued for room on the primary) is granted, or at ``until``
    (monotonic) at the latest. The driver holds no connection while waiting and sends back
    ``(None, [])``."""

    shard_index: int
    until: float
    turn: Turn | None = None


#: What a program may yield.
Request = Exec | Wait
Response = tuple[Any, list[Any]]
#: Called after every read with the result and its duration in seconds.
ReadObserver = Callable[["ReadResult", float], None]
#: A node a read could not use: (node index, what happened, whether it only missed a
#: deadline -- no new proof -- rather than failed).
Failure = tuple[int, str, bool]
Program = Generator[Request, Response, Any]


def fixed(statements: Sequence[Statement], once: bool = False
          ) -> Callable[[ConnState], tuple[Sequence[Statement], bool]]:
    """A plan that runs ``statements`` whatever the connection (``once``: a write, see
    :class:`Exec`)."""
    return lambda conn: (statements, once)
