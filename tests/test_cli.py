"""The ``propstore`` command against the real local cluster (click's runner, or a subprocess
for the live views)."""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from propstore import ConfigError, PropertyStore, Topology
from propstore._durations import parse_duration
from propstore.cli import main
from propstore.lsn import LSN
from propstore.sandbox import LocalCluster
from tests.conftest import users_on_shard

#: The documented fields of every node in ``propstore lag --json`` (docs/operating.md).
LAG_FIELDS = {
    "shard", "node", "address", "configured_role", "role", "state", "state_seconds", "lsn",
    "receive_lsn", "bytes_behind", "staleness_bound_seconds", "receive_replay_gap_bytes",
    "eligible", "serves_replica_reads", "last_error", "proofs",
}


def run(config: Path | str, *args: str) -> Result:
    """``propstore --config CONFIG ARGS...`` in this process."""
    return CliRunner().invoke(main, ["--config", str(config), *args])


def columns(line: str) -> list[str]:
    """The cells of a plain table row (cells are separated by at least two spaces)."""
    return re.split(r"\s{2,}", line.strip())


def pause_shard0_and_write(cluster: LocalCluster, store: PropertyStore, topology: Topology,
                           writes: int = 5) -> None:
    """Pause replay on every replica of shard0, then move its primary on with writes."""
    cluster.wait_caught_up()
    for replica in cluster.shards[0].replicas:
        replica.pause_replay()
    (user,) = users_on_shard(topology, topology.shards[0].name, 1)
    for step in range(writes):
        store.set("acme", user, {"step": step})


@pytest.fixture
def own_cli_monitor(monkeypatch: pytest.MonkeyPatch) -> None:
    """CLI commands poll for themselves (``[monitor] sharing = "off"``): the tests that use
    this read what a monitor *new* to the pause can prove (nothing, since it never saw the
    primary before the writes). A command sharing the host's agent gets its older polls and
    proves the true, small bound until the pause outlasts the budget (tests/test_agent.py)."""
    monkeypatch.setenv("PROPSTORE_MONITOR_SHARING", "off")


@pytest.fixture
def config(topology: Topology) -> str:
    """The session cluster's topology file, schema migrated, tables empty."""
    return topology.source


def test_lag_table_lists_every_node_with_its_observed_role(config: str, topology: Topology
                                                           ) -> None:
    result = run(config, "lag")
    assert result.exit_code == 0, result.output
    for shard in topology.shards:
        for node in shard.nodes:
            (line,) = [ln for ln in result.stdout.splitlines() if f" {node.name} " in f" {ln} "]
            assert node.role in columns(line) and "up" in columns(line), line
    assert "\x1b[" not in result.stdout  # no colour when piped


def test_lag_json_has_the_documented_fields_and_matches_the_table(config: str) -> None:
    document = json.loads(run(config, "lag", "--json").stdout)
    assert set(document) == {"generated_at", "profiles", "nodes", "check", "refusals",
                             "source", "refusals_scope"}
    assert document["check"] is None
    assert document["profiles"] == {"personalisation": {"max_staleness_seconds": 5.0},
                                    "workflow": {"max_staleness_seconds": 0.5}}
    table = run(config, "lag").stdout
    for node in document["nodes"]:
        assert set(node) == LAG_FIELDS
        (line,) = [ln for ln in table.splitlines() if f" {node['node']} " in f" {ln} "]
        cells = columns(line)
        assert node["address"] in cells and node["role"] in cells and node["state"] in cells
        # The table was read after the JSON: the node's LSN there is the same or later
        # (the session cluster's servers write WAL of their own, e.g. checkpoints).
        (lsn_cell,) = [c for c in cells if re.fullmatch(r"[0-9A-F]+/[0-9A-F]+", c)]
        assert LSN.parse(lsn_cell) >= LSN.parse(node["lsn"]), (lsn_cell, node["lsn"])
        if node["role"] == "replica":
            assert node["serves_replica_reads"] and node["staleness_bound_seconds"] < 5.0
            assert set(node["eligible"]) == {"personalisation", "workflow"}
        else:
            assert node["eligible"] == {} and node["staleness_bound_seconds"] == 0.0


