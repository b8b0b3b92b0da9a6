"""Rolling migrations on a real 3-shard cluster: lag-gated, stop at the first failure,
resumable, canary; status, plan and the CLI.

Every test gets its own 3 x 1 cluster (about half a second to start) and its own copy of
``migrations/`` with an extra revision (``EXTRA``, revising the repository's head), so nothing
here touches the session cluster or the repository's revisions, and nothing here needs
changing when the repository gains a revision.
"""

from __future__ import annotations

import io
import re
import shutil
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner, Result
from rich.console import Console
from structlog.testing import capture_logs

import propstore.migrate
from propstore import MigrationError, Topology
from propstore.cli import main
from propstore.cli._live import LiveRollout
from propstore.cli._migrate import _show
from propstore.migrate import (
    MigrationEvent,
    RollingMigration,
    current_revision,
    downgrade,
    head_revision,
    plan,
    shard_status,
    upgrade,
)
from propstore.migrate._alembic import script_directory
from propstore.sandbox import LocalCluster

#: The repository's revisions, oldest first, and its head.
REPOSITORY = [r.revision for r in reversed(list(script_directory().walk_revisions()))]
HEAD = REPOSITORY[-1]
#: The test's own revision on top of the head.
EXTRA = "nick"

#: A revision that fails on any shard whose primary has a table named ``fail_here``.
REVISION_EXTRA = '''
    """Add user_properties.nickname (fails where table fail_here exists).

    Revision ID: {extra}
    Revises: {head}
    """
    import sqlalchemy as sa
    from alembic import op

    revision = "{extra}"
    down_revision = "{head}"
    branch_labels = None
    depends_on = None


    def upgrade() -> None:
        if not op.get_context().as_sql:  # offline (--sql) rendering has no data to read
            marked = op.get_bind().execute(
                sa.text("SELECT to_regclass('fail_here') IS NOT NULL"))
            if marked.scalar():
                raise RuntimeError("marker table fail_here found on this shard")
        op.add_column("user_properties", sa.Column("nickname", sa.Text()))


    def downgrade() -> None:
        op.drop_column("user_properties", "nickname")
'''


@pytest.fixture
def cluster3(cluster_factory: Callable[..., LocalCluster]) -> LocalCluster:
    """A private 3-shard cluster, one replica per shard."""
    return cluster_factory(shards=3, replicas=1)


@pytest.fixture
def topology3(cluster3: LocalCluster) -> Topology:
    """Its topology."""
    assert cluster3.config_path is not None
    return Topology.load(cluster3.config_path)


@pytest.fixture
def scripts(tmp_path: Path) -> Path:
    """A throwaway copy of propstore's migrations plus revision ``EXTRA``."""
    folder = tmp_path / "migrations"
    shutil.copytree(propstore.migrate.script_location(), folder,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "versions" / f"{EXTRA}_nickname.py").write_text(
        textwrap.dedent(REVISION_EXTRA).format(extra=EXTRA, head=HEAD))
    return folder


def cli(cluster: LocalCluster, scripts: Path, *args: str, input: str | None = None) -> Result:
    """Run ``propstore --config ... migrate --script-location ... ARGS``."""
    return CliRunner().invoke(
        main, ["--config", str(cluster.config_path), "migrate", "--script-location",
               str(scripts), *args], input=input,
    )


def revisions(cluster: LocalCluster) -> list[str | None]:
    """Every shard primary's alembic revision, in shard order."""
    return [current_revision(shard.primary.dsn) for shard in cluster.shards]


def to_head(cluster: LocalCluster) -> None:
    """Every shard at the repository's head, replicas caught up."""
    for shard in cluster.shards:
        upgrade(shard.primary.dsn, HEAD)
    cluster.wait_caught_up()


def lag_shard1(cluster: LocalCluster) -> None:
    """Pause shard1's replica and write on its primary, so the replica falls behind."""
    shard = cluster.shards[1]
    shard.replicas[0].pause_replay()
    shard.primary.execute(
        "INSERT INTO user_properties (tenant_id, user_id, bucket) VALUES ('t', 'u', 0)")


def test_up_brings_every_shard_to_head_and_a_second_up_says_nothing_to_do(
    cluster3: LocalCluster, scripts: Path
) -> None:
    first = cli(cluster3, scripts, "up")
    assert first.exit_code == 0, first.output
    assert revisions(cluster3) == [EXTRA] * 3
    assert f"Every shard is at {EXTRA}" in first.output

    status = cli(cluster3, scripts, "status")
    assert status.exit_code == 0, status.output
    for shard in ("shard0", "shard1", "shard2"):
        assert f"{shard}: at {EXTRA} (head), primary WAL at " in status.output
        assert f"{shard}-replica1 up, staleness ≤" in status.output

    second = cli(cluster3, scripts, "up")
    assert second.exit_code == 0, second.output
    assert f"Nothing to do: every shard is at {EXTRA}" in second.output
    assert second.output.count("already at target") == 3


