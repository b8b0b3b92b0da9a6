"""What a read does when no replica proved it fresh enough: the primary fallback, its
limiter, and the stale-serving policy past it.

A program in the same shape as ``_core``'s (it yields :class:`Exec` requests), which
``StoreCore._read`` hands over to once its replica candidates are exhausted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import psycopg

from propstore import _sql
from propstore._wire import DeadlineExceeded, Statement
from propstore.config import OnStale
from propstore.errors import StaleReadError
from propstore.lsn import LSN
from propstore.router import FallbackReason, RouteDecision
from propstore.store._program import Exec, ReadResult, Response, fixed

if TYPE_CHECKING:
    from propstore.store._core import StoreCore


def fallback(
    core: StoreCore,
    shard_index: int,
    decision: RouteDecision,
    reason: FallbackReason,
    on_stale: OnStale,
    data: Statement,
    decode: Callable[[Any], Any],
    started: float,
) -> Generator[Exec, Response, tuple[Any, ReadResult]]:
    """Serve ``data`` on the shard's primary (within the fallback cap), else per ``on_stale``."""
    freshness = decision.freshness
    shard = core.shard_names[shard_index]
    if not freshness.strong and not core.limiters[shard_index].try_acquire(core.clock()):
        if on_stale == "serve":
            served = yield from _serve_stale(core, shard_index, decision, data, decode, started)
            if served is not None:
                return served
        raise StaleReadError(
            shard,
            f"no replica within budget ({freshness}; {reason}) and the primary fallback "
            f"cap of {core.routing.primary_fallback_rate:g} reads/s is exhausted",
        )
    rows, node = yield from core._primary_read(shard_index, data)
    return decode(rows), ReadResult(None, None, shard, node, False, None, 0.0, reason,
                                    "primary")


def _serve_stale(
    core: StoreCore, shard_index: int, decision: RouteDecision, data: Statement,
    decode: Callable[[Any], Any], started: float,
) -> Generator[Exec, Response, tuple[Any, ReadResult] | None]:
    best = decision.freshest
    if best is None:
        return None
    try:
        _conn, results = yield Exec(
            best.node.config, time.monotonic() + core.routing.replica_deadline,
            fixed((Statement(_sql.REPLAY_LSN), data)),
        )
    except (DeadlineExceeded, psycopg.Error):
        return None
    raw = results[0].get_value(0, 0)
    lsn = LSN.parse(raw) if raw else None
    bound = core.state.view(shard_index).history.bound(lsn, started)
    return decode(results[1]), ReadResult(
        None, None, decision.shard.name, best.node.name, True, lsn, bound,
        "replica_stale", "unproven" if math.isinf(bound) else "pipeline",
        within_budget=False,
    )
