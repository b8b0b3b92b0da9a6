"""Proofs where users put their replicas: PgBouncer, HAProxy, libpq multi-host DSNs.

One private cluster (1 shard, 2 replicas) for the module; each test puts one topology in
front of the replicas, injects one fault (paused replay, apply delay, a crash-restart
behind the front, a RELOAD that repoints the entry) and runs a load that checks every read
on its data: within its budget, no false claim (the data is at least as new as the
``replay_lsn`` and ``staleness_bound`` the result states), and read-your-writes. Replicas
must serve some of the reads in every topology.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, LiteralString

import psycopg
import pytest
from structlog.testing import capture_logs

from propstore import PropertyStore, Topology
from propstore.sandbox import LocalCluster, LocalNode
from propstore.sandbox._poolers import Front, front_available, wait_front_serves
from tests._claims_load import BUDGETS, ClaimsLoad, ClaimsReport

pytestmark = pytest.mark.slow

RUN_SECONDS = 2.5
USERS = [f"topo-user-{i}" for i in range(24)]


@pytest.fixture(scope="module")
def topo_cluster() -> Iterator[LocalCluster]:
    """A private 1x2 cluster, migrated, for this module."""
    from propstore.migrate import upgrade

    with LocalCluster(shards=1, replicas=2) as cluster:
        upgrade(cluster.shards[0].primary.dsn)
        cluster.wait_caught_up()
        yield cluster


@pytest.fixture
def fresh(topo_cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The module cluster with an empty table; fronts and faults undone after the test."""
    topo_cluster.shards[0].primary.execute("TRUNCATE user_properties")
    topo_cluster.wait_caught_up()
    yield topo_cluster
    for front in topo_cluster.fronts:
        front.stop()
    topo_cluster.fronts.clear()
    topo_cluster.reset_faults()


@dataclass
class Reached:
    """How the test reaches the replicas: the replica DSN and the server(s) behind it."""

    dsn: str
    #: Servers a connection may land on; faults go to ``servers[-1]`` (the last target).
    servers: list[LocalNode]
    front: Front | None = None
    via: str = "auto"
    #: The front tracks protocol-level prepared statements (``pooler_tracks_prepared``).
    tracks_prepared: bool = False


def _multihost_dsn(nodes: list[LocalNode]) -> str:
    hosts = ",".join("127.0.0.1" for _ in nodes)
    ports = ",".join(str(n.port) for n in nodes)
    return (f"host={hosts} port={ports} load_balance_hosts=random "
            "dbname=propstore user=postgres")


#: Topologies tested with the ``via`` their file declares (the rest use ``auto``).
DECLARED = {"pgbouncer-session-declared": ("pgbouncer-session", "session_pooler"),
            "pgbouncer-prepared": ("pgbouncer-prepared", "transaction_pooler")}


def _reach(cluster: LocalCluster, kind: str) -> Reached:
    replicas = cluster.shards[0].replicas
    kind, via = DECLARED.get(kind, (kind, "auto"))
    if kind == "libpq-multihost":
        if psycopg.pq.version() < 160000:
            pytest.skip("libpq < 16 has no load_balance_hosts")
        return Reached(_multihost_dsn(replicas), list(replicas), None, via)
    reason = front_available(kind)  # type: ignore[arg-type]
    if reason is not None:
        pytest.skip(reason)
    front = cluster.front(kind)  # type: ignore[arg-type]
    wait_front_serves(front)
    return Reached(front.dsn, list(front.targets), front, via, front.tracks_prepared)


def _topology(cluster: LocalCluster, replica_dsn: str, via: str = "auto",
              tracks_prepared: bool = False) -> Topology:
    shard = cluster.shards[0]
    return Topology.from_dict({
        "bucket_count": 64,
        # No fallback cap: StaleReadError past it is the limiter's policy, not a proof. A
        # longer replica deadline than the 50 ms default: on a shared 2-core machine two
        # missed deadlines mark the replica down for a poll interval, which says nothing
        # about the topology (the deadline itself is tested in test_faults.py).
        "routing": {"primary_fallback_rate": 0, "replica_deadline": "250ms"},
        "shards": [{
            "name": shard.name, "buckets": ["0-63"],
            "primary": {"name": "primary", "dsn": shard.primary.dsn},
            "replicas": [{"name": "replicas", "dsn": replica_dsn, "via": via,
                          "pooler_tracks_prepared": tracks_prepared}],
        }],
    })


