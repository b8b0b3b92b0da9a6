"""Writes that ride through a failover, and honest errors when no primary appears.

A private cluster per test (promotion cannot be undone); the promotion is done by hand here
(``LocalNode.promote``), by Patroni in ``tests/test_patroni.py``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import Any

import pytest

from propstore import PropertyStore, ShardUnavailableError, Topology
from tests._workload import Workload
from tests.test_store import wait_for

pytestmark = pytest.mark.slow


def _private(cluster_factory: Any, **routing: Any) -> tuple[Any, Topology]:
    from propstore.migrate import upgrade

    cluster = cluster_factory(shards=1, replicas=2)
    upgrade(cluster.shards[0].primary.dsn)
    cluster.wait_caught_up()
    topology = Topology.load(cluster.config_path)
    return cluster, replace(topology, routing=replace(topology.routing, **routing))


def test_writes_wait_for_the_new_primary_within_the_failover_window(
    cluster_factory: Any,
) -> None:
    window = 20.0
    # The gap (1.5 s) outlasts write_retry_time: only the failover window carries writes.
    cluster, topology = _private(cluster_factory, write_retry_time=0.5,
                                 write_failover_time=window)
    old, new, other = (cluster.shards[0].primary, *cluster.shards[0].replicas)
    users = [f"ride-{i}" for i in range(20)]
    promoted = threading.Event()

    def failover() -> None:
        time.sleep(1.5)  # the gap an HA manager takes to decide (Patroni: ttl/loop_wait)
        new.promote()
        other.repoint(new)
        promoted.set()

    with PropertyStore(topology) as store:
        for user in users:
            store.replace("acme", user, {"seq": 0})
        # Writes wait: none may fail. 5 s budgets are served by the replicas through the gap;
        # only a replica read that times out (a loaded machine) falls back to the primary,
        # which the gap cannot serve (reads during the gap: the degrade policy's part).
        with Workload(store, users, budgets=(5.0,)) as load:
            load.wait(0.5)
            old.stop()  # planned: a clean stop sends all WAL to the standbys
            wait_for(lambda: store.shard_views()[0].primary is None, timeout=10)
            helper = threading.Thread(target=failover)
            helper.start()
            started = time.monotonic()
            store.set("acme", "ride-outside", {"seq": 1})  # waits for the new primary
            took = time.monotonic() - started
            helper.join()
            load.wait(1.0)
            report = load.stop()
        assert promoted.is_set()
        primary = store.shard_views()[0].primary
        assert primary is not None and primary.name == new.name
        assert store.get("acme", "ride-outside", consistency="strong") == {"seq": 1}
    print(f"ride-through: write waited {took:.2f}s for the new primary (window {window:g}s); "
          f"{report.writes} writes, errors {dict(report.errors)}, "
          f"{report.violations} violations, {report.reads} reads")
    assert report.writes > 0 and report.reads > 0
    assert report.violations == 0, report.examples
    assert not any(kind.startswith("write") for kind in report.errors), report.examples
    # Token reads meeting the gap say the primary is down; budgeted reads follow their
    # degrade policy (the default refuse(): StaleReadError, reason primary_unavailable).
    assert set(report.errors) <= {"read:ShardUnavailableError", "read:StaleReadError"}, (
        report.examples)
    assert report.error_count <= report.reads // 100
    assert took < window


def test_no_primary_is_an_honest_error_naming_observed_roles_after_the_window(
    cluster_factory: Any,
) -> None:
    cluster, topology = _private(cluster_factory, write_retry_time=0.5,
                                 write_failover_time=1.5)
    primary, *replicas = (cluster.shards[0].primary, *cluster.shards[0].replicas)
    with PropertyStore(topology) as store:
        store.set("acme", "u", {"v": 1})
        primary.kill()
        wait_for(lambda: store.shard_views()[0].primary is None, timeout=10)
        started = time.monotonic()
        with pytest.raises(ShardUnavailableError) as caught:
            store.set("acme", "u", {"v": 2})
        took = time.monotonic() - started
        with pytest.raises(ShardUnavailableError) as read_error:
            store.get("acme", "u", consistency="strong")
    message = str(caught.value)
    print(f"no primary: write refused after {took:.2f}s: {message}")
    assert 1.5 <= took < 3.0
    assert "no primary observed after" in message and "attempt(s) over" in message
    assert f"{primary.name} (127.0.0.1:{primary.port}) down" in message
    for replica in replicas:
        named = f"{replica.name} (127.0.0.1:{replica.port}) replica"
        assert named in message and named in str(read_error.value)
