"""Lag-throttled batch work: the guard pauses while a replica is beyond ``max_lag``, the
batch size adapts, and a 200k-row backfill keeps a delayed replica within its budget.

The guard's logic is tested by driving a fake clock; the backfills run against real
private clusters (one shard, one replica).
"""

from __future__ import annotations

import math
import shutil
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
import structlog
from structlog.testing import capture_logs

import propstore.migrate
from propstore import LSN, MigrationError, Topology
from propstore.migrate import (
    BackfillProgress,
    BatchSizer,
    LagGuard,
    ReplicaLag,
    RollingMigration,
    ShardLag,
    ShardProbe,
    backfill,
    upgrade,
)
from propstore.migrate._alembic import engine_for
from propstore.sandbox import LocalCluster
from tests import claims

log = structlog.get_logger("tests.backfill")

ROWS = claims.BACKFILL_ROWS
MAX_LAG = claims.BACKFILL_MAX_LAG


# -- the guard and the batch size, with time driven by the test -------------------------


class FakeTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class ScriptedLag:
    """A lag source replaying a list of staleness values (seconds; None = replica down)."""

    def __init__(self, values: list[float | None], time_: FakeTime) -> None:
        self.values = values
        self.time = time_
        self.closed = False

    def sample(self) -> ShardLag:
        value = self.values.pop(0) if len(self.values) > 1 else self.values[0]
        replica = ReplicaLag(
            "s-replica1", "down" if value is None else "up", LSN(0), 0,
            math.inf if value is None else value, None if value is not None else "refused",
        )
        return ShardLag("s", self.time.now, "s-primary", LSN(0), None, (replica,))

    def close(self) -> None:
        self.closed = True


def test_guard_sleeps_while_a_replica_is_beyond_max_lag_and_resumes_below_it() -> None:
    fake = FakeTime()
    source = ScriptedLag([0.1, 1.5, 2.0, None, 0.8, 0.2], fake)
    with LagGuard(max_lag=1.0, check_interval=0.25, source=source, sleep=fake.sleep,
                  clock=fake.clock, name="s") as guard:
        assert guard.wait().waited == 0.0
        check = guard.wait()  # 1.5, 2.0, down, then 0.8: three sleeps
        assert check.waited == pytest.approx(0.75) and check.lag.worst == 0.8
        assert fake.sleeps == [0.25, 0.25, 0.25]
        assert guard.pauses == 1 and guard.max_staleness_seen == 2.0
    assert source.closed


def test_guard_gives_up_after_max_wait_naming_the_replica() -> None:
    fake = FakeTime()
    guard = LagGuard(max_lag=1.0, check_interval=0.5, max_wait=2.0,
                     source=ScriptedLag([5.0], fake), sleep=fake.sleep, clock=fake.clock,
                     name="s")
    with pytest.raises(MigrationError, match=r"shard s: .*s-replica1 up, staleness ≤ 5"):
        guard.wait()
    assert fake.now == pytest.approx(2.0)


def test_batch_size_halves_when_lag_passes_half_the_budget_and_grows_by_steps_when_low(
) -> None:
    sizer = BatchSizer(1000, minimum=100, maximum=1600)
    assert sizer.step == 250
    assert sizer.after(0.1, 1.0, paused=False).size == 1250        # < max_lag / 4: grow
    assert sizer.after(0.4, 1.0, paused=False).size == 1000        # in between: hold
    assert sizer.after(0.6, 1.0, paused=False).size == 500         # > max_lag / 2: halve
    assert sizer.after(0.0, 1.0, paused=True).size == 500          # a pause: halve
    small = BatchSizer(150, minimum=100, maximum=1600)
    assert small.after(0.9, 1.0, paused=False).size == 100         # never below minimum
    assert BatchSizer(1500, maximum=1600).after(0.0, 1.0, False).size == 1600
    with pytest.raises(ValueError):
        BatchSizer(10, minimum=20)


# -- real backfills ----------------------------------------------------------------------


