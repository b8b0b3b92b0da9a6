"""One set of rules for a read's budget options in every command (``lag``, ``get``,
``route``): the same errors, the same combinations, checked by the library's own argument
check before anything is opened."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from propstore import PropertyStore, Topology
from propstore.cli import main
from propstore.cli._budget import BUDGET_RULES, read_budget
from propstore.cli._lag import lag_check_budget

# Nothing listens on these ports: a command that got past its option check would hang in
# its connection attempts instead of exiting at once with a usage error.
_TOPOLOGY = """
default_profile = "personalisation"
[profiles.personalisation]
max_staleness = "5s"
[profiles.workflow]
max_staleness = "500ms"
[[shards]]
name = "shard0"
buckets = ["0-4095"]
primary = "host=127.0.0.1 port=9 dbname=propstore connect_timeout=30"
replicas = ["host=127.0.0.1 port=11 dbname=propstore connect_timeout=30"]
"""

READERS = [["get", "acme", "u1"], ["route", "acme", "u1"]]
CHECKS = [["lag"]]


@pytest.fixture
def offline_config(tmp_path: Path) -> str:
    """A topology file whose servers do not exist."""
    path = tmp_path / "propstore.toml"
    path.write_text(_TOPOLOGY)
    return str(path)


def invoke(config: str, *args: str) -> Result:
    return CliRunner().invoke(main, ["--config", config, *args])


def error_line(result: Result) -> str:
    """The ``Error: ...`` line of a usage error."""
    assert result.exit_code == 2, result.output
    (line,) = [ln for ln in result.stderr.splitlines() if ln.startswith("Error: ")]
    return line


@pytest.mark.parametrize("value", ["-1", "-500ms"])
def test_a_negative_duration_must_be_at_least_zero_in_every_command(
    offline_config: str, value: str
) -> None:
    lines = {error_line(invoke(offline_config, *cmd, "--max-staleness", value))
             for cmd in READERS + CHECKS}
    assert lines == {"Error: Invalid value for '--max-staleness': must be >= 0"}


def test_an_unknown_profile_is_the_same_usage_error_in_every_command(
    offline_config: str
) -> None:
    results = [invoke(offline_config, *cmd, "--profile", "nope") for cmd in READERS + CHECKS]
    lines = {error_line(result) for result in results}
    assert lines == {"Error: Invalid value for '--profile': unknown profile 'nope' "
                     "(have ['personalisation', 'workflow'])"}
    assert len({len(r.stderr.splitlines()) for r in results}) == 1  # same shape too


def test_a_bad_token_is_the_same_usage_error_for_get_and_route(offline_config: str) -> None:
    lines = {error_line(invoke(offline_config, *cmd, "--after", "nonsense"))
             for cmd in READERS}
    assert lines == {"Error: Invalid value for '--after': not a propstore token: 'nonsense'"}


@pytest.mark.parametrize("extra", [["--max-staleness", "1s"], ["--profile", "workflow"],
                                   ["--after", "pst1.shard0.10"]])
def test_strong_with_a_budget_is_refused_not_silently_preferred(
    offline_config: str, extra: list[str]
) -> None:
    for cmd in READERS:
        line = error_line(invoke(offline_config, *cmd, "--strong", *extra))
        assert "--strong reads the primary" in line


def test_profile_and_max_staleness_combine_to_the_tighter_bound_everywhere(
    offline_config: str
) -> None:
    topology = Topology.load(offline_config)
    both = read_budget(topology, profile="workflow", max_staleness=2.0).freshness
    assert both.max_staleness == 0.5 and both.label == "workflow"
    assert read_budget(topology, profile="personalisation",
                       max_staleness=2.0).freshness.max_staleness == 2.0
    assert lag_check_budget(topology, 2.0, "workflow") == (0.5, "500.0ms (profile workflow)")
    assert lag_check_budget(topology, 2.0, "personalisation") == (2.0, "2.00s")
    # The library reads the same options the same way.
    store_view = read_budget(topology, profile="workflow").freshness
    assert store_view.max_staleness == topology.profiles["workflow"].max_staleness


def test_every_budget_command_states_the_rules_in_its_help() -> None:
    for cmd in ["get", "route", "lag"]:
        text = " ".join(CliRunner().invoke(main, [cmd, "--help"]).stdout.split())
        assert " ".join(BUDGET_RULES.split()) in text, cmd


def test_lag_checks_the_tighter_of_profile_and_max_staleness_on_the_cluster(
    topology: Topology, store: PropertyStore
) -> None:
    def check(*args: str) -> dict[str, object]:
        result = CliRunner().invoke(main, ["--config", topology.source, "lag", "--json", *args])
        assert result.exit_code in (0, 1), result.output
        document = json.loads(result.stdout)
        assert isinstance(document["check"], dict)
        return {**document["check"], "exit": result.exit_code}

    alone = check("--profile", "personalisation")
    assert alone["ok"] and alone["exit"] == 0 and alone["max_staleness_seconds"] == 5.0
    # No replica is proven 0 s stale: the tighter bound decides, as a read would.
    both = check("--profile", "personalisation", "--max-staleness", "0")
    assert both["max_staleness_seconds"] == 0.0 and not both["ok"] and both["exit"] == 1
    assert both["failing_shards"] == [shard.name for shard in topology.shards]
