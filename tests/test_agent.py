"""Shared monitoring (``[monitor] sharing``): the processes on a host that use one topology
share one lag monitor, and every read stays proven within its budget."""

from __future__ import annotations

import pytest

from propstore import ConfigError, MonitorSettings, Topology

TOPOLOGY = """
[[shards]]
name = "a"
buckets = ["0-4095"]
primary = "host=127.0.0.1 port=6001 dbname=propstore user=postgres"
"""


def test_sharing_defaults_to_host_and_can_be_turned_off() -> None:
    assert Topology.from_toml(TOPOLOGY, environ={}).monitor.sharing == "host"
    off = Topology.from_toml("[monitor]\nsharing = \"off\"\n" + TOPOLOGY, environ={})
    assert off.monitor.sharing == "off"
    env = Topology.from_toml(TOPOLOGY, environ={"PROPSTORE_MONITOR_SHARING": "off"})
    assert env.monitor.sharing == "off"


@pytest.mark.parametrize("text", ['sharing = "process"', "sharing = true"])
def test_bad_sharing_is_a_clear_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match=r"monitor\.sharing = .* is not one of 'host', 'off'"):
        Topology.from_toml(f"[monitor]\n{text}\n" + TOPOLOGY, environ={})
    with pytest.raises(ConfigError, match="PROPSTORE_MONITOR_SHARING"):
        Topology.from_toml(TOPOLOGY, environ={"PROPSTORE_MONITOR_SHARING": "yes"})
    with pytest.raises(ConfigError, match="is not one of"):
        MonitorSettings(sharing="process")  # type: ignore[arg-type]
