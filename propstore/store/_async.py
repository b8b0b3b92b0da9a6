"""``AsyncPropertyStore``: the asyncio API, the twin of ``_sync``. Same programs, same
routing and proofs (``_core``); only the waiting differs."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from types import TracebackType
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from propstore import _wire
from propstore._sql import GET, GET_MANY, text_array
from propstore.config import Topology
from propstore.errors import InvalidInputError
from propstore.freshness import Token
from propstore.lsn import LSN
from propstore.monitor import LagMonitor, ShardView
from propstore.router import RouteDecision
from propstore.store._core import (
    Exec,
    Program,
    Props,
    ReadResult,
    StoreCore,
    decode_many,
    decode_one,
    is_retryable_write_error,
)
from propstore.store._pool import AsyncNodeConnection, async_pool
from propstore.store._sync import Budget, _config_path


class AsyncPropertyStore:
    """The asyncio twin of :class:`~propstore.PropertyStore`, with the same methods as
    coroutines. Open with ``await AsyncPropertyStore.open(topology)`` or
    ``async with AsyncPropertyStore.from_config(path) as store``; the lag monitor runs as a
    task on the caller's event loop."""

    def __init__(self, topology: Topology) -> None:
        """Prepare the store; :meth:`open` (or ``async with``) starts pools and monitor."""
        self.topology = topology
        self._core = StoreCore(topology)
        self._pools: dict[str, AsyncConnectionPool[AsyncNodeConnection]] = {
            node.name: async_pool(node, topology.routing)
            for shard in topology.shards for node in shard.nodes
        }
        self.monitor = LagMonitor(topology, self._core.state)
        self._monitor_task: asyncio.Task[None] | None = None

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None) -> AsyncPropertyStore:
        """A store on a topology file (default ``$PROPSTORE_CONFIG``); open it with
        ``async with`` or :meth:`start`."""
        return cls(Topology.load(_config_path(path)))

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
        for pool in self._pools.values():
            await pool.open(wait=False)
        self._monitor_task = asyncio.create_task(self.monitor.run(), name="propstore-monitor")
        await self.monitor.wait_first_round(wait_first_round)

    # ------------------------------------------------------------------ reads

    async def read(
        self, tenant: str, user_id: str, *, max_staleness: Budget = None,
        after: Token | str | None = None, profile: str | None = None,
        consistency: str | None = None, on_stale: str | None = None,
    ) -> ReadResult:
        """See :meth:`propstore.PropertyStore.read`."""
        started = time.monotonic()
        tenant, user_id, _bucket, shard = self._core.locate(tenant, user_id)
        freshness, policy = self._core.freshness(
            max_staleness, after, profile, consistency, on_stale
        )
        (props, version), result = await self._run(self._core.read_program(
            shard, freshness, policy,
            _wire.Statement(GET, (tenant.encode(), user_id.encode())), decode_one,
        ))
        return self._core.record(replace(result, props=props, version=version), started)

    async def get(self, tenant: str, user_id: str, **budget: Any) -> Props | None:
        """See :meth:`propstore.PropertyStore.get`."""
        return (await self.read(tenant, user_id, **budget)).props

    async def get_many(self, tenant: str, user_ids: Iterable[str], **budget: Any
                       ) -> dict[str, Props | None]:
        """See :meth:`propstore.PropertyStore.get_many` (shards queried concurrently)."""
        tenant, groups = self._core.group(tenant, user_ids)
        freshness, policy = self._core.freshness(
            budget.pop("max_staleness", None), budget.pop("after", None),
            budget.pop("profile", None), budget.pop("consistency", None),
            budget.pop("on_stale", None),
        )
        if budget:
            raise InvalidInputError("budget", f"unknown keyword(s) {sorted(budget)}")

        async def one(shard: int, ids: list[str]) -> dict[str, Props]:
            started = time.monotonic()
            found, result = await self._run(self._core.read_program(
                shard, freshness, policy,
                _wire.Statement(GET_MANY, (tenant.encode(), text_array(ids))), decode_many,
            ))
            self._core.record(result, started)
            return found  # type: ignore[no-any-return]

        parts = await asyncio.gather(*(one(s, ids) for s, ids in groups.items()))
        out: dict[str, Props | None] = {}
        for ids in groups.values():
            out.update(dict.fromkeys(ids))
        for part in parts:
            out.update(part)
        return out

    # ------------------------------------------------------------------ writes

    async def set(self, tenant: str, user_id: str, props: Mapping[str, Any]) -> Token:
        """See :meth:`propstore.PropertyStore.set`."""
        tenant, user_id, bucket, shard = self._core.locate(tenant, user_id)
        statement = self._core.merge_statement(tenant, user_id, bucket, props, False)
        return await self._write(shard, statement, must_return_row=True)

    async def replace(self, tenant: str, user_id: str, props: Mapping[str, Any]) -> Token:
        """See :meth:`propstore.PropertyStore.replace`."""
        tenant, user_id, bucket, shard = self._core.locate(tenant, user_id)
        statement = self._core.merge_statement(tenant, user_id, bucket, props, True)
        return await self._write(shard, statement, must_return_row=True)

    async def unset(self, tenant: str, user_id: str, keys: Iterable[str]) -> Token:
        """See :meth:`propstore.PropertyStore.unset`."""
        tenant, user_id, _bucket, shard = self._core.locate(tenant, user_id)
        return await self._write(shard, self._core.unset_statement(tenant, user_id, keys))

    async def delete(self, tenant: str, user_id: str) -> Token:
        """See :meth:`propstore.PropertyStore.delete`."""
        tenant, user_id, _bucket, shard = self._core.locate(tenant, user_id)
        return await self._write(shard, self._core.delete_statement(tenant, user_id))

    async def _write(self, shard: int, statement: _wire.Statement,
                     must_return_row: bool = False) -> Token:
        retrying = AsyncRetrying(
            stop=stop_after_delay(self.topology.routing.write_retry_time),
            wait=wait_exponential_jitter(multiplier=0.05, max=0.5),
            retry=retry_if_exception(is_retryable_write_error),
            reraise=True,
        )
        give_up_at = time.monotonic() + self.topology.routing.write_retry_time

        async def attempt() -> tuple[int | None, LSN]:
            program = self._core.write_program(shard, statement, give_up_at)
            return await self._run(program)  # type: ignore[no-any-return]

        try:
            outcome: tuple[int | None, LSN] = await retrying(attempt)
        except (psycopg.Error, _wire.DeadlineExceeded) as exc:
            raise self._core.write_error(shard, exc) from None
        version, lsn = outcome
        self._core.stats.writes[self._core.shard_names[shard]] += 1
        if must_return_row and version is None:
            raise InvalidInputError("props", "the merged document would exceed the size limit")
        return self._core.token(shard, lsn)

    # ------------------------------------------------------------------ insight

    def route(self, tenant: str, user_id: str, **budget: Any) -> RouteDecision:
        """See :meth:`propstore.PropertyStore.route`."""
        _t, _u, _b, shard = self._core.locate(tenant, user_id)
        freshness, _policy = self._core.freshness(
            budget.get("max_staleness"), budget.get("after"), budget.get("profile"),
            budget.get("consistency"), None,
        )
        return self._core.decide(shard, freshness)

    def shard_views(self) -> tuple[ShardView, ...]:
        """The monitor's current view of every shard."""
        return self._core.state.views

    @property
    def stats(self) -> Any:
        """Routing counters (see :class:`~propstore.PropertyStore`)."""
        return self._core.stats

    # ------------------------------------------------------------------ driving

    async def _run(self, program: Program) -> Any:
        try:
            op: Exec = next(program)
        except StopIteration as stop:
            return stop.value
        while True:
            pool = self._pools[op.node.name]
            conn: AsyncNodeConnection | None = None
            try:
                conn = await pool.getconn(timeout=max(0.001, op.deadline - time.monotonic()))
                statements, commit_each = op.plan(conn)
                results = await _wire.execute_async(
                    conn, statements, op.deadline, commit_each=commit_each
                )
            except (psycopg.Error, _wire.DeadlineExceeded) as exc:
                if conn is not None:
                    await pool.putconn(conn)
                try:
                    op = program.throw(exc)
                except StopIteration as stop:
                    return stop.value
                continue
            try:
                op = program.send((conn, results))
            except StopIteration as stop:
                return stop.value
            finally:
                await pool.putconn(conn)

    # ------------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        """Stop the monitor and close every pool."""
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            await asyncio.gather(self._monitor_task, return_exceptions=True)
            self._monitor_task = None
        for pool in self._pools.values():
            await pool.close(timeout=1.0)

    async def __aenter__(self) -> AsyncPropertyStore:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()
