"""Faulty replicas: replay paused for most of the run, or the whole server frozen (SIGSTOP).

``lagging-replica`` runs every contender at once, each in its own threads on its own users
of shard 0 (a waiting reader would otherwise stall the others), and checks every returned
document against the acknowledgement times of the writes (:class:`AckLog`).
``frozen-replica`` interleaves propstore with raw primary reads in one thread.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from propstore import PropertyStore

from _bench.contenders import LibpqNode, RawNode, WaitingReader
from _bench.env import BenchEnv
from _bench.options import Options
from _bench.pgpool import Backend
from _bench.pgpool import describe as pgpool_settings
from _bench.results import Bar, ScenarioResult, reported
from _bench.scenarios._common import fact_ms, note_errors, pgpool_for_shard0, picker
from _bench.stats import Series, quantile
from _bench.timing import Contender, Event, interleave
from _bench.workload import (
    BUDGET_OLDER,
    BUDGET_PAST,
    BUDGET_READS,
    BY_PRIMARY,
    ERRORS,
    RYW_MISSED,
    RYW_READS,
    AckLog,
    Tally,
    Workers,
)

BUDGET = 1.0  # seconds, the readers' max_staleness
USERS_PER_GROUP = 50
PGPOOL = "pgpool"
PGPOOL_PREPARED = "pgpool (prepared)"


def lagging_replica(env: BenchEnv, options: Options) -> ScenarioResult:
    """Shard 0's replica has replay paused 3/4 of the run (two cycles of healthy, paused x3)."""
    result = ScenarioResult(
        "lagging-replica",
        "shard 0's replica replay paused 75% of the run; 1 s-budget readers and "
        "read-your-writes writers on shard 0")
    replica = env.local_node(env.replica_name(0))
    duration = options.seconds(20.0)
    store = env.open_store()
    workers = Workers()
    tallies: dict[str, Tally] = {"propstore": Tally(), PGPOOL: Tally(),
                                 PGPOOL_PREPARED: Tally(), "waiting": Tally()}
    closers: list[Callable[[], None]] = [store.close]
    groups = iter(range(10))
    with pgpool_for_shard0(env, options, result) as pgpool:
        try:
            _start_propstore(env, store, workers, tallies["propstore"], next(groups))
            if pgpool is not None:
                closers += _start_pgpool(env, pgpool.dsn(), workers, tallies[PGPOOL],
                                         next(groups), simple=True)
                # The same reader over the extended protocol, to show which protocol is
                # Pgpool's stronger one here (its lag check has been seen to skip it).
                closers += _start_pgpool(env, pgpool.dsn(), workers,
                                         tallies[PGPOOL_PREPARED], next(groups),
                                         simple=False, writer=False)
                result.facts["pgpool settings"] = pgpool_settings(pgpool)
            else:
                del tallies[PGPOOL], tallies[PGPOOL_PREPARED]
            closers += _start_waiting(env, workers, tallies["waiting"], next(groups))
            time.sleep(options.warmup)
            paused = _run_phases(workers, replica.pause_replay, replica.resume_replay,
                                 duration)
        finally:
            workers.stop()
            replica.resume_replay()
            for close in closers:
                close()
    result.duration = duration
    _report_lagging(result, tallies, paused)
    return result


def _start_propstore(env: BenchEnv, store: PropertyStore, workers: Workers, tally: Tally,
                     group: int) -> None:
    tenant = env.tenant
    users = env.shard_users(0, USERS_PER_GROUP, offset=group * USERS_PER_GROUP)
    log = AckLog(users)
    seqs = dict.fromkeys(users, 0)
    pick_w, pick_r = picker(users, 31), picker(users, 32)

    def writer() -> None:
        user = pick_w()
        seqs[user] += 1
        token = store.set(tenant, user, {"seq": seqs[user]})
        log.acked(user, time.monotonic(), seqs[user])
        t0 = time.monotonic()
        result = store.read(tenant, user, after=token)
        tally.sample("propstore read-your-writes", time.monotonic() - t0, t0 - workers.zero)
        _ryw(tally, result.props, seqs[user], not result.from_replica, f"{user}: {result}")

    def reader() -> None:
        user = pick_r()
        t0 = time.monotonic()
        result = store.read(tenant, user, max_staleness=BUDGET)
        tally.sample("propstore read, 1 s budget", time.monotonic() - t0, t0 - workers.zero)
        # A bound above the budget is a broken promise too, even if the data happens to be
        # new enough.
        _budget_read(tally, log, user, t0, result.props, not result.from_replica,
                     result.staleness_bound > BUDGET, f"{user}: {result}")

    workers.spawn("propstore-writer", writer, tally)
    workers.spawn("propstore-reader", reader, tally)


def _seq(props: dict[str, object] | None) -> int:
    value = (props or {}).get("seq", 0)
    return value if isinstance(value, int) else 0


