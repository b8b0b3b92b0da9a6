"""Statements sent on a libpq connection with a hard deadline, for sync and async callers.

Why this exists instead of ``cursor.execute``: psycopg has no client-side deadline that
*abandons* a query. On a frozen server (SIGSTOP, a hung VM) a sync query waits forever and an
async ``wait_for`` waits for the cancel request, which a frozen server never answers (~11 s
measured). A replica read must cost at most its deadline, so the I/O is driven here, on
psycopg's public libpq wrapper (``conn.pgconn``): the protocol logic is one generator that
yields what it waits for (psycopg's own design), and two thin drivers wait on the socket with
a deadline — ``select.poll`` for sync code, the event loop for async code. At the deadline
the connection is closed, never cancelled.

Also needed for soundness: pipeline mode sends ``SELECT pg_last_wal_replay_lsn()`` and the
data query in one round trip, the LSN statement first, so the LSN is read before the data
query takes its snapshot. One Sync ends the batch, so it is one implicit transaction and,
behind a transaction pooler, runs on one server connection.

Statements go by name (``named=True``: prepared on the connection at the protocol level by
:func:`prepare`) or unnamed (Parse with the empty name, then Bind/Execute, in the same batch
as its Sync): the form a transaction pooler that tracks no prepared statements accepts.
"""

from __future__ import annotations

import asyncio
import select
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass

import psycopg
import psycopg.errors
from psycopg import pq

from propstore._sql import STATEMENTS, TEXT

_READ = 1
_WRITE = 2
_ExecStatus = pq.ExecStatus
_ERROR_STATUSES = frozenset({_ExecStatus.FATAL_ERROR, _ExecStatus.PIPELINE_ABORTED})
#: What a wait for ``_READ`` / ``_WRITE`` / both asks ``poll`` for.
_READABLE = select.POLLIN | select.POLLERR | select.POLLHUP
_POLL_MASKS = {_READ: select.POLLIN, _WRITE: select.POLLOUT,
               _READ | _WRITE: select.POLLIN | select.POLLOUT}

Params = Sequence[bytes | None]


class DeadlineExceeded(Exception):
    """The server did not answer before the deadline; the connection was closed."""


@dataclass(frozen=True, slots=True)
class Statement:
    """A statement prepared on every pooled connection (by name) and its text parameters."""

    name: bytes
    params: Params = ()


def _send(pgconn: pq.abc.PGconn, statement: Statement, named: bool) -> None:
    if named:
        pgconn.send_query_prepared(statement.name, statement.params)
    else:
        pgconn.send_query_params(TEXT[statement.name], statement.params)


def _exchange(
    pgconn: pq.abc.PGconn, statements: Sequence[Statement], commit_each: bool, named: bool
) -> Generator[int, int, list[pq.abc.PGresult]]:
    """Send ``statements`` in one round trip; return one result per statement.

    With ``commit_each`` a Sync follows every statement, so on an autocommit connection each
    statement commits before the server even parses the next: a statement after a write
    observes the write's commit (how a token's LSN is read after the commit, for free).
    """
    single = len(statements) == 1
    if single:
        statement = statements[0]
        if named:
            pgconn.send_query_prepared(statement.name, statement.params)
        else:
            pgconn.send_query_params(TEXT[statement.name], statement.params)
    else:
        pgconn.enter_pipeline_mode()
        for statement in statements:
            _send(pgconn, statement, named)
            if commit_each:
                pgconn.pipeline_sync()
        if not commit_each:
            pgconn.pipeline_sync()
    return (yield from _collect(pgconn, single, len(statements) if commit_each else 1))


def _parse_all(pgconn: pq.abc.PGconn, names: Sequence[bytes]
               ) -> Generator[int, int, list[pq.abc.PGresult]]:
    """Prepare ``names`` at the protocol level (one Parse each, one Sync, one round trip)."""
    pgconn.enter_pipeline_mode()
    for name in names:
        pgconn.send_prepare(name, STATEMENTS[name].encode())
    pgconn.pipeline_sync()
    return (yield from _collect(pgconn, False, 1))


def _collect(pgconn: pq.abc.PGconn, single: bool, syncs_expected: int
             ) -> Generator[int, int, list[pq.abc.PGresult]]:
    while pgconn.flush():
        if (yield _READ | _WRITE) & _READ:
            pgconn.consume_input()
    results: list[pq.abc.PGresult] = []
    if single:  # the common case (a read proven by a fact): one result, then None
        while True:
            yield _READ
            pgconn.consume_input()
            while not pgconn.is_busy():
                result = pgconn.get_result()
                if result is None:
                    return results
                results.append(result)
    syncs = 0
    done = False
    while not done:
        yield _READ
        pgconn.consume_input()
        while not pgconn.is_busy():
            result = pgconn.get_result()
            if result is None:
                if syncs == syncs_expected:
                    done = True
                    break
                continue  # end of one statement's results
            if result.status == _ExecStatus.PIPELINE_SYNC:
                syncs += 1
                if syncs == syncs_expected:
                    done = True
                    break
            else:
                results.append(result)
    pgconn.exit_pipeline_mode()
    return results