def test_every_replica_has_replayed_a_shard_before_the_next_one_starts(
    cluster3: LocalCluster, topology3: Topology, scripts: Path
) -> None:
    seen: list[MigrationEvent] = []
    report = RollingMigration(topology3, script_location=scripts, on_event=seen.append).run()
    assert report.ok and report.migrated == ("shard0", "shard1", "shard2")
    order = [(e.kind, e.shard) for e in seen
             if e.kind in ("caught_up", "shard_started", "migrating")]
    assert order == [(kind, shard) for shard in ("shard0", "shard1", "shard2")
                     for kind in ("shard_started", "migrating", "caught_up")]
    for shard in cluster3.shards:  # the catch-up really waited for the migration's WAL
        assert shard.replicas[0].scalar(
            "SELECT count(*) FROM information_schema.columns WHERE column_name = 'nickname'"
        ) == 1


def test_preflight_waits_for_a_paused_replica_and_proceeds_once_replay_resumes(
    cluster3: LocalCluster, topology3: Topology, scripts: Path
) -> None:
    to_head(cluster3)
    lag_shard1(cluster3)
    waiting = threading.Event()
    seen: list[MigrationEvent] = []

    def on_event(event: MigrationEvent) -> None:
        seen.append(event)
        if event.kind == "preflight_waiting" and event.shard == "shard1":
            waiting.set()

    def resume_when_waiting() -> None:
        assert waiting.wait(30)
        cluster3.shards[1].replicas[0].resume_replay()

    resumer = threading.Thread(target=resume_when_waiting)
    resumer.start()
    with capture_logs() as logs:
        report = RollingMigration(topology3, max_lag=1.0, wait_timeout=30,
                                  script_location=scripts, on_event=on_event).run()
    resumer.join()
    assert report.ok, report
    assert revisions(cluster3) == [EXTRA] * 3
    kinds = [(e.kind, e.shard) for e in seen]
    assert kinds.index(("shard_done", "shard0")) < kinds.index(("preflight_waiting", "shard1"))
    assert kinds.index(("preflight_waiting", "shard1")) < kinds.index(
        ("preflight_passed", "shard1"))
    first_wait = next(e for e in seen if e.kind == "preflight_waiting")
    assert first_wait.remaining is not None and 0 < first_wait.remaining <= 30
    assert "paused" in first_wait.message
    assert not [e for e in seen if e.kind == "preflight_waiting" and e.shard != "shard1"]
    assert any(entry["event"] == "migrate.preflight_waiting" for entry in logs)


def test_short_wait_timeout_stops_with_a_report_and_leaves_later_shards_untouched(
    cluster3: LocalCluster, scripts: Path
) -> None:
    to_head(cluster3)
    lag_shard1(cluster3)
    result = cli(cluster3, scripts, "up", "--max-lag", "1s", "--wait-timeout", "1s")
    assert result.exit_code == 1, result.output
    assert revisions(cluster3) == [EXTRA, HEAD, HEAD]
    assert "Stopped: shard1 failed at pre-flight" in result.output
    assert "shard1-replica1 paused" in result.output
    assert f"shard0           done: {HEAD} -> {EXTRA}" in result.output
    assert "shard1           failed at pre-flight: gave up after 1.00s" in result.output
    assert "shard2           not started" in result.output
    assert "shard1 pre-flight: waiting:" in result.output  # the countdown lines


def test_revision_failing_on_shard_2_of_3_leaves_shard_3_untouched_and_a_rerun_completes(
    cluster3: LocalCluster, topology3: Topology, scripts: Path
) -> None:
    cluster3.shards[1].primary.execute("CREATE TABLE fail_here ()")
    report = RollingMigration(topology3, script_location=scripts).run()
    assert not report.ok
    assert [r.outcome for r in report.results] == ["done", "failed", "not started"]
    failed = report.result("shard1")
    assert failed.step == "migrate" and "marker table fail_here" in (failed.error or "")
    # shard1's transaction rolled back as a whole (every revision of the run); shard2 was
    # never touched.
    assert revisions(cluster3) == [EXTRA, None, None]

    cluster3.shards[1].primary.execute("DROP TABLE fail_here")
    rerun = RollingMigration(topology3, script_location=scripts).run()
    assert rerun.ok
    assert [r.outcome for r in rerun.results] == ["already at target", "done", "done"]
    assert revisions(cluster3) == [EXTRA] * 3


