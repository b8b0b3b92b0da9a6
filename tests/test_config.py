"""Topology files: what is accepted, and a clear error for everything else."""

from __future__ import annotations

from pathlib import Path

import pytest

from propstore import ConfigError, Topology

BASE = """
bucket_count = 16
default_profile = "personalisation"

[profiles.personalisation]
max_staleness = "5s"

[profiles.workflow]
max_staleness = "500ms"
on_stale = "error"

[[shards]]
name = "a"
buckets = ["0-7"]
primary = "host=127.0.0.1 port=6001 dbname=propstore user=postgres"
replicas = ["host=127.0.0.1 port=6002 dbname=propstore user=postgres"]

[[shards]]
name = "b"
buckets = ["8-15"]
primary = { name = "b-main", dsn = "host=127.0.0.1 port=6003 dbname=propstore" }
"""


def test_valid_file_loads_with_defaults_and_names() -> None:
    topo = Topology.from_toml(BASE, environ={})
    assert [s.name for s in topo.shards] == ["a", "b"]
    assert topo.shards[0].replicas[0].name == "a-replica1"
    assert topo.shards[1].primary.name == "b-main"
    assert topo.profiles["workflow"].max_staleness == pytest.approx(0.5)
    assert topo.monitor.interval == pytest.approx(0.1)
    assert {topo.shard_of("acme", f"u{i}").name for i in range(50)} == {"a", "b"}


def test_degrade_policies_load_from_profiles_and_routing_and_on_stale_maps_onto_them(
) -> None:
    from propstore import Degrade

    text = BASE.replace('max_staleness = "5s"', 'max_staleness = "5s"\ndegrade = "serve_stale"')
    text = text.replace("[profiles.personalisation]", "[routing]\ndegrade = \"wait(100ms)\"\n"
                        "primary_fallback_max_concurrency = 40\n[profiles.personalisation]")
    topo = Topology.from_toml(text, environ={})
    assert topo.profiles["personalisation"].policy == Degrade.serve_stale()
    assert topo.profiles["workflow"].policy == Degrade.refuse()  # on_stale = "error"
    assert topo.routing.policy == Degrade.wait(0.1)
    assert topo.routing.limiter.max_concurrency == 40 and topo.routing.limiter.adaptive
    defaults = Topology.from_toml(BASE, environ={}).routing
    assert defaults.policy == Degrade.refuse() and defaults.primary_fallback_rate == 0


@pytest.mark.parametrize(("change", "message"), [
    (("bucket_count = 16", "bucket_count = 16\ncolour = 'red'"), "unknown key"),
    (('buckets = ["8-15"]', 'buckets = ["7-15"]'), "assigned twice"),
    (('buckets = ["8-15"]', 'buckets = ["9-15"]'), "have no shard"),
    (('max_staleness = "5s"', 'max_staleness = "-5s"'), "cannot parse"),
    (('max_staleness = "5s"', "max_staleness = -5"), "non-negative"),
    (('name = "b"', 'name = "a"'), "duplicate shard"),
    (("port=6003", "port=6002"), "appears twice"),
    (('default_profile = "personalisation"', 'default_profile = "nope"'), "not a profile"),
    (('on_stale = "error"', 'on_stale = "maybe"'), "on_stale"),
    (("[profiles.personalisation]", "[monitor]\ninterval = 0\n[profiles.personalisation]"),
     "must be > 0"),
    (("[[shards]]", "[[shards]]\nweight = 3", ), "unknown key"),
    (('on_stale = "error"', 'degrade = "wait(200ms) | snooze"'), "unknown step 'snooze'"),
    (('on_stale = "error"', 'degrade = "wait(2m)"'), "max_wait above"),
    (('on_stale = "error"', 'on_stale = "error"\ndegrade = "refuse"'), "not both"),
    (('on_stale = "error"', 'degrade = 5'), "must be a string"),
    (("[profiles.personalisation]", "[routing]\nprimary_latency_tolerance = 0.5\n"
      "[profiles.personalisation]"), "tolerance must be >= 1"),
    (("[profiles.personalisation]", "[routing]\nprimary_fallback_adaptive = 1\n"
      "[profiles.personalisation]"), "true or false"),
])
def test_bad_config_is_a_clear_error(change: tuple[str, str], message: str) -> None:
    text = BASE.replace(*change, 1)
    with pytest.raises(ConfigError, match=message):
        Topology.from_toml(text, environ={})


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Topology.load(tmp_path / "missing.toml")


def test_environment_overrides_apply_and_password_stays_out_of_display() -> None:
    topo = Topology.from_toml(BASE, environ={
        "PROPSTORE_PASSWORD": "s3cret", "PROPSTORE_MONITOR_INTERVAL": "50ms",
        "PROPSTORE_DEFAULT_PROFILE": "workflow",
    })
    node = topo.shards[0].primary
    assert "s3cret" in node.dsn
    assert "s3cret" not in node.safe_dsn and "s3cret" not in repr(node)
    assert topo.monitor.interval == pytest.approx(0.05)
    assert topo.default_profile == "workflow"
