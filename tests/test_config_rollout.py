"""Rolling PostgreSQL configuration changes on real clusters (issue 13): validated before
anything is touched, ordered for the hot-standby rule, gated on lag, baked, reverted on a
regression, resumable; and the monitor telling the two kinds of pause apart.

Destructive runs get private clusters (``cluster_factory``); only the bad-input test uses the
shared one (it proves nothing was written).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from propstore import ConfigError, MigrationError, PropertyStore, Topology
from propstore.migrate import (
    CommandController,
    ConfigChange,
    ConfigEvent,
    ConfigJournal,
    ConfigPlan,
    ConfigRollout,
    SettingValueError,
    plan_config_change,
    upgrade,
)
from propstore.sandbox import LocalCluster, LocalNodeController
from propstore.sandbox._node import LocalNode
from tests._workload import Workload
from tests.test_store import wait_for

pytestmark = pytest.mark.slow


def topology_of(cluster: LocalCluster) -> Topology:
    assert cluster.config_path is not None
    return Topology.load(cluster.config_path)


def setting(node: LocalNode, name: str) -> str:
    return str(node.scalar("SELECT setting FROM pg_settings WHERE name = %s", (name,)))


def auto_conf(node: LocalNode) -> list[tuple[Any, ...]]:
    """What ALTER SYSTEM has written on ``node`` (its postgresql.auto.conf, as parsed)."""
    return node.execute("SELECT name, setting FROM pg_file_settings"
                        " WHERE sourcefile LIKE '%%postgresql.auto.conf' ORDER BY seqno")


@contextmanager
def pause_watch(nodes: list[LocalNode]) -> Iterator[list[str]]:
    """Sample every node's ``pg_get_wal_replay_pause_state()`` on a thread; yields the list
    of ``node: state`` seen other than ``not paused`` (a thread that dies fails the test)."""
    seen: list[str] = []
    samples = [0]
    stop = threading.Event()
    failure: list[BaseException] = []

    def watch() -> None:
        try:
            while not stop.is_set():
                for node in nodes:
                    try:
                        state = node.scalar("SELECT pg_get_wal_replay_pause_state()")
                    except Exception:  # a restarting node does not answer: not a pause
                        continue
                    samples[0] += 1
                    if state != "not paused":
                        seen.append(f"{node.name}: {state}")
                stop.wait(0.05)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(10)
        assert not failure, failure
        assert samples[0] > 0, "the pause watcher sampled nothing"


@contextmanager
def writing(node: LocalNode) -> Iterator[None]:
    """Commit a row every 20 ms on ``node`` (lag only grows while the primary writes);
    reconnects while the node restarts. Fails the test if it never committed."""
    stop = threading.Event()
    errors: list[BaseException] = []
    commits = [0]

    def write() -> None:
        try:
            node.execute("CREATE TABLE IF NOT EXISTS ticks (at timestamptz)")
            while not stop.is_set():
                try:
                    with node.connect() as conn:
                        while not stop.is_set():
                            conn.execute("INSERT INTO ticks VALUES (now())")
                            commits[0] += 1
                            stop.wait(0.02)
                except psycopg.OperationalError:  # the node restarts: connect again
                    stop.wait(0.05)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
        assert not errors, errors
        assert commits[0] > 0


# -- plan: bad input is refused before any node is touched -------------------------------

@pytest.mark.parametrize(("change", "error", "words"), [
    (ConfigChange({"max_conections": "200"}), SettingValueError,
     ["max_conections", "unknown setting", "max_connections"]),
    (ConfigChange({"max_connections": "999999999"}), SettingValueError,
     ["max_connections", "out of range", "allowed: 1 to 262143"]),
    (ConfigChange({"max_connections": "lots"}), SettingValueError,
     ["max_connections", "is not an integer"]),
    (ConfigChange({"wal_compression": "maybe"}), SettingValueError,
     ["wal_compression", "not allowed", "allowed: pglz"]),
    (ConfigChange({"statement_timeout": "5 parsecs"}), SettingValueError,
     ["statement_timeout", "not"]),
    (ConfigChange({"synchronous_commit": "off"}), SettingValueError,
     ["synchronous_commit", "refused", "flushed"]),
    (ConfigChange({"block_size": "16384"}), SettingValueError, ["block_size", "read-only"]),
    (ConfigChange({"work_mem": "8MB"}, nodes=("shard0-replica9",)), ConfigError,
     ["no node named 'shard0-replica9'", "shard0-replica1"]),
    (ConfigChange({"work_mem": "8MB"}, shards=("shard7",)), ConfigError,
     ["no shard named 'shard7'"]),
    (ConfigChange({"max_connections": "150"}), MigrationError,
     ["max_connections", "restart", "no node controller"]),
])
def test_bad_input_is_refused_before_any_node_is_touched(
    cluster: LocalCluster, change: ConfigChange, error: type[Exception], words: list[str]
) -> None:
    topology = topology_of(cluster)
    before = {node.name: auto_conf(node) for node in cluster.nodes}
    with pytest.raises(error) as refused:
        plan_config_change(topology, change)
    message = str(refused.value)
    for word in words:
        assert word in message, message
    if isinstance(refused.value, SettingValueError) and refused.value.node is not None:
        assert refused.value.node in message  # names the node whose pg_settings refused it
    assert {node.name: auto_conf(node) for node in cluster.nodes} == before


def test_plan_orders_replicas_first_when_raising_and_primary_first_when_lowering(
    cluster: LocalCluster
) -> None:
    topology = topology_of(cluster)
    current = int(setting(cluster.shards[0].primary, "max_connections"))
    raising = plan_config_change(topology, ConfigChange(
        {"max_connections": str(current + 50)}, shards=("shard0",)), can_restart=True)
    assert [s.node.name for s in raising.steps] == [
        "shard0-replica1", "shard0-replica2", "shard0-primary"]
    assert raising.notes == () and all(s.effect == "restart" for s in raising.steps)
    lowering = plan_config_change(topology, ConfigChange(
        {"max_connections": str(current - 10)}), can_restart=True)
    assert [s.node.name for s in lowering.steps] == [
        "shard0-primary", "shard0-replica1", "shard0-replica2",
        "shard1-primary", "shard1-replica1", "shard1-replica2"]
    assert any("reordered, primary first" in note for note in lowering.notes)
    with pytest.raises(MigrationError, match=r"would pause its recovery.*shard0-replica1"):
        plan_config_change(topology, ConfigChange(
            {"max_connections": str(current + 50)}, role="primaries"), can_restart=True)


def test_command_controller_fills_placeholders_per_word_and_reports_failures(
    cluster: LocalCluster
) -> None:
    node = topology_of(cluster).shards[0].replicas[0]
    controller = CommandController("sh -c 'echo restarting {node} >&2; exit 3' {host}")
    assert controller.command(node)[-1] == "127.0.0.1"
    with pytest.raises(MigrationError, match="exited 3: restarting shard0-replica1"):
        controller.restart(node, 10)
    with pytest.raises(ConfigError, match="unknown placeholder"):
        CommandController("ssh {hostname} restart")


# -- the hot-standby rule, both ways, and what the monitor says --------------------------

def test_raising_max_connections_through_the_tool_never_pauses_a_standby_but_by_hand_it_does(
    cluster_factory: Callable[..., LocalCluster]
) -> None:
    private = cluster_factory(shards=1, replicas=1)
    for shard in private.shards:
        upgrade(shard.primary.dsn)
    topology = topology_of(private)
    primary, replica = private.shards[0].primary, private.shards[0].replicas[0]
    controller = LocalNodeController(private)
    plan = plan_config_change(topology, ConfigChange({"max_connections": "150"}),
                              can_restart=True)
    with pause_watch([replica]) as pauses, writing(primary):
        report = ConfigRollout(topology, plan, controller, max_lag=2.0, bake=1.0).run()
    assert pauses == []
    assert report.complete, str(report)
    assert controller.restarted == ["shard0-replica1", "shard0-primary"]
    assert setting(primary, "max_connections") == setting(replica, "max_connections") == "150"

    # By hand, primary first: the standby pauses for insufficient settings. Readers keep
    # their budgets meanwhile, and the monitor names the kind of pause.
    users = [f"hs-{i}" for i in range(20)]
    with PropertyStore(topology) as store:
        for user in users:
            store.replace("acme", user, {"seq": 0})
        # Writes are not what this test is about; on a busy machine the by-hand restart
        # may outlast the store's write retry time.
        with Workload(store, users, expect_write_errors=True) as load:
            primary.execute("ALTER SYSTEM SET max_connections = 200")
            primary.restart()
            wait_for(lambda: store.shard_views()[0].nodes[1].state == "paused (settings)",
                     timeout=30)
            assert replica.scalar("SELECT pg_get_wal_replay_pause_state()") == "paused"
            load.wait(1.0)
            report_load = load.stop()
    assert report_load.reads > 0 and report_load.violations == 0, report_load.examples
    # The only replica is paused: short budgets go to the primary, and past its fallback
    # cap the configured policy refuses them (on_stale="error") rather than serve stale;
    # the by-hand restart of the primary ends the reads running on it. Refused, not stale.
    assert set(report_load.errors) <= {"read:StaleReadError", "read:ShardUnavailableError"}, (
        report_load.examples)
    # The fix is a restart with an adequate value; the tool can do it (replica only).
    fix = plan_config_change(topology, ConfigChange({"max_connections": "200"},
                                                    role="replicas"), can_restart=True)
    fixed = ConfigRollout(topology, fix, controller, max_lag=5.0, bake=0.5).run()
    assert fixed.complete, str(fixed)
    assert replica.scalar("SELECT pg_get_wal_replay_pause_state()") == "not paused"


def test_the_monitor_tells_a_requested_pause_from_a_settings_pause(
    cluster_factory: Callable[..., LocalCluster]
) -> None:
    from propstore.migrate import ShardProbe

    private = cluster_factory(shards=1, replicas=1)
    shard = topology_of(private).shards[0]
    primary, replica = private.shards[0].primary, private.shards[0].replicas[0]
    with ShardProbe(shard) as probe:
        replica.pause_replay()
        assert probe.sample().replicas[0].state == "paused"
        replica.resume_replay()
        primary.execute("ALTER SYSTEM SET max_connections = 120")
        primary.restart()
        wait_for(lambda: probe.sample().replicas[0].state == "paused (settings)", timeout=30)
        assert not probe.sample().ready(60.0)  # such a node never passes a gate
        replica.execute("ALTER SYSTEM SET max_connections = 120")
        replica.restart()
        wait_for(lambda: probe.sample().replicas[0].state == "up", timeout=30)
        replica.disconnect_receiver()
        wait_for(lambda: probe.sample().replicas[0].state == "receiver disconnected",
                 timeout=30)


# -- rolling through 2 x 2 under readers -------------------------------------------------

def test_reload_and_restart_changes_roll_through_2x2_under_readers(
    cluster_factory: Callable[..., LocalCluster]
) -> None:
    private = cluster_factory(shards=2, replicas=2)
    for shard in private.shards:
        upgrade(shard.primary.dsn)
    private.wait_caught_up()
    topology = topology_of(private)
    controller = LocalNodeController(private)
    users = [f"roll-{i}" for i in range(40)]
    with PropertyStore(topology) as store:
        for user in users:
            store.replace("acme", user, {"seq": 0})
        with Workload(store, users) as load:
            reload_plan = plan_config_change(
                topology, ConfigChange({"checkpoint_completion_target": "0.8"}))
            reloaded = ConfigRollout(topology, reload_plan, max_lag=2.0, bake=0.5).run()
            during_reload = load.stop()
        # Restart-context: the replicas first (readers must not notice), then the
        # primaries in place.
        change = ConfigChange({"max_connections": "130"}, role="replicas")
        with Workload(store, users) as load:
            plan = plan_config_change(topology, change, can_restart=True)
            replicas = ConfigRollout(topology, plan, controller, max_lag=2.0,
                                     bake=0.5).run()
            during_replicas = load.stop()
        # The primaries restart in place. A read whose primary session the fast shutdown
        # ended, or that meets the primary refusing connections, is retried within
        # primary_deadline on whatever proves it first: a replica once the restarted
        # primary's first poll is a new sample (or once it replayed a token), else the
        # primary. So every budget is served, 0.1 s included.
        retried_before = sum(store.stats.retried.values())
        with Workload(store, users) as load:
            plan = plan_config_change(topology, replace(change, role="primaries"),
                                      can_restart=True)
            primaries = ConfigRollout(topology, plan, controller, max_lag=2.0,
                                      bake=0.5).run()
            during_primaries = load.stop()
        retried = sum(store.stats.retried.values()) - retried_before
    for done in (reloaded, replicas, primaries):
        assert done.complete, str(done)
    for node in private.nodes:
        assert setting(node, "checkpoint_completion_target") == "0.8"
        assert setting(node, "max_connections") == "130"
    downs = {r.node: round(r.unavailable or 0.0, 3)
             for r in (*replicas.results, *primaries.results)}
    runs = (("reload", during_reload), ("replica restarts", during_replicas),
            ("primary restarts", during_primaries))
    for name, report in runs:
        print(f"2x2 {name}: {report.reads} reads ({report.replica_reads} from replicas), "
              f"{report.writes} writes, {dict(report.errors)} errors, {report.violations} "
              f"violations, worst read {report.worst_read * 1000:.0f} ms")
        assert report.reads > 0 and report.replica_reads > 0 and report.writes > 0
        assert report.violations == 0, report.examples
        assert report.error_count == 0, (name, dict(report.errors), report.examples)
    print(f"restart unavailability (s): {downs}; reads served by a retry during the primary "
          f"restarts: {retried}")
    assert retried > 0, "no read met a primary restart: nothing was tested"
    # Writes are retried by the store for write_retry_time, reads within primary_deadline:
    # none failed, because every primary answered again well within both.
    primary_downs = [downs[s.primary.name] for s in topology.shards]
    assert max(primary_downs) < topology.routing.primary_deadline, downs


# -- revert ------------------------------------------------------------------------------

def test_a_change_that_raises_lag_during_the_bake_is_reverted(
    cluster_factory: Callable[..., LocalCluster]
) -> None:
    private = cluster_factory(shards=1, replicas=2)
    topology = topology_of(private)
    primary, first, second = (private.shards[0].primary, *private.shards[0].replicas)
    before = {node.name: auto_conf(node) for node in private.nodes}
    plan = plan_config_change(topology, ConfigChange({"recovery_min_apply_delay": "3s"},
                                                     role="replicas"))
    with writing(primary):
        report = ConfigRollout(topology, plan, max_lag=1.0, bake=6.0).run()
    assert report.reverted and not report.ok, str(report)
    assert report.regression is not None and report.regression.step == 1
    assert report.regression.phase in ("bake", "settle")
    assert "shard0-replica1" in report.regression.measurement
    assert report.result("shard0-replica1").outcome == "reverted"
    assert report.result("shard0-replica2").outcome == "not started"
    assert report.restored == ("shard0-replica1 recovery_min_apply_delay=0ms",)
    assert "Reverted: regression at step 1" in str(report)
    print(f"revert: regression after {report.regression.after:.2f}s, "
          f"restored in {report.revert_seconds:.2f}s")
    for node in (first, second):
        assert setting(node, "recovery_min_apply_delay") == "0"
    assert {node.name: auto_conf(node) for node in private.nodes} == before


# -- resume ------------------------------------------------------------------------------

class _Interrupted(Exception):
    pass


@dataclass(frozen=True)
class Resumable:
    """What the resume tests share: a private 1 x 2 cluster, a journal path, the change."""

    cluster: LocalCluster
    topology: Topology
    journal: Path
    change: ConfigChange = field(
        default_factory=lambda: ConfigChange({"checkpoint_completion_target": "0.7"}))

    def resumed_plan(self) -> ConfigPlan:
        """The change planned again with the journal's originals: step 1 is applied."""
        plan = plan_config_change(self.topology, self.change,
                                  originals=ConfigJournal(self.journal).originals)
        assert [s.applied for s in plan.steps] == [True, False, False]
        return plan


