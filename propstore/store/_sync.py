"""``PropertyStore``: the blocking API. Drives ``_core`` programs on psycopg-pool pools."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta
from types import TracebackType
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from propstore import _wire
from propstore._sql import GET, GET_MANY, text_array
from propstore.config import Topology
from propstore.errors import ConfigError, InvalidInputError
from propstore.freshness import Token
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
from propstore.store._pool import NodeConnection, sync_pool

Budget = float | timedelta | str | None


class PropertyStore:
    """A sharded user-property store that reads from replicas only when provably fresh.

    Build with :meth:`from_config` (a TOML file) or ``PropertyStore(topology)``; use as a
    context manager or call :meth:`close`. Thread-safe: share one store per process.

    Every read takes a freshness budget — ``max_staleness`` (seconds, ``timedelta`` or
    ``"500ms"``), ``after`` (a :class:`~propstore.Token` from your writes), a named
    ``profile``, or ``consistency="strong"`` — and is served by a replica only when that
    replica is proven within it; otherwise by the primary, at once.
    """

    def __init__(self, topology: Topology, *, start_monitor: bool = True) -> None:
        """Open a pool per node (without waiting: unreachable nodes are marked down) and
        start the lag monitor."""
        self.topology = topology
        self._core = StoreCore(topology)
        self._pools: dict[str, ConnectionPool[NodeConnection]] = {}
        for shard in topology.shards:
            for node in shard.nodes:
                pool = sync_pool(node, topology.routing)
                pool.open(wait=False)
                self._pools[node.name] = pool
        self._executor = ThreadPoolExecutor(
            max_workers=min(len(topology.shards), 32), thread_name_prefix="propstore-shard"
        )
        self.monitor = LagMonitor(topology, self._core.state)
        if start_monitor:
            self.monitor.start()

    @classmethod
    def from_config(cls, path: str | os.PathLike[str] | None = None) -> PropertyStore:
        """Load a topology file (default: ``$PROPSTORE_CONFIG``) and open a store on it."""
        return cls(Topology.load(_config_path(path)))

    # ------------------------------------------------------------------ reads

    def read(
        self, tenant: str, user_id: str, *, max_staleness: Budget = None,
        after: Token | str | None = None, profile: str | None = None,
        consistency: str | None = None, on_stale: str | None = None,
    ) -> ReadResult:
        """Read a user's properties with where and how fresh they were served.

        With no budget, the topology's ``default_profile`` applies (strong if none).
        Raises :class:`~propstore.StaleReadError` when no node can serve within the budget
        and ``on_stale="error"``; :class:`~propstore.ShardUnavailableError` when the
        primary is needed and unreachable.
        """
        started = time.monotonic()
        tenant, user_id, _bucket, shard = self._core.locate(tenant, user_id)
        freshness, policy = self._core.freshness(
            max_staleness, after, profile, consistency, on_stale
        )
        program = self._core.read_program(
            shard, freshness, policy, _wire.Statement(
                GET, (tenant.encode(), user_id.encode())
            ), decode_one,
        )
        (props, version), result = self._run(program)
        return self._core.record(replace(result, props=props, version=version), started)

    def get(self, tenant: str, user_id: str, **budget: Any) -> Props | None:
        """A user's properties (None when absent); budget keywords as in :meth:`read`."""
        return self.read(tenant, user_id, **budget).props

    def get_many(self, tenant: str, user_ids: Iterable[str], **budget: Any
                 ) -> dict[str, Props | None]:
        """Properties of many users of a tenant: one query per shard, shards in parallel.

        Every requested id is a key of the result (None when absent). Each shard's part is
        proven fresh exactly as a single read is.
        """
        tenant, groups = self._core.group(tenant, user_ids)
        freshness, policy = self._core.freshness(
            budget.pop("max_staleness", None), budget.pop("after", None),
            budget.pop("profile", None), budget.pop("consistency", None),
            budget.pop("on_stale", None),
        )
        if budget:
            raise InvalidInputError("budget", f"unknown keyword(s) {sorted(budget)}")

        def one(shard: int, ids: list[str]) -> dict[str, Props]:
            started = time.monotonic()
            found, result = self._run(self._core.read_program(
                shard, freshness, policy, _wire.Statement(
                    GET_MANY, (tenant.encode(), text_array(ids))
                ), decode_many,
            ))
            self._core.record(result, started)
            return found  # type: ignore[no-any-return]

        out: dict[str, Props | None] = {}
        if len(groups) == 1:
            parts = [one(*next(iter(groups.items())))]
        else:
            parts = list(self._executor.map(lambda item: one(*item), groups.items()))
        for ids in groups.values():
            out.update(dict.fromkeys(ids))
        for part in parts:
            out.update(part)
        return out

    # ------------------------------------------------------------------ writes

    def set(self, tenant: str, user_id: str, props: Mapping[str, Any]) -> Token:
        """Merge ``props`` into the user's properties (atomic; concurrent merges lose no
        key). Returns the token to read this write back (``after=token``)."""
        tenant, user_id, bucket, shard = self._core.locate(tenant, user_id)
        statement = self._core.merge_statement(tenant, user_id, bucket, props, False)
        return self._write(shard, statement, must_return_row=True)

    def replace(self, tenant: str, user_id: str, props: Mapping[str, Any]) -> Token:
        """Replace the user's whole property document."""
        tenant, user_id, bucket, shard = self._core.locate(tenant, user_id)
        statement = self._core.merge_statement(tenant, user_id, bucket, props, True)
        return self._write(shard, statement, must_return_row=True)

    def unset(self, tenant: str, user_id: str, keys: Iterable[str]) -> Token:
        """Remove ``keys`` from the user's properties (absent keys are ignored)."""
        tenant, user_id, _bucket, shard = self._core.locate(tenant, user_id)
        return self._write(shard, self._core.unset_statement(tenant, user_id, keys))

    def delete(self, tenant: str, user_id: str) -> Token:
        """Delete the user's properties."""
        tenant, user_id, _bucket, shard = self._core.locate(tenant, user_id)
        return self._write(shard, self._core.delete_statement(tenant, user_id))

    def _write(self, shard: int, statement: _wire.Statement, must_return_row: bool = False
               ) -> Token:
        retrying = Retrying(
            stop=stop_after_delay(self.topology.routing.write_retry_time),
            wait=wait_exponential_jitter(multiplier=0.05, max=0.5),
            retry=retry_if_exception(is_retryable_write_error),
            reraise=True,
        )
        give_up_at = time.monotonic() + self.topology.routing.write_retry_time
        try:
            version, lsn = retrying(
                lambda: self._run(self._core.write_program(shard, statement, give_up_at))
            )
        except (psycopg.Error, _wire.DeadlineExceeded) as exc:
            raise self._core.write_error(shard, exc) from None
        self._core.stats.writes[self._core.shard_names[shard]] += 1
        if must_return_row and version is None:
            raise InvalidInputError("props", "the merged document would exceed the size limit")
        return self._core.token(shard, lsn)

    # ------------------------------------------------------------------ insight

    def route(self, tenant: str, user_id: str, **budget: Any) -> RouteDecision:
        """The routing decision a read would take now (``decision.explain()`` prints it)."""
        _t, _u, _b, shard = self._core.locate(tenant, user_id)
        freshness, _policy = self._core.freshness(
            budget.get("max_staleness"), budget.get("after"), budget.get("profile"),
            budget.get("consistency"), None,
        )
        return self._core.decide(shard, freshness)

    def shard_views(self) -> tuple[ShardView, ...]:
        """The monitor's current view of every shard (lag, states, roles)."""
        return self._core.state.views

    @property
    def stats(self) -> Any:
        """Routing counters (reads by shard, served by, reason; writes by shard)."""
        return self._core.stats

    def add_observer(self, observer: Any) -> None:
        """Call ``observer(result, seconds)`` after every read (used by metrics)."""
        self._core.observers.append(observer)

    # ------------------------------------------------------------------ driving

    def _run(self, program: Program) -> Any:
        try:
            op: Exec = next(program)
        except StopIteration as stop:
            return stop.value
        while True:
            pool = self._pools[op.node.name]
            conn: NodeConnection | None = None
            try:
                conn = pool.getconn(timeout=max(0.001, op.deadline - time.monotonic()))
                statements, commit_each = op.plan(conn)
                results = _wire.execute(conn, statements, op.deadline, commit_each=commit_each)
            except (psycopg.Error, _wire.DeadlineExceeded) as exc:
                if conn is not None:
                    pool.putconn(conn)
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
                pool.putconn(conn)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Stop the monitor and close every pool."""
        self.monitor.stop()
        self._executor.shutdown(wait=False)
        for pool in self._pools.values():
            pool.close(timeout=1.0)

    def __enter__(self) -> PropertyStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _config_path(path: str | os.PathLike[str] | None) -> str | os.PathLike[str]:
    if path is not None:
        return path
    env = os.environ.get("PROPSTORE_CONFIG")
    if not env:
        raise ConfigError("no config given and PROPSTORE_CONFIG is not set")
    return env
