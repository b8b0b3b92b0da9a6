"""pyinstrument profiles of one operation, to explain where propstore spends its time."""

from __future__ import annotations

import time
from pathlib import Path

from _bench.timing import Op


def profile(op: Op, label: str, directory: Path, seconds: float = 3.0) -> Path:
    """Run ``op`` in a loop for ``seconds`` under pyinstrument; write a text report.

    The report (``<directory>/<label>.txt``) shows wall-clock time by call stack, with the
    number of calls made, so a per-call cost can be read off it.
    """
    from pyinstrument import Profiler  # the bench extra; only needed with --profile

    directory.mkdir(parents=True, exist_ok=True)
    # 0.1 ms sampling: an operation takes ~0.1-0.5 ms, the default 1 ms would see little.
    profiler = Profiler(interval=0.0001)
    calls = 0
    end = time.perf_counter() + seconds
    profiler.start()
    while time.perf_counter() < end:
        op()
        calls += 1
    profiler.stop()
    target = directory / f"{label}.txt"
    header = f"{label}: {calls} calls in {seconds:g} s ({seconds / calls * 1e6:.1f} us/call)\n"
    target.write_text(header + profiler.output_text(unicode=True, color=False, show_all=False))
    return target
