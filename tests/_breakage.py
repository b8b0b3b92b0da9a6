"""Deliberately broken stores, to see the tests fail when the property they name fails.

``PROPSTORE_TEST_BREAK=no-proof pytest tests/test_faults.py`` runs the tests against a store
with one property broken (several: comma-separated). This lives in ``tests/`` only, is read
once by ``tests/conftest.py`` when pytest starts, and patches the installed package in that
test process only: nothing here ships, nor can a deployment turn it on.

Each breakage is the smallest change that breaks one property, made at the narrowest point
that stays stable as the package evolves (public values such as ``Freshness`` where they
suffice); a breakage whose target has moved fails loudly at start-up, never silently runs
an unbroken store. ``tests/conftest.py`` prints the active breakage in the report header.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

ENV = "PROPSTORE_TEST_BREAK"


def _patch(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
    original = getattr(owner, name)  # AttributeError: the target moved, update the breakage
    setattr(owner, name, make(original))


def _no_proof() -> None:
    """Replicas serve every non-strong read, proven or not (bounds stay honest)."""
    from propstore.freshness import Freshness

    _patch(Freshness, "admits", lambda _orig: lambda self, shard, lsn, bound: not self.strong)


def _lying_bound() -> None:
    """``no-proof``, and every replica read reports a staleness bound of 0."""
    from propstore.store._core import StoreCore

    _no_proof()

    def make(orig: Any) -> Any:
        def read_program(self: Any, *args: Any) -> Generator[Any, Any, Any]:
            rows, result = yield from orig(self, *args)
            if result.from_replica:
                result = dataclasses.replace(result, staleness_bound=0.0)
            return rows, result
        return read_program

    _patch(StoreCore, "read_program", make)


def _no_token_check() -> None:
    """Tokens are ignored: a replica need not have replayed the token's LSN."""
    from propstore.freshness import Freshness

    _patch(Freshness, "required_lsn", lambda _orig: lambda self, shard: None)


def _understate_bound() -> None:
    """The monitor's proven staleness bound is understated tenfold."""
    from propstore.monitor._state import LagHistory

    _patch(LagHistory, "bound", lambda orig: lambda self, lsn, at: orig(self, lsn, at) / 10)


def _replicas_never_serve() -> None:
    """No replica is ever admitted: the primary serves everything."""
    from propstore.freshness import Freshness

    _patch(Freshness, "admits", lambda _orig: lambda self, shard, lsn, bound: False)