def _ryw(tally: Tally, props: dict[str, object] | None, written: int, by_primary: bool,
         what: str) -> None:
    names = [RYW_READS] + ([BY_PRIMARY] if by_primary else [])
    missed = _seq(props) < written
    if missed:
        names.append(RYW_MISSED)
    tally.count(*names, example=f"missed own write: {what}" if missed else None)


def _budget_read(tally: Tally, log: AckLog, user: str, started: float,
                 props: dict[str, object] | None, by_primary: bool, bound_broken: bool,
                 what: str) -> None:
    seq = _seq(props)
    names = [BUDGET_READS] + ([BY_PRIMARY] if by_primary else [])
    if seq < log.floor(user, started):
        names.append(BUDGET_OLDER)
    past = bound_broken or seq < log.floor(user, started - BUDGET)
    if past:
        names.append(BUDGET_PAST)
    tally.count(*names, example=f"older than its budget: {what}" if past else None)


def _start_pgpool(env: BenchEnv, dsn: str, workers: Workers, tally: Tally, group: int, *,
                  simple: bool, writer: bool = True) -> list[Callable[[], None]]:
    tenant = env.tenant
    users = env.shard_users(0, USERS_PER_GROUP, offset=group * USERS_PER_GROUP)
    log = AckLog(users)
    seqs = dict.fromkeys(users, 0)
    label = PGPOOL if simple else PGPOOL_PREPARED
    # The simple protocol by default: the one Pgpool 4.3.5 was seen to apply
    # delay_threshold to. The writer's session has disable_load_balance_on_write='always'
    # keep its reads on the primary after its first write.
    write_conn, read_conn = RawNode(dsn, simple=simple), RawNode(dsn, simple=simple)
    primary_port = Backend.from_dsn(env.primary_dsn(0)).port  # inet_server_port() there
    pick_w, pick_r = picker(users, 41 + 10 * group), picker(users, 42 + 10 * group)

    def write_step() -> None:
        user = pick_w()
        seqs[user] += 1
        write_conn.merge(tenant, user, env.bucket(user), {"seq": seqs[user]})
        log.acked(user, time.monotonic(), seqs[user])
        t0 = time.monotonic()
        props, port = write_conn.get_served_by(tenant, user)
        tally.sample(f"{label} read-your-writes", time.monotonic() - t0, t0 - workers.zero)
        _ryw(tally, props, seqs[user], port == primary_port, user)

    def reader() -> None:
        user = pick_r()
        t0 = time.monotonic()
        props, port = read_conn.get_served_by(tenant, user)
        tally.sample(f"{label} read", time.monotonic() - t0, t0 - workers.zero)
        _budget_read(tally, log, user, t0, props, port == primary_port, False, user)

    if writer:
        workers.spawn(f"{label}-writer", write_step, tally)
    else:
        # A reader alone still needs acknowledged writes to its users to be judged against:
        # they come from a plain connection to the primary.
        primary = RawNode(env.primary_dsn(0))

        def side_writer() -> None:
            user = pick_w()
            seqs[user] += 1
            primary.merge(tenant, user, env.bucket(user), {"seq": seqs[user]})
            log.acked(user, time.monotonic(), seqs[user])

        workers.spawn(f"{label}-side-writer", side_writer, tally)
        write_conn.close()
        write_conn = primary
    workers.spawn(f"{label}-reader", reader, tally)
    return [write_conn.close, read_conn.close]


def _start_waiting(env: BenchEnv, workers: Workers, tally: Tally, group: int
                   ) -> list[Callable[[], None]]:
    tenant = env.tenant
    users = env.shard_users(0, USERS_PER_GROUP, offset=group * USERS_PER_GROUP)
    seqs = dict.fromkeys(users, 0)
    waiter = WaitingReader(env.primary_dsn(0), env.replica_dsn(0))
    pick = picker(users, 51)

    def writer() -> None:
        user = pick()
        seqs[user] += 1
        lsn = waiter.write(tenant, user, env.bucket(user), {"seq": seqs[user]})
        t0 = time.monotonic()
        props = waiter.read_after(tenant, user, lsn)
        tally.sample("waiting reader read-your-writes", time.monotonic() - t0,
                     t0 - workers.zero)
        _ryw(tally, props, seqs[user], False, user)

    workers.spawn("waiting-writer", writer, tally)
    return [waiter.close]


def _run_phases(workers: Workers, pause: Callable[[], None], resume: Callable[[], None],
                duration: float) -> list[tuple[float, float]]:
    """Healthy for 1/4 of each of 2 cycles, paused for the rest; the paused intervals."""
    cycles = 2
    phase = duration / (4 * cycles)
    workers.zero = time.monotonic()
    paused: list[tuple[float, float]] = []
    for _ in range(cycles):
        time.sleep(phase)
        began = workers.now()
        pause()
        time.sleep(3 * phase)
        resume()
        paused.append((began, workers.now()))
    return paused


