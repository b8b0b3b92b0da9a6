"""What the node pools of both stores share; each connection knows which server run it is on.

A store keeps one bounded psycopg-pool per node (``_pool_async.async_pool``, and
``_pool_sync.sync_pool`` generated from it). When a connection opens it learns, in-band, the
identity of the server run that answered (``proof.ServerRun``) and whether a pooler sits in
between (the BackendKeyData pid libpq got differs from ``pg_backend_pid()``: PgBouncer issues
keys of its own, a TCP proxy passes the server's through). With the node's declared ``via``
that decides whether the connection keeps its server for life (facts about that run may prove
its reads) and whether its statements are prepared by name at the protocol level or sent
unnamed (transaction pooling). Here: :class:`NodeReach` (what was learned), the connect
retry policy, and :class:`IdleStack`, the connections a store keeps between reads.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import psycopg
import structlog
from psycopg import pq
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout
from tenacity import (
    AsyncRetrying,
    Retrying,
    retry_if_exception,
    stop_after_delay,
)

from propstore import _sql, _wire, proof
from propstore._connections import ConnectionBudget
from propstore._jitter import wait_jittered
from propstore.config import NodeConfig, RoutingSettings
from propstore.store._program import Exec

if TYPE_CHECKING:
    from propstore.store._pool_async import AsyncNodeConnection
    from propstore.store._pool_sync import NodeConnection

log = structlog.get_logger("propstore.store")

#: What a connection asks the server when it opens (the row ``NodeReach.learned`` reads).
IDENTITY = [_wire.Statement(_sql.IDENTITY)]
OWN_NAMES = [_wire.Statement(_sql.OWN_NAMES)]
#: Errors a named statement gets when the connection changed server under it (a pooler
#: that does not track protocol-level prepared statements, in transaction mode).
STATEMENT_LOST = (psycopg.errors.InvalidSqlStatementName,
                  psycopg.errors.DuplicatePreparedStatement)


#: How long opening a connection keeps trying while the server refuses it as a server that
#: is shutting down, restarting or starting up does ("the database system is shutting down /
#: starting up", nothing listening yet: ``_BETWEEN_RUNS``), in seconds. psycopg-pool waits
#: 1 s, then 2 s, 4 s... between its own attempts (not configurable): a pool whose primary
#: restarted in place (0.3-0.6 s) would stay empty for a second or three while reads and
#: writes wait for it. Jittered and backing off, so a fleet does not hammer a starting
#: server.
CONNECT_PATIENCE = 2.0
RetryingT = TypeVar("RetryingT", Retrying, AsyncRetrying)


def connecting(kind: type[RetryingT], reach: NodeReach | None = None) -> RetryingT:
    """The retry policy for opening a pooled connection (``Retrying`` or
    ``AsyncRetrying``): refusals are tried again for :data:`CONNECT_PATIENCE`; another
    rejection is noted on ``reach`` (:attr:`NodeReach.rejected`)."""
    return kind(stop=stop_after_delay(CONNECT_PATIENCE),
                wait=wait_jittered(multiplier=0.05, max=0.1, jitter=0.05),
                retry=retry_if_exception(partial(_retried, reach)), reraise=True)


#: The keyword by which a pool hands its node's :class:`NodeReach` to the connect that
#: opens its connections (psycopg-pool passes its ``kwargs`` on; popped before psycopg
#: sees them), so that a rejected connect is known to the node's reads.
REACH = "propstore_reach"


#: What a failed connect says when the server is between two runs. psycopg exposes no
#: SQLSTATE for a failed connection (57P03 here), so the text decides: only these are tried
#: again. Anything else -- too many clients, authentication, a timeout, or these in another
#: server language -- keeps psycopg-pool's own backoff, so a server refusing for other
#: reasons is not hammered by a fleet's pools.
_BETWEEN_RUNS = ("the database system is shutting down", "the database system is starting up",
                 "the database system is not yet accepting connections", "connection refused",
                 "server closed the connection unexpectedly")


def _refused(exc: BaseException) -> bool:
    if not isinstance(exc, psycopg.OperationalError) or isinstance(
            exc, psycopg.errors.ConnectionTimeout):
        return False
    text = str(exc).lower()
    return any(sign in text for sign in _BETWEEN_RUNS)


def _retried(reach: NodeReach | None, exc: BaseException) -> bool:
    """Whether a failed connect is tried again; a server that answered and said no for
    another reason (too many clients, authentication, no such database) is noted."""
    if _refused(exc):
        return True
    if reach is not None and isinstance(exc, psycopg.OperationalError) and not isinstance(
            exc, psycopg.errors.ConnectionTimeout):  # a timeout is silence, not a rejection
        lines = str(exc).strip().splitlines()
        reach.rejected = (lines[-1].strip() if lines else type(exc).__name__)[:200]
    return False


class Rejected(psycopg.OperationalError):
    """No connection to a node whose server rejects this store's new connections (too many
    clients, authentication, ...), and none of the pool's idle: an error of the node, not a
    missed deadline (a read reports it as a failure, and does not wait for the pool)."""


def patience(pool: ConnectionPool[Any] | AsyncConnectionPool[Any], reach: NodeReach,
             op: Exec) -> Exec:
    """``op`` as a request that found no kept connection should wait for the pool: as is,
    or with its deadline now when the node's last connect was rejected and the pool has no
    idle connection (waiting would only spend the deadline). Only this slow path asks the
    pool, and only once a connect was rejected."""
    if reach.rejected is None or pool.get_stats()["pool_available"]:
        return op
    return replace(op, deadline=min(op.deadline, time.monotonic()))


def rejected(reach: NodeReach, exc: BaseException) -> BaseException:
    """``exc``, or for a pool timeout on a node whose connects are rejected, a
    :class:`Rejected` naming why (the timeout as its cause)."""
    if reach.rejected is None or not isinstance(exc, PoolTimeout):
        return exc
    error = Rejected(f"new connections rejected: {reach.rejected}")
    error.__cause__ = exc
    return error


#: A pooled connection of either side (the classes are ``_pool_sync``'s and ``_pool_async``'s).
AnyNodeConnection = TypeVar("AnyNodeConnection", "NodeConnection", "AsyncNodeConnection")
_IDLE = pq.TransactionStatus.IDLE
_monotonic = time.monotonic
#: A connection kept by an :class:`IdleStack` goes back through its pool after this many
#: uses (the pool then applies its ``max_lifetime``, stats and logs to it) ...
PASS_THROUGH_EVERY = 64
#: ... and after this many seconds unused (the pool's ``max_idle`` shrinking applies).
KEPT_IDLE_FOR = 1.0


class IdleStack(Generic[AnyNodeConnection]):
    """Connections of one node's pool that a store keeps, idle, for its next reads.

    psycopg-pool's ``getconn`` and ``putconn`` cost a read about 330 Python bytecodes of
    its ~1,700 (lock, deque, stats, three log calls, the return-path checks; measured in
    docs/deployment.md); taking a connection from this stack and putting it back costs ~30.
    The pool still owns every connection: one kept here is, to the pool, checked out, so the
    node's connection budget (the pool's ``max_size``) holds unchanged. What the stack must
    not do is sit on an idle connection while a reader waits in the pool for one, so:

    * :meth:`take` pops a kept connection, or else counts the caller as waiting in the pool
      (under the lock, so a connection kept concurrently is seen by one or the other);
    * :meth:`keep` keeps a returned connection only while nobody waits in the pool (then
      none is kept: everything kept was taken before the first waiter counted itself), and
      only a healthy, idle one, and never one due back to the pool: every
      ``PASS_THROUGH_EVERY`` uses, or one left unused ``KEPT_IDLE_FOR`` seconds.

    Proofs are unaffected: what a read may reuse is a property of the connection (the server
    run it learned when it opened), whichever way it comes back.
    """

    __slots__ = ("_kept", "_lock", "_waiting")

    def __init__(self) -> None:
        self._kept: list[AnyNodeConnection] = []
        self._lock = threading.Lock()
        self._waiting = 0

    def take(self) -> AnyNodeConnection | None:
        """The most recently kept connection; None: get one from the pool, then call
        :meth:`waited` (the caller counts as waiting until then)."""
        try:
            # Without the lock: popping cannot strand a waiter (only :meth:`keep` adds,
            # and it checks for waiters under the lock).
            return self._kept.pop()
        except IndexError:
            pass
        with self._lock:
            if self._kept:
                return self._kept.pop()
            self._waiting += 1
        return None

    def waited(self) -> None:
        """The caller of a :meth:`take` that returned None has its connection (or gave up)."""
        with self._lock:
            self._waiting -= 1

    def keep(self, conn: AnyNodeConnection) -> AnyNodeConnection | None:
        """Keep ``conn`` if it may be kept; return the connection the caller must put back
        into the pool instead: ``conn``, or a kept one unused for too long (None: neither)."""
        uses = conn.propstore_uses
        if uses < PASS_THROUGH_EVERY and conn.pgconn.transaction_status == _IDLE:
            now = _monotonic()
            with self._lock:
                if not self._waiting:
                    conn.propstore_uses = uses + 1
                    conn.propstore_idle_since = now
                    kept = self._kept
                    kept.append(conn)
                    try:
                        if kept[0].propstore_idle_since >= now - KEPT_IDLE_FOR:
                            return None
                        conn = kept.pop(0)
                    except IndexError:  # taken meanwhile (take pops without the lock)
                        return None
        conn.propstore_uses = 0
        return conn

    def drain(self) -> list[AnyNodeConnection]:
        """Every kept connection, removed (to put back before the pool closes)."""
        drained = []
        with self._lock:
            kept = self._kept
            while True:
                try:
                    conn = kept.pop()  # one at a time: a concurrent take gets others
                except IndexError:
                    break
                conn.propstore_uses = 0
                drained.append(conn)
        return drained


SCHEMA_MISSING = (
    "table user_properties does not exist on this node: migrate the shard first "
    "(`propstore migrate up`)"
)


@dataclass
class NodeReach:
    """What the store learned about how one node is reached (shared by its pool and reads).

    ``statements_lost``: a named statement failed the way it does when a pooler moves the
    connection between servers; from then on the node gets no connection-scoped facts and
    only unnamed statements, and one event says so.
    """

    node: NodeConfig
    pooler_seen: bool | None = None
    statements_lost: bool = False
    #: Why the server rejected the pool's last connect (None once one opened since).
    rejected: str | None = None
    _logged: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def mode(self) -> str:
        """How reads on this node are proven, in a few words (for ``propstore lag``)."""
        return proof.describe_mode(self.node.via, self.pooler_seen, self.statements_lost,
                                   tracks_prepared=self.node.pooler_tracks_prepared)

    def learned(self, conn: NodeConnection | AsyncNodeConnection,
                row: tuple[bytes | None, ...]) -> None:
        """Record an opened connection's identity row and decide what it may reuse."""
        self.rejected = None
        conn.propstore_run = proof.ServerRun.from_row(row)
        backend_pid = int(row[4]) if row[4] else None
        pooler_seen = backend_pid is not None and backend_pid != conn.pgconn.backend_pid
        self.pooler_seen = pooler_seen
        keeps = proof.keeps_server(self.node.via, pooler_seen) and not self.statements_lost
        conn.propstore_keeps_server = keeps
        # Behind a pooler that tracks protocol-level prepared statements a connection keeps
        # its statements, not its server: named statements, facts still per read.
        conn.propstore_named = keeps or (
            self.node.pooler_tracks_prepared and not self.statements_lost)
        if pooler_seen and self.node.via in ("direct", "load_balancer"):
            self._once("via_mismatch", log.warning, via=self.node.via,
                       found="a pooler (the server's backend pid differs from the key "
                       "libpq received)",
                       fix='set via = "session_pooler" or "transaction_pooler" for this node; '
                       "until then every read is verified in its own round trip")
        elif pooler_seen and self.node.via == "auto":
            self._once("pooler_detected", log.info,
                       mode="transaction pooler: per-read proofs only",
                       fix='if it pools sessions, set via = "session_pooler" to reuse proofs')

    def probes(self, conn: NodeConnection | AsyncNodeConnection) -> bool:
        """Whether ``conn``, just prepared, should check the pooler tracks its statements:
        it sends them by name but keeps no server (a node declared ``pooler_tracks_prepared``).
        """
        return conn.propstore_named and not conn.propstore_keeps_server

    def probed(self, conn: NodeConnection | AsyncNodeConnection, own_names: int) -> None:
        """The server connection after ``conn``'s Parses holds ``own_names`` statements under
        propstore's names. A tracking pooler never leaves any there (it prepares them under
        names of its own), so any means the names were passed through: it does not track
        them. None proves nothing (the probe may have run on another server connection);
        a named statement failing later still downgrades the node."""
        if own_names:
            self.lost_statements(conn, f"{own_names} statements under propstore's own names "
                                 "on the server connection: the pooler passes them through")

    def lost_statements(self, conn: NodeConnection | AsyncNodeConnection,
                        error: BaseException | str) -> None:
        """A named statement failed on ``conn`` as it does behind transaction pooling."""
        self.statements_lost = True
        conn.propstore_keeps_server = conn.propstore_named = False
        conn.propstore_verified_lsn = None
        if self.node.pooler_tracks_prepared:
            # Declared as tracking them, but a server connection lacks a statement its client
            # prepared: PgBouncer before 1.21, or max_prepared_statements = 0.
            fix = ("give the pooler max_prepared_statements > 0 (PgBouncer >= 1.21), or drop "
                   "pooler_tracks_prepared for this node; reads are sent unnamed now")
        else:
            fix = ('set via = "transaction_pooler" for this node (PgBouncer before 1.21 '
                   "tracks no prepared statements); reads are verified per round trip now")
        self._once("statements_lost", log.warning, error=str(error).strip()[:200],
                   mode="transaction pooler: per-read proofs only", fix=fix)

    def refresh(self, conn: NodeConnection | AsyncNodeConnection) -> None:
        """Apply a downgrade found on another connection of the node (one check per use)."""
        if self.statements_lost and conn.propstore_named:
            conn.propstore_keeps_server = conn.propstore_named = False
            conn.propstore_verified_lsn = None

    def _once(self, event: str, emit: Any, **fields: Any) -> None:
        with self._lock:
            if event in self._logged:
                return
            self._logged.add(event)
        emit(f"node_{event}", node=self.node.name, address=self.node.address, **fields)


