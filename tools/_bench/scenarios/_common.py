"""Pieces several scenarios share: Pgpool in front of shard 0, profiling, proof counting."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from propstore import ReadResult

from _bench import affinity
from _bench.env import BenchEnv, Skip
from _bench.options import Options
from _bench.pgpool import Backend, PgpoolProcess, PgpoolUnavailable
from _bench.profiling import profile
from _bench.results import ScenarioResult
from _bench.timing import Contender, Op


@contextmanager
def pgpool_for_shard0(env: BenchEnv, options: Options, result: ScenarioResult
                      ) -> Iterator[PgpoolProcess | None]:
    """Pgpool in front of shard 0's primary and first replica, or None with a note why."""
    if not options.pgpool:
        result.notes.append("pgpool: skipped (--no-pgpool)")
        yield None
        return
    try:
        # Pgpool is a hop on the way to the server: on a CPU of its own where the machine has
        # one to spare, else where --pgpool-cpu puts it (see _bench.affinity.pgpool_cpus).
        cpus = (affinity.pgpool_cpus(options.pgpool_cpu)
                if options.pin and affinity.available() else None)
        process = PgpoolProcess(Backend.from_dsn(env.primary_dsn(0)),
                                Backend.from_dsn(env.replica_dsn(0)), cpus=cpus).start()
    except (PgpoolUnavailable, Skip) as exc:
        result.notes.append(f"pgpool: skipped ({exc})")
        yield None
        return
    try:
        yield process
    finally:
        process.stop()


def picker(users: list[str], seed: int) -> Callable[[], str]:
    """A function returning a random user of ``users`` (its own seeded generator)."""
    rng = random.Random(seed)
    return lambda: users[rng.randrange(len(users))]


class ProofCounter:
    """Counts how propstore proved its reads (``pipeline``, ``monitor``, ``primary`` ...)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def __call__(self, result: ReadResult) -> ReadResult:
        key = result.proof if result.from_replica else f"primary:{result.fallback_reason}"
        self.counts[key] += 1
        return result

    def reset(self) -> None:
        """Forget the warm-up's reads."""
        self.counts.clear()

    def as_dict(self) -> dict[str, int]:
        """For the facts of a result."""
        return dict(sorted(self.counts.items()))


def note_errors(result: ScenarioResult, contenders: list[Contender]) -> None:
    """Put the first errors each contender saw into the notes."""
    for contender in contenders:
        for message in contender.errors:
            result.notes.append(f"{contender.name} error: {message}")


def maybe_profile(options: Options, result: ScenarioResult, label: str, op: Op) -> None:
    """With ``--profile``, profile ``op`` and note where the report went."""
    if options.profile_dir is None:
        return
    path = profile(op, f"{result.name}-{label}", options.profile_dir)
    result.notes.append(f"profile of {label}: {path}")


def fact_ms(seconds: float) -> float:
    """Seconds as milliseconds rounded for the facts table."""
    return round(seconds * 1000, 3)


Facts = dict[str, Any]
