"""What a read does when no replica proved it fresh enough: the primary, if its limiter
admits the read, else the read's degrade policy (wait, serve stale), else a clear refusal.

A program in the same shape as ``_core``'s (it yields :class:`Exec` and :class:`Wait`
requests), which ``StoreCore.read_program`` hands over to once its replica candidates are
exhausted. The order in which reads give way, and why, is in ``docs/degrade.md``:

1. strong and token reads always go to the primary (nothing else can serve them);
2. budgeted reads go to the primary while its limiter (``propstore._limiter``) admits them:
   always while the primary's latency is in its normal band;
3. past that, the policy's steps in order (``propstore.degrade``), then
   :class:`~propstore.StaleReadError`.

A read whose primary read fails *transiently* (the primary restarting or failing over) is
first tried again within its deadline (``_retry``). A budgeted read that still finds no
server takes the same path as one the limiter shed: a replica problem plus a primary
restart is no reason to hand a serve-stale reader an error. Strong and token reads keep the
primary's own :class:`~propstore.ShardUnavailableError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, Literal

import psycopg

from propstore import _sql
from propstore._limiter import ShedReason, Turn
from propstore._wire import DeadlineExceeded, Statement
from propstore.degrade import Degrade, ServeStaleStep, WaitStep
from propstore.errors import ShardUnavailableError, StaleReadError
from propstore.freshness import Freshness
from propstore.lsn import LSN
from propstore.router import FallbackReason, RouteDecision
from propstore.store._program import (
    Exec,
    Failure,
    ReadResult,
    Request,
    Response,
    Wait,
    fixed,
)
from propstore.store._retry import Shed, admit, observed_down, on_primary, primary_read

if TYPE_CHECKING:
    from propstore.store._core import StoreCore

#: Why the primary did not serve a budgeted read: shed by its limiter, or failed.
RefusalReason = ShedReason | Literal["primary_unavailable"]

_SHED_TEXT: dict[RefusalReason, str] = {
    "primary_overloaded": "shed: its latency is above its normal band",
    "fallback_ceiling": "shed: at the configured fallback ceiling",
    "primary_unavailable": "failed",
}


def profile_of(freshness: Freshness) -> str:
    """The label a read is counted under: its profile, else ``token``/``max_staleness``
    (a bounded set, whatever the traffic)."""
    if freshness.label:
        return freshness.label
    return "token" if freshness.after is not None else "max_staleness"


def fallback(
    core: StoreCore,
    shard_index: int,
    decision: RouteDecision,
    reason: FallbackReason,
    policy: Degrade,
    data: Statement,
    decode: Callable[[Any], Any],
    started: float,
    failures: list[Failure],
) -> Generator[Request, Response, tuple[Any, ReadResult]]:
    """Serve ``data`` on the shard's primary if its limiter admits it, else per ``policy``."""
    freshness = decision.freshness
    priority = freshness.strong or freshness.after is not None
    failed: ShardUnavailableError | None = None
    # Only a reader that prefers a stale answer to waiting skips a primary seen down, and
    # is not retried: any other reader is better served by trying it (a primary is seen down
    # after errors or 2 s of silence, and may be back before the monitor sees it).
    serve_stale_first = bool(policy.steps) and isinstance(policy.steps[0], ServeStaleStep)
    wait_first = bool(policy.steps) and isinstance(policy.steps[0], WaitStep)
    retry = priority or not serve_stale_first
    down = observed_down(core, shard_index) if not retry else None
    limiter = core.primary_limiters[shard_index]
    # A budgeted read that finds no room queues for its turn (``_limiter``): for the
    # limiter's queue time, or, if its policy waits first, for that wait. Not under a rate
    # ceiling, which refuses by the second, not by the reads in flight.
    queueing = not priority and not core.routing.primary_fallback_rate
    turn: Turn | None = None
    shed: RefusalReason | None
    if down:
        shed = "primary_unavailable"
    elif not queueing or (
            serve_stale_first and limiter.expected_wait() > limiter.settings.queue_time):
        # A serve-stale read that would not get its turn within its queue time gets its
        # stale answer now, not after that wait (a read that would be refused instead
        # still takes its chance in the queue).
        shed = admit(core, shard_index, priority)
    else:
        turn = Turn()
        shed = limiter.queue(turn)
        if shed is not None and not wait_first:
            if (yield from _await_turn(core, shard_index, turn,
                                       time.monotonic() + limiter.settings.queue_time)):
                shed = None
            else:
                limiter.declined(shed)
        if shed is None or not wait_first:
            turn = None  # only a read that waits first keeps its place, for that wait
    if shed is None:
        try:
            return (yield from primary_read(core, shard_index, freshness, data, decode, reason,
                                            started, failures, retry=retry))
        except Shed as declined:
            shed = declined.reason
        except ShardUnavailableError as exc:
            if priority:
                raise  # only the primary can serve it: its own error says why not
            shed, failed = "primary_unavailable", exc
    why = f": {failed}" if failed else f": {down}" if down else ""
    tried = [f"replicas ({reason})", f"primary ({_SHED_TEXT[shed]}{why})"]
    for step in policy.steps:
        if isinstance(step, WaitStep):
            # The first wait keeps the place queued above; a later one queues anew.
            first, turn = turn, None
            queued = first
            if queued is None and queueing and shed != "primary_unavailable":
                queued = Turn()
                limiter.queue(queued)
            waited = yield from _wait(core, shard_index, freshness, step.max_wait, data, decode,
                                      started, failures, reason, queued)
            if waited is not None:
                core.stats.record_wait(core.shard_names[shard_index], profile_of(freshness))
                return waited
            if first is not None and shed != "primary_unavailable":
                limiter.declined(shed)  # queued from the start, and no turn came
            tried.append(f"{step}: no replica came within budget, the primary had no room")
        else:
            # Shed by the limiter, the read gets the replica deadline, as any replica read
            # (the primary has no room: a read must not hold a thread long). With no primary
            # to answer, the replica is the read's only server: it may take the time the
            # read was ready to wait for the primary (primary_deadline from the read's
            # start), so a replica slow on a loaded machine is not turned into an error.
            deadline = time.monotonic() + core.routing.replica_deadline
            if shed == "primary_unavailable":
                deadline = max(deadline, started + core.routing.primary_deadline)
            served = yield from _serve_stale(core, shard_index, core.decide(shard_index,
                                             freshness), data, decode, started, deadline)
            if not isinstance(served, str):
                return served
            tried.append(f"{step}: {served}")
    shard = core.shard_names[shard_index]
    core.stats.record_refusal(shard, profile_of(freshness), shed)
    raise StaleReadError(
        shard,
        f"no replica within budget ({freshness}) and the primary "
        f"{_primary_name(core, shard_index)} is {_primary_state(core, shard_index, shed)}; "
        f"tried: {'; '.join(tried)}",
        budget=str(freshness), reason=shed, tried=tuple(tried),
    ) from failed