def setup_deadline(routing: RoutingSettings) -> float:
    """When a connection's set-up statements (identity, prepares) must have answered."""
    return time.monotonic() + max(2.0, routing.connect_timeout)


def every_attribute(conn: NodeConnection | AsyncNodeConnection) -> None:
    """Give a connection that just opened every per-read attribute on the instance."""
    # Set on the instance when it opens, so that setting them on its reads later allocates
    # nothing (a first assignment grows the instance's dict; tests/test_store.py counts it).
    conn.propstore_verified_lsn = None
    conn.propstore_schema_missing = False
    conn.propstore_one_statement = True  # a named connection's prepare decides
    conn.propstore_uses = 0
    conn.propstore_idle_since = 0.0


def connect_kwargs(node: NodeConfig, routing: RoutingSettings, reach: NodeReach
                   ) -> dict[str, Any]:
    """psycopg's connection arguments for a node's pooled connections (and the node's
    :class:`NodeReach`, for the connect: :data:`REACH`)."""
    return {
        REACH: reach,
        "autocommit": True,
        # libpq rounds connect_timeout to whole seconds, 2 at least.
        "connect_timeout": max(2, math.ceil(routing.connect_timeout)),
        "application_name": f"propstore:{node.name}",
    }


def pool_sizes(routing: RoutingSettings, budget: ConnectionBudget | None) -> tuple[int, int]:
    """A node pool's (min, max): the budget's split, else the routing settings' bounds."""
    if budget is None:
        return routing.pool_min_size, routing.pool_max_size
    return budget.pool_min_size, budget.pool_max_size
