"""Named statements behind a transaction pooler that tracks them (PgBouncer >= 1.21).

A node declared ``pooler_tracks_prepared`` sends protocol-level named statements (Parse by
name once per client connection, then Bind/Execute per read: PgBouncer prepares them on
whichever server connection serves the transaction) and still reuses no connection-scoped
fact: every replica read is verified in its own round trip. The soundness properties through
such a front (budget, no false claim, read-your-writes under paused replay, apply delay, a
crash-restart behind it and a RELOAD that repoints it) are ``tests/test_topologies.py``'s,
run there for ``pgbouncer-prepared`` too; this module checks that the statements really are
named (on the pooler's counters and on the server), and what happens when a node is declared
tracking but its pooler does not track (Debian 12's PgBouncer 1.18).

The tracking PgBouncer is built from Debian's newer source package by
``tools/build_pgbouncer.py`` (``.ci/run`` does it as root); without it those tests skip,
saying so.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs

from propstore import (
    AsyncPropertyStore,
    ConfigError,
    PropertyStore,
    PropStoreError,
    ReadResult,
    Topology,
    _sql,
)
from propstore.proof import describe_mode
from propstore.sandbox import LocalCluster, LocalNode
from propstore.sandbox._poolers import wait_front_serves
from propstore.store._pool import NodeReach
from tests._claims_load import ClaimsLoad
from tests.test_topologies import (
    HEALTHY_BUDGETS,
    RUN_SECONDS,
    _assert_sound,
    _reach,
    _run,
    _topology,
    fresh,
    topo_cluster,
)

__all__ = ["fresh", "topo_cluster"]  # the fixtures, shared with test_topologies


def _counters(rows: list[dict[str, str]]) -> dict[str, int]:
    """The propstore database's prepared-statement counters from ``SHOW STATS``."""
    (row,) = [r for r in rows if r["database"] == "propstore"]
    return {key: int(row[f"total_{key}_count"])
            for key in ("client_parse", "server_parse", "bind")}


def _server_statements(dsn: str) -> set[str]:
    """The statements prepared on the server connection a new client's transaction gets
    through the pooler (PgBouncer names them ``PGBOUNCER_<n>``)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute("SELECT name, statement FROM pg_prepared_statements",
                            prepare=False).fetchall()
    return {statement for name, statement in rows if name.startswith("PGBOUNCER_")}


@pytest.mark.slow
def test_reads_through_a_tracking_pooler_are_named_parsed_once_per_connection(
        fresh: LocalCluster) -> None:
    reached = _reach(fresh, "pgbouncer-prepared")
    front = reached.front
    assert front is not None and reached.tracks_prepared
    before = _counters(front.show("STATS"))

    def healthy(load: ClaimsLoad, victim: LocalNode) -> None:
        load.wait(RUN_SECONDS)

    report = _run(fresh, reached, healthy, HEALTHY_BUDGETS)
    _assert_sound(report)
    # Every replica read verified in its round trip: a tracking pooler is still a
    # transaction pooler, no connection-scoped fact proves anything there.
    assert set(report.proofs) <= {"pipeline", "primary"}, report.summary()
    assert not [e for e in report.events if e["event"] == "node_statements_lost"]
    after = _counters(front.show("STATS"))  # its totals are live, not per stats_period
    binds = after["bind"] - before["bind"]
    parses = after["client_parse"] - before["client_parse"]
    assert binds >= report.replica_reads > 0, (binds, report.summary())
    # Parse once per client connection (a dozen statements each), not once per read.
    assert 0 < parses * 10 <= binds, (parses, binds, report.summary())
    # On the server: its connection holds propstore's read statements, prepared by PgBouncer.
    read_sql = {_sql.STATEMENTS[name] for name in _sql.STATEMENTS
                if name in (_sql.REPLAY_LSN, _sql.GET) or name.startswith(b"propstore_verified")}
    assert _server_statements(front.dsn) & read_sql, _server_statements(front.dsn)


@pytest.mark.slow
def test_a_pooler_declared_tracking_that_does_not_is_named_once_and_reads_go_unnamed(
        fresh: LocalCluster) -> None:
    """Debian 12's PgBouncer 1.18 in transaction mode, declared ``pooler_tracks_prepared``:
    a server connection where another propstore client left its statements (one planted
    here, the same SQL under the same name) refuses the connection's Parse, and one whose
    server connection lacks them fails its Bind. One ``node_statements_lost`` event names the
    node and the fix, the node goes unnamed, and every read stays sound -- no
    ``replica_down``."""
    reached = _reach(fresh, "pgbouncer-transaction")
    reached.via, reached.tracks_prepared = "transaction_pooler", True
    name = _sql.BASE_STATEMENTS[0]
    with psycopg.connect(reached.dsn, autocommit=True) as conn:
        conn.execute(f"PREPARE {name.decode()} AS {_sql.STATEMENTS[name]}", prepare=False)

    def pause(load: ClaimsLoad, victim: LocalNode) -> None:
        load.wait(0.5)
        victim.pause_replay()
        load.wait(RUN_SECONDS)

    report = _run(fresh, reached, pause)
    _assert_sound(report)
    assert report.reasons["replica_down"] == 0, report.summary()
    told = [e for e in report.events if e["event"] == "node_statements_lost"]
    assert len(told) == 1 and told[0]["node"] == "replicas", told
    assert "max_prepared_statements" in told[0]["fix"], told[0]


@pytest.mark.slow
def _replica_reads(store: PropertyStore, user: str, wanted: int = 10) -> list[ReadResult]:
    """Reads of ``user`` until replicas served ``wanted`` of them (a replica read past its
    deadline on a loaded machine falls back to the primary: no proof of anything here)."""
    results: list[ReadResult] = []
    while sum(r.from_replica for r in results) < wanted and len(results) < 500:
        results.append(store.read("t", user, max_staleness=5.0))
    return results


def _failed_reads(events: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Replica reads that failed, but for missed deadlines (contention, not the topology)."""
    return [e for e in events if e["event"] == "replica_read_failed"
            and not any(w in str(e["error"]) for w in ("deadline", "no connection"))]


