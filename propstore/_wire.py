"""Statements sent on a libpq connection with a hard deadline, for sync and async callers.

Why this exists instead of ``cursor.execute``: psycopg has no client-side deadline that
*abandons* a query. On a frozen server (SIGSTOP, a hung VM) a sync query waits forever and an
async ``wait_for`` waits for the cancel request, which a frozen server never answers (~11 s
measured). A replica read must cost at most its deadline, so the I/O is driven here, on
psycopg's public libpq wrapper (``conn.pgconn``), with psycopg's own protocol generators and
waiters (``psycopg.generators``, ``psycopg.waiting``: C where psycopg's C module is there):
the statements are sent, the generator fetching their results is driven by the waiter with a
timeout, and at the deadline the connection is closed, never cancelled. A read proven by a
fact is one statement: sending it and waiting for its result runs no Python code of ours.

Also needed for soundness: pipeline mode sends ``SELECT pg_last_wal_replay_lsn()`` and the
data query in one round trip, the LSN statement first, so the LSN is read before the data
query takes its snapshot. One Sync ends the batch, so it is one implicit transaction and,
behind a transaction pooler, runs on one server connection.

The time an answer took on the server is read from the kernel, not the client's clock
(:class:`Arrival`): a thread of a busy interpreter wakes to its answer only once it holds the
interpreter lock (measured: 2.9 ms per primary read in a 64-thread client, where the
primary's backend took ~1.5 ms), and the primary's limiter must see the primary's latency,
not this process's. With ``SO_TIMESTAMPNS`` on the socket, the kernel stamps each arriving
segment; one byte of the answer is peeked (``MSG_PEEK``: libpq still reads all of it) when
the socket first says readable, and its stamp is when the answer reached this host.

Statements go by name (``named=True``: prepared on the connection at the protocol level by
:func:`prepare`) or unnamed (Parse with the empty name, then Bind/Execute, in the same batch
as its Sync): the form a transaction pooler that tracks no prepared statements accepts.

The blocking :func:`execute` and :func:`prepare` are generated from :func:`execute_async`
and :func:`prepare_async` (the section at the end of this module; ``tools/async_to_sync.py``).
"""

from __future__ import annotations

import contextlib
import math
import socket
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import psycopg
import psycopg.errors
from psycopg import generators, pq, waiting
from psycopg.abc import PQGen

from propstore._sql import STATEMENTS, TEXT

_ExecStatus = pq.ExecStatus
_IN_ERROR = pq.TransactionStatus.INERROR
_ERROR_STATUSES = frozenset({_ExecStatus.FATAL_ERROR, _ExecStatus.PIPELINE_ABORTED})
# The waiters' own timeout error (an OperationalError): the deadline passed.
_TIMED_OUT = psycopg.errors._WaitTimeout

Params = Sequence[bytes | None]
#: What psycopg's waiters drive: yields the socket readiness it waits for, gets it back.
Exchange = PQGen[list[pq.abc.PGresult]]
# psycopg's protocol generators (its C ones when its C module is there): ``execute`` flushes
# what was sent and returns the results of one statement; ``fetch_many`` only the latter.
_execute: Callable[[pq.abc.PGconn], Exchange] = generators.execute
_fetch_many: Callable[[pq.abc.PGconn], Exchange] = generators.fetch_many


#: ``SO_TIMESTAMPNS`` and its control message (``SCM_TIMESTAMPNS``, the same number): not
#: in the ``socket`` module; Linux's value. Elsewhere setting it fails and no stamp is read.
_SO_TIMESTAMPNS = 35
_STAMP = struct.Struct("@qq")  # struct timespec
_STAMP_SPACE = socket.CMSG_SPACE(_STAMP.size)
_READY_R = 1  # psycopg's Ready.R bit, as its waiters send it back to the generator


class DeadlineExceeded(Exception):
    """The server did not answer before the deadline; the connection was closed."""