def _checked(results: list[pq.abc.PGresult]) -> list[pq.abc.PGresult]:
    """Raise the first statement error; the connection itself is idle and reusable."""
    for result in results:
        if result.status in _ERROR_STATUSES:
            raise _error(result)
    return results


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


def execute(
    conn: psycopg.Connection[object],
    statements: Sequence[Statement],
    deadline: float,
    *,
    commit_each: bool = False,
    named: bool = True,
) -> list[pq.abc.PGresult]:
    """Run ``statements`` on a sync connection; ``deadline`` is a ``time.monotonic()`` time.

    ``named``: by their prepared names (see :func:`prepare`), else as unnamed statements.
    Raises :class:`DeadlineExceeded` (after closing the connection) or a ``psycopg.Error``.
    """
    return _drive(conn, _exchange(conn.pgconn, statements, commit_each, named), deadline)


def prepare(conn: psycopg.Connection[object], names: Sequence[bytes], deadline: float
            ) -> None:
    """Prepare the statements ``names`` on ``conn`` at the protocol level (Parse by name)."""
    _drive(conn, _parse_all(conn.pgconn, names), deadline)


async def prepare_async(conn: psycopg.AsyncConnection[object], names: Sequence[bytes],
                        deadline: float) -> None:
    """:func:`prepare` for asyncio."""
    await _drive_async(conn, _parse_all(conn.pgconn, names), deadline)


def _drive(conn: psycopg.Connection[object],
           gen: Generator[int, int, list[pq.abc.PGresult]], deadline: float
           ) -> list[pq.abc.PGresult]:
    fd = conn.pgconn.socket
    poller = select.poll()
    monotonic = time.monotonic
    try:
        wait = next(gen)
        registered = 0
        while True:
            remaining = deadline - monotonic()
            if remaining <= 0:
                raise DeadlineExceeded
            mask = _POLL_MASKS[wait]
            if mask != registered:
                poller.register(fd, mask)
                registered = mask
            # poll() rounds a float timeout *up* to the next millisecond; rounding down
            # keeps the deadline a deadline (the sub-millisecond rest is a few poll(0)s).
            events = poller.poll(int(remaining * 1000.0))
            if events:  # one descriptor: one event
                event = events[0][1]
                wait = gen.send((_READ if event & _READABLE else 0)
                                | (_WRITE if event & select.POLLOUT else 0))
    except StopIteration as stop:
        return _checked(stop.value)
    except DeadlineExceeded:
        _abandon(conn)
        raise
    except (OSError, psycopg.Error) as exc:
        # Mid-exchange the protocol state is unknown: never hand this connection out again.
        _abandon(conn)
        if isinstance(exc, psycopg.OperationalError):
            raise
        raise psycopg.OperationalError(str(exc)) from exc


async def execute_async(
    conn: psycopg.AsyncConnection[object],
    statements: Sequence[Statement],
    deadline: float,
    *,
    commit_each: bool = False,
    named: bool = True,
) -> list[pq.abc.PGresult]:
    """:func:`execute` for asyncio: waits on the event loop, never blocks it."""
    return await _drive_async(
        conn, _exchange(conn.pgconn, statements, commit_each, named), deadline
    )


async def _drive_async(conn: psycopg.AsyncConnection[object],
                       gen: Generator[int, int, list[pq.abc.PGresult]], deadline: float
                       ) -> list[pq.abc.PGresult]:
    pgconn = conn.pgconn
    fd = pgconn.socket
    loop = asyncio.get_running_loop()
    try:
        wait = next(gen)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded
            ready_fut: asyncio.Future[int] = loop.create_future()

            def _wake(flag: int, fut: asyncio.Future[int] = ready_fut) -> None:
                if not fut.done():
                    fut.set_result(flag)

            if wait & _READ:
                loop.add_reader(fd, _wake, _READ)
            if wait & _WRITE:
                loop.add_writer(fd, _wake, _WRITE)
            try:
                async with asyncio.timeout(remaining):
                    ready = await ready_fut
            except TimeoutError:
                raise DeadlineExceeded from None
            finally:
                if wait & _READ:
                    loop.remove_reader(fd)
                if wait & _WRITE:
                    loop.remove_writer(fd)
            wait = gen.send(ready)
    except StopIteration as stop:
        return _checked(stop.value)
    except DeadlineExceeded:
        _abandon(conn)
        raise
    except (OSError, psycopg.Error) as exc:
        _abandon(conn)
        if isinstance(exc, psycopg.OperationalError):
            raise
        raise psycopg.OperationalError(str(exc)) from exc
