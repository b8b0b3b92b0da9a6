"""Healthy-cluster latency: single reads, batch reads and writes, interleaved with the floor.

Every contender runs against the same server: shard 0's first replica for reads (raw psycopg,
propstore's replica reads, Pgpool's standby) and shard 0's primary for writes.
"""

from __future__ import annotations

import itertools
import random
import time

from propstore import Token

from _bench.contenders import RawNode
from _bench.env import BenchEnv
from _bench.options import Options
from _bench.results import Bar, ScenarioResult
from _bench.scenarios._common import (
    ProofCounter,
    maybe_profile,
    note_errors,
    pgpool_for_shard0,
    picker,
)
from _bench.stats import Ratio
from _bench.timing import Contender, Event, interleave

READ_BUDGET = 1.0  # seconds: a typical bounded-staleness budget
BATCH_SIZE = 10_000
FLOOR = "raw psycopg (replica)"
FAST = "propstore get, 1 s budget"
FLOOR_AFTER = "raw psycopg (replica), after a write"
FAST_AFTER = "propstore get, 1 s budget, after a write"
TOKEN = "propstore get, token (LSN pipelined), after a write"


def read_fresh(env: BenchEnv, options: Options) -> ScenarioResult:
    """Single-user reads on a healthy shard: propstore vs raw psycopg vs Pgpool."""
    result = ScenarioResult(
        "read-fresh", "single-user reads of shard 0, healthy replica, same server for all")
    tenant, users = env.tenant, env.shard_users(0, 2000)
    raw = RawNode(env.replica_dsn(0))
    store = env.open_store()
    fast, verified = ProofCounter(), ProofCounter()
    replica_watch = RawNode(env.replica_dsn(0))
    ticker = env.shard_users(0, 1, offset=2000)[0]
    ticks = itertools.count()
    token: list[Token] = []

    def write_and_wait() -> None:
        # Untimed: a write a moment ago, already replayed, so the timed read must prove
        # the replica has it with the LSN pipelined before its query (the in-line proof).
        token[:] = [store.set(tenant, ticker, {"tick": next(ticks)})]
        lsn = str(token[0].lsn_for(env.topology.shards[0].name))
        while not replica_watch.replayed(lsn):
            time.sleep(0.0002)

    pick_raw, pick_fast, pick_ver = picker(users, 1), picker(users, 2), picker(users, 3)
    pick_raw_after, pick_fast_after = picker(users, 6), picker(users, 7)
    contenders = [
        Contender(FLOOR, lambda: raw.get(tenant, pick_raw())),
        Contender(FAST, lambda: fast(store.read(tenant, pick_fast(), max_staleness=READ_BUDGET))),
        # A read right after a write (and the wait for its replay, during which this thread
        # sleeps) runs on cold caches against a replica that just replayed: the token read
        # is compared with a raw read and a 1 s-budget read taken under the same conditions.
        Contender(FLOOR_AFTER, lambda: raw.get(tenant, pick_raw_after()), every=2,
                  before=write_and_wait),
        Contender(FAST_AFTER,
                  lambda: store.read(tenant, pick_fast_after(), max_staleness=READ_BUDGET),
                  every=2, before=write_and_wait),
        Contender(TOKEN, lambda: verified(store.read(tenant, pick_ver(), after=token[0])),
                  every=2, before=write_and_wait),
    ]
    with pgpool_for_shard0(env, options, result) as pgpool:
        clients: list[RawNode] = []
        if pgpool is not None:
            prepared, simple = RawNode(pgpool.dsn()), RawNode(pgpool.dsn(), simple=True)
            clients += [prepared, simple]
            pick_pp, pick_ps = picker(users, 4), picker(users, 5)
            contenders += [
                Contender("pgpool (prepared)", lambda: prepared.get(tenant, pick_pp())),
                Contender("pgpool (simple protocol)", lambda: simple.get(tenant, pick_ps())),
            ]
        try:
            run = interleave(contenders, duration=options.seconds(15.0),
                             warmup=options.warmup, block_seconds=options.block_seconds,
                             events=[Event(0.0, fast.reset, "count 1 s budget proofs"),
                                     Event(0.0, verified.reset, "count token proofs")])
            result.duration = run.seconds
            result.add_series(*run.series.values())
            main = result.ratio(FAST, FLOOR)
            inline = result.ratio(TOKEN, FLOOR_AFTER)
            result.ratio(FLOOR_AFTER, FLOOR)
            result.ratio(FAST_AFTER, FLOOR_AFTER)
            proof_cost = Ratio.of(run.series[TOKEN], run.series[FAST_AFTER])
            result.facts["token read / 1 s-budget read, both after a write (the in-line "
                         "proof's own cost)"] = str(proof_cost)
            result.bars += [
                Bar("propstore get (1 s budget) median / raw", main.value, 1.25,
                    detail=f"{main}; proofs {fast.as_dict()}"),
                Bar("propstore get (token, LSN pipelined) median / raw, both after a write",
                    inline.value, 1.25, detail=f"{inline}; proofs {verified.as_dict()}"),
            ]
            if pgpool is not None:
                for name in ("pgpool (prepared)", "pgpool (simple protocol)"):
                    ratio = result.ratio(name, FLOOR)
                    result.facts[f"{name} median / raw"] = str(ratio)
            result.facts["proofs (1 s budget)"] = fast.as_dict()
            result.facts["proofs (token)"] = verified.as_dict()
            note_errors(result, contenders)
            maybe_profile(options, result, "propstore-get-1s",
                          lambda: store.get(tenant, pick_fast(), max_staleness=READ_BUDGET))
            maybe_profile(options, result, "raw-get", lambda: raw.get(tenant, pick_raw()))
        finally:
            for client in clients:
                client.close()
            store.close()
            raw.close()
            replica_watch.close()
    return result


