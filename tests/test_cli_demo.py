"""``propstore demo --json``: the run's summary as one document on stdout, the progress on
stderr, and the same figures as the text summary (which ends with the last lag table)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from propstore.cli import main
from tests.test_cli import LAG_FIELDS


def test_demo_json_summarises_the_run_and_keeps_stdout_for_the_document() -> None:
    result = CliRunner().invoke(main, ["demo", "--duration", "6", "--users", "300", "--json"],
                                env={"PROPSTORE_CONFIG": None})
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)  # nothing but the document on stdout
    assert "Sandbox stopped." in result.stderr and "Starting a local cluster" in result.stderr
    assert document["violations"] == 0
    readers = {reader["name"]: reader for reader in document["readers"]}
    assert set(readers) == {"personalisation", "workflow", "writer (read-your-writes)"}
    for reader in readers.values():
        assert reader["reads"] == reader["replica_reads"] + reader["primary_reads"] > 0
        assert reader["violations"] == 0 and reader["p50_seconds"] <= reader["p99_seconds"]
    assert readers["workflow"]["fallback_reasons"].get("replica_stale", 0) > 0
    assert document["writes"] == readers["writer (read-your-writes)"]["reads"] > 0
    assert [e["text"].split()[1] for e in document["events"][1:]] == ["paused", "resumed"]
    assert len(document["lag"]) == 6 and all(set(row) == LAG_FIELDS for row in document["lag"])
    assert document["paused_nodes"] == ["shard0-replica1", "shard0-replica2"]