def _run(cluster: LocalCluster, reached: Reached,
         fault: Callable[[ClaimsLoad, LocalNode], None],
         budgets: tuple[float, ...] = BUDGETS) -> ClaimsReport:
    topology = _topology(cluster, reached.dsn, reached.via, reached.tracks_prepared)
    with capture_logs() as events, PropertyStore(topology) as store, \
            ClaimsLoad(store, USERS, budgets=budgets) as load:
        load.wait(0.5)
        fault(load, _victim(reached))
        report = load.stop()
    report.events = events
    print(report.summary())
    return report


def _monitor_on(node: LocalNode) -> bool:
    return bool(node.scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'propstore-monitor'"))


def _victim(reached: Reached) -> LocalNode:
    """The server to hurt: the only one, or one the monitor's connection is *not* on (the
    case where an observation of the DSN describes another server than the reads use)."""
    if len(reached.servers) == 1:
        return reached.servers[0]
    others = [n for n in reached.servers if not _monitor_on(n)]
    assert others, "the monitor seems connected to every backend"
    return others[0]


def _assert_sound(report: ClaimsReport, *, some_down: bool = False) -> None:
    assert report.reads > 0 and report.token_reads > 0 and report.writes > 0, report.summary()
    assert report.budget_violations == 0, report.examples
    assert report.false_claims == 0, report.examples
    assert report.missed_own_writes == 0, report.examples
    assert report.replica_reads > 0, f"no replica served a read: {report.summary()}"
    if not some_down:
        # Nothing was down: a failed replica read other than a missed deadline (contention
        # on a shared machine) is the topology breaking a statement, passed off as an outage.
        broken = [e for e in report.events if e["event"] == "replica_read_failed"
                  and not any(w in e["error"] for w in ("deadline", "no connection"))]
        assert not broken, (broken[:3], report.summary())
        assert not report.errors, (dict(report.errors), report.examples)


TOPOLOGIES = ["pgbouncer-session", "pgbouncer-session-declared", "pgbouncer-transaction",
              "pgbouncer-prepared", "pgbouncer-hosts", "haproxy", "libpq-multihost"]
#: Topologies whose replica DSN reaches both replicas (the fault hits one of them).
MULTI = {"pgbouncer-hosts", "haproxy", "libpq-multihost"}

#: Replica share of budget reads while healthy, per topology (docs/deployment.md), for
#: budgets of a few monitor intervals and up: a 0.1 s budget is one 100 ms interval, so
#: about half its reads find the newest primary sample too old and go to the primary.
HEALTHY_SHARE = 0.95
HEALTHY_BUDGETS = (0.5, 1.0, 5.0)


@pytest.mark.parametrize("kind", TOPOLOGIES)
def test_replicas_serve_nearly_every_read_while_healthy(fresh: LocalCluster, kind: str) -> None:
    reached = _reach(fresh, kind)

    def healthy(load: ClaimsLoad, victim: LocalNode) -> None:
        load.wait(RUN_SECONDS)

    report = _run(fresh, reached, healthy, HEALTHY_BUDGETS)
    _assert_sound(report)
    assert report.budget_replica_share >= HEALTHY_SHARE, report.summary()


@pytest.mark.parametrize("kind", TOPOLOGIES)
def test_reads_within_budget_and_claims_true_under_paused_replay(
        fresh: LocalCluster, kind: str) -> None:
    reached = _reach(fresh, kind)

    def pause(load: ClaimsLoad, victim: LocalNode) -> None:
        victim.pause_replay()
        load.wait(RUN_SECONDS)

    _assert_sound(_run(fresh, reached, pause))


@pytest.mark.parametrize("kind", TOPOLOGIES)
def test_reads_within_budget_and_claims_true_under_apply_delay(
        fresh: LocalCluster, kind: str) -> None:
    reached = _reach(fresh, kind)

    def delay(load: ClaimsLoad, victim: LocalNode) -> None:
        victim.set_apply_delay(0.7)
        load.wait(RUN_SECONDS)

    _assert_sound(_run(fresh, reached, delay))


@pytest.mark.parametrize("kind", TOPOLOGIES)
def test_reads_sound_across_a_replica_crash_restart_behind_the_front(
        fresh: LocalCluster, kind: str) -> None:
    reached = _reach(fresh, kind)

    def crash(load: ClaimsLoad, victim: LocalNode) -> None:
        # Paused first: the restarted server reopens behind what it had shown (at most at
        # its last restartpoint), which is what a remembered LSN must not survive.
        victim.pause_replay()
        load.wait(0.5)
        victim.kill()
        victim.start()
        victim.pause_replay()
        load.wait(RUN_SECONDS)

    # Reads in flight on the crashed server may fail and fall back; claims may not be false.
    _assert_sound(_run(fresh, reached, crash), some_down=True)


@pytest.mark.parametrize("kind", ["haproxy", "libpq-multihost"])
def test_verified_reads_lend_their_run_facts_soundly_to_other_connections(
        fresh: LocalCluster, kind: str) -> None:
    """Reads verified in their own round trip refresh their server run's fact, and other
    connections to that run reuse it (proof ``run``) -- never for another server: with the
    backend the monitor is not on paused, every claim stays true."""
    reached = _reach(fresh, kind)

    def pause(load: ClaimsLoad, victim: LocalNode) -> None:
        victim.pause_replay()
        load.wait(RUN_SECONDS)

    report = _run(fresh, reached, pause)
    _assert_sound(report)
    assert report.proofs["run"] > 0, report.summary()


@pytest.mark.parametrize("kind", ["pgbouncer-session", "pgbouncer-session-declared",
                                  "pgbouncer-transaction", "pgbouncer-prepared"])
def test_token_reads_see_own_writes_after_a_reload_repoints_the_entry(
        fresh: LocalCluster, kind: str) -> None:
    reached = _reach(fresh, kind)
    replica1, replica2 = fresh.shards[0].replicas
    assert reached.front is not None and reached.servers == [replica1]

    def repoint(load: ClaimsLoad, victim: LocalNode) -> None:
        load.wait(0.5)  # connections verify (and remember) replica1's LSNs
        replica2.pause_replay()
        reached.front.repoint([replica2])  # type: ignore[union-attr]
        # Recycle the pooled clients' server connections (as server_lifetime would): new
        # clients land on replica2 while the monitor's connection stays on replica1.
        replica1.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                         " WHERE application_name LIKE 'propstore:%'")
        load.wait(RUN_SECONDS)

    _assert_sound(_run(fresh, reached, repoint), some_down=True)


