"""The wire's own measure of a server's latency (``_wire.Arrival``) against a real server.

A thread of a busy interpreter wakes to its answer only once it holds the interpreter lock;
the primary's limiter must not take that wait for the primary's. Here another thread holds
the lock for long switch intervals while the server sleeps a known time: the arrival stamp
must say the server's time, and the caller's wall clock (which did wait) must say more.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Iterator

import psycopg
import pytest

from propstore import _sql, _wire
from propstore.sandbox import LocalCluster
from propstore.sandbox._load import LoadThreads

#: What the server takes (pg_sleep) and how long the busy thread keeps the lock at a time.
SERVER_SECONDS = 0.05
SWITCH_INTERVAL = 0.2
SLEEP = _wire.Statement(b"test_server_sleep")


@pytest.fixture
def sleeping(monkeypatch: pytest.MonkeyPatch) -> None:
    """A statement the wire may send unnamed: the server sleeps ``SERVER_SECONDS``."""
    monkeypatch.setitem(_sql.TEXT, SLEEP.name, f"SELECT pg_sleep({SERVER_SECONDS})".encode())


@contextlib.contextmanager
def busy_interpreter() -> Iterator[list[int]]:
    """Another thread running Python inside the block, taking the interpreter lock for
    ``SWITCH_INTERVAL`` whenever it gets it; yields its loop count (it must have run; a
    thread that died fails the test). The test checks after the block: a failing assert's
    report under that lock takes minutes."""
    spins = [0]

    def spin(_index: int) -> None:
        spins[0] += 1

    before = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        with LoadThreads("busy-interpreter") as busy:
            busy.repeat(1, spin)
            yield spins
    finally:
        sys.setswitchinterval(before)


def check(arrival: _wire.Arrival, wall: float, spins: list[int]) -> None:
    assert spins[0] > 0  # the busy thread ran
    assert arrival.seconds is not None, "a TCP connection's answer carries the kernel's stamp"
    # The server's sleep, a round trip on loopback: not the wait to run that followed.
    assert SERVER_SECONDS <= arrival.seconds < SERVER_SECONDS + 0.03
    assert wall >= arrival.seconds + 0.05, "the caller's thread did wait to run"


@pytest.mark.usefixtures("sleeping")
def test_an_answers_time_on_the_server_leaves_out_the_callers_wait_for_the_interpreter(
        migrated_cluster: LocalCluster) -> None:
    with psycopg.connect(migrated_cluster.shards[0].primary.dsn, autocommit=True) as conn:
        _wire.stamp_arrivals(conn)
        arrival = _wire.Arrival()
        with busy_interpreter() as spins:
            began = time.monotonic()
            _wire.execute(conn, [SLEEP], began + 10, named=False, arrival=arrival)
            wall = time.monotonic() - began
    check(arrival, wall, spins)


@pytest.mark.usefixtures("sleeping")
def test_an_async_answers_time_on_the_server_leaves_out_the_event_loops_wait(
        migrated_cluster: LocalCluster) -> None:
    async def read() -> tuple[_wire.Arrival, float, list[int]]:
        dsn = migrated_cluster.shards[0].primary.dsn
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            _wire.stamp_arrivals(conn)
            arrival = _wire.Arrival()
            with busy_interpreter() as spins:
                began = time.monotonic()
                await _wire.execute_async(conn, [SLEEP], began + 10, named=False,
                                          arrival=arrival)
                wall = time.monotonic() - began
            return arrival, wall, spins

    arrival, wall, spins = asyncio.run(read())
    check(arrival, wall, spins)


def test_a_connection_without_stamps_reports_no_arrival(
        migrated_cluster: LocalCluster) -> None:
    """No stamping asked for: the arrival is unknown, never a made-up figure."""
    with psycopg.connect(migrated_cluster.shards[0].primary.dsn, autocommit=True) as conn:
        arrival = _wire.Arrival()
        rows = _wire.execute(conn, [_wire.Statement(_sql.IS_PRIMARY)], time.monotonic() + 10,
                             named=False, arrival=arrival)
    assert rows and arrival.arrived is None and arrival.seconds is None
