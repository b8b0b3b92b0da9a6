"""Prometheus metrics of a store: the documented names, served over HTTP, telling the truth."""

from __future__ import annotations

import math
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from propstore import PropertyStore, Topology
from propstore.metrics import METRIC_NAMES, StoreMetrics
from propstore.sandbox import LocalCluster
from tests.conftest import users_on_shard

OPERATING = Path(__file__).parent.parent / "docs" / "operating.md"


def scrape(url: str) -> dict[str, list[Sample]]:
    """Samples by metric family name, fetched over HTTP."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(samples: list[Sample], name: str | None = None, **labels: str) -> float:
    """The one sample whose labels include ``labels`` (and whose name is ``name``)."""
    (found,) = [s for s in samples if labels.items() <= s.labels.items()
                and (name is None or s.name == name)]
    return found.value


def test_every_metric_name_is_documented() -> None:
    text = OPERATING.read_text()
    for name in METRIC_NAMES:
        assert f"`{name}" in text, name


def test_endpoint_serves_the_documented_metrics_with_the_reads_made(
    store: PropertyStore, topology: Topology
) -> None:
    metrics = StoreMetrics(store)
    server = metrics.serve(0)
    try:
        (user,) = users_on_shard(topology, "shard0", 1)
        token = store.set("acme", user, {"a": 1})
        for _ in range(5):
            store.read("acme", user, max_staleness=5)
        store.read("acme", user, consistency="strong")
        store.read("acme", user, after=token)
        families = scrape(server.url)
    finally:
        server.close()
    assert set(METRIC_NAMES) <= set(families)
    reads = families["propstore_reads"]
    assert sum(s.value for s in reads if s.name == "propstore_reads_total") == 7
    assert value(reads, "propstore_reads_total", shard="shard0", served_by="primary",
                 reason="strong") == 1
    latency = families["propstore_read_duration_seconds"]
    assert sum(s.value for s in latency if s.name.endswith("_count")) == 7
    assert value(families["propstore_writes"], "propstore_writes_total", shard="shard0") >= 1
    for shard in topology.shards:
        for node in shard.nodes:
            key = {"shard": shard.name, "node": node.name}
            assert value(families["propstore_node_up"], **key) == 1
            assert value(families["propstore_node_state"], state="up", **key) == 1
            assert value(families["propstore_node_primary"], **key) == (
                1 if node.role == "primary" else 0)
            bound = value(families["propstore_node_staleness_bound_seconds"], **key)
            assert 0 <= bound < 5
            assert value(families["propstore_node_lsn_bytes"], **key) > 0


def test_paused_replica_shows_as_paused_with_a_growing_bound(
    store: PropertyStore, topology: Topology, cluster: LocalCluster
) -> None:
    metrics = StoreMetrics(store)
    server = metrics.serve(0, "127.0.0.1")
    key = {"shard": "shard0", "node": "shard0-replica1"}
    try:
        cluster.wait_caught_up()
        for replica in cluster.shards[0].replicas:
            replica.pause_replay()
        (user,) = users_on_shard(topology, "shard0", 1)
        store.set("acme", user, {"a": 1})
        deadline = time.monotonic() + 30
        bounds: list[float] = []
        while len(bounds) < 2 or bounds[-1] - bounds[0] < 0.3:
            assert time.monotonic() < deadline, bounds
            families = scrape(server.url)
            if value(families["propstore_node_state"], state="paused", **key) == 1 and (
                value(families["propstore_node_bytes_behind"], **key) > 0
            ):
                bounds.append(value(families["propstore_node_staleness_bound_seconds"], **key))
            time.sleep(0.1)  # spacing between scrapes, not waiting for a condition
        assert all(math.isfinite(b) for b in bounds) and bounds == sorted(bounds)
        assert value(families["propstore_node_eligible"], profile="workflow", **key) == (
            0 if bounds[-1] > 0.5 else 1)
    finally:
        server.close()


def test_each_store_metrics_has_its_own_registry(store: PropertyStore) -> None:
    first, second = StoreMetrics(store), StoreMetrics(store)
    assert first.registry is not second.registry
    shared = CollectorRegistry()
    StoreMetrics(store, registry=shared)
    assert shared.get_sample_value("propstore_node_up", {"shard": "shard0",
                                                         "node": "shard0-primary"}) == 1


def test_metrics_command_serves_over_http_until_terminated(cluster_config: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "propstore.cli", "--config", str(cluster_config), "metrics",
         "--port", "0", "--host", "127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()  # blocks until served (or the process exits)
        assert first.startswith("serving http://127.0.0.1:"), first
        families = scrape(first.split()[1])
        assert {"propstore_node_up", "propstore_node_staleness_bound_seconds"} <= set(families)
        assert all(s.value == 1 for s in families["propstore_node_up"])
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert process.returncode == 0
