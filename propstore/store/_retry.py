"""A read on the shard's primary past its replicas: the limiter's admission, the attempt,
and its retries while the primary restarts.

A read is idempotent, so one whose primary failed *transiently* is tried again, within its
own deadline (``routing.primary_deadline`` from its first primary attempt), before its
degrade policy is consulted. Transient means what a primary restarting in place or failing
over does to a client: the session ended (SQLSTATE 57P01 ``admin_shutdown`` at a fast
shutdown, 57P02 ``crash_shutdown``), the server refused to start a session (57P03
``cannot_connect_now``: "the database system is shutting down / starting up"; a refused
connection), the connection closed mid-query (no SQLSTATE), or the node stopped being the
primary the monitor observes. Nothing else is retried: a missing table, a permission, a
deadline spent on a slow primary.

Between attempts the read holds no connection: it waits (a ``Wait`` request, so the sync and
async drivers share this code) for the monitor's next observation of the shard, or a short
jittered backoff, whichever comes first, and then tries, in order:

1. a replica that now proves it (``StoreCore.decide``): once the restarted primary answers a
   poll, that poll is a new sample and replicas that replayed it prove short budgets again
   within a poll or two; a token read is proven by any replica that replayed its write;
2. the primary, unless the monitor observes it down (then the attempt costs no I/O). While
   the attempt waits for a connection (the pool reconnecting), it gives up as soon as a
   replica proves the read or the monitor sees the primary down, and the loop goes on.

The policy is tenacity's (a stop at the deadline, its jittered exponential wait,
``retry_if_exception``); its ``sleep`` only records the pause, which the program yields.
Why a read may be retried at all, and why a replica that replayed the primary's shutdown
checkpoint is not taken as proof, is in ``docs/architecture.md``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import psycopg
import structlog
from psycopg_pool import PoolTimeout
from tenacity import RetryCallState, Retrying, retry_if_exception

from propstore._jitter import wait_jittered
from propstore._limiter import ShedReason
from propstore._wire import DeadlineExceeded, Statement
from propstore.errors import ShardUnavailableError
from propstore.freshness import Freshness
from propstore.router import FallbackReason
from propstore.store._primary import PrimaryGone
from propstore.store._program import Exec, Failure, ReadResult, Request, Response, Wait

if TYPE_CHECKING:
    from propstore.store._core import StoreCore

log = structlog.get_logger("propstore.store")

#: SQLSTATEs of a server ending or refusing sessions while it shuts down or starts.
TRANSIENT_SQLSTATES = frozenset({"57P01", "57P02", "57P03"})
#: Pauses between attempts: short, because the monitor's observations wake the read first
#: (every node of the shard is polled each ``monitor.interval``).
_BACKOFF = wait_jittered(multiplier=0.04, max=0.1, jitter=0.02)
_FIRST_PAUSE = 0.02


class Shed(Exception):
    """A retry found the primary's limiter declining the read: its degrade policy answers."""

    def __init__(self, reason: ShedReason) -> None:
        super().__init__(reason)
        self.reason = reason


def transient(exc: BaseException) -> bool:
    """Whether a failed primary read may be tried again (see the module docstring)."""
    cause = exc.__cause__ if isinstance(exc, ShardUnavailableError) else exc
    if isinstance(cause, PrimaryGone):
        return True
    if isinstance(cause, DeadlineExceeded | PoolTimeout):
        return False  # the read's deadline is spent
    if isinstance(cause, psycopg.OperationalError):
        state = cause.sqlstate
        # None: the connection was lost or refused before the server could say why.
        return state is None or state in TRANSIENT_SQLSTATES or state.startswith("08")
    return False


def admit(core: StoreCore, shard_index: int, priority: bool) -> ShedReason | None:
    """Count a primary read in flight (None), or say why the primary declines it."""
    if not priority and not core.limiters[shard_index].try_acquire(core.clock()):
        return "fallback_ceiling"
    return core.primary_limiters[shard_index].admit(priority)


def observed_down(core: StoreCore, shard_index: int) -> str | None:
    """Why the monitor sees the shard's primary down, None unless it does.

    A serve-stale read does not try a primary the monitor saw down, nor does a waiting or
    retrying read retry it: its pool would hold the read up to the primary deadline (2 s by
    default) reconnecting, where the read's policy answers now. The monitor sees a restarted
    primary up within a poll interval.
    """
    view = core.state.view(shard_index)
    if view.primary is not None:
        return None
    node = view.nodes[view.primary_index if view.primary_index is not None else 0]
    if node.state != "down":
        return None  # not polled yet, or in a state the primary read itself explains
    return f"{node.name} observed down ({node.last_error or 'no answer'})"


