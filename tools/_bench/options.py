"""Settings shared by every scenario (from the command line)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Options:
    """How long and how to run scenarios.

    Attributes:
        duration: seconds per scenario, overriding each scenario's default when set.
        warmup: seconds of discarded warm-up before each timed run.
        block_seconds: length of the blocks that ratios are paired on.
        pgpool: whether to start Pgpool-II for the scenarios that compare against it.
        profile_dir: where to write pyinstrument profiles of propstore's operations.
        pin: pin this process to CPU 0 and the servers it starts to the other CPUs
            (see ``_bench.affinity``).
        pgpool_cpu: where a pinned Pgpool runs: ``"own"`` (a CPU of its own, when the
            machine has a CPU beyond the client's and the servers'), ``"servers"`` or
            ``"client"`` (see ``_bench.affinity.pgpool_cpus``).
    """

    duration: float | None = None
    warmup: float = 2.0
    block_seconds: float = 1.0
    pgpool: bool = True
    profile_dir: Path | None = None
    pin: bool = True
    pgpool_cpu: str = "own"

    def seconds(self, default: float) -> float:
        """The timed duration of a scenario whose default is ``default``."""
        return default if self.duration is None else self.duration