def _upsert(primary: LocalNode, user: str, value: int) -> str:
    """Write ``{"v": value}`` for ``user`` on the primary; the flush LSN read after the ack."""
    primary.execute(
        "INSERT INTO user_properties (tenant_id, user_id, bucket, props)"
        " VALUES ('t', %s, 0, jsonb_build_object('v', %s::int))"
        " ON CONFLICT (tenant_id, user_id) DO UPDATE SET props = EXCLUDED.props,"
        " version = user_properties.version + 1", (user, value))
    return str(primary.scalar("SELECT pg_current_wal_flush_lsn()"))


def test_the_verifying_function_reads_its_data_after_its_lsn_not_on_the_callers_snapshot(
        fresh: LocalCluster) -> None:
    """Migration 0002's ``propstore_read`` reads the replay LSN, then the data on a
    snapshot of its own (VOLATILE), not on the calling statement's. A cursor pins the
    calling statement's snapshot before a write; fetched after the write replayed, the
    function must return the write's LSN *and* its data (a STABLE function would return the
    new LSN over the old data: a read claiming a write it does not contain)."""
    primary, replica = fresh.shards[0].primary, fresh.shards[0].replicas[0]
    _upsert(primary, "fn-user", 1)
    fresh.wait_caught_up()
    with psycopg.connect(replica.dsn) as conn:  # a transaction: READ COMMITTED, a cursor
        conn.execute("DECLARE pinned NO SCROLL CURSOR FOR SELECT replay_lsn::text, props"
                     " FROM propstore_read('t', 'fn-user')")
        written = _upsert(primary, "fn-user", 2)
        fresh.wait_caught_up()
        ((lsn, props),) = conn.execute("FETCH ALL FROM pinned").fetchall()
        conn.rollback()
    assert replica.scalar("SELECT %s::pg_lsn >= %s::pg_lsn", (lsn, written))
    assert props == {"v": 2}, f"replay LSN {lsn} (>= the write's {written}) over older data"


@pytest.mark.parametrize(("function", "query"), [
    ("propstore_read", "SELECT * FROM propstore_read('t', 'fn-user')"),
    ("propstore_read_many", "SELECT * FROM propstore_read_many('t', ARRAY['fn-user'])"),
])
def test_the_verifying_function_refuses_a_snapshot_shared_across_statements(
        fresh: LocalCluster, function: str, query: LiteralString) -> None:
    """Under REPEATABLE READ every statement shares the transaction's first snapshot, so
    the data could predate the LSN: each function refuses, naming itself, instead of
    answering."""
    replica = fresh.shards[0].replicas[0]
    with psycopg.connect(replica.dsn) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        with pytest.raises(psycopg.errors.InvalidTransactionState,
                           match=f"^{function} needs READ COMMITTED"):
            conn.execute(query)