def _in_any(at: float, intervals: list[tuple[float, float]]) -> bool:
    return any(first <= at < last for first, last in intervals)


def _split(series: Series, paused: list[tuple[float, float]]) -> tuple[Series, Series]:
    healthy, lagging = Series(f"{series.name} (healthy)"), Series(f"{series.name} (lagging)")
    for value, start in zip(series.values, series.starts, strict=True):
        if start < 0:
            continue  # warm-up
        phase = sum(1 for first, _ in paused if start >= first)
        (lagging if _in_any(start, paused) else healthy).add(value, phase, start)
    return healthy, lagging


def _share(part: int, whole: int) -> str:
    return f"{part:,} of {whole:,} ({100 * part / whole:.1f}%)" if whole else "0 of 0"


def _report_lagging(result: ScenarioResult, tallies: dict[str, Tally],
                    paused: list[tuple[float, float]]) -> None:
    result.facts["paused intervals (s)"] = [(round(a, 2), round(b, 2)) for a, b in paused]
    lagging_p99: dict[str, float] = {}
    for label, tally in tallies.items():
        for series in tally.series.values():
            healthy, lagging = _split(series, paused)
            result.add_series(healthy, lagging)
            lagging_p99[series.name] = lagging.summary().p99
            if label == "propstore":
                h99 = healthy.summary().p99
                l99 = lagging.summary().p99
                budget = ("1 s" if "budget" in series.name else "token (own write)")
                result.bars.append(Bar(
                    f"{series.name}: p99 lagging / p99 healthy", l99 / h99, 1.5,
                    budget=budget,
                    detail=f"p99 {l99 * 1000:.2f} ms lagging vs {h99 * 1000:.2f} ms healthy"))
        result.facts[label] = tally.facts()
        result.notes += [f"{label}: {example}" for example in tally.examples]
    props = tallies["propstore"]
    reads = props.counts[BUDGET_READS] + props.counts[RYW_READS]
    result.bars.append(Bar(
        "propstore budget violations", float(props.violations), 0.0, unit="",
        budget="judged at each read's own budget (1 s, or its own write)",
        text=f"{props.violations:,} of {reads:,} reads",
        detail=f"past budget or missing own write; {props.counts[ERRORS]} errors"))
    # Stale reads at equal budgets: every reader judged at the same budget, Pgpool included
    # (it has none of its own). At 1 s and at 0 (any read older than the newest write
    # acknowledged before it began, which propstore's 1 s readers are allowed to be).
    pool = [(label, tallies[label]) for label in (PGPOOL, PGPOOL_PREPARED) if label in tallies]
    for judged, key in (("1 s", BUDGET_PAST), ("0", BUDGET_OLDER)):
        cells = [f"propstore {_share(props.counts[key], props.counts[BUDGET_READS])}"]
        cells += [f"{label} {_share(t.counts[key], t.counts[BUDGET_READS])}"
                  for label, t in pool]
        value = (100 * props.counts[key] / props.counts[BUDGET_READS]
                 if props.counts[BUDGET_READS] else math.nan)
        result.bars.append(reported(
            f"budget reads staler than {judged} (older than a write acknowledged "
            f"{judged} before the read began)", value, unit="%",
            budget=f"judged at {judged} on all (propstore read at 1 s)",
            text="; ".join(cells)))
    ryw = [f"propstore {_share(props.counts[RYW_MISSED], props.counts[RYW_READS])} missed"]
    primary = [f"propstore {_share(props.counts[BY_PRIMARY], reads)}"]
    for label, t in pool:
        all_reads = t.counts[BUDGET_READS] + t.counts[RYW_READS]
        primary.append(f"{label} {_share(t.counts[BY_PRIMARY], all_reads)}")
        if t.counts[RYW_READS]:
            ryw.append(f"{label} {_share(t.counts[RYW_MISSED], t.counts[RYW_READS])} missed")
    waiting = tallies.get("waiting")
    if waiting is not None and waiting.series:
        lagging_wait = _split(next(iter(waiting.series.values())), paused)[1].summary()
        ryw.append(f"waiting reader p99 {lagging_wait.p99 * 1000:,.0f} ms while lagging")
    pairs = [("propstore read, 1 s budget", f"{PGPOOL} read"),
             ("propstore read-your-writes", f"{PGPOOL} read-your-writes")]
    cells = [f"{a} {lagging_p99[a] * 1000:.2f} ms vs {b} {lagging_p99[b] * 1000:.2f} ms"
             for a, b in pairs if a in lagging_p99 and b in lagging_p99]
    if cells:
        ratio = lagging_p99[pairs[0][0]] / lagging_p99[pairs[0][1]] if pairs[0][1] in (
            lagging_p99) else math.nan
        result.bars.append(reported(
            "p99 while lagging, propstore vs Pgpool (simple protocol)", ratio,
            budget="propstore 1 s / own write; Pgpool none (delay_threshold 1 B, 'always')",
            text="; ".join(cells)))
    result.bars += [
        reported("read-your-writes: reads missing the reader's own write",
                 float(props.counts[RYW_MISSED]), unit="",
                 budget="own write on all (Pgpool: disable_load_balance_on_write='always')",
                 text="; ".join(ryw)),
        reported("reads served by the primary", float(props.counts[BY_PRIMARY]), unit="",
                 budget="all reads of each contender", text="; ".join(primary)),
    ]
    result.notes.append(
        "pgpool: Pgpool-II 4.3.5 at its strongest lag protection (delay_threshold=1 B, "
        "sr_check_period=1 s, disable_load_balance_on_write='always'); 'pgpool' uses the "
        "simple query protocol, 'pgpool (prepared)' the extended one. Pgpool has no budget "
        "of its own: its reads are judged at the same budgets as propstore's")