class Statement(NamedTuple):
    """A statement prepared on every pooled connection (by name) and its text parameters.

    A named tuple rather than a frozen dataclass: every read builds one, and a tuple is
    built in one step (a frozen dataclass's ``__init__`` sets each field through
    ``object.__setattr__``)."""

    name: bytes
    params: Params = ()


class Arrival:
    """When a batch was sent and when its answer reached this host (``time.monotonic()``
    times; ``arrived`` None: not known, e.g. a Unix socket, whose segments carry no stamp).

    ``seconds`` is the answer's time on the way and on the server, without the wait of the
    client's thread to run once it came (see the module docstring)."""

    __slots__ = ("arrived", "sent")

    def __init__(self) -> None:
        self.sent = math.inf
        self.arrived: float | None = None

    @property
    def seconds(self) -> float | None:
        """From sending to the answer's arrival, None when the arrival is not known (or
        came before the sending: bytes the server sent unasked, read by no one yet)."""
        if self.arrived is None or self.arrived < self.sent:
            return None
        return self.arrived - self.sent


def stamp_arrivals(conn: psycopg.Connection[object] | psycopg.AsyncConnection[object]
                   ) -> None:
    """Have the kernel stamp the arrival of what ``conn`` receives (for :class:`Arrival`)."""
    # Suppressed: not Linux, or a socket that takes no stamps (then none is read).
    with contextlib.suppress(OSError), _borrowed(conn.pgconn.socket) as sock:
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)


@contextlib.contextmanager
def _borrowed(fd: int) -> Iterator[socket.socket]:
    """libpq's socket as a Python one, given back (never closed) on exit."""
    # Family and type given: else the socket module asks the kernel for them (3 calls).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=fd)
    try:
        yield sock
    finally:
        sock.detach()


