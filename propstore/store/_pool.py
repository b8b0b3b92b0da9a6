"""One bounded psycopg-pool per node; connections that remember what they have proven."""

from __future__ import annotations

import math
import time
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from propstore import _sql
from propstore.config import NodeConfig, RoutingSettings
from propstore.lsn import LSN

_PREPARE = [_sql.prepare_sql(name) for name in _sql.DATA_STATEMENTS]
_NO_TABLE = [_sql.prepare_sql(name) for name in (_sql.REPLAY_LSN, _sql.FLUSH_LSN,
                                                  _sql.INSERT_LSN, _sql.IS_PRIMARY)]


class NodeConnection(psycopg.Connection[Any]):
    """A pooled connection plus the facts the fast path relies on (see ``_core``)."""

    #: ``time.monotonic()`` once the connection was open (an upper bound of its open time).
    propstore_opened_at: float = math.inf
    #: Newest replay LSN verified *through this connection*: holds for its whole life.
    propstore_verified_lsn: LSN | None = None
    #: The database has no ``user_properties`` table (shard not migrated).
    propstore_schema_missing: bool = False


class AsyncNodeConnection(psycopg.AsyncConnection[Any]):
    """The asyncio twin of :class:`NodeConnection`."""

    propstore_opened_at: float = math.inf
    propstore_verified_lsn: LSN | None = None
    propstore_schema_missing: bool = False


SCHEMA_MISSING = (
    "table user_properties does not exist on this node: migrate the shard first "
    "(`propstore migrate up`)"
)


def prepare(conn: NodeConnection) -> bool:
    """Prepare every statement on ``conn``; False (and flagged) when the table is missing.

    A connection is kept even without the table: failing here would only surface as a pool
    timeout, while a flagged connection lets the store say what is wrong, and re-checks on
    its next use (after a migration it recovers without a reconnect).
    """
    try:
        if conn.propstore_schema_missing:
            conn.execute("DEALLOCATE ALL", prepare=False)
        for command in _PREPARE:
            conn.execute(command, prepare=False)
    except psycopg.errors.UndefinedTable:
        conn.execute("DEALLOCATE ALL", prepare=False)
        for command in _NO_TABLE:
            conn.execute(command, prepare=False)
        conn.propstore_schema_missing = True
        return False
    conn.propstore_schema_missing = False
    return True


async def prepare_async(conn: AsyncNodeConnection) -> bool:
    """The asyncio twin of :func:`prepare`."""
    try:
        if conn.propstore_schema_missing:
            await conn.execute("DEALLOCATE ALL", prepare=False)
        for command in _PREPARE:
            await conn.execute(command, prepare=False)
    except psycopg.errors.UndefinedTable:
        await conn.execute("DEALLOCATE ALL", prepare=False)
        for command in _NO_TABLE:
            await conn.execute(command, prepare=False)
        conn.propstore_schema_missing = True
        return False
    conn.propstore_schema_missing = False
    return True


def _configure(conn: NodeConnection) -> None:
    prepare(conn)
    conn.propstore_opened_at = time.monotonic()


async def _configure_async(conn: AsyncNodeConnection) -> None:
    await prepare_async(conn)
    conn.propstore_opened_at = time.monotonic()


def _kwargs(node: NodeConfig, routing: RoutingSettings) -> dict[str, Any]:
    return {
        "autocommit": True,
        # libpq rounds connect_timeout to whole seconds, 2 at least.
        "connect_timeout": max(2, math.ceil(routing.connect_timeout)),
        "application_name": f"propstore:{node.name}",
    }


def sync_pool(node: NodeConfig, routing: RoutingSettings) -> ConnectionPool[NodeConnection]:
    """An unopened pool for a node (open it with ``open(wait=False)``: a down node must not
    stop the store from starting)."""
    return ConnectionPool(
        node.dsn,
        connection_class=NodeConnection,
        kwargs=_kwargs(node, routing),
        min_size=routing.pool_min_size,
        max_size=routing.pool_max_size,
        configure=_configure,
        name=node.name,
        open=False,
        reconnect_timeout=math.inf,
    )


def async_pool(node: NodeConfig, routing: RoutingSettings
               ) -> AsyncConnectionPool[AsyncNodeConnection]:
    """The asyncio twin of :func:`sync_pool`."""
    return AsyncConnectionPool(
        node.dsn,
        connection_class=AsyncNodeConnection,
        kwargs=_kwargs(node, routing),
        min_size=routing.pool_min_size,
        max_size=routing.pool_max_size,
        configure=_configure_async,
        name=node.name,
        open=False,
        reconnect_timeout=math.inf,
    )