def test_lag_check_exits_1_while_a_shards_replicas_are_paused_and_0_after_resume(
    config: str, cluster: LocalCluster, store: PropertyStore, topology: Topology,
    own_cli_monitor: None,
) -> None:
    assert run(config, "lag", "--max-staleness", "2s").exit_code == 0
    pause_shard0_and_write(cluster, store, topology)

    failed = run(config, "lag", "--max-staleness", "2s")
    assert failed.exit_code == 1, failed.output
    assert "FAILED: no replica within 2.00s on shard0" in failed.stdout
    assert run(config, "lag", "--profile", "workflow").exit_code == 1
    check = json.loads(run(config, "lag", "--json", "--profile", "workflow").stdout)["check"]
    assert check == {"max_staleness_seconds": 0.5, "budget": "500.0ms (profile workflow)",
                     "ok": False, "failing_shards": ["shard0"]}

    for replica in cluster.shards[0].replicas:
        replica.resume_replay()
    cluster.wait_caught_up()
    assert run(config, "lag", "--max-staleness", "2s").exit_code == 0
    assert run(config, "lag", "--profile", "workflow").exit_code == 0


def test_lag_watch_json_prints_one_document_per_refresh(config: str) -> None:
    result = run(config, "lag", "--watch", "--json", "--interval", "0.1s", "--count", "3")
    documents = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.exit_code == 0 and len(documents) == 3
    assert all(len(d["nodes"]) == 6 for d in documents)
    first, last = (
        next(n["state_seconds"] for n in d["nodes"] if n["node"] == "shard0-replica1")
        for d in (documents[0], documents[-1])
    )
    assert last >= first + 0.2


def test_lag_check_exits_2_with_one_line_when_the_config_is_unreadable(tmp_path: Path) -> None:
    result = run(tmp_path / "missing.toml", "lag", "--max-staleness", "2s")
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0
    assert "cannot read config" in result.stderr and "Traceback" not in result.stderr


def test_debug_shows_the_error_with_its_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--debug", "--config", str(tmp_path / "x.toml"), "lag"])
    assert isinstance(result.exception, ConfigError)


def test_conflicting_options_are_a_usage_error(config: str) -> None:
    result = run(config, "get", "acme", "u", "--strong", "--max-staleness", "2s")
    assert result.exit_code == 2 and "--strong reads the primary" in result.stderr


def test_route_names_the_primary_while_the_replicas_are_paused(
    config: str, cluster: LocalCluster, store: PropertyStore, topology: Topology,
    own_cli_monitor: None,
) -> None:
    (user,) = users_on_shard(topology, topology.shards[0].name, 1)
    bucket = topology.bucket_of("acme", user)
    before = run(config, "route", "acme", user, "--profile", "workflow")
    assert f"bucket {bucket} of 4096, shard shard0" in before.stdout
    assert "choice: shard0-replica" in before.stdout

    pause_shard0_and_write(cluster, store, topology)
    during = run(config, "route", "acme", user, "--profile", "workflow")
    assert during.exit_code == 0, during.output
    assert "choice: primary shard0-primary (replica_stale)" in during.stdout
    assert during.stdout.count("rejected  shard0-replica") == 2


