"""Writes: one attempt as a program on the shard's primary, the window its retries keep to,
the retry policy (tenacity) and the error a caller sees when they are exhausted."""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import psycopg
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
)

from propstore import _sql
from propstore._jitter import wait_jittered
from propstore._limiter import PrimaryLimiter
from propstore._wire import Arrival, DeadlineExceeded, Statement
from propstore.config import RoutingSettings
from propstore.errors import InvalidInputError, PropStoreError, ShardUnavailableError
from propstore.lsn import from_column
from propstore.monitor import MonitorState
from propstore.store._primary import (
    PrimaryGone,
    describe,
    observed_roles,
    primary_node,
    still_primary,
)
from propstore.store._program import ConnState, Exec, Response, fixed
from propstore.timeline import WriteMark, timeline_of_wal_file

RetryingT = TypeVar("RetryingT", Retrying, AsyncRetrying)
_BEGIN, _COMMIT, _FLUSH_LSN = (Statement(_sql.BEGIN), Statement(_sql.COMMIT),
                               Statement(_sql.FLUSH_LSN))


@dataclass(slots=True)
class WriteWindow:
    """How long one write may keep trying (``time.monotonic()`` times) and what it saw.

    Retries stop at ``retry_until`` (``write_retry_time``) unless no primary is observed
    then: a failover is under way and the write waits for the new primary, trying it as soon
    as the monitor observes it, until ``failover_until`` (``write_failover_time``).
    """

    started: float
    retry_until: float
    failover_until: float
    attempts: int = 0
    #: The node of the latest attempt that reached one (None: none had a target).
    last_node: str | None = None

    @property
    def last_deadline(self) -> float:
        """No attempt runs past this."""
        return max(self.retry_until, self.failover_until)