@pytest.fixture
def resumable(cluster_factory: Callable[..., LocalCluster], tmp_path: Path) -> Resumable:
    private = cluster_factory(shards=1, replicas=2)
    return Resumable(private, topology_of(private), tmp_path / "journal.json")


def test_an_interrupted_run_continues_where_it_stopped_and_remembers_the_originals(
    resumable: Resumable,
) -> None:
    private, topology, journal, change = (resumable.cluster, resumable.topology,
                                          resumable.journal, resumable.change)
    original = setting(private.nodes[0], "checkpoint_completion_target")

    def interrupt(event: ConfigEvent) -> None:
        if event.kind == "step_done" and event.step == 1:
            raise _Interrupted

    plan = plan_config_change(topology, change)
    with pytest.raises(_Interrupted):
        ConfigRollout(topology, plan, bake=0.2, journal=journal, on_event=interrupt).run()
    assert journal.exists()
    values = [setting(node, "checkpoint_completion_target") for node in private.nodes]
    assert values == [original, "0.7", original]  # replica1 done, the others untouched

    resumed_plan = resumable.resumed_plan()
    assert resumed_plan.steps[0].settings[0].before == original
    resumed = ConfigRollout(topology, resumed_plan, bake=0.2, journal=journal).run()
    assert [r.outcome for r in resumed.results] == ["already applied", "done", "done"]
    assert [setting(node, "checkpoint_completion_target") for node in private.nodes] == [
        "0.7"] * 3
    assert not journal.exists()


