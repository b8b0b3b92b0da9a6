"""Reads through poolers and proxies: propstore vs a raw read through the same front.

For each front the sandbox can start in front of shard 0's first replica (PgBouncer in
session mode declared ``via = "session_pooler"``, PgBouncer in transaction mode, the same
on a PgBouncer >= 1.21 that tracks prepared statements (``pgbouncer-prepared``, declared
``pooler_tracks_prepared``; named statements on both sides), HAProxy),
propstore reads with a 1 s budget through the front, interleaved with a raw read through
the same front: protocol-level prepared (Parse once, Bind/Execute per read) where the
client keeps its server connection, unnamed extended protocol with its Sync (what a raw
client must send behind transaction pooling). The bar: propstore <= 1.3x the raw read;
replica share >= 95 % (the topology's healthy share, reported per front). Behind
transaction pooling a third contender reads with the two-statement pipeline (the store's
fallback on a schema without migration 0002, forced) beside the one-statement read.
"""

from __future__ import annotations

import json
import math
from typing import Any

import psycopg
from propstore import PropertyStore, Topology, _sql
from propstore.sandbox._poolers import front_available, wait_front_serves
from psycopg import pq

from _bench.env import BenchEnv, Skip
from _bench.options import Options
from _bench.results import Bar, ScenarioResult, reported
from _bench.scenarios._common import ProofCounter, picker
from _bench.timing import Contender, interleave

READ_BUDGET = 1.0
PIPELINED = "propstore get, 1 s budget, through {kind}, pipelined (as without migration 0002)"
#: (front kind, via declared in the topology, whether a raw client may prepare by name).
FRONTS = (
    ("pgbouncer-session", "session_pooler", True),
    ("pgbouncer-transaction", "transaction_pooler", False),
    # PgBouncer >= 1.21 tracking prepared statements (pooler_tracks_prepared): both named.
    ("pgbouncer-prepared", "transaction_pooler", True),
    ("haproxy", "load_balancer", True),
)


class RawThrough:
    """One autocommit libpq connection through a front: named or unnamed ``GET``."""

    def __init__(self, dsn: str, named: bool) -> None:
        self.conn: psycopg.Connection[Any] = psycopg.connect(dsn, autocommit=True)
        self.pgconn = self.conn.pgconn
        self.named = named
        self.sql = _sql.STATEMENTS[_sql.GET].encode()
        if named:
            result = self.pgconn.prepare(_sql.GET, self.sql)
            if result.status != pq.ExecStatus.COMMAND_OK:
                raise Skip(f"cannot prepare through the front: {result.error_message!r}")

    def get(self, tenant: str, user: str) -> object:
        params = (tenant.encode(), user.encode())
        result = (self.pgconn.exec_prepared(_sql.GET, params) if self.named
                  else self.pgconn.exec_params(self.sql, params))
        if result.status != pq.ExecStatus.TUPLES_OK:
            raise psycopg.DatabaseError((result.error_message or b"").decode())
        return json.loads(result.get_value(0, 0) or b"null") if result.ntuples else None

    def close(self) -> None:
        self.conn.close()


def _topology(env: BenchEnv, dsn: str, via: str, tracks_prepared: bool = False) -> Topology:
    shard = env.topology.shards[0]
    return Topology.from_dict({
        "bucket_count": env.topology.bucket_count,
        "shards": [{
            "name": shard.name,
            "buckets": [f"0-{env.topology.bucket_count - 1}"],
            "primary": {"name": shard.primary.name, "dsn": shard.primary.dsn},
            "replicas": [{"name": "front", "dsn": dsn, "via": via,
                          "pooler_tracks_prepared": tracks_prepared}],
        }],
    })


def topologies(env: BenchEnv, options: Options) -> ScenarioResult:
    """propstore through each front vs a raw read through the same front."""
    result = ScenarioResult(
        "topologies", "single-user reads of shard 0 through a pooler or proxy in front of "
        "its first replica; propstore (1 s budget) vs raw through the same front")
    if env.cluster is None:
        raise Skip("needs a local sandbox cluster to start poolers")
    for kind, via, named in FRONTS:
        reason = front_available(kind)  # type: ignore[arg-type]
        if reason is not None:
            result.notes.append(f"{kind}: skipped ({reason})")
            continue
        _through(env, options, result, kind, via, named)
    if not result.bars:
        result.bars.append(reported("no front could run here", 0.0))
    return result


def _through(env: BenchEnv, options: Options, result: ScenarioResult, kind: str, via: str,
             named: bool) -> None:
    assert env.cluster is not None
    users, tenant = env.shard_users(0, 2000), env.tenant
    replica = env.local_node(env.replica_name(0))
    front = env.cluster.front(kind, 0, [replica])  # type: ignore[arg-type]
    try:
        wait_front_serves(front)
        raw = RawThrough(front.dsn, named)
        store = PropertyStore(_topology(env, front.dsn, via, front.tracks_prepared))
        proofs = ProofCounter()
        raw_name = f"raw {'prepared' if named else 'unnamed'} through {kind}"
        ours = f"propstore get, 1 s budget, through {kind} (via {via})"
        pick_raw, pick_ours = picker(users, 31), picker(users, 32)
        contenders = [Contender(raw_name, lambda: raw.get(tenant, pick_raw())),
                      Contender(ours, lambda: proofs(
                          store.read(tenant, pick_ours(), max_staleness=READ_BUDGET)))]
        piped: PropertyStore | None = None
        if via == "transaction_pooler":
            # The same read verified by the two-statement pipeline, as on a schema without
            # migration 0002 (the store's own fallback, forced): the one statement's A/B.
            piped = PropertyStore(_topology(env, front.dsn, via, front.tracks_prepared))
            piped._core.replicas.pipeline_until["front"] = math.inf
            pick_piped = picker(users, 33)
            contenders.append(Contender(PIPELINED.format(kind=kind), lambda: piped.read(
                tenant, pick_piped(), max_staleness=READ_BUDGET)))
        try:
            run = interleave(contenders, duration=options.seconds(8.0), warmup=options.warmup,
                             block_seconds=options.block_seconds)
        finally:
            store.close()
            if piped is not None:
                piped.close()
            raw.close()
    finally:
        front.stop()
        env.cluster.fronts.remove(front)
    result.add_series(*run.series.values())
    ratio = result.ratio(ours, raw_name)
    counts = proofs.as_dict()
    total = sum(counts.values()) or 1
    share = sum(v for k, v in counts.items() if not k.startswith("primary")) / total
    result.bars += [
        Bar(f"propstore through {kind} / raw through it", ratio.value, 1.3,
            budget="propstore 1 s; raw none", text=str(ratio), detail=f"proofs {counts}"),
        Bar(f"replica share through {kind}", share * 100, 95.0, unit="%", at_least=True,
            budget="propstore 1 s", text=f"{share:.1%}"),
    ]
    if via == "transaction_pooler":
        piped_ratio = result.ratio(PIPELINED.format(kind=kind), raw_name)
        result.bars.append(reported(
            f"propstore through {kind}, pipelined (no migration 0002) / raw through it",
            piped_ratio.value, budget="propstore 1 s; raw none", text=str(piped_ratio),
            readme=False))