def test_unreachable_primary_fails_its_pre_flight_and_later_shards_are_not_started(
    cluster3: LocalCluster, topology3: Topology, scripts: Path
) -> None:
    cluster3.shards[1].primary.stop()
    report = RollingMigration(topology3, wait_timeout=0.5, script_location=scripts).run()
    assert [r.outcome for r in report.results] == ["done", "failed", "not started"]
    failed = report.result("shard1")
    assert failed.step == "pre-flight" and "primary shard1-primary" in (failed.error or "")
    assert current_revision(cluster3.shards[2].primary.dsn) is None


def test_a_database_at_a_revision_the_scripts_do_not_know_fails_without_waiting(
    cluster3: LocalCluster, topology3: Topology, scripts: Path
) -> None:
    upgrade(cluster3.shards[0].primary.dsn, HEAD)
    cluster3.shards[0].primary.execute("UPDATE alembic_version SET version_num = 'f00d'")
    report = RollingMigration(topology3, wait_timeout=30, script_location=scripts).run()
    failed = report.result("shard0")
    assert (failed.outcome, failed.step) == ("failed", "plan")
    assert "'f00d' is not in the script directory" in (failed.error or "")
    assert failed.seconds < 5
    assert revisions(cluster3)[1:] == [None, None]


def test_canary_1_migrates_exactly_one_shard_and_the_next_run_the_next(
    cluster3: LocalCluster, scripts: Path
) -> None:
    first = cli(cluster3, scripts, "up", "--canary", "1", "--yes")
    assert first.exit_code == 0, first.output
    assert revisions(cluster3) == [EXTRA, None, None]
    assert "canary: 1 shard(s) migrated" in first.output
    second = cli(cluster3, scripts, "up", "--canary", "1")
    assert second.exit_code == 0, second.output
    assert revisions(cluster3) == [EXTRA, EXTRA, None]


def test_shard_option_migrates_only_the_named_shards(
    cluster3: LocalCluster, scripts: Path
) -> None:
    result = cli(cluster3, scripts, "up", "--shard", "shard2")
    assert result.exit_code == 0, result.output
    assert revisions(cluster3) == [None, None, EXTRA]
    assert "shard0           not selected" in result.output
    unknown = cli(cluster3, scripts, "up", "--shard", "nope")
    assert unknown.exit_code == 2 and "no shard named nope" in unknown.output


def test_plan_lists_each_shards_revisions_and_offline_sql(
    cluster3: LocalCluster, topology3: Topology, scripts: Path
) -> None:
    for shard in cluster3.shards[:1]:
        upgrade(shard.primary.dsn, HEAD)
    plans = plan(topology3, script_location=scripts)
    assert [[s.revision for s in p.steps] for p in plans] == [
        [EXTRA], [*REPOSITORY, EXTRA], [*REPOSITORY, EXTRA]]
    result = cli(cluster3, scripts, "plan", "--sql")
    assert result.exit_code == 0, result.output
    assert f"shard0: upgrade {HEAD} -> {EXTRA}" in result.output
    assert "ALTER TABLE user_properties ADD COLUMN nickname TEXT" in result.output
    assert result.output.count("CREATE TABLE user_properties") == 2  # shard1, shard2 only


def test_down_asks_for_confirmation_unless_yes(cluster3: LocalCluster, scripts: Path) -> None:
    assert cli(cluster3, scripts, "up").exit_code == 0
    refused = cli(cluster3, scripts, "down", HEAD, input="n\n")
    assert refused.exit_code == 1 and "Aborted" in refused.output
    assert revisions(cluster3) == [EXTRA] * 3
    done = cli(cluster3, scripts, "down", HEAD, "--yes")
    assert done.exit_code == 0, done.output
    assert revisions(cluster3) == [HEAD] * 3
    again = cli(cluster3, scripts, "down", HEAD, "--yes")
    assert "Nothing to do" in again.output


def test_status_reports_revisions_and_a_lagging_replica(
    cluster3: LocalCluster, topology3: Topology, scripts: Path
) -> None:
    to_head(cluster3)
    lag_shard1(cluster3)
    rows = shard_status(topology3, script_location=scripts)
    assert [(r.current, r.head, r.at_head) for r in rows] == [(HEAD, EXTRA, False)] * 3
    assert rows[1].primary_lsn is not None
    lagging = rows[1].replicas[0]
    assert lagging.state == "paused" and (lagging.bytes_behind or 0) > 0
    assert rows[0].replicas[0].up and rows[0].replicas[0].staleness < 1.0


