"""Healthy-cluster latency: single reads, batch reads and writes, interleaved with the floor.

Every contender runs against the same server: shard 0's first replica for reads (raw clients,
propstore's replica reads, Pgpool's standby) and shard 0's primary for writes. Two raw
baselines run beside propstore: the *floor* at propstore's own level (libpq through
``pgconn``, propstore's own prepared statements, only the decoding a caller needs:
:class:`LibpqNode`) and a hand-written psycopg ``Cursor`` client (:class:`RawNode`). The
bars are judged against the floor; the cursor ratio is reported beside it. Batch reads are
compared at the same query shape on both sides (``json_object_agg`` per shard, as
``get_many`` sends; a row per user is shown for both raw clients too).
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable

from propstore import ReadResult, Token

from _bench.contenders import LibpqNode, RawNode
from _bench.env import BenchEnv
from _bench.options import Options
from _bench.pgpool import describe as pgpool_settings
from _bench.results import Bar, ScenarioResult, reported
from _bench.scenarios._common import (
    ProofCounter,
    maybe_profile,
    note_errors,
    pgpool_for_shard0,
    picker,
)
from _bench.stats import Ratio
from _bench.timing import Contender, Event, Op, interleave

READ_BUDGET = 1.0  # seconds: a typical bounded-staleness budget
BATCH_SIZE = 10_000
FLOOR = "raw libpq (replica)"
CURSOR = "raw psycopg cursor (replica)"
DRIVER = "raw libpq through propstore's deadline driver (replica)"
FAST = "propstore get, 1 s budget"
FLOOR_AFTER = "raw libpq (replica), after a write"
FAST_AFTER = "propstore get, 1 s budget, after a write"
TOKEN = "propstore get, token (LSN pipelined), after a write"
PGPOOL_PREPARED = "pgpool (prepared)"
PGPOOL_SIMPLE = "pgpool (simple protocol)"
#: Budget cells (every comparison states at which freshness each side read).
NO_BOUND = "none"
B_FAST = "propstore 1 s; raw none"
B_TOKEN = "propstore token (own write); raw none"


def read_fresh(env: BenchEnv, options: Options) -> ScenarioResult:
    """Single-user reads on a healthy shard: propstore vs the libpq floor, a psycopg cursor
    client and Pgpool."""
    result = ScenarioResult(
        "read-fresh", "single-user reads of shard 0, healthy replica, same server for all")
    tenant, users = env.tenant, env.shard_users(0, 2000)
    floor, cursor, driver = (LibpqNode(env.replica_dsn(0)), RawNode(env.replica_dsn(0)),
                             LibpqNode(env.replica_dsn(0)))
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

    pick_floor, pick_fast, pick_ver = picker(users, 1), picker(users, 2), picker(users, 3)
    pick_floor_after, pick_fast_after = picker(users, 6), picker(users, 7)
    pick_cursor, pick_driver = picker(users, 8), picker(users, 9)
    contenders = [
        Contender(FLOOR, lambda: floor.get(tenant, pick_floor())),
        Contender(CURSOR, lambda: cursor.get(tenant, pick_cursor())),
        Contender(DRIVER, lambda: driver.get_with_deadline(tenant, pick_driver())),
        Contender(FAST, lambda: fast(store.read(tenant, pick_fast(), max_staleness=READ_BUDGET))),
        # A read right after a write (and the wait for its replay, during which this thread
        # sleeps) runs on cold caches against a replica that just replayed: the token read
        # is compared with a floor read and a 1 s-budget read taken under the same conditions.
        Contender(FLOOR_AFTER, lambda: floor.get(tenant, pick_floor_after()), every=2,
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
                Contender(PGPOOL_PREPARED, lambda: prepared.get(tenant, pick_pp())),
                Contender(PGPOOL_SIMPLE, lambda: simple.get(tenant, pick_ps())),
            ]
        try:
            run = interleave(contenders, duration=options.seconds(15.0),
                             warmup=options.warmup, block_seconds=options.block_seconds,
                             events=[Event(0.0, fast.reset, "count 1 s budget proofs"),
                                     Event(0.0, verified.reset, "count token proofs")])
            result.duration = run.seconds
            result.add_series(*run.series.values())
            main = result.ratio(FAST, FLOOR)
            vs_cursor = result.ratio(FAST, CURSOR)
            inline = result.ratio(TOKEN, FLOOR_AFTER)
            cursor_cost = result.ratio(CURSOR, FLOOR)
            driver_cost = result.ratio(DRIVER, FLOOR)
            result.ratio(FLOOR_AFTER, FLOOR)
            result.ratio(FAST_AFTER, FLOOR_AFTER)
            proof_cost = Ratio.of(run.series[TOKEN], run.series[FAST_AFTER])
            result.bars += [
                Bar("propstore get median / libpq floor", main.value, 1.25, budget=B_FAST,
                    text=str(main), detail=f"proofs {fast.as_dict()}"),
                reported("propstore get median / psycopg-cursor raw", vs_cursor.value,
                         budget=B_FAST, text=str(vs_cursor)),
                Bar("propstore token read median / libpq floor, both right after a write",
                    inline.value, 1.25, budget=B_TOKEN, text=str(inline),
                    detail=f"proofs {verified.as_dict()}"),
                reported("token read / 1 s-budget read, both after a write (the in-line "
                         "proof's own cost)", proof_cost.value,
                         budget="propstore token vs propstore 1 s", text=str(proof_cost)),
                reported("psycopg-cursor raw / libpq floor (what a cursor costs)",
                         cursor_cost.value, budget="none on both", text=str(cursor_cost),
                         readme=False),
                reported("libpq through propstore's deadline driver / libpq floor (the "
                         "deadline's own cost)", driver_cost.value, budget="none on both",
                         text=str(driver_cost), readme=False),
            ]
            if pgpool is not None:
                best = min((result.ratio(name, FLOOR) for name in
                            (PGPOOL_PREPARED, PGPOOL_SIMPLE)), key=lambda r: r.value)
                vs_pool = result.ratio(FAST, best.numerator)
                result.bars += [
                    reported(f"Pgpool at its fastest ({best.numerator}) / libpq floor",
                             best.value, budget="Pgpool none; raw none", text=str(best)),
                    reported(f"propstore get / {best.numerator}", vs_pool.value,
                             budget="propstore 1 s; Pgpool none", text=str(vs_pool)),
                ]
                result.facts["pgpool settings"] = pgpool_settings(pgpool)
            result.facts["proofs (1 s budget)"] = fast.as_dict()
            result.facts["proofs (token)"] = verified.as_dict()
            note_errors(result, contenders)
            maybe_profile(options, result, "propstore-get-1s",
                          lambda: store.get(tenant, pick_fast(), max_staleness=READ_BUDGET))
            maybe_profile(options, result, "libpq-get", lambda: floor.get(tenant, pick_floor()))
        finally:
            for client in clients:
                client.close()
            store.close()
            for node in (floor, driver):
                node.close()
            cursor.close()
            replica_watch.close()
    return result


BATCH_FLOOR = "raw libpq, json_object_agg per shard"
BATCH_CURSOR = "raw psycopg cursor, json_object_agg per shard"
BATCH_FLOOR_ROWS = "raw libpq, = ANY rows per shard"
BATCH_CURSOR_ROWS = "raw psycopg cursor, = ANY rows per shard"
GET_MANY = "propstore get_many"


def read_batch(env: BenchEnv, options: Options) -> ScenarioResult:
    """``get_many`` of 10,000 users of every shard vs the same query shape sent raw, one query
    per shard sequentially; and 10,000 single gets, propstore's and the floor's."""
    result = ScenarioResult(
        "read-batch", f"{BATCH_SIZE:,} users across all shards, healthy replicas")
    tenant = env.tenant
    ids = random.Random(11).sample(env.users, min(BATCH_SIZE, len(env.users)))
    if len(ids) < BATCH_SIZE:
        result.notes.append(f"only {len(ids)} users loaded; batch is smaller than {BATCH_SIZE}")
    groups: dict[int, list[str]] = {}
    for user in ids:
        groups.setdefault(env.topology.shard_index_of(tenant, user), []).append(user)
    floors = {shard: LibpqNode(env.replica_dsn(shard)) for shard in groups}
    cursors = {shard: RawNode(env.replica_dsn(shard)) for shard in groups}
    owner = [(floors[env.topology.shard_index_of(tenant, user)], user) for user in ids]
    store = env.open_store()
    singles_name = f"propstore {len(ids):,} single gets"
    raw_singles_name = f"raw libpq {len(ids):,} single gets"

    def batch(fetch: str, nodes: dict[int, LibpqNode] | dict[int, RawNode]) -> Op:
        def op() -> None:
            found: dict[str, object] = {}
            for shard, users in groups.items():
                found.update(getattr(nodes[shard], fetch)(tenant, users))
            assert len(found) == len(ids)
        return op

    # How each shard read of get_many (and each single get) was served: a batch that
    # outlasts the replica deadline is abandoned and re-read on the primary, which is part
    # of what get_many costs here.
    proofs = {"get_many": ProofCounter(), "singles": ProofCounter()}
    counting = [proofs["get_many"]]

    def observe(read: ReadResult, _seconds: float) -> None:
        counting[0](read)

    store.add_observer(observe)

    def propstore_batch() -> None:
        counting[0] = proofs["get_many"]
        found = store.get_many(tenant, ids, max_staleness=READ_BUDGET)
        assert len(found) == len(ids)

    def singles() -> None:
        counting[0] = proofs["singles"]
        for user in ids:
            store.get(tenant, user, max_staleness=READ_BUDGET)

    def raw_singles() -> None:
        for node, user in owner:
            node.get(tenant, user)

    batches: list[tuple[str, Op]] = [
        (BATCH_FLOOR, batch("get_many", floors)),
        (BATCH_CURSOR, batch("get_many_agg", cursors)),
        (BATCH_FLOOR_ROWS, batch("get_many_rows", floors)),
        (BATCH_CURSOR_ROWS, batch("get_many", cursors)),
        (GET_MANY, propstore_batch),
    ]
    try:
        # Give the single gets about a third of the run: time one pass of each first.
        t0 = time.perf_counter()
        for _, op in batches:
            op()
        batch_pass = time.perf_counter() - t0
        t0 = time.perf_counter()
        singles()
        raw_singles()
        single_pass = time.perf_counter() - t0
        every = max(1, round(single_pass / (2 * batch_pass)))
        contenders = [Contender(name, op) for name, op in batches] + [
            Contender(singles_name, singles, every=every),
            Contender(raw_singles_name, raw_singles, every=every),
        ]
        block = max(options.block_seconds, 2 * single_pass)
        # At least 4 blocks (a ratio is a median of per-block ratios), within reason: on a
        # loaded machine a pass of single gets takes several seconds.
        duration = min(max(options.seconds(20.0), 4 * block), 3 * options.seconds(20.0))
        run = interleave(contenders, duration=duration, warmup=options.warmup,
                         block_seconds=block,
                         events=[Event(0.0, proofs["get_many"].reset, "count get_many"),
                                 Event(0.0, proofs["singles"].reset, "count singles")])
        result.duration = run.seconds
        result.add_series(*run.series.values())
        ratio = result.ratio(GET_MANY, BATCH_FLOOR)
        vs_cursor = result.ratio(GET_MANY, BATCH_CURSOR)
        rows_floor = result.ratio(BATCH_FLOOR_ROWS, BATCH_FLOOR)
        rows_cursor = result.ratio(BATCH_CURSOR_ROWS, BATCH_FLOOR)
        speedup = result.ratio(singles_name, GET_MANY)
        floor_speedup = result.ratio(raw_singles_name, BATCH_FLOOR)
        single_cost = result.ratio(singles_name, raw_singles_name)
        budget = "propstore 1 s; raw none"
        result.bars += [
            Bar("get_many median / libpq floor, same query (json_object_agg per shard)",
                ratio.value, 1.3, budget=budget, text=str(ratio)),
            reported("get_many median / psycopg cursor, same query", vs_cursor.value,
                     budget=budget, text=str(vs_cursor)),
            reported("raw = ANY rows / libpq floor: libpq rows, cursor rows", rows_floor.value,
                     budget="none on both", text=f"{rows_floor}, {rows_cursor}"),
            Bar(f"{len(ids):,} single gets / get_many (propstore's speed-up)", speedup.value,
                20.0, at_least=True, budget="1 s on both", text=str(speedup)),
            reported(f"{len(ids):,} single gets / one batch, the floor's own (libpq)",
                     floor_speedup.value, budget="none on both", text=str(floor_speedup)),
            reported(f"propstore {len(ids):,} single gets / libpq floor's", single_cost.value,
                     budget=budget, text=str(single_cost)),
        ]
        result.bars.append(reported(
            "get_many shard reads by how they were served", float(sum(
                n for k, n in proofs["get_many"].counts.items() if k.startswith("primary"))),
            unit="", budget="1 s", text=", ".join(
                f"{k}: {n:,}" for k, n in proofs["get_many"].as_dict().items()) or "none",
            detail="primary:replica_timeout = the batch outlasted the replica deadline, was "
            "abandoned and read again on the primary"))
        result.facts["proofs (get_many shard reads)"] = proofs["get_many"].as_dict()
        result.facts["proofs (single gets)"] = proofs["singles"].as_dict()
        result.facts["shards"] = {env.topology.shards[s].name: len(u) for s, u in groups.items()}
        note_errors(result, contenders)
        maybe_profile(options, result, "propstore-get-many", propstore_batch)
        maybe_profile(options, result, "libpq-batch", batches[0][1])
    finally:
        store.close()
        nodes: list[LibpqNode | RawNode] = [*floors.values(), *cursors.values()]
        for node in nodes:
            node.close()
    return result


W_FLOOR = "raw libpq upsert (primary)"
W_CURSOR = "raw psycopg cursor upsert (primary)"
W_STORE = "propstore set"
W_BATCH = "raw libpq, propstore's write batch (token position after the commit)"
W_PGPOOL = "pgpool upsert (prepared)"


def write(env: BenchEnv, options: Options) -> ScenarioResult:
    """``set`` (merge, token read after commit) vs a raw upsert, on shard 0's primary."""
    result = ScenarioResult("write", "merge of one key into a user's document on shard 0")
    tenant = env.tenant
    store = env.open_store()
    floor, cursor = LibpqNode(env.primary_dsn(0)), RawNode(env.primary_dsn(0))
    batch = LibpqNode(env.primary_dsn(0))
    # Disjoint users per contender, so no two contend for one row lock.
    floor_users, cursor_users, store_users, pool_users, batch_users = (
        env.shard_users(0, 1000, offset=i * 1000) for i in range(5))
    seq = itertools.count()
    pick_floor, pick_cursor, pick_store, pick_pool, pick_batch = (
        picker(floor_users, 24), picker(cursor_users, 21), picker(store_users, 22),
        picker(pool_users, 23), picker(batch_users, 25))

    def raw_batch() -> None:
        user = pick_batch()
        batch.merge_with_position(tenant, user, env.bucket(user), {"seq": next(seq)})


    def upsert(node: LibpqNode | RawNode, pick: Callable[[], str]) -> Op:
        def op() -> None:
            user = pick()
            node.merge(tenant, user, env.bucket(user), {"seq": next(seq)})
        return op

    contenders = [
        Contender(W_FLOOR, upsert(floor, pick_floor)),
        Contender(W_CURSOR, upsert(cursor, pick_cursor)),
        Contender(W_STORE, lambda: store.set(tenant, pick_store(), {"seq": next(seq)})),
        Contender(W_BATCH, raw_batch),
    ]
    with pgpool_for_shard0(env, options, result) as pgpool:
        client = None if pgpool is None else RawNode(pgpool.dsn())
        if client is not None:
            contenders.append(Contender(W_PGPOOL, upsert(client, pick_pool)))
        try:
            run = interleave(contenders, duration=options.seconds(15.0),
                             warmup=options.warmup, block_seconds=options.block_seconds)
            result.duration = run.seconds
            result.add_series(*run.series.values())
            ratio = result.ratio(W_STORE, W_FLOOR)
            vs_cursor = result.ratio(W_STORE, W_CURSOR)
            result.ratio(W_CURSOR, W_FLOOR)
            protocol = result.ratio(W_BATCH, W_FLOOR)
            own = result.ratio(W_STORE, W_BATCH)
            budget = "primary on all (propstore also returns a token: LSN pipelined)"
            result.bars += [
                Bar("propstore set median / libpq floor upsert", ratio.value, 1.3,
                    budget=budget, text=str(ratio)),
                reported("propstore set median / psycopg-cursor upsert", vs_cursor.value,
                         budget=budget, text=str(vs_cursor)),
                # Where the set bar's ratio comes from: the batch a token needs (its
                # position read after the commit), sent raw, vs the floor; and propstore's
                # own cost on top of that batch.
                reported("raw libpq write batch with the token's position / libpq floor "
                         "upsert (what the protocol costs)", protocol.value, budget=budget,
                         text=str(protocol), readme=False),
                reported("propstore set / raw libpq write batch (propstore's own cost)",
                         own.value, budget=budget, text=str(own), readme=False),
            ]
            if client is not None:
                pool = result.ratio(W_PGPOOL, W_FLOOR)
                vs_pool = result.ratio(W_STORE, W_PGPOOL)
                result.bars += [
                    reported("Pgpool upsert / libpq floor", pool.value, budget=budget,
                             text=str(pool)),
                    reported("propstore set / Pgpool upsert", vs_pool.value, budget=budget,
                             text=str(vs_pool)),
                ]
            note_errors(result, contenders)
            maybe_profile(options, result, "propstore-set",
                          lambda: store.set(tenant, pick_store(), {"seq": next(seq)}))
        finally:
            if client is not None:
                client.close()
            store.close()
            floor.close()
            batch.close()
            cursor.close()
    return result