def test_set_get_unset_delete_through_the_cli(config: str) -> None:
    token = run(config, "set", "acme", "cli-user", "plan=pro", "seats:=5").stdout.strip()
    assert token.startswith("pst2.")
    merged = run(config, "set", "acme", "cli-user", "--json", '{"tags": ["a"]}').stdout.strip()
    document = json.loads(run(config, "get", "acme", "cli-user", "--after", merged,
                              "--json").stdout)
    assert document["props"] == {"plan": "pro", "seats": 5, "tags": ["a"]}
    assert document["version"] == 2 and document["within_budget"]
    assert {"node", "from_replica", "replay_lsn", "staleness_bound_seconds",
            "fallback_reason", "proof"} <= set(document)

    unset = run(config, "unset", "acme", "cli-user", "seats", "tags").stdout.strip()
    text = run(config, "get", "acme", "cli-user", "--after", unset).stdout
    assert json.loads(text[: text.rindex("}") + 1]) == {"plan": "pro"}
    assert "served by shard" in text

    deleted = run(config, "delete", "acme", "cli-user").stdout.strip()
    gone = run(config, "get", "acme", "cli-user", "--after", deleted)
    assert gone.exit_code == 0 and "acme/cli-user has no properties" in gone.stdout


def test_bad_input_is_one_line_and_exit_2(config: str) -> None:
    assert run(config, "set", "acme", "u").exit_code == 2
    assert run(config, "set", "acme", "u", "novalue").exit_code == 2
    bad_token = run(config, "get", "acme", "u", "--after", "nonsense")
    assert bad_token.exit_code == 2 and "not a propstore token" in bad_token.stderr
    assert "Traceback" not in bad_token.stderr


def test_shards_shows_every_shard_its_buckets_and_nodes(config: str, topology: Topology
                                                        ) -> None:
    text = run(config, "shards").stdout
    for shard in topology.shards:
        assert any(ln.split()[:3] == [shard.name, str(shard.buckets[0]), "2048"]
                   for ln in text.splitlines()), text
        for node in shard.nodes:
            assert node.address in text
    document = json.loads(run(config, "shards", "--json").stdout)
    assert [s["bucket_count"] for s in document["shards"]] == [2048, 2048]


def _commands(group: click.Group, prefix: tuple[str, ...] = ()
              ) -> Iterator[tuple[str, ...]]:
    context = click.Context(group)
    for name in group.list_commands(context):  # the root group loads its commands lazily
        command = group.get_command(context, name)
        assert command is not None, name
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


def test_every_command_has_useful_help() -> None:
    for path in [(), *_commands(main)]:
        result = CliRunner().invoke(main, [*path, "--help"])
        assert result.exit_code == 0, path
        summary = result.stdout.split("\n\n")[1].strip()
        assert len(summary) > 20, (path, summary)


def _lines(process: subprocess.Popen[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _replica_staleness(lines: queue.Queue[str], deadline: float) -> tuple[str, str]:
    """The next table row of shard0-replica1 from a ``lag --watch`` stream: (state,
    staleness cell)."""
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError("lag --watch printed nothing in time") from None
        if "shard0-replica1" in line:
            cells = columns(line)
            # node, address, role, state, for, lsn, behind, staleness, recv-replay, ...
            return cells[3], cells[7]


def test_lag_watch_shows_a_paused_replica_as_paused_with_growing_staleness(
    config: str, cluster: LocalCluster, store: PropertyStore, topology: Topology
) -> None:
    cluster.wait_caught_up()
    process = subprocess.Popen(
        [sys.executable, "-m", "propstore.cli", "--config", config, "lag", "--watch",
         "--interval", "0.2s"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        lines = _lines(process)
        deadline = time.monotonic() + 60
        assert _replica_staleness(lines, deadline)[0] == "up"
        pause_shard0_and_write(cluster, store, topology)
        # Until the watcher's monitor samples the primary past the paused position, the
        # bound is only the age of its last poll; from then on it must grow with the clock.
        window: list[float] = []
        while len(window) < 4 or window[-1] - window[0] < 0.5:
            state, staleness = _replica_staleness(lines, deadline)
            bound = parse_duration(staleness) if state == "paused" else None
            if bound is None or (window and bound <= window[-1]):
                window = []
            if bound is not None:
                window.append(bound)
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert process.returncode == 0, process.stderr.read() if process.stderr else ""