def test_unknown_revision_is_refused_before_any_shard_is_touched(
    topology3: Topology, scripts: Path, cluster3: LocalCluster
) -> None:
    with pytest.raises(MigrationError, match="unknown revision"):
        RollingMigration(topology3, "9999", script_location=scripts).run()
    assert revisions(cluster3) == [None] * 3


def test_repository_head_is_still_reported_without_a_script_location() -> None:
    # The head is the newest numbered revision file of the package's migrations.
    versions = Path(propstore.migrate.script_location()) / "versions"
    newest = max(m.group(1) for f in versions.glob("*.py")
                 if (m := re.match(r"(\d{4})_", f.name)))
    assert head_revision() == newest == HEAD


def _batch_function(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_get_functiondef('propstore_read_many(text, text[])'::regprocedure)"
        ).fetchone()
    assert row is not None
    return str(row[0])


def _batch_refusal(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:  # a transaction, so the isolation level holds
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        with pytest.raises(psycopg.errors.InvalidTransactionState) as refused:
            conn.execute("SELECT * FROM propstore_read_many('t', ARRAY['u'])")
    return str(refused.value)


def test_0003_names_the_batch_function_in_its_refusal_and_its_downgrade_restores_0002(
        cluster_factory: Callable[..., LocalCluster]) -> None:
    dsn = cluster_factory(shards=1, replicas=0).shards[0].primary.dsn
    upgrade(dsn, "0002")
    at_0002 = _batch_function(dsn)
    assert _batch_refusal(dsn).startswith("propstore_read needs READ COMMITTED")
    upgrade(dsn, "0003")
    assert _batch_refusal(dsn).startswith("propstore_read_many needs READ COMMITTED")
    downgrade(dsn, "0002")
    assert _batch_function(dsn) == at_0002


def test_terminal_display_is_a_live_table_and_piped_output_is_plain_lines() -> None:
    events = [
        MigrationEvent("preflight_waiting", "shard1", "pre-flight", "waiting: replica paused",
                       remaining=4.2),
        MigrationEvent("shard_done", "shard1", None, "0002 -> 0003 in 1.00s"),
    ]
    screen = io.StringIO()
    display = LiveRollout(Console(file=screen, force_terminal=True, width=120),
                          ("shard", "step", "status", "replica lag"))
    with display.running():
        for event in events:
            _show(display)(event)
    assert display.rows["shard1"][0] == "done"
    assert "shard1" in screen.getvalue() and "step" in screen.getvalue()

    runner = CliRunner()
    with runner.isolation() as (out, _err, _input):
        plain = LiveRollout(Console(), ("shard", "step", "status", "replica lag"))
        with plain.running():
            for event in events:
                _show(plain)(event)
        lines = out.getvalue().decode().splitlines()
    assert lines == ["shard1 pre-flight: waiting: replica paused [4.20s left]",
                     "shard1: 0002 -> 0003 in 1.00s"]


def test_migrate_public_api_is_pinned() -> None:
    assert set(propstore.migrate.__all__) == {
        "PRIMARY_DSN_ATTRIBUTE", "REPLICA_DSNS_ATTRIBUTE", "SHARD_ATTRIBUTE",
        "BackfillProgress", "BackfillReport", "BatchSizer", "BucketMove", "ConfigDiff",
        "GuardCheck", "LagGuard", "MigrationEvent", "MigrationReport", "NodeChange",
        "PlannedRevision", "ReplicaLag", "RollingMigration", "SettingChange", "ShardLag",
        "ShardMigrationStatus", "ShardPlan", "ShardProbe", "ShardResult", "UnsafeChange",
        "backfill", "current_revision", "diff_topologies", "downgrade", "head_revision",
        "plan", "script_location", "shard_status", "upgrade",
        # configuration rollouts (issue 13)
        "CommandController", "ConfigChange", "ConfigEvent", "ConfigJournal", "ConfigPlan",
        "ConfigReport", "ConfigRollout", "ConfigStep", "NodeController", "NodeSetting",
        "Regression", "SettingValueError", "StepResult", "plan_config_change",
    }
    for name in propstore.migrate.__all__:
        member = getattr(propstore.migrate, name)
        assert isinstance(member, str) or member.__doc__, f"{name} has no docstring"