@pytest.fixture
def shard(cluster_factory: Callable[..., LocalCluster]) -> LocalCluster:
    """A private one-shard cluster with one replica."""
    return cluster_factory(shards=1, replicas=1)


class StalenessObserver:
    """Measures the replica's proven staleness every ``interval`` seconds, independently of
    the guard (its own probe and LSN history), and keeps the maximum."""

    def __init__(self, cluster: LocalCluster, interval: float = 0.02) -> None:
        assert cluster.config_path is not None
        self.probe = ShardProbe(Topology.load(cluster.config_path).shards[0])
        self.interval = interval
        self.maximum = 0.0
        self.unproven = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="staleness-observer")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            worst = self.probe.sample().worst
            if math.isinf(worst):
                self.unproven += 1
            else:
                self.maximum = max(self.maximum, worst)

    def __enter__(self) -> StalenessObserver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.probe.close()


@pytest.fixture
def demo_table(shard: LocalCluster) -> Iterator[str]:
    """``backfill_demo(id, v)`` with ROWS rows on the primary, replicated."""
    primary = shard.shards[0].primary
    primary.execute("CREATE TABLE backfill_demo (id bigint PRIMARY KEY, v int NOT NULL "
                    "DEFAULT 0)")
    primary.execute("INSERT INTO backfill_demo (id) SELECT g FROM generate_series(1, %s) g",
                    (ROWS,))
    shard.wait_caught_up()
    yield "backfill_demo"


def test_backfill_of_200k_rows_pauses_for_a_delayed_replica_and_keeps_it_within_budget(
    shard: LocalCluster, demo_table: str
) -> None:
    primary, replica = shard.shards[0].primary, shard.shards[0].replicas[0]
    events: dict[str, int] = {"delay_set_at": 0, "delay_cleared_at": 0}
    guard = LagGuard(primary.dsn, [replica.dsn], max_lag=MAX_LAG, check_interval=0.05,
                     name="shard0")

    def on_progress(progress: BackfillProgress) -> None:
        # Early on the replica starts applying every commit MAX_LAG late (a replica that
        # applies D late is D stale whatever the writer does, so D = MAX_LAG is the most a
        # budget of MAX_LAG can tolerate; the guard must add no more than one batch). Once
        # the guard has paused for it twice, the delay goes away again.
        if not events["delay_set_at"] and progress.rows >= ROWS // 10:
            replica.set_apply_delay(MAX_LAG)
            events["delay_set_at"] = progress.rows
        elif events["delay_set_at"] and not events["delay_cleared_at"] and (
            progress.pauses >= 2 or progress.rows >= ROWS * 3 // 4
        ):
            replica.clear_apply_delay()
            events["delay_cleared_at"] = progress.rows

    with psycopg.connect(primary.dsn, autocommit=True) as conn, guard, \
            StalenessObserver(shard) as observer:
        report = backfill(conn, "UPDATE backfill_demo SET v = 1 WHERE id BETWEEN %s AND %s",
                          [(1, ROWS)], guard=guard, batch_size=250, max_batch_size=500,
                          on_progress=on_progress)
    allowed = MAX_LAG + report.longest_batch + claims.BACKFILL_ALLOWANCE
    log.info("backfill_measured", rows=report.rows, seconds=round(report.seconds, 2),
             pauses=report.pauses, waited=round(report.waited, 2),
             max_staleness_observed=round(observer.maximum, 3),
             max_staleness_guard=round(report.max_staleness_seen, 3),
             longest_batch=round(report.longest_batch, 3), allowed=round(allowed, 3),
             batch_sizes=(min(report.sizes), max(report.sizes)), **events)
    print(f"\nbackfill: {report.rows} rows in {report.seconds:.1f}s, {report.pauses} pauses "
          f"({report.waited:.1f}s), max staleness observed {observer.maximum:.3f}s, "
          f"allowed {allowed:.3f}s, longest batch {report.longest_batch:.3f}s")

    assert report.rows == ROWS
    assert primary.scalar("SELECT count(*) FROM backfill_demo WHERE v = 1") == ROWS
    assert events["delay_set_at"] and events["delay_cleared_at"]
    assert report.pauses >= 1 and report.waited > 0
    assert observer.unproven == 0
    assert observer.maximum <= allowed
    sizes = report.sizes
    assert min(sizes) < 250 and sizes[-1] > min(sizes)  # shrank under lag, grew back
    shard.wait_caught_up()
    assert replica.scalar("SELECT count(*) FROM backfill_demo WHERE v = 1") == ROWS