def _arrived(fd: int) -> float | None:
    """When the first unread byte on ``fd`` reached this host (monotonic), if stamped."""
    # As _borrowed, inline: its context manager was a fifth of this function's ~10 us.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=fd)
    try:
        _data, ancillary, _flags, _address = sock.recvmsg(
            1, _STAMP_SPACE, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return None
    finally:
        sock.detach()
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(data) >= _STAMP.size:
            seconds, nanoseconds = _STAMP.unpack_from(data)
            ago = time.time() - (seconds + nanoseconds * 1e-9)
            # The stamp is wall-clock time: a clock stepped meanwhile makes it nonsense.
            return time.monotonic() - ago if 0.0 <= ago < _STAMP_SANITY else None
    return None


#: An arrival stamp further back than this (seconds) is a stepped clock, not a slow reader.
_STAMP_SANITY = 60.0


def _stamped(exchange: Exchange, fd: int, arrival: Arrival) -> Exchange:
    """``exchange``, noting in ``arrival`` when its answer began to arrive: the socket's
    first readiness to read (before libpq reads it)."""
    try:
        wait = next(exchange)
        while True:
            ready = yield wait
            if ready & _READY_R and arrival.arrived is None:
                arrival.arrived = _arrived(fd)
            wait = exchange.send(ready)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def _send(pgconn: pq.abc.PGconn, statement: Statement, named: bool) -> None:
    if named:
        pgconn.send_query_prepared(statement.name, statement.params)
    else:
        pgconn.send_query_params(TEXT[statement.name], statement.params)


def _exchange(pgconn: pq.abc.PGconn, statements: Sequence[Statement], named: bool
              ) -> Exchange:
    """Send ``statements`` in one round trip, one Sync at the end (one implicit transaction,
    unless the batch holds transaction commands of its own: a write's ``BEGIN``/``COMMIT``);
    the generator returning one result each."""
    if len(statements) == 1:  # the common case (a read proven by a fact): psycopg's own
        statement = statements[0]
        if named:
            pgconn.send_query_prepared(statement.name, statement.params)
        else:
            pgconn.send_query_params(TEXT[statement.name], statement.params)
        return _execute(pgconn)
    pgconn.enter_pipeline_mode()
    for statement in statements:
        _send(pgconn, statement, named)
    pgconn.pipeline_sync()
    return _pipelined(pgconn, len(statements))


def _parse_all(pgconn: pq.abc.PGconn, names: Sequence[bytes]) -> Exchange:
    """Prepare ``names`` at the protocol level (one Parse each, one Sync, one round trip)."""
    pgconn.enter_pipeline_mode()
    for name in names:
        pgconn.send_prepare(name, STATEMENTS[name].encode())
    pgconn.pipeline_sync()
    return _pipelined(pgconn, len(names))


def _pipelined(pgconn: pq.abc.PGconn, count: int) -> Exchange:
    """The results of ``count`` statements sent in pipeline mode with one Sync at the end;
    leaves pipeline mode.

    psycopg's ``fetch_many`` returns one statement's results (up to the NULL that ends
    them), or a Sync's result alone; ``execute`` flushes the batch first.
    """
    results: list[pq.abc.PGresult] = []
    fetch = _execute  # the first fetch flushes what was sent
    for _ in range(count):
        results += yield from fetch(pgconn)
        fetch = _fetch_many
    yield from _sync_result(pgconn)
    pgconn.exit_pipeline_mode()
    return results


def _sync_result(pgconn: pq.abc.PGconn) -> PQGen[None]:
    (result,) = yield from _fetch_many(pgconn)
    if result.status != _ExecStatus.PIPELINE_SYNC:  # never: libpq keeps this order
        raise psycopg.OperationalError(f"expected a pipeline sync, got {result.status!r}")


def _first_error(results: list[pq.abc.PGresult]) -> psycopg.Error | None:
    """The first statement error of a batch, if any."""
    for result in results:
        if result.status in _ERROR_STATUSES:
            return _error(result)
    return None


def _rollback(pgconn: pq.abc.PGconn) -> Exchange:
    """End the failed transaction block a batch left open (a write's ``BEGIN`` whose write
    failed: the Sync does not end an explicit block), so the connection is idle again."""
    pgconn.send_query(b"ROLLBACK")
    return _execute(pgconn)


def _error(result: pq.abc.PGresult) -> psycopg.Error:
    """The psycopg exception class matching the result's SQLSTATE."""
    if result.status == _ExecStatus.PIPELINE_ABORTED:
        return psycopg.errors.PipelineAborted("pipeline aborted")
    sqlstate = (result.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()
    message = (result.error_message or b"server error").decode("utf-8", "replace").strip()
    try:
        cls = psycopg.errors.lookup(sqlstate)
    except KeyError:
        cls = psycopg.errors.DatabaseError
    return cls(message)


def _abandon(conn: psycopg.Connection[object] | psycopg.AsyncConnection[object]) -> None:
    """Close without cancelling: a frozen server would never answer the cancel."""
    conn.pgconn.finish()


def _failed(conn: psycopg.Connection[object] | psycopg.AsyncConnection[object],
            exc: BaseException) -> BaseException:
    """What to raise for an exchange that did not complete; the connection is closed (mid-
    exchange its protocol state is unknown: it must never be handed out again)."""
    _abandon(conn)
    if isinstance(exc, _TIMED_OUT):
        return DeadlineExceeded()
    if isinstance(exc, psycopg.OperationalError):
        return exc
    return psycopg.OperationalError(str(exc))


# BEGIN ASYNC SOURCE of the sync section below (tools/async_to_sync.py generates it).


async def execute_async(
    conn: psycopg.AsyncConnection[object],
    statements: Sequence[Statement],
    deadline: float,
    *,
    named: bool = True,
    arrival: Arrival | None = None,
) -> list[pq.abc.PGresult]:
    """Run ``statements`` on ``conn``; ``deadline`` is a ``time.monotonic()`` time (an
    asyncio connection waits on the event loop, never blocking it).

    ``named``: by their prepared names (see :func:`prepare_async`), else as unnamed
    statements. ``arrival``: noted there, when they were sent and their answer arrived
    (:func:`stamp_arrivals` on the connection first). Raises :class:`DeadlineExceeded`
    (after closing the connection) or a ``psycopg.Error``.
    """
    pgconn = conn.pgconn
    try:
        remaining = deadline - time.monotonic()
        if arrival is None:
            exchange = _exchange(pgconn, statements, named)
        else:
            arrival.sent, arrival.arrived = time.monotonic(), None
            exchange = _stamped(_exchange(pgconn, statements, named), pgconn.socket, arrival)
        # The waiter polls for at most ``remaining`` (whole milliseconds, rounded down: the
        # deadline stays a deadline), then raises its timeout error.
        results = await waiting.wait_async(exchange, pgconn.socket, remaining, remaining)
        error = _first_error(results)
        if error is not None and pgconn.transaction_status == _IN_ERROR:
            remaining = deadline - time.monotonic()
            await waiting.wait_async(_rollback(pgconn), pgconn.socket, remaining, remaining)
    except (OSError, psycopg.Error) as exc:
        raise _failed(conn, exc) from exc
    if error is not None:
        raise error
    return results


async def prepare_async(conn: psycopg.AsyncConnection[object], names: Sequence[bytes],
                        deadline: float) -> None:
    """Prepare the statements ``names`` on ``conn`` at the protocol level (Parse by name)."""
    pgconn = conn.pgconn
    try:
        remaining = deadline - time.monotonic()
        results = await waiting.wait_async(
            _parse_all(pgconn, names), pgconn.socket, remaining, remaining)
    except (OSError, psycopg.Error) as exc:
        raise _failed(conn, exc) from exc
    error = _first_error(results)
    if error is not None:
        raise error


# BEGIN GENERATED SYNC from the async source above by tools/async_to_sync.py: do not edit.


def execute(
    conn: psycopg.Connection[object],
    statements: Sequence[Statement],
    deadline: float,
    *,
    named: bool = True,
    arrival: Arrival | None = None,
) -> list[pq.abc.PGresult]:
    """Run ``statements`` on ``conn``; ``deadline`` is a ``time.monotonic()`` time (an
    asyncio connection waits on the event loop, never blocking it).

    ``named``: by their prepared names (see :func:`prepare`), else as unnamed
    statements. ``arrival``: noted there, when they were sent and their answer arrived
    (:func:`stamp_arrivals` on the connection first). Raises :class:`DeadlineExceeded`
    (after closing the connection) or a ``psycopg.Error``.
    """
    pgconn = conn.pgconn
    try:
        remaining = deadline - time.monotonic()
        if arrival is None:
            exchange = _exchange(pgconn, statements, named)
        else:
            arrival.sent, arrival.arrived = time.monotonic(), None
            exchange = _stamped(_exchange(pgconn, statements, named), pgconn.socket, arrival)
        # The waiter polls for at most ``remaining`` (whole milliseconds, rounded down: the
        # deadline stays a deadline), then raises its timeout error.
        results = waiting.wait(exchange, pgconn.socket, remaining, remaining)
        error = _first_error(results)
        if error is not None and pgconn.transaction_status == _IN_ERROR:
            remaining = deadline - time.monotonic()
            waiting.wait(_rollback(pgconn), pgconn.socket, remaining, remaining)
    except (OSError, psycopg.Error) as exc:
        raise _failed(conn, exc) from exc
    if error is not None:
        raise error
    return results


def prepare(conn: psycopg.Connection[object], names: Sequence[bytes],
            deadline: float) -> None:
    """Prepare the statements ``names`` on ``conn`` at the protocol level (Parse by name)."""
    pgconn = conn.pgconn
    try:
        remaining = deadline - time.monotonic()
        results = waiting.wait(
            _parse_all(pgconn, names), pgconn.socket, remaining, remaining)
    except (OSError, psycopg.Error) as exc:
        raise _failed(conn, exc) from exc
    error = _first_error(results)
    if error is not None:
        raise error


# END GENERATED SYNC