class Writes:
    """What a store's writes share: the monitor's view of each primary, the deadlines and
    retry times, and each primary's limiter (writes are part of its measured load)."""

    def __init__(self, state: MonitorState, routing: RoutingSettings,
                 primary_limiters: Sequence[PrimaryLimiter], shard_names: Sequence[str]
                 ) -> None:
        self.state = state
        self.routing = routing
        self.primary_limiters = primary_limiters
        self.shard_names = shard_names

    def window(self) -> WriteWindow:
        """The retry window of a write starting now."""
        now = time.monotonic()
        return WriteWindow(now, now + self.routing.write_retry_time,
                           now + self.routing.write_failover_time)

    def program(self, shard_index: int, statement: Statement, window: WriteWindow
                ) -> Generator[Exec, Response, tuple[int | None, WriteMark]]:
        """One attempt at a write on the shard's primary: (new version, where it committed).

        The write (which also returns ``pg_current_wal_insert_lsn()`` read in its own
        transaction) in a ``BEGIN``/``COMMIT`` block, then ``pg_current_wal_flush_lsn()``
        with the WAL file name, are pipelined with one Sync, at no extra round trip: the
        first LSN is at or before the write's commit record, the second read after the
        COMMIT had flushed it (>= the end of the commit record), on the timeline the commit
        was written on (``_sql``, above MERGE).
        ``window`` caps the attempt, so retries never outlast it.

        The attempt goes to the primary the monitor observes; with none, to the last one
        (it may be restarting) unless the monitor has seen it in recovery since (then it
        fails at once, without I/O). While it waits for a connection it gives up as soon as
        the monitor observes another primary, so no attempt stays blocked on a dead
        primary's pool.
        """
        window.attempts += 1
        view = self.state.view(shard_index)
        node = view.primary
        if node is None:
            node = primary_node(view)
            if view.ruled_out(node):
                raise PrimaryGone(f"no primary observed ({observed_roles(view)})")
        window.last_node = node.name
        began = time.monotonic()
        deadline = min(began + self.routing.primary_deadline, window.last_deadline)
        name = node.name
        statements = fixed((_BEGIN, statement, _COMMIT, _FLUSH_LSN), once=True)
        connected = began
        limiter = self.primary_limiters[shard_index]
        # The stamp's peek costs a write ~10 us (measured: set / libpq floor 1.48-1.51x
        # without it on every write, 1.64-1.66x with): paid only while reads fall back to
        # this primary, when the writes' latency is the limiter's second witness.
        arrival = Arrival() if limiter.serving_fallbacks else None

        def plan(conn: ConnState) -> tuple[Sequence[Statement], bool]:
            nonlocal connected
            connected = time.monotonic()
            return statements(conn)

        try:
            _conn, results = yield Exec(
                node.config, deadline, plan,
                valid=lambda: still_primary(self.state.view(shard_index), name),
                arrival=arrival,
            )
        finally:
            # Writes are the primary's other load: their latency on it is part of its
            # health (as the kernel stamped the answer's arrival; else from a connection in
            # hand: a wait for one is this store's own queue).
            stamped = None if arrival is None else arrival.seconds
            limiter.sample(time.monotonic() - connected if stamped is None else stamped)
        _begun, write, _committed, after = results
        version = write.get_value(0, 0)
        wal_file = after.get_value(0, 1)
        # Both positions are pg_lsn columns as the server prints them (never NULL: the
        # functions always answer on a primary), parsed without LSN.parse's checks.
        return None if version is None else int(version), WriteMark(
            timeline_of_wal_file(wal_file.decode()) if wal_file else None,
            from_column(after.get_value(0, 0)), from_column(write.get_value(0, 1)),
        )

    def exhausted(self, shard_index: int, window: WriteWindow) -> bool:
        """Whether a failed write stops retrying now (see :class:`WriteWindow`)."""
        now = time.monotonic()
        if now >= window.last_deadline:
            return True
        if now < window.retry_until:
            return False
        primary = self.state.view(shard_index).primary
        # Past write_retry_time only a failover keeps the write going: until a primary is
        # observed, and then until it was tried once.
        return primary is not None and primary.name == window.last_node

    def retrying(self, kind: type[RetryingT], shard_index: int, window: WriteWindow
                 ) -> RetryingT:
        """The retry policy for writes (``Retrying`` or ``AsyncRetrying``): jittered backoff
        while the error is retryable and :meth:`exhausted` says go on; while no primary is
        observed, short waits (an attempt then costs no I/O), so the write reaches a new
        primary within ~20 ms of the monitor observing it."""
        backoff = wait_jittered(multiplier=0.05, max=0.5)

        def wait(state: RetryCallState) -> float:
            if self.state.view(shard_index).primary is None:
                return 0.02
            return float(backoff(state))

        return kind(
            stop=lambda state: self.exhausted(shard_index, window),
            wait=wait,
            retry=retry_if_exception(is_retryable_write_error),
            reraise=True,
        )

    def error(self, shard_index: int, exc: BaseException,
              window: WriteWindow | None = None) -> PropStoreError:
        """The error a caller sees for a write that failed (after any retries); it names
        the roles the monitor observed, never only the file's."""
        view = self.state.view(shard_index)
        node = primary_node(view)
        shard = self.shard_names[shard_index]
        if is_retryable_write_error(exc):
            tried = "" if window is None else (
                f" after {window.attempts} attempt(s) over "
                f"{time.monotonic() - window.started:.1f}s"
            )
            if view.primary is None:
                return ShardUnavailableError(
                    shard, f"write not applied: no primary observed{tried} "
                    f"({observed_roles(view)}); last error: {describe(exc)}",
                )
            return ShardUnavailableError(
                shard, f"write failed on primary {node.name} ({node.config.address}){tried}: "
                f"{describe(exc)}",
            )
        if isinstance(exc, psycopg.DataError | psycopg.IntegrityError):
            return InvalidInputError("props", f"refused by the database: {describe(exc)}")
        # Permissions, a missing table (not migrated), ...: a deployment problem, not input.
        return PropStoreError(f"shard {shard}: write refused by {node.name}: {describe(exc)}")


def is_retryable_write_error(exc: BaseException) -> bool:
    """Errors after which a write may be retried on the (possibly new) primary."""
    return isinstance(exc, DeadlineExceeded | psycopg.OperationalError | (
        psycopg.errors.ReadOnlySqlTransaction
    ))