def _wait(
    core: StoreCore, shard_index: int, freshness: Freshness, max_wait: float,
    data: Statement, decode: Callable[[Any], Any], started: float,
    failures: list[Failure], reason: FallbackReason, turn: Turn | None,
) -> Generator[Request, Response, tuple[Any, ReadResult] | None]:
    """Up to ``max_wait`` seconds for a replica proven within the budget (the monitor's
    next observations) or room on the primary: ``turn``, queued for it (or granted
    already; None: no queue, the primary's room is rechecked at each observation). The read
    holds no connection meanwhile."""
    until = time.monotonic() + max_wait
    limiter = core.primary_limiters[shard_index]
    try:
        while True:
            if turn is not None and turn.granted and observed_down(core, shard_index):
                # Seen down since it queued: tried again once seen up, as below.
                limiter.leave(turn)
                turn = None
            if turn is not None and turn.granted:
                turn = None  # in flight now: the read's end (``done``) gives the place on
                with contextlib.suppress(ShardUnavailableError):
                    return (yield from on_primary(core, shard_index, data, decode, reason,
                                                  time.monotonic() + core.routing.primary_deadline))
            if time.monotonic() >= until:
                return None
            yield Wait(shard_index, until, turn)
            decision = core.decide(shard_index, freshness)
            if decision.candidates or decision.tentative:
                # The bound stays measured from the read's start: the budget is about the
                # writes acknowledged before the caller asked, not before it was answered.
                served = yield from core.replicas.read(shard_index, decision, data, decode,
                                                       failures, started)
                if isinstance(served, tuple):
                    return served
            if turn is None and observed_down(core, shard_index) is None and admit(
                    core, shard_index, False) is None:
                # A primary that failed (restarting, failing over) is tried again once the
                # monitor sees it up, within the same max_wait.
                with contextlib.suppress(ShardUnavailableError):
                    return (yield from on_primary(core, shard_index, data, decode, reason,
                                                  time.monotonic() + core.routing.primary_deadline))
    finally:
        if turn is not None:
            limiter.leave(turn)  # out of the queue, or its place handed on if granted


def _await_turn(core: StoreCore, shard_index: int, turn: Turn, until: float
                ) -> Generator[Request, Response, bool]:
    """Wait until ``turn`` (queued) is granted, or ``until``: whether it was (the read is
    then in flight; if not, it left the queue)."""
    limiter = core.primary_limiters[shard_index]
    taken = False
    try:
        while not turn.granted and time.monotonic() < until:
            yield Wait(shard_index, until, turn)
        taken = limiter.take(turn)
        return taken
    finally:
        if not taken:
            limiter.leave(turn)  # closed while waiting: its place, granted or not, goes on