def on_primary(
    core: StoreCore, shard_index: int, data: Statement, decode: Callable[[Any], Any],
    reason: FallbackReason, deadline: float, valid: Callable[[], bool] | None = None,
) -> Generator[Exec, Response, tuple[Any, ReadResult]]:
    """One admitted attempt on the primary; its duration is the limiter's measure of health
    (a failure that says nothing about the primary's speed releases it without a sample).

    Two durations: in flight (from here) and on the primary (from sending its statements to
    the answer's arrival, as the kernel stamped it; from a connection in hand to the answer
    where the socket carries no stamps). The wait for one of this store's connections, in
    the former only, is this process's own queue (its pool still opening connections after
    a quiet spell, or more reads in flight than connections), not the primary's latency
    (docs/degrade.md)."""
    began = time.monotonic()
    spent = on_server = math.inf
    try:
        rows, node, connected, stamped = yield from core.primary.read(
            shard_index, data, deadline, valid)
        spent = time.monotonic() - began
        # The kernel's word for when the answer came, where it has one: the client's own
        # clock holds its thread's wait to run (a busy interpreter's lock) as well.
        on_server = spent - (connected - began) if stamped is None else stamped
    except ShardUnavailableError as exc:
        if not transient(exc):
            spent = time.monotonic() - began  # slow or refusing: that is health
        raise
    finally:
        # The end hands this read's place to the oldest read queued for one (``done``
        # grants its turn and wakes that read alone): a read ends hundreds of times a
        # second under a surge, and waking every waiter each time would be a herd.
        core.primary_limiters[shard_index].done(spent, on_server)
    return decode(rows), ReadResult(None, None, core.shard_names[shard_index], node, False,
                                    None, 0.0, reason, "primary")


def primary_read(
    core: StoreCore, shard_index: int, freshness: Freshness, data: Statement,
    decode: Callable[[Any], Any], reason: FallbackReason, started: float,
    failures: list[Failure], *, retry: bool,
) -> Generator[Request, Response, tuple[Any, ReadResult]]:
    """The read on the primary (already admitted), retried while its failures are transient
    (``retry``), on a replica that comes to prove it or on the primary; raises the last
    :class:`ShardUnavailableError` when none served it by the deadline, :class:`Shed` when
    the limiter declined a retry."""
    began = time.monotonic()
    until = began + core.routing.primary_deadline

    def worth_waiting() -> bool:
        return observed_down(core, shard_index) is None and not core.decide(
            shard_index, freshness).candidates

    # A first attempt keeps its place in the pool's queue (giving up in slices re-queues
    # it behind newer reads: unfair on a busy primary), unless the monitor already sees the
    # primary down: then it stops waiting for a reconnecting pool as a retry does.
    down = retry and observed_down(core, shard_index) is not None
    try:
        return (yield from on_primary(core, shard_index, data, decode, reason, until,
                                      worth_waiting if down else None))
    except ShardUnavailableError as exc:
        if not retry or not transient(exc):
            raise
        first = exc
    if time.monotonic() + _FIRST_PAUSE >= until:
        raise first

    def spent(state: RetryCallState) -> bool:  # no attempt would start before the deadline
        return time.monotonic() + state.upcoming_sleep >= until

    # Only a failed first attempt pays for tenacity (as writes do).
    priority = freshness.strong or freshness.after is not None
    pauses = [_FIRST_PAUSE]  # tenacity attempts at once; the first retry pauses too
    attempts = 1
    try:
        for attempt in Retrying(stop=spent, wait=_BACKOFF, retry=retry_if_exception(transient),
                                sleep=pauses.append, reraise=True):
            with attempt:
                served = yield from _elsewhere(core, shard_index, freshness, data, decode,
                                               started, failures,
                                               min(until, time.monotonic() + pauses.pop()))
                if served is None:
                    shed = admit(core, shard_index, priority)
                    if shed is not None:
                        raise Shed(shed)
                    attempts += 1
                    served = yield from on_primary(core, shard_index, data, decode, reason,
                                                   until, worth_waiting)
                return _retried(core, shard_index, served, attempts, began)
    except ShardUnavailableError as last:
        raise ShardUnavailableError(
            core.shard_names[shard_index],
            f"{_text(first)}; tried again for {time.monotonic() - began:.2f}s "
            f"({attempts} primary attempt(s)), last: {_text(last)}",
        ) from last.__cause__
    raise AssertionError("unreachable: every attempt returns or raises")


def _text(error: ShardUnavailableError) -> str:
    return str(error).removeprefix(f"shard {error.shard}: ")


def _elsewhere(
    core: StoreCore, shard_index: int, freshness: Freshness, data: Statement,
    decode: Callable[[Any], Any], started: float, failures: list[Failure],
    until: float,
) -> Generator[Request, Response, tuple[Any, ReadResult] | None]:
    """Pause until the monitor's next observation of the shard (``until`` at the latest),
    then serve the read on a replica that now proves it. None when none does; raises (a
    transient error, no I/O) while the monitor observes the primary down."""
    yield Wait(shard_index, until)
    decision = core.decide(shard_index, freshness)
    if decision.candidates or decision.tentative:
        # The bound stays measured from the read's start: the budget is about the writes
        # acknowledged before the caller asked, not before it was answered.
        served = yield from core.replicas.read(shard_index, decision, data, decode, failures,
                                               started)
        if isinstance(served, tuple):
            return served
    down = observed_down(core, shard_index)
    if down is not None:
        # Not tried while the monitor sees it down: its pool would only be reconnecting.
        text = f"primary did not answer: {down} by the monitor"
        raise ShardUnavailableError(core.shard_names[shard_index], text) from PrimaryGone(text)
    return None


def _retried(core: StoreCore, shard_index: int, served: tuple[Any, ReadResult],
             attempts: int, began: float) -> tuple[Any, ReadResult]:
    result = served[1]
    core.stats.record_retry(core.shard_names[shard_index], result.from_replica)
    log.info("read_retried", shard=core.shard_names[shard_index], node=result.node,
             from_replica=result.from_replica, primary_attempts=attempts,
             seconds=round(time.monotonic() - began, 4))
    return served
