"""ContainerCluster on a real Docker engine: loopback only, same shape, nothing left behind.

The store's tests run on containers with ``--propstore-cluster=containers``; these check what
is particular to containers. Skipped, with the reason, where no Docker engine answers
(``tools/docker_env.sh`` prepares one).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from propstore.sandbox import ContainerCluster, docker_available
from propstore.sandbox._container_node import LABEL, CapabilityMissing
from propstore.sandbox._waiting import wait_for

pytestmark = pytest.mark.docker
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    """A docker-py client of the engine the tests use."""
    available, reason = docker_available(timeout=5.0)
    if not available:
        pytest.skip(reason)
    import docker  # type: ignore[import-untyped]

    client = docker.from_env()
    yield client
    client.close()


@pytest.fixture(scope="module")
def pair(engine: Any) -> Iterator[ContainerCluster]:
    """One shard, one replica, for this module."""
    with ContainerCluster(shards=1, replicas=1) as started:
        yield started


def _ours(engine: Any) -> list[Any]:
    return list(engine.containers.list(all=True, filters={"label": LABEL}))


def test_servers_listen_on_loopback_and_replicate_over_it(pair: ContainerCluster,
                                                          engine: Any) -> None:
    shard = pair.shards[0]
    primary, replica = shard.primary, shard.replicas[0]
    for node in pair.nodes:
        attrs = engine.containers.get(node.container_id).attrs
        assert attrs["HostConfig"]["NetworkMode"] == "host"
        assert not attrs["HostConfig"]["PortBindings"]  # nothing published: no bridge
        assert node.scalar("SHOW listen_addresses") == "127.0.0.1"
        assert node.scalar("SHOW synchronous_commit") == "on"
        assert node.dsn == f"host=127.0.0.1 port={node.port} dbname=propstore user=postgres"
    # The WAL sender sees its replica come from loopback.
    rows = primary.execute("SELECT application_name, client_addr::text, state "
                           "FROM pg_stat_replication")
    assert rows == [(replica.name, "127.0.0.1/32", "streaming")]
    assert replica.streams_from(primary)


def test_topology_file_names_every_container_server(pair: ContainerCluster) -> None:
    assert pair.config_path is not None
    document = tomllib.loads(pair.config_path.read_text())
    entry = document["shards"][0]
    assert entry["primary"]["dsn"] == pair.shards[0].primary.dsn
    assert [r["dsn"] for r in entry["replicas"]] == [r.dsn for r in pair.shards[0].replicas]
    assert entry["buckets"] == [f"0-{pair.bucket_count - 1}"]


def test_docker_pause_freezes_the_server_and_unpause_thaws_it(pair: ContainerCluster) -> None:
    node = pair.shards[0].replicas[0]
    node.freeze()
    try:
        assert node.frozen
        began = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(node.dsn, connect_timeout=1).close()
        assert time.monotonic() - began >= 1.0
    finally:
        node.thaw()
    assert not node.frozen and node.scalar("SELECT 1") == 1


def test_killed_primary_restarts_with_its_data(pair: ContainerCluster) -> None:
    shard = pair.shards[0]
    shard.primary.execute("CREATE TABLE IF NOT EXISTS kept (v int)")
    shard.primary.execute("INSERT INTO kept VALUES (1)")
    shard.primary.kill()
    assert not shard.primary.is_running()
    shard.primary.start()
    assert shard.primary.scalar("SELECT count(*) FROM kept") >= 1
    wait_for(lambda: shard.replicas[0].streams_from(shard.primary), timeout=TIMEOUT,
             what="the replica to stream again")
    shard.wait_caught_up(TIMEOUT)


def test_local_only_features_raise_capability_missing(pair: ContainerCluster) -> None:
    node = pair.shards[0].primary
    with pytest.raises(CapabilityMissing, match=r"node\.pid"):
        _ = node.pid
    with pytest.raises(CapabilityMissing, match=r"cluster\.detach"):
        pair.detach()
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        _ = node.nonsense  # not a LocalNode feature either: a plain AttributeError


def test_stop_leaves_no_container_and_no_folder(engine: Any) -> None:
    cluster = ContainerCluster(shards=1, replicas=1).start()
    ids = {node.container_id for node in cluster.nodes}
    assert ids <= {c.id for c in _ours(engine)}
    assert cluster.config_path is not None
    folder = cluster.config_path.parent
    cluster.nodes[1].freeze()  # a paused container is removed too
    cluster.stop()
    assert not ids & {c.id for c in _ours(engine)}
    assert not folder.exists()


_ABANDON = textwrap.dedent("""
    import json, sys
    from propstore.sandbox import ContainerCluster
    cluster = ContainerCluster(shards=1, replicas=1).start()
    ids = [node.container_id for node in cluster.nodes]
    print("REPORT", json.dumps(ids), flush=True)
    if sys.argv[1] == "raise":
        raise RuntimeError("a test crashed")
""")


@pytest.mark.parametrize("ending", ["exit", "raise"])
def test_interpreter_exit_removes_containers_nobody_stopped(engine: Any, ending: str) -> None:
    result = subprocess.run([sys.executable, "-c", _ABANDON, ending], capture_output=True,
                            text=True, timeout=300)
    assert (result.returncode == 0) == (ending == "exit"), result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("REPORT "))
    ids = set(json.loads(line[7:]))
    assert len(ids) == 2
    assert not ids & {c.id for c in _ours(engine)}


_KILLED = textwrap.dedent("""
    import json, os, signal
    from propstore.sandbox import ContainerCluster
    cluster = ContainerCluster(shards=1, replicas=0).start()
    ids = [node.container_id for node in cluster.nodes]
    folder = str(cluster.config_path.parent)
    print("REPORT", json.dumps({"ids": ids, "folder": folder}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_containers_of_a_killed_process_are_removed_by_the_next_start(engine: Any) -> None:
    result = subprocess.run([sys.executable, "-c", _KILLED], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == -9, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("REPORT "))
    report = json.loads(line[7:])
    assert set(report["ids"]) <= {c.id for c in _ours(engine)}  # no finalizer ran

    with ContainerCluster(shards=1, replicas=0):
        assert not set(report["ids"]) & {c.id for c in _ours(engine)}
        assert not Path(report["folder"]).exists()