def interrupt_during_the_bake_of(step: int, events: list[ConfigEvent]
                                 ) -> Callable[[ConfigEvent], None]:
    """An ``on_event`` that records events and stops the run at ``step``'s first bake
    sample (the node runs with its new values, its bake has begun and not ended)."""
    def on_event(event: ConfigEvent) -> None:
        events.append(event)
        if event.kind == "baking" and event.step == step:
            raise _Interrupted

    return on_event


def test_a_step_interrupted_during_its_bake_is_baked_again_on_resume(
    resumable: Resumable,
) -> None:
    private, topology, journal, change = (resumable.cluster, resumable.topology,
                                          resumable.journal, resumable.change)
    first: list[ConfigEvent] = []
    with pytest.raises(_Interrupted):
        ConfigRollout(topology, plan_config_change(topology, change), bake=1.0,
                      journal=journal, on_event=interrupt_during_the_bake_of(1, first)).run()
    assert not [e for e in first if e.kind == "step_done"]
    assert setting(private.shards[0].replicas[0], "checkpoint_completion_target") == "0.7"

    resumed_plan = resumable.resumed_plan()
    from click.testing import CliRunner

    from propstore.cli import main

    shown = CliRunner().invoke(main, ["--config", str(private.config_path), "config", "plan",
                                      "checkpoint_completion_target=0.7", "--journal",
                                      str(journal)])
    assert shown.exit_code == 0, shown.output
    assert ("step 1 (shard0-replica1): applied by a run that stopped during its bake; baked "
            "again before the next step") in shown.output
    events: list[ConfigEvent] = []
    resumed = ConfigRollout(topology, resumed_plan, bake=1.0, journal=journal,
                            on_event=events.append).run()
    assert resumed.complete, str(resumed)
    step1 = resumed.result("shard0-replica1")
    assert step1.outcome == "done" and step1.rebaked and step1.seconds >= 1.0
    assert "baked again" in str(resumed) and resumed.to_dict()["steps"][0]["rebaked"]
    # Watched: the shard's replicas were sampled during step 1's new bake, before step 2.
    kinds = [(e.kind, e.step) for e in events]
    assert ("step_rebaking", 1) in kinds
    bake_samples = [e for e in events if e.kind == "baking" and e.step == 1]
    assert bake_samples and all(len(e.replicas) == 2 for e in bake_samples)
    assert kinds.index(("step_done", 1)) < kinds.index(("step_started", 2))
    assert [setting(node, "checkpoint_completion_target") for node in private.nodes] == [
        "0.7"] * 3
    assert not journal.exists()


