# Generated from propstore/store/_pool_async.py by tools/async_to_sync.py: do not edit. Change the
# async source and run `python tools/async_to_sync.py`.
"""The blocking side of the node pools: ``NodeConnection``, ``prepare`` and ``sync_pool``
(what they share with the asyncio side is ``_pool``)."""

from __future__ import annotations

import math
import time
from typing import Any, Self

import psycopg
from psycopg_pool import ConnectionPool
from tenacity import Retrying

from propstore import _sql, _wire, proof
from propstore._connections import ConnectionBudget
from propstore.config import NodeConfig, RoutingSettings
from propstore.lsn import LSN
from propstore.store._pool import (
    IDENTITY,
    OWN_NAMES,
    REACH,
    STATEMENT_LOST,
    NodeReach,
    connect_kwargs,
    connecting,
    every_attribute,
    pool_sizes,
    setup_deadline,
)

#: A read of no user (tenant and user id empty: never valid input, so no row).
_WARM_UP = (_wire.Statement(_sql.GET, (b"", b"")),)


class NodeConnection(psycopg.Connection[Any]):
    """A pooled connection plus what the fast path relies on (see ``proof``)."""

    @classmethod
    def connect(cls, conninfo: str = "", **kwargs: Any) -> Self:
        """psycopg's ``connect``, tried again while the server refuses (see
        :data:`~propstore.store._pool.CONNECT_PATIENCE`)."""
        for attempt in connecting(Retrying, kwargs.pop(REACH, None)):
            with attempt:
                return super().connect(conninfo, **kwargs)
        raise AssertionError("unreachable: tenacity returns or raises")

    #: ``time.monotonic()`` once the connection was open (an upper bound of its open time).
    propstore_opened_at: float = math.inf
    #: The server run the connection reached when it opened.
    propstore_run: proof.ServerRun | None = None
    #: Whether it provably stays on that run for life (else no connection-scoped facts).
    propstore_keeps_server: bool = False
    #: Statements are prepared on it by name (else sent unnamed, with their Sync).
    propstore_named: bool = False
    #: Newest replay LSN verified *through this connection* (only where it keeps its server).
    propstore_verified_lsn: LSN | None = None
    #: The database has no ``user_properties`` table (shard not migrated).
    propstore_schema_missing: bool = False
    #: A verified read may be one statement (migration 0002's functions; for a named
    #: connection: prepared). Unnamed ones try, and fall back per node (``_replica``).
    propstore_one_statement: bool = False
    #: Uses since it last went back through its psycopg pool (see ``IdleStack``).
    propstore_uses: int = 0
    #: ``time.monotonic()`` when it was last kept idle by its ``IdleStack``.
    propstore_idle_since: float = 0.0


def prepare(conn: NodeConnection, routing: RoutingSettings | None = None
            ) -> bool:
    """Prepare every statement on ``conn`` by name; False (and flagged) when the table is
    missing. Nothing to do on a connection that sends unnamed statements.

    A connection is kept even without the table: failing here would only surface as a pool
    timeout, while a flagged connection lets the store say what is wrong, and re-checks on
    its next use (after a migration it recovers without a reconnect).
    """
    if not conn.propstore_named:
        return True
    deadline = setup_deadline(routing or RoutingSettings())
    if conn.propstore_schema_missing:
        conn.execute("DEALLOCATE ALL", prepare=False)
        conn.propstore_schema_missing = False
    _wire.prepare(conn, _sql.BASE_STATEMENTS, deadline)
    try:
        _wire.prepare(conn, _sql.TABLE_STATEMENTS, deadline)
    except psycopg.errors.UndefinedTable:
        conn.propstore_schema_missing = True
        return False
    # GET run once, on no user: a backend's first execution of a statement on the table
    # loads the catalog entries its plan needs (the index, its operators, statistics), a
    # millisecond or more measured on a fresh primary backend against 0.1-0.5 ms after it.
    # Paid here, in the pool's worker, not by the connection's first read: often a read
    # falling back to the primary after a frozen replica's deadline.
    try:
        _wire.execute(conn, _WARM_UP, deadline)
    except psycopg.DatabaseError:
        # Only a warm-up: a statement the server refuses (no SELECT privilege, say) leaves
        # the connection usable, and the reads report that error as they did without it.
        if conn.closed:
            raise
    try:
        _wire.prepare(conn, _sql.FUNCTION_STATEMENTS, deadline)
        conn.propstore_one_statement = True
    except psycopg.errors.UndefinedFunction:  # before migration 0002: the pipeline verifies
        conn.propstore_one_statement = False
    return True


def sync_pool(node: NodeConfig, routing: RoutingSettings, reach: NodeReach | None = None,
              budget: ConnectionBudget | None = None
              ) -> ConnectionPool[NodeConnection]:
    """An unopened pool for a node (open it with ``open(wait=False)``: a down node must not
    stop the store from starting), sized by the store's connection ``budget`` (default:
    the routing settings' own bounds)."""
    known = reach or NodeReach(node)
    sizes = pool_sizes(routing, budget)

    def configure(conn: NodeConnection) -> None:
        (row,) = _wire.execute(
            conn, IDENTITY, setup_deadline(routing), named=False)
        known.learned(conn, tuple(row.get_value(0, c) for c in range(5)))
        every_attribute(conn)
        _wire.stamp_arrivals(conn)
        try:
            prepare(conn, routing)
        except STATEMENT_LOST as lost:  # a pooler moved it between its Parses: unnamed
            known.lost_statements(conn, lost)
        if known.probes(conn):
            (names,) = _wire.execute(
                conn, OWN_NAMES, setup_deadline(routing), named=False)
            known.probed(conn, int(names.get_value(0, 0) or 0))
        conn.propstore_opened_at = time.monotonic()

    return ConnectionPool(
        node.dsn,
        connection_class=NodeConnection,
        kwargs=connect_kwargs(node, routing, known),
        min_size=sizes[0],
        max_size=sizes[1],
        configure=configure,
        name=node.name,
        open=False,
        reconnect_timeout=math.inf,
    )
