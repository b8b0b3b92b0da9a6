"""Read the fleet scenario's traces (``PROPSTORE_FLEET_TRACE=DIR``): where reads' time went.

    python tools/_bench/fleet_trace_report.py DIR/host-64 [DIR/host-1 ...]

Per phase: latency quantiles of all reads and of the window's; for the fastest half, the
middle and the slowest 1 %: the reading thread's CPU, its wait on a run queue and the rest
(blocked: the server, the network, the GIL), the store's monitor thread's CPU meanwhile and
how many of the fleet's monitor wake-ups fell inside; the slowest reads one by one (time
from the window's start, read index in its process); garbage collections; and the host's
CPU by part over the window (``_fleet_trace.host_snapshot``).
"""

from __future__ import annotations

import bisect
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

FIELDS = ("t0", "lat", "cpu", "runq", "mon_cpu", "mon_runq", "wakes")


def _q(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _describe(label: str, reads: list[dict[str, float]], wakes: list[float]) -> None:
    if not reads:
        return

    def mean(key: str) -> float:
        return statistics.mean(r[key] for r in reads) * 1e3

    inside = statistics.mean(bisect.bisect_right(wakes, r["t0"] + r["lat"])
                             - bisect.bisect_left(wakes, r["t0"]) for r in reads)
    print(f"  {label:8s} n={len(reads):5d}: {mean('lat'):6.2f} ms = cpu {mean('cpu'):.2f} + "
          f"run queue {mean('runq'):.2f} + blocked {mean('lat') - mean('cpu') - mean('runq'):.2f}"
          f"; own monitor cpu {mean('mon_cpu'):.3f}; fleet wakes inside {inside:.2f}")


def report(folder: Path, slowest: int = 12) -> None:
    """Print one phase's figures."""
    scenario = json.loads((folder / "scenario.json").read_text())
    t2, t3 = scenario["window"]
    clients = [json.loads(p.read_text()) for p in sorted(folder.glob("client-*.json"))]
    reads: list[dict[str, Any]] = []
    wakes: list[float] = []
    collections: list[tuple[float, float, int]] = []
    for c in clients:
        for i, r in enumerate(c["reads"]):
            reads.append({**dict(zip(FIELDS, r, strict=True)), "i": i, "pid": c["pid"]})
        wakes.extend(c["wakes"])
        collections.extend((g[0] - t2, g[1], g[2]) for g in c.get("gc", []))
    wakes.sort()
    window = [r for r in reads if t2 <= r["t0"] <= t3]
    print(f"{folder.name}: {len(clients)} processes; window {t3 - t2:.1f} s; probes at "
          + ", ".join(f"{a - t2:+.2f} s ({(b - a) * 1e3:.0f} ms)" for a, b in scenario["probes"]))
    for label, chosen in (("all", reads), ("window", window)):
        lat = [r["lat"] for r in chosen]
        print(f"  {label}: {len(lat)} reads, p50 {_q(lat, .5) * 1e3:.2f} p90 "
              f"{_q(lat, .9) * 1e3:.2f} p99 {_q(lat, .99) * 1e3:.2f} max {max(lat) * 1e3:.1f} ms")
    lat = [r["lat"] for r in window]
    p50, p99 = _q(lat, .5), _q(lat, .99)
    _describe("<= p50", [r for r in window if r["lat"] <= p50], wakes)
    _describe("p50-p99", [r for r in window if p50 < r["lat"] < p99], wakes)
    _describe(">= p99", [r for r in window if r["lat"] >= p99], wakes)
    print("  slowest reads of all:")
    for r in sorted(reads, key=lambda r: -r["lat"])[:slowest]:
        print(f"    {r['lat'] * 1e3:7.2f} ms at {r['t0'] - t2:+6.2f} s (read {r['i']:3d} of pid "
              f"{r['pid']}): cpu {r['cpu'] * 1e3:.2f}, run queue {r['runq'] * 1e3:.2f}, own "
              f"monitor cpu {r['mon_cpu'] * 1e3:.2f}")
    for gen in sorted({g[2] for g in collections}):
        mine = [g for g in collections if g[2] == gen]
        print(f"  gc gen{gen}: {len(mine)}, mean {statistics.mean(g[1] for g in mine) * 1e3:.2f} "
              f"ms, longest {max(g[1] for g in mine) * 1e3:.1f} ms")
    start, end = scenario.get("host_start"), scenario.get("host_end")
    if start and end:
        _host(clients, start, end)


def _host(clients: list[dict[str, Any]], start: dict[str, Any], end: dict[str, Any]) -> None:
    seconds = end["mono"] - start["mono"]
    busy = (end["busy"] - start["busy"]) / (end["total"] - start["total"]) * 100
    print(f"  host: {busy:.0f} % busy over {seconds:.1f} s; CPU and run-queue wait by part:")
    names: dict[str, str] = {}
    for c in clients:
        for tid, name in c["threads"].items():
            names[tid] = "main" if int(tid) == c["pid"] else re.sub(r"[_\-]?\d+$", "", name)
    parts: dict[str, list[float]] = {}
    for tid, (on, wait) in end["threads"].items():
        if tid in start["threads"]:
            slot = parts.setdefault(f"client {names.get(tid, '?')}", [0.0, 0.0])
            slot[0] += on - start["threads"][tid][0]
            slot[1] += wait - start["threads"][tid][1]
    for part, (on, wait) in end["parts"].items():
        if part in start["parts"]:
            slot = parts.setdefault(part, [0.0, 0.0])
            slot[0] += on - start["parts"][part][0]
            slot[1] += wait - start["parts"][part][1]
    for part, (on, wait) in sorted(parts.items(), key=lambda kv: -kv[1][0]):
        if on / seconds * 1e3 > 2:
            print(f"    {part:36s} cpu {on / seconds * 1e3:7.1f} ms/s, run queue "
                  f"{wait / seconds * 1e3:7.1f} ms/s")


if __name__ == "__main__":
    for name in sys.argv[1:]:
        report(Path(name))