def frozen_replica(env: BenchEnv, options: Options) -> ScenarioResult:
    """Shard 0's replica SIGSTOPped a quarter into the run, until the end."""
    result = ScenarioResult(
        "frozen-replica", "shard 0's replica frozen (SIGSTOP) after 25% of the run; "
        "1 s-budget reads of shard 0 interleaved with raw primary reads")
    node = env.local_node(env.replica_name(0))
    tenant, users = env.tenant, env.shard_users(0, 2000)
    duration = options.seconds(12.0)
    store = env.open_store()
    primary = LibpqNode(env.primary_dsn(0))
    pick_s, pick_p = picker(users, 61), picker(users, 62)
    contenders = [
        Contender("propstore get, 1 s budget",
                  lambda: store.get(tenant, pick_s(), max_staleness=BUDGET)),
        Contender("raw libpq (primary)", lambda: primary.get(tenant, pick_p())),
    ]
    freeze_at = duration / 4
    # Paced to half the primary fallback cap: past the cap, fallback reads raise
    # StaleReadError by design (on_stale="error"), which is not what this scenario tests.
    rate = env.topology.routing.primary_fallback_rate
    period = 2.0 / rate if rate > 0 else 0.0
    result.notes.append(f"paced to {1 / period:.0f} reads/s each (half of "
                        f"routing.primary_fallback_rate = {rate:g}/s)" if period else
                        "unpaced (no primary fallback cap configured)")
    try:
        run = interleave(contenders, duration=duration, warmup=options.warmup,
                         block_seconds=options.block_seconds,
                         events=[Event(freeze_at, node.freeze, "freeze")], period=period)
    finally:
        node.thaw()
        store.close()
        primary.close()
    result.duration = run.seconds
    frozen_from = run.event_times.get("freeze", freeze_at)
    store_frozen = run.series["propstore get, 1 s budget"].between(
        "propstore get, 1 s budget (frozen)", frozen_from)
    primary_frozen = run.series["raw libpq (primary)"].between(
        "raw libpq (primary) (frozen)", frozen_from)
    store_before = run.series["propstore get, 1 s budget"].between(
        "propstore get, 1 s budget (healthy)", 0.0, frozen_from)
    result.add_series(store_before, store_frozen, primary_frozen)
    deadline = env.topology.routing.replica_deadline
    p99 = primary_frozen.summary().p99
    limit = deadline + 2 * p99
    worst = store_frozen.summary().max
    errors = sum(s.errors for s in run.series.values())
    result.bars += [
        Bar("propstore max latency while frozen", worst * 1000, limit * 1000, unit="ms",
            budget="1 s",
            detail=f"deadline {deadline * 1000:.0f} ms + 2 x primary p99 {p99 * 1000:.2f} ms"),
        Bar("propstore errors while frozen", float(errors), 0.0, unit="", budget="1 s"),
    ]
    # Reads that tried the frozen replica wait out the deadline; after the monitor marks
    # it down, reads go straight to the primary.
    slow = [(start, value) for start, value in zip(store_frozen.starts, store_frozen.values,
                                                   strict=True) if value >= deadline * 0.9]
    result.facts.update({
        "reads paying the deadline": len(slow),
        "their latencies (ms)": [fact_ms(v) for _, v in slow[:10]],
        "last of them, s after the freeze": round(slow[-1][0] - frozen_from, 3) if slow else None,
        "p99 primary while frozen (ms)": fact_ms(quantile(sorted(primary_frozen.values), 0.99)),
    })
    note_errors(result, contenders)
    env.reset()
    return result


__all__ = ["frozen_replica", "lagging_replica"]