def _serve_stale(
    core: StoreCore, shard_index: int, decision: RouteDecision, data: Statement,
    decode: Callable[[Any], Any], started: float, deadline: float,
) -> Generator[Exec, Response, tuple[Any, ReadResult] | str]:
    """The freshest up replica's answer with its true bound, or why there was none."""
    best = decision.freshest
    if best is None:
        return "no replica up to serve"
    try:
        _conn, results = yield Exec(best.node.config, deadline,
                                    fixed((Statement(_sql.REPLAY_LSN), data)))
    except DeadlineExceeded:
        return f"{best.node.name} did not answer by the deadline"
    except psycopg.Error as exc:
        return f"{best.node.name} failed: {type(exc).__name__}"
    raw, timeline = results[0].get_value(0, 0), results[0].get_value(0, 1)
    lsn = LSN.parse(raw) if raw else None
    view = core.state.view(shard_index)
    # Off the primary's timeline history its LSN compares with nothing: unproven. So is it
    # when the data shared the LSN statement's snapshot (not READ COMMITTED, _sql.REPLAY_LSN).
    on_history = timeline is not None and view.on_history(int(timeline), lsn) and (
        results[0].get_value(0, 2) == b"read committed")
    bound = view.history.bound(lsn, started) if on_history else math.inf
    return decode(results[1]), ReadResult(
        None, None, decision.shard.name, best.node.name, True, lsn, bound,
        "replica_stale", "unproven" if math.isinf(bound) else "pipeline",
        within_budget=False,
    )


def _primary_name(core: StoreCore, shard_index: int) -> str:
    view = core.state.view(shard_index)
    primary = view.primary
    return f"{primary.name} ({primary.config.address})" if primary else "(none reachable)"


def _primary_state(core: StoreCore, shard_index: int, shed: RefusalReason) -> str:
    if shed == "primary_unavailable":
        return "unavailable"
    if shed == "fallback_ceiling":
        routing = core.routing
        caps = []
        if routing.primary_fallback_max_concurrency:
            caps.append(f"{routing.primary_fallback_max_concurrency} reads in flight")
        if routing.primary_fallback_rate:
            caps.append(f"{routing.primary_fallback_rate:g} reads/s")
        return f"at its configured fallback ceiling ({' or '.join(caps)})"
    return f"overloaded ({core.primary_limiters[shard_index].state()})"


class Changes:
    """Wakes reads waiting on a shard: under :meth:`Degrade.wait`, at each observation of
    one of the shard's nodes (the monitor calls :meth:`notify`, a few times per poll
    interval), when a waiting read rechecks both the replicas and the primary's room; and
    a read queued for room on the primary once its turn is granted (:meth:`granted`, from
    the thread whose read ended: that read only, not every waiter).

    Each waiter blocks on its own event (sync) or future (async, resolved through its own
    loop: the monitor may run in another thread). Holds one entry per read waiting now,
    nothing per read that ever waited.
    """

    def __init__(self, shards: int) -> None:
        self._lock = threading.Lock()
        self._events: list[set[threading.Event]] = [set() for _ in range(shards)]
        self._futures: list[set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = [
            set() for _ in range(shards)
        ]

    def notify(self, shard_index: int) -> None:
        """Something changed on the shard: wake its waiters."""
        if not (self._events[shard_index] or self._futures[shard_index]):
            return  # read without the lock: a cheap "anyone?" (a waiter misses one at most)
        with self._lock:
            for event in self._events[shard_index]:
                event.set()
            for loop, future in self._futures[shard_index]:
                loop.call_soon_threadsafe(_resolve, future)

    def granted(self, turn: Turn) -> None:
        """``turn`` was granted: wake the read that holds it (if it is blocked now; if not,
        it sees ``turn.granted`` before it blocks again)."""
        with self._lock:
            wake = turn.wake
        if wake is not None:
            wake()

    def wait(self, request: Wait) -> None:
        """Block until the shard changes, the request's turn is granted, or
        ``request.until`` (monotonic)."""
        shard, turn = request.shard_index, request.turn
        event = threading.Event()
        with self._lock:
            # A turn granted before this registered is seen here (the grant's flag is set
            # before ``granted`` takes this lock); one granted after finds the wake.
            if turn is not None:
                if turn.granted:
                    return
                turn.wake = event.set
            self._events[shard].add(event)
        try:
            # A change between the program's check and here is caught by the next one:
            # the monitor observes every node each interval.
            event.wait(timeout=max(0.0, request.until - time.monotonic()))
        finally:
            with self._lock:
                self._events[shard].discard(event)
                if turn is not None:
                    turn.wake = None

    async def wait_async(self, request: Wait) -> None:
        """:meth:`wait` for asyncio."""
        shard, turn = request.shard_index, request.turn
        loop = asyncio.get_running_loop()
        entry = (loop, loop.create_future())
        with self._lock:
            if turn is not None:
                if turn.granted:
                    return
                future = entry[1]
                turn.wake = lambda: _resolve_soon(loop, future)
            self._futures[shard].add(entry)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, request.until - time.monotonic())):
                    await entry[1]
        finally:
            with self._lock:
                self._futures[shard].discard(entry)
                if turn is not None:
                    turn.wake = None


def _resolve_soon(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
    loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
