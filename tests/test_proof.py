"""The rule that decides whether a fact about a server run proves a read (``proof``)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from propstore import ConfigError, Topology
from propstore.lsn import LSN
from propstore.proof import (
    RunFacts,
    ServerRun,
    Sighting,
    add_sighting,
    covers,
    describe_mode,
    keeps_server,
    known_lsn,
    primary_proven,
    remember,
)

RUN_A = ServerRun(7, "10.0.0.1", 5432, "2026-12-01 10:00:00.000001+00")
RUN_B = ServerRun(7, "10.0.0.2", 5432, "2026-12-01 10:00:00.000001+00")
RUN_A_RESTARTED = ServerRun(7, "10.0.0.1", 5432, "2026-12-01 11:00:00.000001+00")


@dataclass
class Conn:
    propstore_opened_at: float = 1.0
    propstore_run: ServerRun | None = RUN_A
    propstore_keeps_server: bool = True
    propstore_verified_lsn: LSN | None = None


def test_a_fact_covers_a_connection_on_the_same_run_opened_before_it() -> None:
    assert covers(Sighting(RUN_A, 2.0, True, LSN(100)), Conn())


@pytest.mark.parametrize("fact, conn", [
    (Sighting(RUN_B, 2.0, True, LSN(100)), Conn()),                 # another backend
    (Sighting(RUN_A_RESTARTED, 2.0, True, LSN(100)), Conn()),       # another run
    (Sighting(RUN_A, 0.5, True, LSN(100)), Conn()),                 # poll before the open
    (Sighting(RUN_A, 2.0, True, LSN(100)), Conn(propstore_keeps_server=False)),  # tx pooler
    (Sighting(RUN_A, 2.0, True, LSN(100)), Conn(propstore_run=None)),
])
def test_a_fact_about_another_server_run_or_time_covers_nothing(
        fact: Sighting, conn: Conn) -> None:
    assert not covers(fact, conn)


def test_known_lsn_takes_the_newest_covering_fact_or_the_connections_own() -> None:
    facts = (Sighting(RUN_B, 2.0, True, LSN(900)), Sighting(RUN_A, 2.0, True, LSN(300)))
    assert known_lsn(facts, Conn()) == (LSN(300), "monitor")
    assert known_lsn(facts, Conn(propstore_verified_lsn=LSN(400))) == (LSN(400), "connection")
    assert known_lsn(facts, Conn(propstore_keeps_server=False,
                                 propstore_verified_lsn=LSN(400))) is None


def test_remember_keeps_a_verified_lsn_only_where_the_connection_keeps_its_server() -> None:
    kept, pooled = Conn(), Conn(propstore_keeps_server=False)
    for conn in (kept, pooled):
        remember(conn, LSN(50))
        remember(conn, LSN(40))
    assert kept.propstore_verified_lsn == LSN(50)
    assert pooled.propstore_verified_lsn is None


def test_primary_is_proven_only_by_a_primary_fact_about_the_connections_run() -> None:
    assert primary_proven((Sighting(RUN_A, 2.0, False, LSN(1)),), Conn())
    assert not primary_proven((Sighting(RUN_B, 2.0, False, LSN(1)),), Conn())
    assert not primary_proven((Sighting(RUN_A, 2.0, True, LSN(1)),), Conn())


def test_sightings_keep_one_fact_per_run_newest_first_and_stay_bounded() -> None:
    facts: tuple[Sighting, ...] = ()
    for i in range(20):
        run = ServerRun(7, f"10.0.0.{i % 10}", 5432, "t")
        facts = add_sighting(facts, Sighting(run, float(i), True, LSN(i)), keep=8)
    assert len(facts) == 8 and facts[0].at == 19.0
    assert len({f.run for f in facts}) == 8


def test_only_a_declared_session_pooler_keeps_facts_behind_a_detected_pooler() -> None:
    assert keeps_server("auto", pooler_seen=False)
    assert not keeps_server("auto", pooler_seen=True)
    assert keeps_server("session_pooler", pooler_seen=True)
    assert not keeps_server("transaction_pooler", pooler_seen=False)
    assert not keeps_server("direct", pooler_seen=True)
    assert describe_mode("auto", True) == "transaction pooler: per-read proofs only"


def test_server_run_parses_the_identity_row() -> None:
    run = ServerRun.from_row((b"7", b"10.0.0.1", b"5432", b"t0", b"99"))
    assert run == ServerRun(7, "10.0.0.1", 5432, "t0")
    assert ServerRun.from_row((b"7", None, None, b"t0", b"1")).address is None


def _config(via: object) -> dict[str, object]:
    return {"shards": [{"name": "s0", "buckets": ["0-4095"],
                        "primary": "host=127.0.0.1 port=1",
                        "replicas": [{"dsn": "host=127.0.0.1 port=2", "via": via}]}]}


def test_via_is_read_from_the_node_table() -> None:
    topology = Topology.from_dict(_config("transaction_pooler"), environ={})
    assert topology.shards[0].replicas[0].via == "transaction_pooler"
    assert topology.shards[0].primary.via == "auto"


def test_an_unknown_via_is_a_clear_config_error() -> None:
    with pytest.raises(ConfigError, match=r"via = 'pgbouncer' is not one of"):
        Topology.from_dict(_config("pgbouncer"), environ={})


def test_a_verified_reads_fact_covers_other_connections_to_its_run_opened_before_its_send(
) -> None:
    runs = RunFacts()
    runs.observe(RUN_A, 2.0, LSN(500))  # a round trip sent at 2.0 read replay LSN 500
    assert known_lsn((), Conn(propstore_opened_at=1.0), runs) == (LSN(500), "run")
    # Opened after the send (the answer may predate it): not covered; nor another run,
    # nor a connection that does not keep its server.
    assert known_lsn((), Conn(propstore_opened_at=2.5), runs) is None
    assert known_lsn((), Conn(propstore_run=RUN_A_RESTARTED), runs) is None
    assert known_lsn((), Conn(propstore_keeps_server=False), runs) is None
    # The newest proven LSN wins, whoever proved it.
    facts = (Sighting(RUN_A, 2.0, True, LSN(600)),)
    assert known_lsn(facts, Conn(), runs) == (LSN(600), "monitor")


def test_run_facts_are_monotonic_and_bounded() -> None:
    runs = RunFacts(size=4)
    assert runs.observe(RUN_A, 2.0, LSN(500)) is not None
    assert runs.observe(RUN_A, 3.0, LSN(400)) is None      # older LSN: kept the newer
    assert runs.observe(RUN_A, 1.0, LSN(900)) is None      # sent before the kept one
    fact = runs.get(RUN_A)
    assert fact is not None and (fact.lsn, fact.at) == (LSN(500), 2.0)
    assert runs.observe(RUN_A, 3.0, LSN(700)) is not None
    for i in range(10):
        runs.observe(ServerRun(7, f"10.0.1.{i}", 5432, "t"), 4.0, LSN(i + 1))
    assert len(runs.snapshot()) == 4 and runs.get(RUN_A) is None