def test_without_the_verifying_function_reads_fall_back_to_the_pipeline_and_say_so_once(
        fresh: LocalCluster) -> None:
    """On a schema without migration 0002 (or a replica that has not replayed it), reads
    behind a transaction pooler are still verified -- by the two-statement pipeline -- and
    one event names the node and the fix; every claim stays true under paused replay."""
    from propstore.migrate import downgrade, upgrade

    primary = fresh.shards[0].primary
    downgrade(primary.dsn, "0001")
    fresh.wait_caught_up()
    try:
        reached = _reach(fresh, "pgbouncer-transaction")
        reached.via = "transaction_pooler"

        def pause(load: ClaimsLoad, victim: LocalNode) -> None:
            load.wait(0.5)
            victim.pause_replay()
            load.wait(RUN_SECONDS)

        report = _run(fresh, reached, pause)
        assert report.reads > 0 and report.replica_reads > 0, report.summary()
        assert report.budget_violations == 0 and report.false_claims == 0, report.examples
        assert report.missed_own_writes == 0, report.examples
        assert report.proofs["pipeline"] > 0, report.summary()
        told = [e for e in report.events if e["event"] == "node_verified_read_pipelined"]
        assert len(told) == 1 and told[0]["node"] == "replicas", told
        assert "propstore migrate up" in told[0]["fix"]
    finally:
        upgrade(primary.dsn)  # replicas replay it once the fixture has undone the pause


def test_behind_transaction_pooling_a_read_is_verified_in_one_statement(
        fresh: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """With migration 0002, a read behind a transaction pooler sends one statement (the
    function, its own LSN check inside), not the two-statement pipeline."""
    from propstore import _sql, _wire

    reached = _reach(fresh, "pgbouncer-transaction")
    sent: list[tuple[bytes, ...]] = []
    execute = _wire.execute

    def spy(conn: object, statements: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(tuple(s.name for s in statements))
        return execute(conn, statements, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(_wire, "execute", spy)
    with capture_logs() as events, PropertyStore(
            _topology(fresh, reached.dsn, "transaction_pooler")) as store:
        store.set("t", "one-statement", {"v": 1})
        # Replayed on both replicas first: a 5 s budget may rightly miss a write made a
        # millisecond before (its bound says so); the test is about the statement sent.
        from tests.test_store import wait_for
        wait_for(lambda: all(r.scalar("SELECT count(*) FROM user_properties"
                                      " WHERE user_id = 'one-statement'") == 1
                             for r in fresh.shards[0].replicas), timeout=30)
        sent.clear()
        results = [store.read("t", "one-statement", max_staleness=5.0) for _ in range(20)]
    served = [r for r in results if r.from_replica]
    assert served and all(r.proof == "pipeline" and r.props == {"v": 1} for r in served)
    reads = [names for names in sent if _sql.GET in names or _sql.VERIFIED_GET in names]
    assert len(reads) >= len(served) and all(names == (_sql.VERIFIED_GET,) for names in reads), (
        reads[:3])
    assert not [e for e in events if e["event"] == "node_verified_read_pipelined"], events


@pytest.mark.parametrize("schema", ["0002", "0001"])
def test_under_repeatable_read_no_read_is_served_on_a_snapshot_older_than_its_lsn(
        fresh: LocalCluster, schema: str) -> None:
    """Where the server's reads run under REPEATABLE READ (here the database's default; a
    transaction pooler's other clients can leave it on a server connection too) every
    statement of a transaction shares its first snapshot, so neither the function (0002)
    nor the pipeline (0001) proves its data as new as its LSN: no such read is served from
    the replica, the primary serves it, one event names the node and the fix, and every
    claim stays true."""
    from propstore.migrate import downgrade, upgrade

    primary = fresh.shards[0].primary
    if schema == "0001":
        downgrade(primary.dsn, "0001")
    primary.execute("ALTER DATABASE propstore SET default_transaction_isolation"
                    " = 'repeatable read'")
    fresh.wait_caught_up()
    try:
        reached = _reach(fresh, "pgbouncer-transaction")
        reached.via = "transaction_pooler"

        def run(load: ClaimsLoad, victim: LocalNode) -> None:
            load.wait(RUN_SECONDS)

        report = _run(fresh, reached, run)
        assert report.reads > 0 and report.writes > 0, report.summary()
        assert report.budget_violations == 0 and report.false_claims == 0, report.examples
        assert report.missed_own_writes == 0, report.examples
        assert report.proofs["pipeline"] == 0, report.summary()
        told = [e for e in report.events if e["event"] == "node_not_read_committed"]
        assert len(told) == 1 and told[0]["node"] == "replicas", told
        assert not report.errors, dict(report.errors)
    finally:
        primary.execute("ALTER DATABASE propstore RESET default_transaction_isolation")
        if schema == "0001":
            upgrade(primary.dsn)