def _one_connection(topology: Topology) -> Topology:
    """``topology`` with one pooled connection per node: its Parses land on one server
    connection of the pooler, and none collide with another client's."""
    return dataclasses.replace(topology, routing=dataclasses.replace(
        topology.routing, pool_min_size=1, pool_max_size=1))


@pytest.mark.slow
def test_a_pooler_passing_statement_names_through_is_found_when_the_connection_opens(
        fresh: LocalCluster) -> None:
    """Declared tracking on a 1.18 PgBouncer, with nothing colliding: the connection's
    probe right after its Parses finds them on the server connection under propstore's own
    names (a tracking pooler renames them), so the node goes unnamed before its first read
    -- one event naming the node and the fix, every read served."""
    reached = _reach(fresh, "pgbouncer-transaction")
    topology = _one_connection(_topology(fresh, reached.dsn, "transaction_pooler", True))
    with capture_logs() as events, PropertyStore(topology) as store:
        store.set("t", "probed-user", {"v": 1})
        fresh.wait_caught_up()
        results = _replica_reads(store, "probed-user")
    assert all(r.props == {"v": 1} for r in results)
    assert sum(r.from_replica for r in results) >= 10, results
    told = [e for e in events if e["event"] == "node_statements_lost"]
    assert len(told) == 1 and "passes them through" in told[0]["error"], told
    assert told[0]["node"] == "replicas" and "max_prepared_statements" in told[0]["fix"]
    assert not _failed_reads(events), events


