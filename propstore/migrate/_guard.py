"""Lag-throttled batch work: :class:`LagGuard` and :func:`backfill`.

A backfill that writes as fast as the primary allows can leave replicas minutes behind, and
every reader with a freshness budget then falls back to the primary. The guard measures the
shard's replicas between batches (the sound time bound of :mod:`._lag`) and sleeps while any
is more than ``max_lag`` stale. Because a batch starts only after a check proved every
replica within ``max_lag``, and staleness grows at most one second per second, a replica
that keeps replaying is never more than ``max_lag`` plus one batch's duration stale.

The batch size adapts like TCP's congestion window (AIMD): it is halved when the lag passes
half the budget, and grows by a fixed step while the lag stays under a quarter of it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Protocol

import psycopg
import sqlalchemy as sa
import structlog
from psycopg import sql as pgsql

from propstore._durations import format_duration
from propstore.config import Topology
from propstore.errors import MigrationError
from propstore.migrate._alembic import (
    PRIMARY_DSN_ATTRIBUTE,
    REPLICA_DSNS_ATTRIBUTE,
    SHARD_ATTRIBUTE,
)
from propstore.migrate._lag import Clock, ShardLag, ShardProbe

log = structlog.get_logger("propstore.migrate")

Sleep = Callable[[float], None]


class LagSource(Protocol):
    """Anything that measures a shard's lag now (a :class:`ShardProbe`, or a fake)."""

    def sample(self) -> ShardLag:
        """The shard's lag now."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


@dataclass(frozen=True, slots=True)
class GuardCheck:
    """The outcome of :meth:`LagGuard.wait`: the measurement that let work go on, and how
    long (seconds) the guard held it back first."""

    lag: ShardLag
    waited: float


class LagGuard:
    """Holds batch work back while any replica of a shard is more than ``max_lag`` stale.

    Build it with :meth:`for_shard` (from a topology), :meth:`from_alembic` (inside a
    revision run by the rolling migrator), or from DSNs directly.

    Args:
        primary: DSN of the shard's primary (its WAL position is sampled for the bound).
        replicas: DSNs of the replicas to protect.
        max_lag: seconds of proven staleness a replica may have before work pauses.
        check_interval: seconds between re-checks while paused.
        max_wait: seconds one pause may last before :class:`MigrationError`; None waits
            for ever.
        sleep, clock: injectable, so tests drive time instead of waiting.
        source: a ready-made lag source (overrides ``primary``/``replicas``).
        name: the shard's name, for logs.
    """

    def __init__(
        self,
        primary: str | None = None,
        replicas: Sequence[str] = (),
        *,
        max_lag: float = 1.0,
        check_interval: float = 0.1,
        max_wait: float | None = 300.0,
        sleep: Sleep = time.sleep,
        clock: Clock = time.monotonic,
        source: LagSource | None = None,
        name: str = "shard",
    ) -> None:
        if max_lag <= 0 or check_interval <= 0:
            raise ValueError("max_lag and check_interval must be > 0 seconds")
        if source is None:
            if primary is None:
                raise ValueError("LagGuard needs the primary's DSN (its LSN bounds the lag)")
            source = ShardProbe.from_dsns(primary, replicas, name=name, clock=clock)
        self.name = name
        self.max_lag = max_lag
        self.check_interval = check_interval
        self.max_wait = max_wait
        self._sleep = sleep
        self._clock = clock
        self._source = source
        #: Pauses so far, seconds spent paused, and the worst staleness any check saw.
        self.pauses = 0
        self.waited = 0.0
        self.max_staleness_seen = 0.0

    @classmethod
    def for_shard(cls, topology: Topology, shard: str, **kwargs: Any) -> LagGuard:
        """A guard on ``shard``'s configured replicas (keyword arguments as the class)."""
        config = topology.shard(shard)
        probe = ShardProbe(config, clock=kwargs.get("clock", time.monotonic),
                           connect_timeout=topology.routing.connect_timeout)
        return cls(source=probe, name=config.name, **kwargs)

    @classmethod
    def from_alembic(cls, **kwargs: Any) -> LagGuard:
        """A guard on the shard being migrated, for use inside an alembic revision.

        The rolling migrator puts the shard's DSNs in ``config.attributes``; a revision run
        any other way has none, and this raises :class:`MigrationError`.
        """
        from alembic import op

        config = op.get_context().config
        attributes = {} if config is None else config.attributes
        if PRIMARY_DSN_ATTRIBUTE not in attributes:
            raise MigrationError(
                "LagGuard.from_alembic() needs the shard's DSNs in config.attributes: run "
                "the revision with `propstore migrate up` / RollingMigration, or pass "
                "attributes={PRIMARY_DSN_ATTRIBUTE: ..., REPLICA_DSNS_ATTRIBUTE: [...]} to "
                "propstore.migrate.upgrade()"
            )
        return cls(
            attributes[PRIMARY_DSN_ATTRIBUTE], tuple(attributes[REPLICA_DSNS_ATTRIBUTE]),
            name=str(attributes.get(SHARD_ATTRIBUTE, "shard")), **kwargs,
        )

    def __repr__(self) -> str:
        return (f"LagGuard({self.name}, max_lag={format_duration(self.max_lag)}, "
                f"check_interval={format_duration(self.check_interval)})")

    def __enter__(self) -> LagGuard:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def clock(self) -> Clock:
        """The guard's clock (monotonic seconds)."""
        return self._clock

    def close(self) -> None:
        """Close the guard's connections."""
        self._source.close()

    def check(self) -> ShardLag:
        """Measure the shard now (no waiting)."""
        lag = self._source.sample()
        if not math.isinf(lag.worst):
            self.max_staleness_seen = max(self.max_staleness_seen, lag.worst)
        return lag

    def wait(self) -> GuardCheck:
        """Return once every replica is up and within ``max_lag``; sleep meanwhile.

        Raises :class:`MigrationError` when a pause lasts longer than ``max_wait``.
        """
        started = self._clock()
        lag = self.check()
        if lag.ready(self.max_lag):
            return GuardCheck(lag, 0.0)
        self.pauses += 1
        log.info("migrate.guard_paused", shard=self.name, max_lag=self.max_lag,
                 reason=lag.explain(self.max_lag))
        while True:
            waited = self._clock() - started
            if self.max_wait is not None and waited >= self.max_wait:
                self.waited += waited
                log.warning("migrate.guard_gave_up", shard=self.name, waited=round(waited, 3),
                          reason=lag.explain(self.max_lag))
                raise MigrationError(
                    f"shard {self.name}: replicas still behind after "
                    f"{format_duration(waited)}: {lag.explain(self.max_lag)}"
                )
            self._sleep(self.check_interval)
            lag = self.check()
            if lag.ready(self.max_lag):
                waited = self._clock() - started
                self.waited += waited
                log.info("migrate.guard_resumed", shard=self.name, waited=round(waited, 3),
                         staleness=round(lag.worst, 4))
                return GuardCheck(lag, waited)


