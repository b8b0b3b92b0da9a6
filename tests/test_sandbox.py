"""The local cluster really replicates, and every fault it injects does what it says.

Real servers throughout. Faults on the shared session cluster are undone by the ``cluster``
fixture; destructive ones (promotion, repointing) run on a private cluster.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

from propstore.cli._sandbox import sandbox as sandbox_cli
from propstore.sandbox import (
    ContainerCluster,
    LocalCluster,
    LocalNode,
    SandboxError,
    docker_available,
    down,
    status,
)
from propstore.sandbox._locations import scratch_root
from propstore.sandbox._processes import descendants, identify, is_alive, state_of
from propstore.sandbox._topology import bucket_ranges
from propstore.sandbox._waiting import wait_for

TIMEOUT = 60.0  # generous: other suites share this 2-core machine; every wait is a poll


@pytest.fixture(scope="module")
def probe_table(local_cluster: LocalCluster) -> Iterator[str]:
    """A scratch table on every shard (not the store's schema), dropped afterwards."""
    for shard in local_cluster.shards:
        shard.primary.execute(
            "CREATE TABLE IF NOT EXISTS sandbox_probe (id bigserial PRIMARY KEY, note text)"
        )
    local_cluster.wait_caught_up(TIMEOUT)
    yield "sandbox_probe"
    for shard in local_cluster.shards:
        shard.primary.execute("DROP TABLE IF EXISTS sandbox_probe")


@pytest.fixture
def daemon_dir() -> Iterator[Path]:
    """A base_dir the server account can enter (pytest's tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="propstore-test-", dir=scratch_root()))
    folder.chmod(0o755)
    yield folder / "sandbox"
    shutil.rmtree(folder, ignore_errors=True)


def _write(node: LocalNode) -> str:
    note = uuid.uuid4().hex
    node.execute("INSERT INTO sandbox_probe (note) VALUES (%s)", (note,))
    return note


def _sees(node: LocalNode, note: str) -> bool:
    return bool(node.execute("SELECT 1 FROM sandbox_probe WHERE note = %s", (note,)))


def _await_visible(node: LocalNode, note: str, timeout: float = TIMEOUT) -> None:
    wait_for(lambda: _sees(node, note), timeout=timeout, what=f"{note} on {node.name}")


def _server_pids(node: LocalNode) -> list[int]:
    assert node.pid is not None
    return [node.pid, *descendants(node.pid)]


def _all_gone(pids: list[int]) -> bool:
    procs = [identify(pid) for pid in pids]
    return all(proc is None or not is_alive(proc) for proc in procs)


# -- replication ----------------------------------------------------------------------------


def test_every_replica_streams_from_its_own_primary(cluster: LocalCluster) -> None:
    for shard in cluster.shards:
        rows = shard.primary.execute(
            "SELECT application_name, state FROM pg_stat_replication"
        )
        assert {name: state for name, state in rows} == {
            replica.name: "streaming" for replica in shard.replicas
        }
        for replica in shard.replicas:
            assert replica.is_in_recovery()
            assert replica.streams_from(shard.primary)


def test_row_written_on_a_primary_becomes_visible_on_its_replicas(
    cluster: LocalCluster, probe_table: str
) -> None:
    for shard in cluster.shards:
        note = _write(shard.primary)
        for replica in shard.replicas:
            _await_visible(replica, note)


def test_nodes_listen_on_distinct_loopback_ports(cluster: LocalCluster) -> None:
    ports = [node.port for node in cluster.nodes]
    assert len(set(ports)) == len(ports)
    for node in cluster.nodes:
        assert node.dsn == f"host=127.0.0.1 port={node.port} dbname=propstore user=postgres"
        assert node.scalar("SHOW listen_addresses") == "127.0.0.1"
        assert node.scalar("SHOW synchronous_commit") == "on"
        assert node.scalar("SELECT current_user") == "postgres"


# -- lag injection --------------------------------------------------------------------------


def test_paused_replay_stops_replay_lsn_while_the_primary_moves_on(
    cluster: LocalCluster, probe_table: str
) -> None:
    shard = cluster.shards[0]
    replica = shard.replicas[0]
    replica.pause_replay()
    frozen_at = replica.replay_lsn()
    note = _write(shard.primary)
    target = shard.primary.flush_lsn()
    # WAL keeps arriving; only its application stops.
    wait_for(lambda: (replica.receive_lsn() or 0) >= target, timeout=TIMEOUT,
             what="WAL to reach the paused replica")
    assert frozen_at is not None and target > frozen_at
    assert replica.replay_lsn() == frozen_at
    assert not _sees(replica, note)

    replica.resume_replay()
    shard.wait_caught_up(TIMEOUT)
    assert _sees(replica, note)


def test_wait_caught_up_times_out_naming_a_paused_replica(
    cluster: LocalCluster, probe_table: str
) -> None:
    shard = cluster.shards[0]
    replica = shard.replicas[-1]
    replica.pause_replay()
    _write(shard.primary)
    with pytest.raises(SandboxError, match=replica.name):
        shard.wait_caught_up(timeout=0.5)


def test_apply_delay_makes_a_write_visible_only_after_the_delay(
    cluster: LocalCluster, probe_table: str
) -> None:
    shard = cluster.shards[0]
    replica = shard.replicas[0]
    delay = 1.5
    replica.set_apply_delay(delay)
    assert replica.apply_delay() == delay
    began = time.monotonic()
    note = _write(shard.primary)
    _await_visible(replica, note, timeout=delay + TIMEOUT)
    # The delay counts from the commit time, which is after `began`.
    assert time.monotonic() - began >= delay - 0.05

    replica.clear_apply_delay()
    assert replica.apply_delay() == 0
    began = time.monotonic()
    note = _write(shard.primary)
    _await_visible(replica, note)


def test_cut_receiver_stops_streaming_until_reconnected(
    cluster: LocalCluster, probe_table: str
) -> None:
    shard = cluster.shards[0]
    replica = shard.replicas[0]
    replica.disconnect_receiver()
    assert not replica.scalar("SELECT count(*) FROM pg_stat_wal_receiver")
    names = {row[0] for row in shard.primary.execute(
        "SELECT application_name FROM pg_stat_replication")}
    assert replica.name not in names
    assert replica.is_in_recovery()  # still a standby, still serving reads

    replica.reconnect_receiver()
    note = _write(shard.primary)
    _await_visible(replica, note)


# -- fault injection ------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["primary", "replica"])
def test_frozen_server_does_not_answer_a_new_connection_until_thawed(
    cluster: LocalCluster, role: str
) -> None:
    shard = cluster.shards[-1]
    node = shard.primary if role == "primary" else shard.replicas[0]
    node.freeze()
    began = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(node.dsn, connect_timeout=1).close()
    assert time.monotonic() - began >= 1.0

    node.thaw()
    assert node.scalar("SELECT 1") == 1


def test_freeze_stops_the_postmaster_and_every_child(cluster: LocalCluster) -> None:
    node = cluster.shards[0].replicas[-1]
    pids = _server_pids(node)
    assert len(pids) > 3  # startup, WAL receiver, checkpointer, ... are separate processes
    node.freeze()
    try:
        states = {pid: state_of(proc) for pid in pids if (proc := identify(pid)) is not None}
        assert set(states.values()) <= {"T", "t"}, states
    finally:
        node.thaw()
    assert node.scalar("SELECT 1") == 1


def test_killed_replica_restarts_and_catches_up(
    cluster: LocalCluster, probe_table: str
) -> None:
    shard = cluster.shards[0]
    replica = shard.replicas[0]
    pids = _server_pids(replica)
    replica.kill()
    assert not replica.is_running()
    wait_for(lambda: _all_gone(pids), timeout=TIMEOUT, what="the killed server's processes")
    note = _write(shard.primary)

    replica.start()
    shard.wait_caught_up(TIMEOUT)
    assert _sees(replica, note)
    wait_for(lambda: replica.streams_from(shard.primary), timeout=TIMEOUT,
             what="the restarted replica to stream")


def test_cluster_fixture_restores_a_killed_and_frozen_node(cluster: LocalCluster) -> None:
    frozen, killed = cluster.shards[-1].replicas[0], cluster.shards[0].replicas[-1]
    frozen.freeze()
    killed.kill()
    cluster.reset_faults()
    assert not frozen.frozen and frozen.scalar("SELECT 1") == 1
    assert killed.is_running() and killed.is_in_recovery()


def test_promoted_replica_accepts_writes_and_others_can_follow_it(
    cluster_factory: Callable[..., LocalCluster],
) -> None:
    private: LocalCluster = cluster_factory(shards=1, replicas=2)
    shard = private.shards[0]
    promoted, follower = shard.replicas
    shard.primary.execute("CREATE TABLE sandbox_probe (id bigserial PRIMARY KEY, note text)")
    shard.wait_caught_up(TIMEOUT)
    shard.primary.kill()

    promoted.promote()
    assert promoted.role == "primary" and not promoted.is_in_recovery()
    note = _write(promoted)
    assert _sees(promoted, note)

    follower.repoint(promoted)
    _await_visible(follower, note)
    assert follower.streams_from(promoted)


# -- topology file --------------------------------------------------------------------------


def test_written_config_parses_and_covers_every_bucket_once(cluster: LocalCluster) -> None:
    assert cluster.config_path is not None and cluster.base_dir is not None
    assert cluster.config_path == cluster.base_dir / "propstore.toml"
    document = tomllib.loads(cluster.config_path.read_text())

    assert document["bucket_count"] == cluster.bucket_count
    assert document["default_profile"] == "personalisation"
    assert document["profiles"] == {
        "personalisation": {"max_staleness": "5s"},
        "workflow": {"max_staleness": "500ms"},
    }
    covered: list[int] = []
    for index, (entry, shard) in enumerate(zip(document["shards"], cluster.shards, strict=True)):
        assert entry["name"] == shard.name == f"shard{index}"
        assert entry["primary"] == {"name": f"shard{index}-primary", "dsn": shard.primary.dsn}
        assert entry["replicas"] == [
            {"name": f"shard{index}-replica{n}", "dsn": replica.dsn}
            for n, replica in enumerate(shard.replicas, start=1)
        ]
        for text in entry["buckets"]:
            first, last = (int(part) for part in text.split("-"))
            covered.extend(range(first, last + 1))
    assert sorted(covered) == list(range(cluster.bucket_count))


def test_written_config_loads_as_a_topology(cluster_config: Path) -> None:
    config = pytest.importorskip("propstore.config")
    topology = config.Topology.load(cluster_config)
    assert topology.bucket_count == 4096


def test_write_config_to_another_path(cluster: LocalCluster, tmp_path: Path) -> None:
    original = cluster.config_path
    try:
        target = cluster.write_config(tmp_path / "other.toml")
        assert cluster.config_path == target
        assert tomllib.loads(target.read_text())["bucket_count"] == cluster.bucket_count
    finally:
        assert original is not None
        cluster.write_config(original)


@pytest.mark.parametrize(("buckets", "shards"), [(4096, 2), (4096, 3), (10, 4), (7, 7)])
def test_bucket_ranges_are_contiguous_and_even(buckets: int, shards: int) -> None:
    ranges = bucket_ranges(buckets, shards)
    assert ranges[0][0] == 0 and ranges[-1][1] == buckets - 1
    assert all(prev[1] + 1 == nxt[0] for prev, nxt in itertools.pairwise(ranges))
    sizes = [last - first + 1 for first, last in ranges]
    assert max(sizes) - min(sizes) <= 1


# -- lifecycle ------------------------------------------------------------------------------


def test_stop_leaves_no_server_process(cluster_factory: Callable[..., LocalCluster]) -> None:
    private: LocalCluster = cluster_factory(shards=1, replicas=1)
    assert private.pg_version >= 13
    pids = [pid for node in private.nodes for pid in _server_pids(node)]
    base_dir = private.base_dir
    private.stop()
    assert _all_gone(pids)
    assert base_dir is not None and not base_dir.exists()  # a temporary base_dir is removed


def _report(stdout: str) -> str:
    # structlog prints events to stdout too; the child marks the line meant for the test.
    return next(line[7:] for line in stdout.splitlines() if line.startswith("REPORT "))


def test_failed_start_leaves_no_server_and_no_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: LocalCluster, timeout: float) -> None:
        raise SandboxError("injected failure after the servers started")

    monkeypatch.setattr(LocalCluster, "_wait_streaming", broken)
    doomed = LocalCluster(shards=1, replicas=1)
    with pytest.raises(SandboxError, match="injected"):
        doomed.start()
    assert doomed.nodes and not any(node.is_running() for node in doomed.nodes)
    assert doomed.base_dir is not None and not doomed.base_dir.exists()


#: The child starts the fronts it can (PgBouncer, HAProxy): they must go with the servers.
_FRONTS = """
    from propstore.sandbox._poolers import front_available
    fronts = [cluster.front(kind) for kind in ("pgbouncer-transaction", "haproxy")
              if front_available(kind) is None]
    pids += [front.pid for front in fronts]
"""



def _fronts_here() -> int:
    from propstore.sandbox._poolers import front_available

    return sum(front_available(kind) is None for kind in ("pgbouncer-transaction", "haproxy"))


_ABANDON = textwrap.dedent("""
    import json, sys
    from propstore.sandbox import LocalCluster
    cluster = LocalCluster(shards=1, replicas=1).start()
    pids = [cluster.nodes[0].pid, cluster.nodes[1].pid]
""" + _FRONTS + """
    print("REPORT", json.dumps({"pids": pids, "base_dir": str(cluster.base_dir)}), flush=True)
    if sys.argv[1] == "raise":
        raise RuntimeError("a test crashed")
""")


@pytest.mark.parametrize("ending", ["exit", "raise"])
def test_interpreter_exit_stops_a_cluster_nobody_stopped(ending: str) -> None:
    result = subprocess.run([sys.executable, "-c", _ABANDON, ending], capture_output=True,
                            text=True, timeout=300, env=os.environ.copy())
    assert (result.returncode == 0) == (ending == "exit"), result.stderr
    report = json.loads(_report(result.stdout))
    assert len(report["pids"]) == 2 + _fronts_here()
    assert _all_gone(report["pids"])
    assert not Path(report["base_dir"]).exists()


_KILLED = textwrap.dedent("""
    import json, os, signal
    from propstore.sandbox import LocalCluster
    cluster = LocalCluster(shards=1, replicas=1).start()
    pids = [node.pid for node in cluster.nodes]
""" + _FRONTS + """
    print("REPORT", json.dumps({"pids": pids, "base_dir": str(cluster.base_dir)}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_cluster_of_a_killed_process_is_reaped_by_the_next_start(
    cluster_factory: Callable[..., LocalCluster],
) -> None:
    result = subprocess.run([sys.executable, "-c", _KILLED], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == -9, result.stderr
    report = json.loads(_report(result.stdout))
    assert len(report["pids"]) == 2 + _fronts_here()
    assert not _all_gone(report["pids"])  # no finalizer ran: the servers are orphans

    cluster_factory(shards=1, replicas=0)
    wait_for(lambda: _all_gone(report["pids"]), timeout=TIMEOUT, what="orphans to exit")
    assert not Path(report["base_dir"]).exists()


_UP = textwrap.dedent("""
    import json, sys
    from propstore.sandbox import up
    cluster = up(sys.argv[1], shards=1, replicas=1)
    print("REPORT", json.dumps([node.pid for node in cluster.nodes]))
""")


def test_sandbox_up_outlives_its_process_and_down_leaves_nothing(daemon_dir: Path) -> None:
    base_dir = daemon_dir
    result = subprocess.run([sys.executable, "-c", _UP, str(base_dir)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    pids = json.loads(_report(result.stdout))
    try:
        rows = status(base_dir)
        assert [row["name"] for row in rows] == ["shard0-primary", "shard0-replica1"]
        assert all(row["running"] for row in rows)
        assert [row["pid"] for row in rows] == pids
        assert [row["in_recovery"] for row in rows] == [False, True]
        assert (base_dir / "propstore.toml").exists()

        attached = LocalCluster.attach(base_dir)
        assert [node.port for node in attached.nodes] == [row["port"] for row in rows]
        assert attached.nodes[1].streams_from(attached.nodes[0])

        runner = CliRunner()
        shown = runner.invoke(sandbox_cli, ["status", "--dir", str(base_dir)])
        assert shown.exit_code == 0, shown.output
        assert "shard0-replica1" in shown.output and "in recovery" in shown.output
    finally:
        stopped = CliRunner().invoke(sandbox_cli, ["down", "--dir", str(base_dir)])
    assert stopped.exit_code == 0, stopped.output
    assert "stopped 2 servers" in stopped.output
    assert _all_gone(pids)
    assert not (base_dir / "sandbox.json").exists()
    with pytest.raises(SandboxError, match="no sandbox cluster"):
        down(base_dir)


def test_cli_up_prints_how_to_use_the_config_and_revives_a_killed_node(daemon_dir: Path) -> None:
    base_dir = daemon_dir
    runner = CliRunner()
    try:
        started = runner.invoke(sandbox_cli, ["up", "--shards", "1", "--replicas", "1",
                                              "--dir", str(base_dir)])
        assert started.exit_code == 0, started.output
        assert f"export PROPSTORE_CONFIG={base_dir / 'propstore.toml'}" in started.output
        LocalCluster.attach(base_dir).nodes[1].kill()
        again = runner.invoke(sandbox_cli, ["up", "--shards", "1", "--replicas", "1",
                                            "--dir", str(base_dir)])
        assert again.exit_code == 0, again.output
        assert all(node.is_running() for node in LocalCluster.attach(base_dir).nodes)
    finally:
        runner.invoke(sandbox_cli, ["down", "--dir", str(base_dir)])


def test_start_refuses_a_folder_where_a_cluster_runs(cluster: LocalCluster) -> None:
    assert cluster.base_dir is not None
    with pytest.raises(SandboxError, match="already running"):
        LocalCluster(shards=1, replicas=0, base_dir=cluster.base_dir).start()


def test_missing_binaries_are_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="lacks postgres"):
        LocalCluster(pg_bin=tmp_path)


def test_clean_state_fixture_runs_with_or_without_the_schema(
    propstore_clean_state: LocalCluster,
) -> None:
    for shard in propstore_clean_state.shards:
        if shard.primary.scalar("SELECT to_regclass('user_properties') IS NOT NULL"):
            assert shard.primary.scalar("SELECT count(*) FROM user_properties") == 0


# -- containers -----------------------------------------------------------------------------


@pytest.mark.docker
def test_container_cluster_replicates_and_pauses_replay(tmp_path: Path) -> None:
    available, reason = docker_available(timeout=2.0)
    if not available:
        pytest.skip(reason)
    with ContainerCluster(shards=1, replicas=1) as containers:
        shard = containers.shards[0]
        replica = shard.replicas[0]
        config = tomllib.loads(containers.write_config(tmp_path / "c.toml").read_text())
        assert config["shards"][0]["replicas"][0]["dsn"] == replica.dsn
        shard.primary.execute("CREATE TABLE sandbox_probe (note text)")
        containers.wait_caught_up(TIMEOUT)
        replica.pause_replay()
        shard.primary.execute("INSERT INTO sandbox_probe VALUES ('x')")
        assert replica.execute("SELECT * FROM sandbox_probe") == []
        replica.resume_replay()
        containers.wait_caught_up(TIMEOUT)
        assert replica.execute("SELECT * FROM sandbox_probe") == [("x",)]


def test_sandbox_public_api_is_pinned() -> None:
    import propstore.sandbox

    assert sorted(propstore.sandbox.__all__) == [
        "ContainerCluster", "LocalCluster", "LocalNode", "LocalNodeController", "LocalShard",
        "SandboxError", "default_base_dir", "docker_available", "down", "status", "up",
    ]