def test_backfill_refuses_a_sqlalchemy_connection_inside_a_transaction(
    shard: LocalCluster
) -> None:
    dsn = shard.shards[0].primary.dsn
    with LagGuard(dsn, [], name="shard0") as guard, engine_for(dsn) as engine, \
            engine.connect() as conn, pytest.raises(MigrationError, match="AUTOCOMMIT"):
        backfill(conn, "SELECT %s, %s", [(1, 2)], guard=guard)


REVISION_BACKFILL = '''
    """Add user_properties.score and backfill it from bucket, lag-guarded.

    Revision ID: score
    Revises: HEAD
    """
    import sqlalchemy as sa
    from alembic import op

    from propstore.migrate import LagGuard, backfill

    revision = "score"
    down_revision = "HEAD"
    branch_labels = None
    depends_on = None


    def upgrade() -> None:
        op.add_column("user_properties", sa.Column("score", sa.Integer()))
        # Batches must commit as they go, outside the migration's transaction.
        with op.get_context().autocommit_block(), LagGuard.from_alembic(max_lag=1.0) as guard:
            backfill(op.get_bind(),
                     "UPDATE user_properties SET score = bucket WHERE bucket BETWEEN %s AND %s",
                     [(0, 4095)], guard=guard, batch_size=256)


    def downgrade() -> None:
        op.drop_column("user_properties", "score")
'''


def test_backfill_inside_a_revision_finds_the_shards_replicas_through_alembic(
    shard: LocalCluster, tmp_path: Path
) -> None:
    scripts = tmp_path / "migrations"
    shutil.copytree(propstore.migrate.script_location(), scripts,
                    ignore=shutil.ignore_patterns("__pycache__"))
    # On top of the repository's head, whatever it is (HEAD in the text is replaced).
    head = propstore.migrate.head_revision()
    assert head is not None
    (scripts / "versions" / "score.py").write_text(
        textwrap.dedent(REVISION_BACKFILL).replace("HEAD", head))
    primary = shard.shards[0].primary
    upgrade(primary.dsn, head)
    primary.execute(
        "INSERT INTO user_properties (tenant_id, user_id, bucket) "
        "SELECT 't', 'u' || g, g % 4096 FROM generate_series(1, 5000) g")
    assert shard.config_path is not None
    with capture_logs() as logs:
        report = RollingMigration(Topology.load(shard.config_path),
                                  script_location=scripts).run()
    assert report.ok, report
    assert primary.scalar("SELECT count(*) FROM user_properties WHERE score = bucket") == 5000
    done = [e for e in logs if e["event"] == "migrate.backfill_done"]
    assert len(done) == 1 and done[0]["shard"] == "shard0" and done[0]["rows"] == 5000
    assert shard.shards[0].replicas[0].scalar(
        "SELECT count(*) FROM user_properties WHERE score = bucket") == 5000


def test_guard_outside_a_migration_run_says_how_to_get_the_dsns() -> None:
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    engine = sa.create_engine("sqlite://")
    with engine.connect() as conn, Operations.context(MigrationContext.configure(conn)), \
            pytest.raises(MigrationError, match=r"config\.attributes"):
        LagGuard.from_alembic(max_lag=1.0)


def test_guard_measures_a_real_replica_within_budget(shard: LocalCluster) -> None:
    primary, replica = shard.shards[0].primary, shard.shards[0].replicas[0]
    with LagGuard(primary.dsn, [replica.dsn], max_lag=MAX_LAG) as guard:
        started = time.monotonic()
        check = guard.wait()
    assert check.waited == 0.0 and check.lag.ready(MAX_LAG)
    assert check.lag.worst <= time.monotonic() - started
