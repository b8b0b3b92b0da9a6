"""``AsyncPropertyStore``: the asyncio API. Drives ``_core`` programs on psycopg-pool pools
without blocking the event loop.

This module is the source of ``_sync`` (``PropertyStore``), which ``tools/async_to_sync.py``
generates from it: edit here, then run the tool. What differs between the two sits in
``if True:  # ASYNC`` blocks (the ``else`` is the sync side)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from datetime import timedelta
from types import TracebackType
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from tenacity import AsyncRetrying

from propstore import _wire
from propstore._limiter import LimiterState
from propstore.config import Topology
from propstore.degrade import Degrade
from propstore.errors import ConfigError
from propstore.freshness import Token
from propstore.monitor import LagMonitor, ShardView, monitor_for
from propstore.router import RouteDecision
from propstore.store._core import StoreCore
from propstore.store._pool import (
    SCHEMA_MISSING,
    STATEMENT_LOST,
    IdleStack,
    NodeReach,
    patience,
    rejected,
)
from propstore.store._pool_async import AsyncNodeConnection, async_pool, prepare_async
from propstore.store._primary import PrimaryGone
from propstore.store._program import (
    Exec,
    Program,
    Props,
    ReadObserver,
    ReadResult,
    Request,
    Wait,
)
from propstore.store._stats import ReadStats
from propstore.store._writes import is_retryable_write_error
from propstore.timeline import WriteMark

if True:  # ASYNC
    import asyncio
else:
    from concurrent.futures import ThreadPoolExecutor

# SYNC DOCSTRING
"""``PropertyStore``: the blocking API. Drives ``_core`` programs on psycopg-pool pools."""

Budget = float | timedelta | str | None
#: How often a write waiting for a connection rechecks that its node is still the primary.
_VALIDITY_SLICE = 0.05


class AsyncPropertyStore:
    """The asyncio twin of :class:`~propstore.PropertyStore`, with the same methods as
    coroutines. Open with ``await AsyncPropertyStore.open(topology)`` or
    ``async with AsyncPropertyStore.from_config(path) as store``; the lag monitor runs as a
    task on the caller's event loop."""

    # SYNC DOCSTRING
    """A sharded user-property store that reads from replicas only when provably fresh.

    Build with :meth:`from_config` (a TOML file) or ``PropertyStore(topology)``; use as a
    context manager or call :meth:`close`. Thread-safe: share one store per process.

    Every read takes a freshness budget — ``max_staleness`` (seconds, ``timedelta`` or
    ``"500ms"``), ``after`` (a :class:`~propstore.Token` from your writes, or its string),
    a named ``profile``, or ``consistency="strong"`` — and is served by a replica only when
    that replica is proven within it; otherwise by the primary, at once. With no budget the
    topology's ``default_profile`` applies (strong if it has none).

    When no replica is within the budget the primary serves the read, unless its limiter
    sheds it (only when the primary's latency leaves its normal band, or at a configured
    ceiling; strong and token reads are never shed). A shed read follows its ``degrade``
    policy (a :class:`~propstore.Degrade`, e.g. ``Degrade.wait(0.2) | Degrade.serve_stale()``;
    from the read, its profile or ``routing.degrade``); ``on_stale="error"``/``"serve"`` are
    ``Degrade.refuse()``/``Degrade.serve_stale()``.
    """

    if True:  # ASYNC
        def __init__(self, topology: Topology) -> None:
            """Prepare the store; :meth:`start` (or ``async with``) opens pools and monitor."""
            self._build(topology)
            self._monitor_task: asyncio.Task[None] | None = None

        @classmethod
        async def open(cls, topology: Topology) -> AsyncPropertyStore:
            """Create and start a store."""
            store = cls(topology)
            await store.start()
            return store

        async def start(self, wait_first_round: float = 2.0) -> None:
            """Open the pools (without waiting for unreachable nodes) and start the monitor."""
            if self._monitor_task is not None:
                return
            for pool, _reach, _idle in self._nodes.values():
                await pool.open(wait=False)
            self._monitor_task = asyncio.create_task(self.monitor.run(),
                                                     name="propstore-monitor")
            await self.monitor.wait_first_round(wait_first_round)
    else:
        def __init__(self, topology: Topology, *, start_monitor: bool = True) -> None:
            """Open a pool per node (without waiting: unreachable nodes are marked down) and
            start the lag monitor."""
            self._build(topology)
            for pool, _reach, _idle in self._nodes.values():
                pool.open(wait=False)
            self._executor = ThreadPoolExecutor(
                max_workers=min(len(topology.shards), 32), thread_name_prefix="propstore-shard"
            )
            if start_monitor:
                self.monitor.start()

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None) -> AsyncPropertyStore:
        """A store on a topology file (default ``$PROPSTORE_CONFIG``); start it with
        ``async with`` or :meth:`start`."""
        # SYNC DOCSTRING
        """Load a topology file (default: ``$PROPSTORE_CONFIG``) and open a store on it."""
        return cls(Topology.load(config_path(path)))

    def _build(self, topology: Topology) -> None:
        self.topology = topology
        self._core = StoreCore(topology)
        #: Per node: its pool, what is known of how it is reached, the connections kept idle.
        self._nodes: dict[str, tuple[AsyncConnectionPool[AsyncNodeConnection], NodeReach,
                                     IdleStack[AsyncNodeConnection]]] = {}
        for shard in topology.shards:
            for node in shard.nodes:
                reach = NodeReach(node)
                self._nodes[node.name] = (
                    async_pool(node, topology.routing, reach, topology.connections), reach,
                    IdleStack())
        self.monitor: LagMonitor = monitor_for(topology, self._core.state, self._core.stats)

    # ------------------------------------------------------------------ reads

    async def read(
        self, tenant: str, user_id: str, *, max_staleness: Budget = None,
        after: Token | str | None = None, profile: str | None = None,
        consistency: str | None = None, on_stale: str | None = None,
        degrade: Degrade | str | None = None,
    ) -> ReadResult:
        """Read a user's properties, with where and how fresh they were served.

        Raises :class:`~propstore.StaleReadError` when no node may serve within the budget
        and the ``degrade`` policy found no way either;
        :class:`~propstore.ShardUnavailableError` when the primary is needed and unreachable;
        :class:`~propstore.InvalidInputError` for bad arguments.
        """
        # The common read gives one budget: a one-key dict finds it in the memo at once.
        options = {"max_staleness": max_staleness} if (
            after is None and profile is None and consistency is None and on_stale is None
            and degrade is None
        ) else {"max_staleness": max_staleness, "after": after, "profile": profile,
                "consistency": consistency, "on_stale": on_stale, "degrade": degrade}
        return await self._run(self._core.single_read(tenant, user_id, options))  # type: ignore[no-any-return]

    async def get(self, tenant: str, user_id: str, **budget: Any) -> Props | None:
        """A user's properties (None when absent); budget keywords as in :meth:`read`."""
        return (await self._run(self._core.single_read(tenant, user_id, budget))).props  # type: ignore[no-any-return]

    async def get_many(self, tenant: str, user_ids: Iterable[str], **budget: Any
                       ) -> dict[str, Props | None]:
        """Properties of many users of a tenant: one query per shard, shards in parallel.

        Every requested id is a key of the result (None when absent). Each shard's part is
        proven fresh exactly as a single read is.
        """
        result, programs = self._core.batch_reads(tenant, user_ids, budget)
        if True:  # ASYNC
            parts = await asyncio.gather(*(self._run(p) for p in programs))
        else:
            parts = ([self._run(programs[0])] if len(programs) == 1
                     else list(self._executor.map(self._run, programs)))
        for part in parts:
            result.update(part)
        return result

    # ------------------------------------------------------------------ writes

    async def set(self, tenant: str, user_id: str, props: Mapping[str, Any]) -> Token:
        """Merge ``props`` into the user's properties (atomic; concurrent merges lose no
        key). Returns the token to read this write back (``after=token``)."""
        return await self._write("set", tenant, user_id, props)

    async def replace(self, tenant: str, user_id: str, props: Mapping[str, Any]) -> Token:
        """Replace the user's whole property document."""
        return await self._write("replace", tenant, user_id, props)

    async def unset(self, tenant: str, user_id: str, keys: Iterable[str]) -> Token:
        """Remove ``keys`` from the user's properties (absent keys are ignored)."""
        return await self._write("unset", tenant, user_id, keys)

    async def delete(self, tenant: str, user_id: str) -> Token:
        """Delete the user's properties."""
        return await self._write("delete", tenant, user_id, None)

    async def _write(self, kind: str, tenant: str, user_id: str, argument: object) -> Token:
        shard, statement = self._core.write_request(kind, tenant, user_id, argument)
        window = self._core.writes.window()

        async def attempt() -> tuple[int | None, WriteMark]:
            return await self._run(self._core.writes.program(shard, statement, window))  # type: ignore[no-any-return]

        try:
            try:
                outcome = await attempt()
            except (psycopg.Error, _wire.DeadlineExceeded) as exc:
                if not is_retryable_write_error(exc):
                    raise
                # Only a failed first attempt pays for tenacity: the primary may be
                # restarting or a promotion may be under way (the monitor rediscovers it).
                outcome = await self._core.writes.retrying(AsyncRetrying, shard, window)(
                    attempt)
        except (psycopg.Error, _wire.DeadlineExceeded) as exc:
            raise self._core.writes.error(shard, exc, window) from None
        return self._core.write_done(shard, statement, outcome)

    # ------------------------------------------------------------------ insight

    def route(self, tenant: str, user_id: str, **budget: Any) -> RouteDecision:
        """The routing decision a read would take now (``decision.explain()`` prints it)."""
        return self._core.route_for(tenant, user_id, budget)

    def fallback_states(self) -> dict[str, LimiterState]:
        """Each shard primary's fallback limiter now: limit, reads in flight, latency."""
        return {name: limiter.state() for name, limiter in
                zip(self._core.shard_names, self._core.primary_limiters, strict=True)}

    def shard_views(self) -> tuple[ShardView, ...]:
        """The monitor's current view of every shard (lag, states, roles)."""
        return self._core.state.views

    @property
    def stats(self) -> ReadStats:
        """Routing counters (reads by shard, served by, reason; writes by shard)."""
        return self._core.stats

    def add_observer(self, observer: ReadObserver) -> None:
        """Call ``observer(result, seconds)`` after every read (used by metrics); an
        observer that raises is logged, never fails the read."""
        self._core.observers.append(observer)

    def remove_observer(self, observer: ReadObserver) -> None:
        """Stop calling an observer added with :meth:`add_observer`."""
        self._core.observers.remove(observer)

    # ------------------------------------------------------------------ driving

    async def _run(self, program: Program) -> Any:
        """Drive a program: check out a connection per request, run it, hand back results.

        A connection closed under a request (abandoned at its deadline: a frozen server) goes
        back to its pool only once the program is done: the pool then opens a replacement,
        and that connect (Python code in the pool's worker, to the server that does not
        answer) must not compete for the interpreter with the read that falls back to the
        primary (measured: the fallback's primary round trip 1.5-4.5 ms with the replacement
        starting beside it, 0.5 ms without, load 3-5)."""
        abandoned: list[tuple[AsyncConnectionPool[AsyncNodeConnection],
                              AsyncNodeConnection]] | None = None
        try:
            try:
                op: Request = next(program)
            except StopIteration as stop:
                return stop.value
            while True:
                if isinstance(op, Wait):
                    await self._core.changes.wait_async(op)  # holds no connection while waiting
                    try:
                        op = program.send((None, []))
                    except StopIteration as stop:
                        return stop.value
                    continue
                pool, reach, idle = self._nodes[op.node.name]
                conn: AsyncNodeConnection | None = None
                try:
                    conn = idle.take()
                    if conn is None:
                        conn = await self._checkout(pool, idle, patience(pool, reach, op))
                    if reach.statements_lost:
                        reach.refresh(conn)
                    if conn.propstore_schema_missing and not await prepare_async(conn):
                        raise psycopg.errors.UndefinedTable(SCHEMA_MISSING)
                    statements, once = op.plan(conn)
                    try:
                        results = await _wire.execute_async(
                            conn, statements, op.deadline, named=conn.propstore_named,
                            arrival=op.arrival)
                    except STATEMENT_LOST as lost:
                        # The pooler moved this connection to another server: no facts about
                        # it hold any more; re-plan (verified in the round trip) and resend
                        # unnamed. Never for a write: a later statement of its batch may have run.
                        reach.lost_statements(conn, lost)
                        if once:
                            raise
                        statements, once = op.plan(conn)
                        results = await _wire.execute_async(
                            conn, statements, op.deadline, named=False, arrival=op.arrival)
                except (psycopg.Error, _wire.DeadlineExceeded) as exc:
                    if conn is not None:
                        if conn.closed:
                            abandoned = [*(abandoned or ()), (pool, conn)]
                        else:
                            await self._checkin(pool, idle, conn)
                    try:
                        op = program.throw(rejected(reach, exc))
                    except StopIteration as stop:
                        return stop.value
                    continue
                try:
                    op = program.send((conn, results))
                except StopIteration as stop:
                    return stop.value
                finally:
                    back = idle.keep(conn)
                    if back is not None:
                        await pool.putconn(back)
        finally:
            if abandoned is not None:
                for dead_pool, dead in abandoned:
                    await dead_pool.putconn(dead)

    @staticmethod
    async def _checkout(pool: AsyncConnectionPool[AsyncNodeConnection],
                        idle: IdleStack[AsyncNodeConnection], op: Exec) -> AsyncNodeConnection:
        """A connection from the pool by ``op.deadline`` (after ``idle.take()`` found none
        kept); while waiting, give up once ``op.valid`` says the node is no longer worth it
        (checked every ``_VALIDITY_SLICE`` seconds)."""
        try:
            if op.valid is None:
                return await pool.getconn(timeout=max(0.001, op.deadline - time.monotonic()))
            while True:
                remaining = op.deadline - time.monotonic()
                try:
                    return await pool.getconn(
                        timeout=max(0.001, min(remaining, _VALIDITY_SLICE)))
                except PoolTimeout:
                    if remaining <= _VALIDITY_SLICE:
                        raise
                if not op.valid():
                    raise PrimaryGone(f"{op.node.name} is no longer the observed primary")
        finally:
            idle.waited()

    @staticmethod
    async def _checkin(pool: AsyncConnectionPool[AsyncNodeConnection],
                       idle: IdleStack[AsyncNodeConnection], conn: AsyncNodeConnection
                       ) -> None:
        back = idle.keep(conn)
        if back is not None:
            await pool.putconn(back)

    # ------------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        """Stop the monitor and close every pool."""
        if True:  # ASYNC
            if self._monitor_task is not None:
                self._monitor_task.cancel()
                await asyncio.gather(self._monitor_task, return_exceptions=True)
                self._monitor_task = None
        else:
            self.monitor.stop()
            self._executor.shutdown(wait=False)
        for pool, _reach, idle in self._nodes.values():
            for conn in idle.drain():
                await pool.putconn(conn)
            await pool.close(timeout=1.0)

    async def __aenter__(self) -> AsyncPropertyStore:
        if True:  # ASYNC
            await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()


def config_path(path: str | os.PathLike[str] | None) -> str | os.PathLike[str]:
    """``path``, or ``$PROPSTORE_CONFIG``; a :class:`ConfigError` when neither is set."""
    if path is not None:
        return path
    env = os.environ.get("PROPSTORE_CONFIG")
    if not env:
        raise ConfigError("no config given and PROPSTORE_CONFIG is not set")
    return env