def _reader_crash() -> None:
    """Reads made off the main thread raise ``RuntimeError`` now and then (not a
    ``PropStoreError``): a workload's threads die."""
    from propstore import AsyncPropertyStore, PropertyStore

    calls = itertools.count(1)

    def make(orig: Any) -> Any:
        def read(self: Any, *args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not threading.main_thread() and (
                next(calls) % 200 == 0
            ):
                raise RuntimeError("broken store: reader crash")
            return orig(self, *args, **kwargs)
        return read

    _patch(PropertyStore, "read", make)
    del AsyncPropertyStore  # async tests run on the main thread: nothing to break there


def _settings(**changes: Callable[[Any], Any]) -> None:
    """Stores open with routing settings other than the topology they were given says."""
    from propstore import AsyncPropertyStore, PropertyStore

    def make(orig: Any) -> Any:
        def __init__(self: Any, topology: Any, *args: Any, **kwargs: Any) -> None:
            routing = dataclasses.replace(topology.routing, **{
                name: change(getattr(topology.routing, name)) for name, change in changes.items()
            })
            orig(self, dataclasses.replace(topology, routing=routing), *args, **kwargs)
        return __init__

    _patch(PropertyStore, "__init__", make)
    _patch(AsyncPropertyStore, "__init__", make)


def _slow_deadline() -> None:
    """Replica reads wait three times the configured deadline."""
    _settings(replica_deadline=lambda seconds: seconds * 3)


def _slow_write_failure() -> None:
    """Writes to a dead primary retry a second longer than ``write_retry_time``."""
    _settings(write_retry_time=lambda seconds: seconds + 1.0)


def _slow_fallback() -> None:
    """Every fallback read on a primary takes 30 ms more."""
    from propstore.store._primary import PrimaryReads

    def make(orig: Any) -> Any:
        def read(self: Any, *args: Any) -> Generator[Any, Any, Any]:
            time.sleep(0.03)
            return (yield from orig(self, *args))
        return read

    _patch(PrimaryReads, "read", make)


def _try_down_replicas() -> None:
    """Replicas the monitor marked down are still tried by every read."""
    from propstore.monitor._state import NodeView

    _patch(NodeView, "serves_replica_reads", lambda orig: property(
        lambda self: orig.fget(self) or (self.role == "replica" or self.config.role == "replica")
    ))


def _any_server_run() -> None:
    """A monitor fact covers any connection opened before it, whatever server it is on."""
    from propstore import proof

    _patch(proof, "covers", lambda _orig: lambda fact, conn: (
        conn.propstore_keeps_server and conn.propstore_opened_at < fact.at))


def _pooled_facts() -> None:
    """Connections behind a pooler keep connection-scoped facts (as if it pooled sessions)."""
    from propstore import proof

    _patch(proof, "keeps_server", lambda _orig: lambda via, pooler_seen: True)


def _run_facts_any_run() -> None:
    """A replay LSN a read verified is credited to every server run, not only its own."""
    from propstore import proof

    def make(_orig: Any) -> Any:
        def get(self: Any, run: Any) -> Any:
            facts = self.snapshot()
            if not facts:
                return None
            newest = max(facts, key=lambda fact: fact.lsn)
            return proof.Sighting(run, newest.at, True, newest.lsn)
        return get

    _patch(proof.RunFacts, "get", make)


def _stale_shared() -> None:
    """A store whose host agent is gone keeps the agent's last observations as current
    (re-stamped every interval) instead of polling for itself."""
    import asyncio

    from propstore.monitor._shared import SharedMonitor
    from propstore.monitor._state import Observation

    def make(_orig: Any) -> Any:
        async def own_until_joined(self: Any, paths: Any, polled: Any) -> Any:
            self.source, self.agent_pid = "own", None
            while True:
                await asyncio.sleep(self.topology.monitor.interval)
                now = self.state.clock()
                for s, view in enumerate(self.state.views):
                    for n, node in enumerate(view.nodes):
                        if node.role is not None and node.run is not None:
                            self.state.observe(s, n, Observation(
                                now, node.role == "replica", node.lsn, node.receive_lsn,
                                node.replay_paused, node.receiver_streaming, node.system_id,
                                node.hot_standby_settings, node.timeline, node.run,
                                node.pooler_seen))
                link = await self._join(paths)
                if link is not None:
                    return link
        return own_until_joined

    _patch(SharedMonitor, "_own_until_joined", make)


def _no_read_retry() -> None:
    """A read whose primary failed transiently (its session ended by a restart, the server
    refusing connections while it shuts down or starts) is not tried again: its degrade
    policy (or, for strong and token reads, the error) answers at once."""
    from propstore.store import _retry

    _patch(_retry, "transient", lambda _orig: lambda exc: False)


_KEPT: list[Any] = []


def _leak() -> None:
    """The store keeps every read's result."""
    from propstore.store._core import StoreCore

    def make(orig: Any) -> Any:
        def record(self: Any, result: Any, started: float) -> Any:
            _KEPT.append(result)
            return orig(self, result, started)
        return record

    _patch(StoreCore, "record", make)


def _zombie_primary() -> None:
    """Any node answering as a primary may be the primary: neither the HA manager's word nor
    a newer timeline elsewhere rules out an ex-leader that still accepts writes."""
    from propstore.monitor import ShardView

    _patch(ShardView, "admits", lambda _orig: lambda self, node: node.role == "primary")
    _patch(ShardView, "ruled_out", lambda _orig: lambda self, node: node.role == "replica")


def _slow_is_down() -> None:
    """A poll or read that misses its deadline counts as a failure (two in a row: down), as
    before polls were let answer late."""
    from propstore.monitor._monitor import MonitorState

    _patch(MonitorState, "unanswered", lambda _orig: lambda self, shard, node, error,
           since=None: self.fail(shard, node, error))


def _stable_verified_read() -> None:
    """Migration 0002's verifying functions are STABLE: their data query runs on the calling
    statement's snapshot, taken before the function reads the replay LSN (the unsound order).
    Applied by every ``propstore.migrate.upgrade`` the tests run.

    (The other unsound form, LSN and data in one plain statement, differs from the sound
    one only by the microseconds between its snapshot and its LSN read; no test can make
    replay land in that window on purpose, so none is offered: docs/architecture.md holds
    the argument.)"""
    import psycopg

    import propstore.migrate

    def make(orig: Any) -> Any:
        def upgrade(dsn: str, *args: Any, **kwargs: Any) -> Any:
            done = orig(dsn, *args, **kwargs)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(
                    "DO $$ BEGIN IF to_regprocedure('propstore_read(text, text)') IS NOT NULL"
                    " THEN ALTER FUNCTION propstore_read(text, text) STABLE;"
                    " ALTER FUNCTION propstore_read_many(text, text[]) STABLE; END IF; END $$")
            return done
        return upgrade

    _patch(propstore.migrate, "upgrade", make)


BREAKAGES: dict[str, Callable[[], None]] = {
    "no-proof": _no_proof,
    "lying-bound": _lying_bound,
    "no-token-check": _no_token_check,
    "understate-bound": _understate_bound,
    "replicas-never-serve": _replicas_never_serve,
    "reader-crash": _reader_crash,
    "slow-deadline": _slow_deadline,
    "slow-write-failure": _slow_write_failure,
    "slow-fallback": _slow_fallback,
    "try-down-replicas": _try_down_replicas,
    "leak": _leak,
    "any-server-run": _any_server_run,
    "pooled-facts": _pooled_facts,
    "zombie-primary": _zombie_primary,
    "run-facts-any-run": _run_facts_any_run,
    "stale-shared": _stale_shared,
    "no-read-retry": _no_read_retry,
    "slow-is-down": _slow_is_down,
    "stable-verified-read": _stable_verified_read,
}


def apply_from_environment() -> list[str]:
    """Apply the breakages ``$PROPSTORE_TEST_BREAK`` names; returns their names."""
    names = [n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()]
    unknown = sorted(set(names) - set(BREAKAGES))
    if unknown:
        raise SystemExit(f"{ENV}: unknown breakage(s) {unknown}; known: {sorted(BREAKAGES)}")
    for name in names:
        BREAKAGES[name]()
    return names