def read_batch(env: BenchEnv, options: Options) -> ScenarioResult:
    """``get_many`` of 10,000 users of every shard vs one raw query per shard, sequentially."""
    result = ScenarioResult(
        "read-batch", f"{BATCH_SIZE:,} users across all shards, healthy replicas")
    tenant = env.tenant
    ids = random.Random(11).sample(env.users, min(BATCH_SIZE, len(env.users)))
    if len(ids) < BATCH_SIZE:
        result.notes.append(f"only {len(ids)} users loaded; batch is smaller than {BATCH_SIZE}")
    groups: dict[int, list[str]] = {}
    for user in ids:
        groups.setdefault(env.topology.shard_index_of(tenant, user), []).append(user)
    raws = {shard: RawNode(env.replica_dsn(shard)) for shard in groups}
    store = env.open_store()

    def raw_batch() -> None:
        found: dict[str, object] = {}
        for shard, users in groups.items():
            found.update(raws[shard].get_many(tenant, users))
        assert len(found) == len(ids)

    def propstore_batch() -> None:
        found = store.get_many(tenant, ids, max_staleness=READ_BUDGET)
        assert len(found) == len(ids)

    def singles() -> None:
        for user in ids:
            store.get(tenant, user, max_staleness=READ_BUDGET)

    try:
        # Give the 10,000 single gets about a third of the run: time one pass of each first.
        t0 = time.perf_counter()
        raw_batch()
        propstore_batch()
        pair = time.perf_counter() - t0
        t0 = time.perf_counter()
        singles()
        single_pass = time.perf_counter() - t0
        every = max(1, round(single_pass / (2 * pair)))
        contenders = [
            Contender("raw psycopg, 1 query per shard", raw_batch),
            Contender("propstore get_many", propstore_batch),
            Contender(f"propstore {len(ids):,} single gets", singles, every=every),
        ]
        run = interleave(contenders, duration=options.seconds(20.0), warmup=options.warmup,
                         block_seconds=max(options.block_seconds, 2 * single_pass))
        result.duration = run.seconds
        result.add_series(*run.series.values())
        ratio = result.ratio("propstore get_many", "raw psycopg, 1 query per shard")
        speedup = result.ratio(f"propstore {len(ids):,} single gets", "propstore get_many")
        result.bars += [
            Bar("propstore get_many median / raw per-shard queries", ratio.value, 1.3,
                detail=str(ratio)),
            Bar("single gets / get_many (speed-up)", speedup.value, 20.0, at_least=True,
                detail=str(speedup)),
        ]
        floor_speedup = Ratio.of(run.series[f"propstore {len(ids):,} single gets"],
                                 run.series["raw psycopg, 1 query per shard"])
        result.facts["single gets / raw per-shard queries (what the floor itself achieves)"] = (
            str(floor_speedup))
        result.facts["shards"] = {env.topology.shards[s].name: len(u) for s, u in groups.items()}
        note_errors(result, contenders)
        maybe_profile(options, result, "propstore-get-many", propstore_batch)
        maybe_profile(options, result, "raw-batch", raw_batch)
    finally:
        store.close()
        for raw in raws.values():
            raw.close()
    return result


def write(env: BenchEnv, options: Options) -> ScenarioResult:
    """``set`` (merge, token read after commit) vs a raw upsert, on shard 0's primary."""
    result = ScenarioResult("write", "merge of one key into a user's document on shard 0")
    tenant = env.tenant
    store = env.open_store()
    raw = RawNode(env.primary_dsn(0))
    # Disjoint users per contender, so no two contend for one row lock.
    raw_users, store_users, pool_users = (env.shard_users(0, 1000, offset=i * 1000)
                                          for i in range(3))
    seq = itertools.count()
    pick_raw, pick_store, pick_pool = (picker(raw_users, 21), picker(store_users, 22),
                                       picker(pool_users, 23))

    def raw_write() -> None:
        user = pick_raw()
        raw.merge(tenant, user, env.bucket(user), {"seq": next(seq)})

    contenders = [
        Contender("raw psycopg upsert (primary)", raw_write),
        Contender("propstore set", lambda: store.set(tenant, pick_store(), {"seq": next(seq)})),
    ]
    with pgpool_for_shard0(env, options, result) as pgpool:
        client = None if pgpool is None else RawNode(pgpool.dsn())
        if client is not None:
            def pool_write() -> None:
                user = pick_pool()
                client.merge(tenant, user, env.bucket(user), {"seq": next(seq)})

            contenders.append(Contender("pgpool upsert (prepared)", pool_write))
        try:
            run = interleave(contenders, duration=options.seconds(15.0),
                             warmup=options.warmup, block_seconds=options.block_seconds)
            result.duration = run.seconds
            result.add_series(*run.series.values())
            ratio = result.ratio("propstore set", "raw psycopg upsert (primary)")
            result.bars.append(Bar("propstore set median / raw upsert", ratio.value, 1.3,
                                   detail=str(ratio)))
            if client is not None:
                pool = result.ratio("pgpool upsert (prepared)", "raw psycopg upsert (primary)")
                result.facts["pgpool upsert median / raw"] = str(pool)
            note_errors(result, contenders)
            maybe_profile(options, result, "propstore-set",
                          lambda: store.set(tenant, pick_store(), {"seq": next(seq)}))
        finally:
            if client is not None:
                client.close()
            store.close()
            raw.close()
    return result