def test_a_regression_present_when_an_interrupted_bake_resumes_is_reverted(
    cluster_factory: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    private = cluster_factory(shards=1, replicas=2)
    topology = topology_of(private)
    primary, first, second = (private.shards[0].primary, *private.shards[0].replicas)
    before = {node.name: auto_conf(node) for node in private.nodes}
    journal = tmp_path / "journal.json"
    change = ConfigChange({"recovery_min_apply_delay": "3s"}, role="replicas")
    with writing(primary):
        with pytest.raises(_Interrupted):
            ConfigRollout(topology, plan_config_change(topology, change), max_lag=1.0,
                          bake=6.0, journal=journal,
                          on_event=interrupt_during_the_bake_of(1, [])).run()
        assert setting(first, "recovery_min_apply_delay") == "3000"
        resumed_plan = plan_config_change(topology, change,
                                          originals=ConfigJournal(journal).originals)
        # Short waits: replica1 is past max_lag already, so its settle fails when the timeout
        # ends (a regression); skipping the bake would leave step 2's pre-flight waiting.
        report = ConfigRollout(topology, resumed_plan, max_lag=1.0, bake=6.0,
                               wait_timeout=3.0, settle_timeout=3.0, journal=journal).run()
    assert report.reverted and not report.ok, str(report)
    assert report.regression is not None and report.regression.step == 1
    assert "shard0-replica1" in report.regression.measurement
    step1 = report.result("shard0-replica1")
    assert step1.outcome == "reverted" and step1.rebaked
    assert report.result("shard0-replica2").outcome == "not started"
    assert report.restored == ("shard0-replica1 recovery_min_apply_delay=0ms",)
    for node in (first, second):
        assert setting(node, "recovery_min_apply_delay") == "0"
    assert {node.name: auto_conf(node) for node in private.nodes} == before
    assert not journal.exists()


# -- the CLI -----------------------------------------------------------------------------

def test_cli_plan_refuses_bad_input_and_apply_rolls_out_with_canary_then_resumes(
    cluster_factory: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    import json

    from click.testing import CliRunner

    from propstore.cli import main

    private = cluster_factory(shards=1, replicas=1)
    base = ["--config", str(private.config_path), "config"]
    runner = CliRunner()
    refused = runner.invoke(main, [*base, "plan", "max_connections=0"])
    assert refused.exit_code != 0
    assert "max_connections on shard0-primary: 0 is out of range" in refused.output
    shown = runner.invoke(main, [*base, "plan", "work_mem=8MB", "--json"])
    assert shown.exit_code == 0, shown.output
    document = json.loads(shown.output)
    assert [s["node"] for s in document["steps"]] == ["shard0-replica1", "shard0-primary"]
    assert document["steps"][0]["settings"][0]["after"] == "8192"
    journal = str(tmp_path / "journal.json")
    args = [*base, "apply", "work_mem=8MB", "--bake", "0.2s", "--journal", journal]
    canary = runner.invoke(main, [*args, "--canary", "1"])
    assert canary.exit_code == 0, canary.output
    assert "Stopped: canary: 1 step(s) applied" in canary.output
    assert [setting(n, "work_mem") for n in private.nodes] == ["4096", "8192"]
    rest = runner.invoke(main, [*args, "--json"])
    assert rest.exit_code == 0, rest.output
    report = json.loads(rest.output)
    assert report["complete"] and [s["outcome"] for s in report["steps"]] == [
        "already applied", "done"]
    assert [setting(n, "work_mem") for n in private.nodes] == ["8192", "8192"]
