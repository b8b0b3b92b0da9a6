"""What the lag monitor costs: CPU per second and queries per second per node, by cluster size.

Each shape gets a cluster of its own and a bare :class:`~propstore.LagMonitor` (no store, so
nothing else runs in this process). The monitor thread's CPU time is read from its own
per-thread clock (``pthread_getcpuclockid``); the servers' CPU for answering the polls from
``/proc/<pid>/stat`` of the backends whose ``application_name`` is ``propstore-monitor``.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from propstore import LagMonitor, Topology
from propstore.sandbox import LocalCluster

from _bench import affinity
from _bench.env import BenchEnv, pin_cluster
from _bench.options import Options
from _bench.results import ScenarioResult, reported

#: (shards, replicas per shard). 16 shards get one replica each: 48 servers would not fit
#: beside everything else on a 2-core machine; 32 do.
SHAPES = ((2, 2), (8, 2), (16, 1))
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Cost:
    """One shape's figures over ``seconds`` of idle monitoring."""

    shards: int
    replicas: int
    nodes: int
    seconds: float
    polls: int
    thread_cpu: float
    process_cpu: float
    server_cpu: float | None
    #: CPU seconds per second of a bare asyncio loop with one 100 ms sleeper per node.
    idle_loop_cpu: float

    def as_dict(self) -> dict[str, float | int | None]:
        """Per-second and per-poll figures for the report."""
        per_s = self.seconds
        return {
            "nodes": self.nodes,
            "polls/s per node": round(self.polls / per_s / self.nodes, 2),
            "monitor thread CPU ms/s": round(self.thread_cpu / per_s * 1000, 2),
            "process CPU ms/s (store idle)": round(self.process_cpu / per_s * 1000, 2),
            "client CPU us/poll": round(self.thread_cpu / max(1, self.polls) * 1e6, 1),
            "server CPU ms/s (all nodes)": None if self.server_cpu is None
            else round(self.server_cpu / per_s * 1000, 2),
            "bare asyncio loop, same wake-ups without I/O, CPU ms/s":
                round(self.idle_loop_cpu * 1000, 2),
        }


def monitor_cost(env: BenchEnv, options: Options) -> ScenarioResult:
    """Measure the monitor on 2x2, 8x2 and 16x1 clusters at the default interval."""
    del env  # every shape runs on a cluster of its own
    result = ScenarioResult(
        "monitor-cost", "idle LagMonitor at the default interval on clusters of 2x2, 8x2 "
        "and 16x1 (shards x replicas)")
    seconds = options.seconds(10.0)
    pin = options.pin and affinity.available()
    costs = [_measure(shards, replicas, seconds, options.warmup, pin)
             for shards, replicas in SHAPES]
    for cost in costs:
        result.facts[f"{cost.shards}x{cost.replicas}"] = cost.as_dict()
    result.duration = seconds * len(costs)
    first, last = costs[0], costs[-1]
    per_node = (last.thread_cpu / last.seconds - first.thread_cpu / first.seconds) / (
        last.nodes - first.nodes)
    result.facts["growth: monitor CPU ms/s per added node"] = round(per_node * 1000, 3)
    shapes = " / ".join(f"{c.shards}x{c.replicas}" for c in costs)
    figures = [c.as_dict() for c in costs]
    result.bars.append(reported(
        f"monitor thread CPU, {shapes} shards x replicas", per_node * 1000, unit="",
        budget="idle store, default poll interval",
        text=" / ".join(f"{f['monitor thread CPU ms/s']:.0f}" for f in figures)
        + " ms/s at " + " / ".join(f"{f['polls/s per node']:.1f}" for f in figures)
        + " polls/s per node (bare asyncio loop, same wake-ups: "
        + " / ".join(f"{f['bare asyncio loop, same wake-ups without I/O, CPU ms/s']:.0f}"
                     for f in figures) + " ms/s)",
        detail=f"{per_node * 1000:.2f} ms/s per added node"))
    result.notes.append("16 shards run with 1 replica each (32 servers) to fit on this "
                        "machine; the 2- and 8-shard clusters have 2 replicas per shard")
    return result


def _measure(shards: int, replicas: int, seconds: float, warmup: float, pin: bool) -> Cost:
    with LocalCluster(shards=shards, replicas=replicas) as cluster:
        assert cluster.config_path is not None
        if pin:
            pin_cluster(cluster)
        topology = Topology.load(cluster.config_path)
        before = set(threading.enumerate())
        monitor = LagMonitor(topology)
        monitor.start()
        try:
            (thread,) = [t for t in threading.enumerate()
                         if t not in before and t.name == "propstore-monitor"]
            time.sleep(warmup)
            nodes = [node for shard in topology.shards for node in shard.nodes]
            server0 = _server_cpu([n.dsn for n in nodes])
            clock = time.pthread_getcpuclockid(thread.ident or 0)
            t0, cpu0, proc0 = time.monotonic(), time.clock_gettime(clock), time.process_time()
            polls0 = monitor.state.polls
            time.sleep(seconds)
            elapsed = time.monotonic() - t0
            cpu, proc = time.clock_gettime(clock) - cpu0, time.process_time() - proc0
            polls = monitor.state.polls - polls0
            server1 = _server_cpu([n.dsn for n in nodes])
        finally:
            monitor.stop()
    server = None if server0 is None or server1 is None else server1 - server0
    idle = asyncio.run(_idle_loop_cpu(len(nodes), topology.monitor.interval,
                                      max(2.0, seconds / 2)))
    return Cost(shards, replicas, len(nodes), elapsed, polls, cpu, proc, server, idle)


async def _idle_loop_cpu(sleepers: int, interval: float, seconds: float) -> float:
    """CPU seconds per second of an event loop whose only work is ``sleepers`` tasks waking
    every ``interval`` (jittered like the monitor): the floor any per-node poller pays.

    On a VM an idle CPU halts and each wake-up is expensive; this shows how much of the
    monitor's CPU is waking up rather than polling.
    """
    async def sleeper(seed: int) -> None:
        jitter = random.Random(seed)
        while True:
            await asyncio.sleep(interval * jitter.uniform(0.9, 1.1))

    tasks = [asyncio.create_task(sleeper(i)) for i in range(sleepers)]
    await asyncio.sleep(interval * 2)
    started, cpu = time.monotonic(), time.thread_time()
    await asyncio.sleep(seconds)
    used = (time.thread_time() - cpu) / (time.monotonic() - started)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return used


def _server_cpu(dsns: list[str]) -> float | None:
    """CPU seconds used so far by every server backend serving the monitor (None if the
    servers' processes cannot be read, e.g. not on this machine)."""
    total = 0.0
    for dsn in dsns:
        with psycopg.connect(dsn, autocommit=True) as conn:
            pids = [row[0] for row in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'propstore-monitor'"
            ).fetchall()]
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                return None
            # utime and stime: fields 14 and 15 of stat(5), i.e. 12 and 13 after the name.
            total += (int(fields[11]) + int(fields[12])) / _TICK
    return total
