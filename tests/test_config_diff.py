"""``config diff``: every kind of topology change is reported, and each unsafe one is
refused with its reason, checked against a real 2-shard cluster."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from propstore import Topology
from propstore.cli import main
from propstore.migrate import ConfigDiff, diff_topologies, upgrade
from propstore.sandbox import LocalCluster

NOWHERE = "host=127.0.0.1 port=1 dbname=propstore user=postgres"  # nothing listens


@pytest.fixture
def cluster2(cluster_factory: Callable[..., LocalCluster]) -> LocalCluster:
    """A private 2-shard cluster (one replica each), migrated, tables empty."""
    cluster = cluster_factory(shards=2, replicas=1)
    for shard in cluster.shards:
        upgrade(shard.primary.dsn)
    return cluster


def shards_of(cluster: LocalCluster) -> list[dict[str, Any]]:
    """The cluster's shards as editable dicts (name, buckets, primary, replicas)."""
    return [
        {"name": s.name, "buckets": [f"{s.buckets[0]}-{s.buckets[1]}"],
         "primary": {"name": s.primary.name, "dsn": s.primary.dsn},
         "replicas": [{"name": r.name, "dsn": r.dsn} for r in s.replicas]}
        for s in cluster.shards
    ]


def write(path: Path, shards: list[dict[str, Any]], *, profiles: dict[str, str] | None = None,
          extra: str = "") -> Path:
    """A topology file (TOML written by hand; JSON strings are valid TOML strings)."""
    q = json.dumps
    lines = ["bucket_count = 4096", 'default_profile = "personalisation"', extra]
    for name, staleness in (profiles or {"personalisation": "5s", "workflow": "500ms"}).items():
        lines += [f"[profiles.{name}]", f"max_staleness = {q(staleness)}"]
    for shard in shards:
        node = "{{ name = {}, dsn = {} }}"
        lines += [
            "[[shards]]", f"name = {q(shard['name'])}",
            f"buckets = [{', '.join(q(b) for b in shard['buckets'])}]",
            f"primary = {node.format(q(shard['primary']['name']), q(shard['primary']['dsn']))}",
            "replicas = [" + ", ".join(node.format(q(r["name"]), q(r["dsn"]))
                                       for r in shard["replicas"]) + "]",
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def old(cluster2: LocalCluster, tmp_path: Path) -> Path:
    """The cluster's current topology file."""
    return write(tmp_path / "old.toml", shards_of(cluster2))


def moved(cluster: LocalCluster, first: int = 0, last: int = 99) -> list[dict[str, Any]]:
    """Shards with buckets first..last moved from shard0 to shard1."""
    shards = shards_of(cluster)
    shards[0]["buckets"] = [f"{last + 1}-2047"]
    shards[1]["buckets"] = [f"{first}-{last}", "2048-4095"]
    return shards


def add_user(cluster: LocalCluster, bucket: int) -> None:
    """A row of ``bucket`` on shard0's primary."""
    cluster.shards[0].primary.execute(
        "INSERT INTO user_properties (tenant_id, user_id, bucket) VALUES ('t', %s, %s)",
        (f"user-{bucket}", bucket))


def reasons(diff: ConfigDiff) -> str:
    return "\n".join(str(u) for u in diff.unsafe)


def test_every_kind_of_safe_change_is_reported(
    cluster2: LocalCluster, old: Path, tmp_path: Path
) -> None:
    shards = moved(cluster2)
    shards[0]["replicas"].append({"name": "shard0-replica2", "dsn": NOWHERE})
    removed = shards[1]["replicas"].pop()
    new = write(tmp_path / "new.toml", shards,
                profiles={"personalisation": "5s", "workflow": "250ms", "batch": "30s"},
                extra='[routing]\nreplica_deadline = "80ms"\n[monitor]\ninterval = "50ms"')
    diff = diff_topologies(old, new)
    assert diff.safe, reasons(diff)
    assert [n.node for n in diff.nodes_added] == ["shard0-replica2"]
    assert [n.node for n in diff.nodes_removed] == [removed["name"]]
    (move,) = diff.buckets_moved
    assert (move.source, move.target, move.count, move.users) == ("shard0", "shard1", 100, 0)
    assert [str(r) for r in move.ranges] == ["0-99"]
    assert {str(c) for c in diff.profiles_changed} == {
        "profiles.workflow.max_staleness: 500.0ms -> 250.0ms",
        "profiles.batch.max_staleness: added (30.00s)",
    }
    assert {str(c) for c in diff.settings_changed} == {
        "routing.replica_deadline: 50.0ms -> 80.0ms", "monitor.interval: 100.0ms -> 50.0ms",
    }
    text = str(diff)
    for expected in ("nodes added:", "nodes removed:", "buckets moved:",
                     "100 bucket(s) 0-99: shard0 -> shard1, 0 user(s) on the source",
                     "profiles and budgets changed:", "settings changed:", "safe to apply"):
        assert expected in text
    assert diff_topologies(old, old).empty


def test_moving_buckets_whose_source_still_holds_users_is_refused(
    cluster2: LocalCluster, old: Path, tmp_path: Path
) -> None:
    add_user(cluster2, 42)
    add_user(cluster2, 99)
    add_user(cluster2, 500)  # stays on shard0: not counted
    diff = diff_topologies(old, write(tmp_path / "new.toml", moved(cluster2)))
    assert not diff.safe
    assert diff.buckets_moved[0].users == 2
    assert "shard0 still holds 2 user(s) of these buckets" in reasons(diff)


def test_a_bucket_left_without_a_shard_is_refused_not_raised(
    cluster2: LocalCluster, old: Path, tmp_path: Path
) -> None:
    shards = shards_of(cluster2)
    shards[0]["buckets"] = ["10-2047"]
    with pytest.raises(Exception, match="have no shard"):
        Topology.load(write(tmp_path / "new.toml", shards))  # what the loader would say
    diff = diff_topologies(old, tmp_path / "new.toml")
    assert "10 bucket(s) left without a shard" in reasons(diff)
    assert diff.buckets_moved[0].target is None


def test_a_bucket_claimed_by_two_shards_is_refused(
    cluster2: LocalCluster, old: Path, tmp_path: Path
) -> None:
    shards = shards_of(cluster2)
    shards[1]["buckets"] = ["2000-4095"]
    diff = diff_topologies(old, write(tmp_path / "new.toml", shards))
    assert "48 bucket(s) assigned to several shards (shard0, shard1)" in reasons(diff)


def test_a_shard_without_a_reachable_primary_is_refused(
    cluster2: LocalCluster, old: Path, tmp_path: Path
) -> None:
    shards = shards_of(cluster2)
    shards[1]["primary"]["dsn"] = NOWHERE
    diff = diff_topologies(old, write(tmp_path / "new.toml", shards))
    assert "shard shard1: no reachable primary: primary shard1-primary (127.0.0.1:1) " \
           "unreachable" in reasons(diff)
    assert [n.detail for n in diff.nodes_changed] == [
        f"address 127.0.0.1:{cluster2.shards[1].primary.port} -> 127.0.0.1:1"]


def test_a_primary_that_is_a_standby_is_refused(
    cluster2: LocalCluster, old: Path, tmp_path: Path
) -> None:
    shards = shards_of(cluster2)
    standby = shards[0]["replicas"].pop()
    shards[0]["primary"] = {"name": "shard0-primary", "dsn": standby["dsn"]}
    diff = diff_topologies(old, write(tmp_path / "new.toml", shards))
    assert "is a standby (in recovery)" in reasons(diff)


def test_a_move_from_an_unreachable_source_is_refused(
    cluster2: LocalCluster, tmp_path: Path
) -> None:
    shards = shards_of(cluster2)
    shards[0]["primary"]["dsn"] = NOWHERE
    old = write(tmp_path / "old.toml", shards)
    new_shards = moved(cluster2)
    diff = diff_topologies(old, write(tmp_path / "new.toml", new_shards))
    assert "cannot tell whether shard0 still holds users of the 100 bucket(s)" in reasons(diff)


def test_without_checking_a_move_cannot_be_proven_safe(
    cluster2: LocalCluster, old: Path, tmp_path: Path
) -> None:
    diff = diff_topologies(old, write(tmp_path / "new.toml", moved(cluster2)), check=False)
    assert "not checked" in reasons(diff) and diff.buckets_moved[0].users is None


def test_changing_bucket_count_with_data_is_refused(
    cluster2: LocalCluster, old: Path, tmp_path: Path
) -> None:
    add_user(cluster2, 7)
    shards = shards_of(cluster2)
    shards[1]["buckets"] = ["2048-8191"]
    new = tmp_path / "new.toml"
    write(new, shards)
    new.write_text(new.read_text().replace("bucket_count = 4096", "bucket_count = 8192"))
    diff = diff_topologies(old, new)
    assert "changes every user's bucket and shard0 holds 1 user(s)" in reasons(diff)
    assert "bucket_count: 4096 -> 8192" in {str(c) for c in diff.settings_changed}


def test_cli_diff_exits_1_with_reasons_when_unsafe_and_0_when_safe(
    cluster2: LocalCluster, old: Path, tmp_path: Path
) -> None:
    safe = write(tmp_path / "safe.toml", moved(cluster2))
    result = CliRunner().invoke(main, ["config", "diff", str(old), str(safe)])
    assert result.exit_code == 0, result.output
    assert "safe to apply" in result.output
    add_user(cluster2, 3)
    result = CliRunner().invoke(main, ["config", "diff", str(old), str(safe)])
    assert result.exit_code == 1
    assert "UNSAFE (refused):" in result.output
    assert "shard0 still holds 1 user(s) of these buckets" in result.output
    broken = tmp_path / "broken.toml"
    broken.write_text("bucket_count = 'many'\n")
    result = CliRunner().invoke(main, ["config", "diff", str(old), str(broken)])
    assert result.exit_code == 2 and "bucket_count must be an integer" in result.output