@pytest.mark.slow
def test_a_read_whose_named_statement_the_server_lacks_is_resent_unnamed_and_said_once(
        fresh: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The read path of the same diagnostic, for when the probe proved nothing (it ran on
    another server connection; disabled here): one connection's statements prepared on one
    server connection of a 1.18 PgBouncer, that server connection ended, the next read binds
    on a new one (``26000``): resent unnamed in the same read, one event, no failed read."""
    monkeypatch.setattr(NodeReach, "probed", lambda self, conn, own_names: None)
    reached = _reach(fresh, "pgbouncer-transaction")
    assert reached.front is not None
    topology = _one_connection(_topology(fresh, reached.dsn, "transaction_pooler", True))
    replica = fresh.shards[0].replicas[0]
    with capture_logs() as events, PropertyStore(topology) as store:
        store.set("t", "gone-user", {"v": 1})
        fresh.wait_caught_up()
        _replica_reads(store, "gone-user", 1)
        # Every server connection PgBouncer holds (one that served the monitor's poll last
        # carries the monitor's application_name): whichever the reads get next lacks the
        # statements (if the first read did not already land on one without them).
        replica.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE application_name LIKE 'propstore%'")
        wait_front_serves(reached.front)
        results = _replica_reads(store, "gone-user")
    assert all(r.props == {"v": 1} for r in results)
    assert sum(r.from_replica for r in results) >= 10, results
    told = [e for e in events if e["event"] == "node_statements_lost"]
    assert len(told) == 1 and "does not exist" in told[0]["error"], told
    assert "max_prepared_statements" in told[0]["fix"], told[0]
    assert not _failed_reads(events), events


@pytest.mark.slow
def test_a_shard_migrated_after_its_connection_opened_is_read_named_through_it(
        fresh: LocalCluster) -> None:
    """A connection opened before the table existed re-prepares in place once the shard is
    migrated (``DEALLOCATE ALL``, which PgBouncer >= 1.22 applies to its own statement
    map, then the Parses again): replica reads, named, and no statement lost."""
    from propstore.migrate import downgrade, upgrade

    reached = _reach(fresh, "pgbouncer-prepared")
    assert reached.front is not None
    primary = fresh.shards[0].primary
    topology = _one_connection(
        _topology(fresh, reached.dsn, reached.via, reached.tracks_prepared))
    downgrade(primary.dsn, "base")
    fresh.wait_caught_up()
    try:
        with capture_logs() as events, PropertyStore(topology) as store:
            with pytest.raises(PropStoreError):
                store.read("t", "late-user", max_staleness=5.0)
            upgrade(primary.dsn)
            fresh.wait_caught_up()
            store.set("t", "late-user", {"v": 1})
            fresh.wait_caught_up()
            before = _counters(reached.front.show("STATS"))
            results = _replica_reads(store, "late-user")
            binds = _counters(reached.front.show("STATS"))["bind"] - before["bind"]
    finally:
        upgrade(primary.dsn)
    served = [r for r in results if r.from_replica]
    assert len(served) >= 10 and all(r.props == {"v": 1} for r in served), results
    assert binds >= len(served), binds
    assert not [e for e in events if e["event"] == "node_statements_lost"], events


@pytest.mark.slow
def test_asyncio_reads_through_a_tracking_pooler_are_named_too(fresh: LocalCluster) -> None:
    """The asyncio store (the source the blocking one is generated from) binds the named
    statements too, and serves verified replica reads of the acknowledged write."""
    reached = _reach(fresh, "pgbouncer-prepared")
    assert reached.front is not None
    topology = _topology(fresh, reached.dsn, reached.via, reached.tracks_prepared)
    before = _counters(reached.front.show("STATS"))

    async def main() -> list[ReadResult]:
        async with AsyncPropertyStore(topology) as store:
            token = await store.set("t", "async-user", {"v": 1})
            return [await store.read("t", "async-user", after=token) for _ in range(40)]

    results = asyncio.run(main())
    served = [r for r in results if r.from_replica]
    assert served and all(r.props == {"v": 1} and r.proof == "pipeline" for r in served)
    binds = _counters(reached.front.show("STATS"))["bind"] - before["bind"]
    assert binds >= len(served), (binds, len(served))


def _node(**extra: object) -> dict[str, object]:
    return {"name": "r1", "dsn": "host=127.0.0.1 port=6432 dbname=propstore", **extra}


def _file(replica: dict[str, object]) -> Topology:
    return Topology.from_dict({"bucket_count": 4, "shards": [{
        "name": "s0", "buckets": ["0-3"], "primary": "host=127.0.0.1 port=5432",
        "replicas": [replica]}]})


def test_pooler_tracks_prepared_is_read_for_a_transaction_pooler_only() -> None:
    declared = _file(_node(via="transaction_pooler", pooler_tracks_prepared=True))
    assert declared.shards[0].replicas[0].pooler_tracks_prepared
    assert _file(_node(pooler_tracks_prepared=True)).shards[0].replicas[0].via == "auto"
    assert not _file(_node(via="transaction_pooler")).shards[0].replicas[0] \
        .pooler_tracks_prepared
    for via in ("direct", "session_pooler", "load_balancer"):
        with pytest.raises(ConfigError, match="node r1: pooler_tracks_prepared applies to a "
                                              "transaction pooler"):
            _file(_node(via=via, pooler_tracks_prepared=True))
    with pytest.raises(ConfigError, match="must be true or false"):
        _file(_node(via="transaction_pooler", pooler_tracks_prepared="yes"))


def test_lag_says_a_tracking_pooler_gets_named_statements_and_per_read_proofs() -> None:
    assert describe_mode("transaction_pooler", True, tracks_prepared=True) == (
        "transaction pooler: per-read proofs only, named statements")
    assert describe_mode("transaction_pooler", True, True, tracks_prepared=True) == (
        "transaction pooler: per-read proofs only")  # the pooler turned out not to track
    assert describe_mode("transaction_pooler", True) == (
        "transaction pooler: per-read proofs only")

