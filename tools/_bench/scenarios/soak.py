"""Soak: mixed load for ten minutes; the client's memory must not grow, nothing may fail.

Writers merge, readers read with assorted budgets and tokens, a batch reader calls
``get_many``; shard 0's replica has replay paused 5 s of every 30 s (when a sandbox is
available) so the fallback paths run too. RSS is sampled every second.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path

from propstore import Token

from _bench.env import BenchEnv, Skip
from _bench.options import Options
from _bench.results import Bar, ScenarioResult
from _bench.scenarios._common import picker
from _bench.workload import BUDGET_PAST, BUDGET_READS, ERRORS, AckLog, Tally, Workers

BUDGETS = (0.1, 0.5, 1.0, 5.0)
PAUSE_EVERY, PAUSE_FOR = 30.0, 5.0


def rss_bytes() -> int:
    """This process's resident set size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def soak(env: BenchEnv, options: Options) -> ScenarioResult:
    """Mixed load for ``--duration`` (default 600 s)."""
    result = ScenarioResult("soak", "mixed reads, writes and get_many; shard 0's replica "
                            f"paused {PAUSE_FOR:g} s in every {PAUSE_EVERY:g} s")
    duration = options.seconds(600.0)
    users = [u for shard in sorted(env.users_by_shard)
             for u in env.shard_users(shard, 100, offset=3000)]
    try:
        replica = env.local_node(env.replica_name(0))
    except Skip as exc:
        replica = None
        result.notes.append(f"no paused replica: {exc}")
    store = env.open_store()
    tally, log = Tally(reservoir=5_000), AckLog(users)
    workers = Workers()
    owned = [users[i::2] for i in range(2)]
    # The newest token per user and the seq its write wrote: a token read must show it.
    tokens: dict[str, tuple[Token, int]] = {}
    seqs = dict.fromkeys(users, 0)

    def writer(mine: list[str], seed: int) -> None:
        pick = picker(mine, seed)

        def step() -> None:
            user = pick()
            seqs[user] += 1
            tokens[user] = (store.set(env.tenant, user, {"seq": seqs[user]}), seqs[user])
            log.acked(user, time.monotonic(), seqs[user])

        workers.spawn(f"soak-writer-{seed}", step, tally)

    def reader(seed: int) -> None:
        rng = random.Random(seed)

        def step() -> None:
            user = users[rng.randrange(len(users))]
            t0 = time.monotonic()
            entry = tokens.get(user)
            if entry is not None and rng.random() < 0.25:
                token, required = entry
                read = store.read(env.tenant, user, after=token)
            else:
                budget = rng.choice(BUDGETS)
                read = store.read(env.tenant, user, max_staleness=budget)
                required = log.floor(user, t0 - budget)
            tally.sample("read", time.monotonic() - t0, t0 - workers.zero)
            seq = (read.props or {}).get("seq", 0)
            late = seq < required
            tally.count(BUDGET_READS, *([BUDGET_PAST] if late else []),
                        example=f"violation: {user} seq {seq} < {required}" if late else None)

        workers.spawn(f"soak-reader-{seed}", step, tally)

    def batch_reader() -> None:
        rng = random.Random(99)

        def step() -> None:
            chosen = rng.sample(users, 100)
            t0 = time.monotonic()
            store.get_many(env.tenant, chosen, max_staleness=1.0)
            tally.sample("get_many(100)", time.monotonic() - t0, t0 - workers.zero)

        workers.spawn("soak-batch", step, tally)

    samples: list[tuple[float, int]] = []
    try:
        for index, mine in enumerate(owned):
            writer(mine, 70 + index)
        for seed in range(3):
            reader(80 + seed)
        batch_reader()
        warmup = min(30.0, max(options.warmup, duration / 10))
        time.sleep(warmup)
        workers.zero = time.monotonic()
        while (now := workers.now()) < duration:
            if replica is not None:
                paused_now = (now % PAUSE_EVERY) < PAUSE_FOR
                if paused_now != replica.is_replay_paused():
                    (replica.pause_replay if paused_now else replica.resume_replay)()
            samples.append((now, rss_bytes()))
            time.sleep(1.0)
    finally:
        workers.stop()
        if replica is not None:
            replica.resume_replay()
        store.close()
    _report(result, tally, samples, duration)
    return result


def _report(result: ScenarioResult, tally: Tally, samples: list[tuple[float, int]],
            duration: float) -> None:
    result.duration = duration
    result.add_series(*tally.series.values())
    if len(samples) < 4:
        result.notes.append("too short to judge memory growth")
        return
    head = statistics.median(rss for _, rss in samples[:5])
    tail = statistics.median(rss for _, rss in samples[-5:])
    growth = (tail - head) / head * 100
    result.bars += [
        Bar("client RSS growth", growth, 5.0, unit="%", budget="assorted (0.1-5 s, tokens)",
            detail=f"{head / 2**20:.1f} MiB after warm-up -> {tail / 2**20:.1f} MiB"),
        Bar("errors", float(tally.counts[ERRORS]), 0.0, unit="", budget="assorted",
            detail="; ".join(tally.examples)),
        Bar("budget violations", float(tally.violations), 0.0, unit="",
            budget="judged at each read's own budget",
            text=f"{tally.violations:,} of {tally.counts[BUDGET_READS]:,} reads"),
    ]
    result.facts["RSS MiB every ~10%"] = [
        round(rss / 2**20, 1) for _, rss in samples[:: max(1, len(samples) // 10)]]
    result.facts["reads"] = tally.counts[BUDGET_READS]