@dataclass(frozen=True, slots=True)
class BatchSizer:
    """The next batch's size (keys), adapted to lag: additive increase, multiplicative
    decrease. ``step`` defaults to a quarter of the starting size."""

    size: int
    minimum: int = 1
    maximum: int = 1_000_000
    step: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.minimum <= self.size <= self.maximum:
            raise ValueError(f"need 1 <= minimum <= size <= maximum, got {self}")
        if self.step <= 0:
            object.__setattr__(self, "step", max(1, self.size // 4))

    def after(self, staleness: float, max_lag: float, paused: bool) -> BatchSizer:
        """The size after a check that measured ``staleness`` (seconds)."""
        if paused or staleness > max_lag / 2:
            return replace(self, size=max(self.minimum, self.size // 2))
        if staleness < max_lag / 4:
            return replace(self, size=min(self.maximum, self.size + self.step))
        return self


@dataclass(frozen=True, slots=True)
class BackfillProgress:
    """Where a :func:`backfill` stands after a batch (times in seconds)."""

    rows: int
    keys_done: int
    keys_total: int
    batches: int
    batch_size: int
    staleness: float
    waited: float
    pauses: int
    elapsed: float

    @property
    def fraction(self) -> float:
        """Share of the key ranges done (0..1)."""
        return self.keys_done / self.keys_total if self.keys_total else 1.0

    def __str__(self) -> str:
        return (f"{self.fraction:6.1%} {self.rows} rows in {self.batches} batches, "
                f"batch {self.batch_size}, lag ≤ {format_duration(self.staleness)}, "
                f"paused {self.pauses}x / {format_duration(self.waited)}")


@dataclass(frozen=True, slots=True)
class BackfillReport:
    """What a finished :func:`backfill` did (times in seconds)."""

    rows: int
    batches: int
    seconds: float
    waited: float
    pauses: int
    max_staleness_seen: float
    longest_batch: float
    final_batch_size: int
    sizes: tuple[int, ...] = field(default=(), repr=False)


Ranges = Iterable[tuple[int, int]] | range


def _normalise(ranges: Ranges) -> list[tuple[int, int]]:
    if isinstance(ranges, range):
        if ranges.step != 1:
            raise ValueError("backfill ranges must be contiguous (step 1)")
        return [(ranges.start, ranges.stop - 1)] if len(ranges) else []
    result = [(int(lo), int(hi)) for lo, hi in ranges]
    for lo, hi in result:
        if hi < lo:
            raise ValueError(f"empty key range {lo}..{hi}")
    return result


Query = str | pgsql.SQL | pgsql.Composed
Connection = psycopg.Connection[Any] | sa.Connection


def _runner(conn: Connection, query: Query) -> Callable[[int, int], int]:
    """A function running one batch ``lo..hi`` and committing it; returns rows touched."""
    if isinstance(conn, sa.Connection):
        if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
            raise MigrationError(
                "backfill commits batch by batch: give it an AUTOCOMMIT connection (inside "
                "a revision: `with op.get_context().autocommit_block(): backfill(op.get_bind()"
                ", ...)`)"
            )
        driver = conn.connection.driver_connection
        text = query if isinstance(query, str) else query.as_string(driver)

        def run_sa(lo: int, hi: int) -> int:
            # AUTOCOMMIT: the statement commits by itself. No conn.commit() here: inside
            # autocommit_block() alembic holds SQLAlchemy's (empty) transaction and commits
            # it at the end of the block; committing it first makes that fail.
            result = conn.exec_driver_sql(text, (lo, hi))
            return max(result.rowcount, 0)

        return run_sa

    def run_pg(lo: int, hi: int) -> int:
        # The statement is the caller's code (like a revision's own SQL); the batch bounds
        # always travel as bind parameters.
        cursor = conn.execute(query, (lo, hi))
        if not conn.autocommit:
            conn.commit()
        return max(cursor.rowcount, 0)

    return run_pg


def backfill(
    conn: Connection,
    sql: Query,
    ranges: Ranges,
    *,
    guard: LagGuard,
    batch_size: int = 1000,
    min_batch_size: int | None = None,
    max_batch_size: int | None = None,
    on_progress: Callable[[BackfillProgress], None] | None = None,
) -> BackfillReport:
    """Run ``sql`` over integer key ranges in committed batches, paced by ``guard``.

    ``sql`` takes two parameters, the first and last key of a batch (inclusive), e.g.
    ``"UPDATE t SET x = f(y) WHERE id BETWEEN %s AND %s"``. ``ranges`` lists inclusive
    ``(first, last)`` pairs (or a ``range``); each is cut into batches of the current size.
    Before every batch ``guard.wait()`` holds the work back while a replica is beyond its
    ``max_lag``; the size then adapts (see :class:`BatchSizer`). Every batch is committed
    (a psycopg connection not in autocommit is committed after each; an SQLAlchemy
    connection must be in AUTOCOMMIT, as inside ``op.get_context().autocommit_block()``).

    Returns a :class:`BackfillReport`; raises :class:`MigrationError` if the guard gives up
    (batches committed so far stay committed: re-running an idempotent statement is safe).
    """
    todo = _normalise(ranges)
    total = sum(hi - lo + 1 for lo, hi in todo)
    sizer = BatchSizer(
        batch_size, minimum=min_batch_size or max(1, batch_size // 16),
        maximum=max_batch_size or batch_size * 16,
    )
    run = _runner(conn, sql)
    clock = guard.clock
    started = clock()
    rows = batches = done = 0
    longest = 0.0
    sizes: list[int] = []
    log.info("migrate.backfill_started", shard=guard.name, keys=total, batch_size=batch_size,
             max_lag=guard.max_lag)
    for lo, hi in todo:
        position = lo
        while position <= hi:
            check = guard.wait()
            sizer = sizer.after(check.lag.worst, guard.max_lag, paused=check.waited > 0)
            last = min(hi, position + sizer.size - 1)
            began = clock()
            rows += run(position, last)
            longest = max(longest, clock() - began)
            batches += 1
            done += last - position + 1
            sizes.append(sizer.size)
            position = last + 1
            progress = BackfillProgress(
                rows=rows, keys_done=done, keys_total=total, batches=batches,
                batch_size=sizer.size, staleness=check.lag.worst, waited=guard.waited,
                pauses=guard.pauses, elapsed=clock() - started,
            )
            log.debug("migrate.backfill_batch", shard=guard.name, first=lo, last=last,
                      rows=rows, batch_size=sizer.size, staleness=round(check.lag.worst, 4))
            if on_progress is not None:
                on_progress(progress)
    report = BackfillReport(
        rows=rows, batches=batches, seconds=clock() - started, waited=guard.waited,
        pauses=guard.pauses, max_staleness_seen=guard.max_staleness_seen,
        longest_batch=longest, final_batch_size=sizer.size, sizes=tuple(sizes),
    )
    log.info("migrate.backfill_done", shard=guard.name, rows=rows, batches=batches,
             seconds=round(report.seconds, 3), waited=round(report.waited, 3),
             pauses=report.pauses, max_staleness_seen=round(report.max_staleness_seen, 4))
    return report
