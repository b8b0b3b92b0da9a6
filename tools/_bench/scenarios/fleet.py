"""fleet: what N client processes cost every server, per-process monitor vs shared vs Pgpool.

One sandbox of 4 shards x 2 replicas (its own; ``max_connections`` raised to 600 and
``pg_stat_statements`` loaded, so that today's per-process design can be measured at all
and every statement is counted on the server). For N = 1, 8, 32 and 64 client processes:

* ``off``: each process's store polls every node itself (``[monitor] sharing = "off"``);
* ``host``: the shared design (``sharing = "host"``, the default): one monitor per host;
* ``pgpool``: the one-proxy reference, one Pgpool-II per shard (primary and both replicas,
  its strongest lag protection, ``_bench.pgpool``), each process reading through it.

Stores run with ``routing.connection_budget = 2 x nodes`` (one pooled connection per node:
the fleet setup of docs/deployment.md). Each phase: the processes open their stores, an
idle window (client CPU per idle process, monitoring figures), then a reading window at
``RATE`` reads/s per process with a 1 s budget (latency, replica share, monitoring figures,
connections), which begins a second after the start signal: latency and replica share are
those of the reads that began inside it. Every server figure is the servers' own
(``_fleet_servers``). The bench's heap is frozen across the forks (``Fleet.start``).

Quick runs and diagnosis (the defaults are the full run): ``PROPSTORE_FLEET_MODES``
(e.g. ``host``), ``PROPSTORE_FLEET_COUNTS`` (e.g. ``1,64``), ``PROPSTORE_FLEET_MIN_READS``,
and ``PROPSTORE_FLEET_TRACE=DIR`` for per-read traces (``_fleet_trace``).

Bars (issue 14), judged on ``host``: at N = 64, monitoring statements/s per server <= 2x
the N = 1 figure; client connections per server <= N + 4; replica share and read latency
(p50, p99) no worse than at N = 1. A latency quantile is compared with what one process
can show: every phase reads until it has :data:`MIN_READS` reads (one process at ``RATE``
reads for 100 s, not 5: 25 reads made "p99" a maximum), and N = 64's quantile must not pass
the upper end of N = 1's 95 % confidence interval (distribution-free, from the binomial
order statistics: :func:`quantile_interval`).
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from propstore import MonitorSettings, Topology
from propstore.migrate import upgrade
from propstore.sandbox import LocalCluster

from _bench import affinity
from _bench.env import load_users, pin_cluster, wait_caught_up
from _bench.options import Options
from _bench.pgpool import Backend, PgpoolProcess, PgpoolUnavailable
from _bench.results import Bar, ScenarioResult, reported
from _bench.scenarios._fleet_clients import EVERYWHERE, READ_BUDGET, ClientReport, Fleet
from _bench.scenarios._fleet_servers import (
    Probe,
    ServerSnapshot,
    evicted,
    monitor_cpu,
    monitoring_calls,
    processes_mentioning,
    top_monitoring,
    tree_cpu,
)
from _bench.scenarios._fleet_trace import host_snapshot, trace_dir, write_host

#: Where a store looks for its host's agent (``propstore.monitor._shared``; read from the
#: environment, so the name is repeated here rather than imported from a build that may
#: not have it).
AGENT_DIR_ENV = "PROPSTORE_AGENT_DIR"
SHAPE = (4, 2)


def _listed(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated override from the environment (a quick run of a few phases: the
    default is the full run)."""
    value = os.environ.get(name, "").strip()
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else default


COUNTS = tuple(int(c) for c in _listed("PROPSTORE_FLEET_COUNTS", ("1", "8", "32", "64")))
MODES = _listed("PROPSTORE_FLEET_MODES", ("off", "host", "pgpool"))
#: Reads per second per process: modest, so that 64 processes fit on 2 shared cores.
RATE = 5.0
USERS = 4000
MAX_CONNECTIONS = 600
#: Reads every phase collects at least (its reading window is stretched to get them): a
#: p99 of fewer is one of the slowest few reads, and its interval has no upper end.
MIN_READS = int(os.environ.get("PROPSTORE_FLEET_MIN_READS", "500"))
#: Confidence of the latency quantiles' intervals.
CONFIDENCE_Z = 1.96


@dataclass
class Phase:
    """One mode at one N: the figures of its idle and reading windows."""

    mode: str
    count: int
    idle_seconds: float
    read_seconds: float
    idle_monitor_qps: float
    monitor_qps: float
    monitor_qps_mean: float
    monitor_connections: int
    client_connections: int
    server_monitor_cpu: float
    client_cpu_idle: float
    proxy_cpu: float | None
    reads: int
    replica_reads: int
    errors: int
    p50: float
    p99: float
    first_error: str
    top: list[tuple[str, int]]
    fallbacks: dict[str, int] = field(default_factory=dict)
    evictions: int = 0
    #: 95 % confidence intervals of the latency quantiles (``p50``, ``p99``), seconds.
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: Reads that began before the reading window (after the start signal), and their
    #: p99 (seconds): not in the figures above, reported in a note.
    before_window: tuple[int, float] = (0, math.nan)

    @property
    def replica_share(self) -> float:
        """Replica reads / reads (percent)."""
        return 100.0 * self.replica_reads / self.reads if self.reads else math.nan

    def row(self) -> dict[str, Any]:
        """The fleet table's row."""
        return {
            "monitoring q/s per server (max)": round(self.monitor_qps, 1),
            "(mean)": round(self.monitor_qps_mean, 1),
            "idle": round(self.idle_monitor_qps, 1),
            "monitoring conns per server": self.monitor_connections,
            "client conns per server": self.client_connections,
            "server CPU on monitoring ms/s (all servers)": round(self.server_monitor_cpu, 1),
            "client CPU ms/s per idle process": round(self.client_cpu_idle, 2),
            "proxy CPU ms/s": "-" if self.proxy_cpu is None else round(self.proxy_cpu, 1),
            "reads": self.reads,
            "errors": self.errors,
            "replica share %": round(self.replica_share, 1),
            "p50 ms": round(self.p50 * 1000, 2),
            "p99 ms": round(self.p99 * 1000, 2),
        }


def fleet(env: Any, options: Options) -> ScenarioResult:
    """Run every mode at every N on one 4x2 cluster of the scenario's own."""
    del env  # the fleet needs a cluster shape and server settings of its own
    result = ScenarioResult(
        "fleet", f"N = {', '.join(map(str, COUNTS))} client processes on 4 shards x 2 "
        f"replicas, {RATE:g} reads/s each ({READ_BUDGET:g} s budget): per-process monitor "
        "(sharing=off), shared (sharing=host) and Pgpool-II, in one run")
    seconds = options.seconds(5.0)
    # The setting landed before its behaviour: without the agent "host" would run as "off".
    shared = importlib.util.find_spec("propstore.monitor._agent") is not None
    phases: list[Phase] = []
    # The shared agents of this run in a folder of their own: their CPU is the clients',
    # and no other program's agent is taken for ours (nor ours joined by another's store).
    agents = Path(tempfile.mkdtemp(prefix="propstore-fleet-agents-"))
    os.environ[AGENT_DIR_ENV] = str(agents)
    with LocalCluster(shards=SHAPE[0], replicas=SHAPE[1]) as cluster:
        _prepare(cluster)
        if affinity.available():  # a fleet is a host's worth of processes: unpinned
            pin_cluster(cluster, EVERYWHERE)
        assert cluster.config_path is not None
        topology = Topology.load(cluster.config_path)
        users, _ = load_users(topology, USERS)
        wait_caught_up(topology)
        for mode in MODES:
            if mode == "pgpool" and not options.pgpool:
                result.notes.append("pgpool: skipped (--no-pgpool)")
                continue
            if mode == "host" and not shared:
                result.notes.append('host: skipped (this build has no shared monitor yet: '
                                    'sharing = "host" would run as "off")')
                continue
            for count in COUNTS:
                try:
                    phases.append(_phase(cluster, topology, mode, count, users, seconds,
                                         options.warmup))
                except PgpoolUnavailable as exc:
                    result.notes.append(f"pgpool: skipped ({exc})")
                    break
                print(f"fleet {mode} N={count}: {phases[-1].row()}", flush=True)
                _wait_agents_gone(agents)
    del os.environ[AGENT_DIR_ENV]
    shutil.rmtree(agents, ignore_errors=True)
    result.duration = sum(p.idle_seconds + p.read_seconds for p in phases)
    for phase in phases:
        result.facts[f"{phase.mode} N={phase.count}"] = phase.row()
        if phase.top:
            result.notes.append(f"{phase.mode} N={phase.count} top monitoring statements: "
                                + "; ".join(f"{n}x {t[:60]!r}" for t, n in phase.top))
        if phase.fallbacks and phase.mode != "pgpool":
            result.notes.append(f"{phase.mode} N={phase.count} primary reads by reason: "
                                + ", ".join(f"{k} {v}" for k, v in phase.fallbacks.items()))
        if phase.evictions:
            result.notes.append(f"{phase.mode} N={phase.count}: {phase.evictions} "
                                "pg_stat_statements entries evicted while reading (their "
                                "earlier calls are missing from the figures)")
        if phase.before_window[0]:
            result.notes.append(
                f"{phase.mode} N={phase.count}: {phase.before_window[0]} reads before the "
                f"window (the first after the start signal), not counted: p99 "
                f"{phase.before_window[1] * 1000:.2f} ms")
        if phase.first_error:
            result.notes.append(f"{phase.mode} N={phase.count}: {phase.errors} read errors, "
                                f"first: {phase.first_error}")
    _bars(result, phases)
    result.notes.append(
        f"stores: routing.connection_budget = {2 * _nodes(topology)} (one pooled connection "
        f"per node); servers: max_connections = {MAX_CONNECTIONS}; windows of {seconds:g} s "
        f"idle then {seconds:g} s reading (longer until {MIN_READS} reads: "
        f"{MIN_READS / RATE:g} s for one process) after {options.warmup:g} s of warm-up; "
        "nothing pinned (clients, servers and Pgpool on every CPU)")
    return result


def _wait_agents_gone(folder: Path, timeout: float = 30.0) -> None:
    """An agent outlives its last store by a grace period: wait it out, so that its polls
    do not count in the next phase."""
    deadline = time.monotonic() + timeout
    while processes_mentioning(str(folder)) and time.monotonic() < deadline:
        time.sleep(0.2)


def _nodes(topology: Topology) -> int:
    return sum(len(s.nodes) for s in topology.shards)


def _prepare(cluster: LocalCluster) -> None:
    """Room for today's per-process design (64 x 2 connections per server), and statement
    counts: replicas first, so none ever has fewer connection slots than its primary."""
    for shard in cluster.shards:
        for node in (*shard.replicas, shard.primary):
            node.execute(f"ALTER SYSTEM SET max_connections = {MAX_CONNECTIONS}")
            node.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            node.restart()
    for shard in cluster.shards:
        shard.primary.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        upgrade(shard.primary.dsn)
    cluster.wait_caught_up()


def _document(topology: Topology, mode: str) -> dict[str, Any]:
    shards = [{
        "name": s.name, "buckets": [str(r) for r in s.buckets],
        "primary": {"name": s.primary.name, "dsn": s.primary.dsn},
        "replicas": [{"name": r.name, "dsn": r.dsn} for r in s.replicas],
    } for s in topology.shards]
    data: dict[str, Any] = {"bucket_count": topology.bucket_count, "shards": shards,
                            "routing": {"connection_budget": 2 * _nodes(topology)}}
    if mode in ("off", "host") and "sharing" in MonitorSettings.__dataclass_fields__:
        data["monitor"] = {"sharing": mode}
    return data


def _pgpools(cluster: LocalCluster, count: int) -> list[PgpoolProcess]:
    started: list[PgpoolProcess] = []
    try:
        for shard in cluster.shards:
            first, second = shard.replicas
            extra: dict[str, str | int] = {
                "backend_hostname2": "'127.0.0.1'", "backend_port2": second.port,
                "backend_weight2": 1, "backend_flag2": "'DISALLOW_TO_FAILOVER'",
                "backend_application_name2": f"'{second.name}'",
                "backend_application_name1": f"'{first.name}'",
                # One child per client process (each holds its connection for the run).
                "num_init_children": count + 2,
            }
            started.append(PgpoolProcess(
                Backend.from_dsn(shard.primary.dsn), Backend.from_dsn(first.dsn), extra=extra,
                cpus=EVERYWHERE if affinity.available() else None).start())
    except BaseException:
        for process in started:
            process.stop()
        raise
    return started


def _phase(cluster: LocalCluster, topology: Topology, mode: str, count: int,
           users: list[str], seconds: float, warmup: float) -> Phase:
    servers = {node.name: node.dsn for node in cluster.nodes}
    pgpools = _pgpools(cluster, count) if mode == "pgpool" else []
    try:
        clients = Fleet(mode, count, _document(topology, mode), users, RATE,
                        [p.dsn() for p in pgpools],
                        [s.primary.port for s in cluster.shards])
        if threading.active_count() > 1:
            print(f"fleet: forking with {threading.active_count()} threads", flush=True)
        try:
            clients.start(timeout=60 + count)
            time.sleep(warmup)
            with Probe(servers) as probe:
                return _measure(probe, clients, pgpools, mode, count, seconds,
                                [n.pid for n in cluster.nodes if n.pid is not None])
        except BaseException:
            clients.kill()
            raise
    finally:
        for process in pgpools:
            process.stop()


def _measure(probe: Probe, clients: Fleet, pgpools: list[PgpoolProcess], mode: str,
             count: int, seconds: float, server_pids: list[int] | None = None) -> Phase:
    proxy_roots = [p._proc.pid for p in pgpools if p._proc is not None]
    # Idle window: monitoring only; the client processes' CPU and their agent's.
    agents = os.environ.get(AGENT_DIR_ENV, "")
    roots = [*clients.pids, *(processes_mentioning(agents) if agents else [])]
    s0, c0, t0 = probe.snapshot(), tree_cpu(roots), time.monotonic()
    time.sleep(seconds)
    s1, c1, t1 = probe.snapshot(), tree_cpu(roots), time.monotonic()
    idle = t1 - t0
    clients.read()
    time.sleep(min(1.0, seconds / 4))  # every process past its first read
    window = max(seconds, MIN_READS / (count * RATE))
    folder = trace_dir(mode, count)
    traced: dict[str, Any] = {"probes": []}

    def snap() -> dict[str, ServerSnapshot]:
        began = time.monotonic()
        taken = probe.snapshot()
        traced["probes"].append((began, time.monotonic()))
        return taken

    def host(name: str) -> None:
        if folder is not None:
            traced[name] = host_snapshot(clients.pids, server_pids or [],
                                         processes_mentioning(agents) if agents else [])
    host("host_start")
    s2, p2, t2 = snap(), tree_cpu(proxy_roots), time.monotonic()
    time.sleep(window / 2)
    mid = snap()
    time.sleep(window / 2)
    s3, p3, t3 = snap(), tree_cpu(proxy_roots), time.monotonic()
    host("host_end")
    traced["window"] = (t2, t3)
    reports = clients.stop()
    if folder is not None:
        write_host(folder, "scenario", traced)
    reading = t3 - t2
    # The reads of the window only, as for every other figure: the reads before it are
    # the first ones after the start signal, which wakes every process in the same instant
    # (64 first reads at once: a herd no fleet has; the slowest 1 % of N = 64's reads
    # were a third of them).
    before = sorted(lat for r in reports for lat, at in zip(r.latencies, r.starts, strict=True)
                    if at < t2)
    phase = _phase_figures(mode, count, idle, reading, (s0, s1), (s2, mid, s3),
                           (c1 - c0) / idle / count * 1000,
                           (p3 - p2) / reading * 1000 if proxy_roots else None,
                           [r.within(t2, t3) for r in reports])
    phase.before_window = (len(before), _quantile(before, 0.99))
    return phase


def _phase_figures(mode: str, count: int, idle: float, reading: float,
                   idle_snaps: tuple[dict[str, ServerSnapshot], ...],
                   read_snaps: tuple[dict[str, ServerSnapshot], ...], client_cpu: float,
                   proxy_cpu: float | None, reports: list[ClientReport]) -> Phase:
    s0, s1 = idle_snaps
    s2, mid, s3 = read_snaps
    per_server = {name: monitoring_calls(s2[name], s3[name]) / reading for name in s3}
    idle_qps = max(monitoring_calls(s0[name], s1[name]) / idle for name in s1)
    worst = max(per_server, key=per_server.__getitem__)
    latencies = sorted(lat for r in reports for lat in r.latencies)
    errors = [r for r in reports if r.errors]
    return Phase(
        mode=mode, count=count, idle_seconds=idle, read_seconds=reading,
        idle_monitor_qps=idle_qps, monitor_qps=per_server[worst],
        monitor_qps_mean=sum(per_server.values()) / len(per_server),
        monitor_connections=max(snap[n].monitor_connections for snap in (mid, s3) for n in s3),
        client_connections=max(snap[n].client_connections for snap in (mid, s3) for n in s3),
        server_monitor_cpu=sum(monitor_cpu(s2[n], s3[n]) for n in s3) / reading * 1000,
        client_cpu_idle=client_cpu, proxy_cpu=proxy_cpu,
        reads=len(latencies), replica_reads=sum(r.replica_reads for r in reports),
        errors=sum(r.errors for r in reports),
        p50=_quantile(latencies, 0.5), p99=_quantile(latencies, 0.99),
        intervals={"p50": quantile_interval(latencies, 0.5),
                   "p99": quantile_interval(latencies, 0.99)},
        first_error=errors[0].first_error if errors else "",
        top=top_monitoring(s2[worst], s3[worst]), fallbacks=_sum(r.fallbacks for r in reports),
        evictions=sum(evicted(s2[n], s3[n]) for n in s3))


def _sum(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for one in counts:
        for key, value in one.items():
            total[key] = total.get(key, 0) + value
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def _quantile(ordered: list[float], q: float) -> float:
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def quantile_interval(ordered: list[float], q: float, z: float = CONFIDENCE_Z
                      ) -> tuple[float, float]:
    """Distribution-free confidence interval of the ``q`` quantile of sorted samples: the
    order statistics whose ranks bound the binomial count of samples below the quantile
    (normal approximation, ``z`` standard deviations); an end no sample reaches is
    ``inf`` (too few samples: 30 reads bound no p99 from above)."""
    n = len(ordered)
    if not n:
        return math.nan, math.nan
    spread = z * math.sqrt(n * q * (1 - q))
    low, high = math.floor(n * q - spread), math.ceil(n * q + spread)
    return (ordered[low - 1] if low >= 1 else -math.inf,
            ordered[high - 1] if high <= n else math.inf)


def _ms_interval(interval: tuple[float, float] | None) -> str:
    if interval is None:
        return ""
    return f" [95% CI {interval[0] * 1000:.2f}-{interval[1] * 1000:.2f}]"


def _bars(result: ScenarioResult, phases: list[Phase]) -> None:
    by = {(p.mode, p.count): p for p in phases}
    low, high = COUNTS[0], COUNTS[-1]
    for mode in ("host", "off"):
        one, many = by.get((mode, low)), by.get((mode, high))
        if one is None or many is None:
            continue
        judged = mode == "host"
        label = f"fleet ({mode}): N={high} vs N={low}"

        def bar(name: str, value: float, limit: float, unit: str, *, at_least: bool = False,
                detail: str = "", judged: bool = judged) -> Bar:
            if judged:
                return Bar(name, value, limit, at_least=at_least, unit=unit, detail=detail,
                           budget=f"{READ_BUDGET:g} s")
            return reported(name, value, unit=unit, detail=detail, readme=False,
                            budget=f"{READ_BUDGET:g} s")

        ratio = many.monitor_qps / one.monitor_qps if one.monitor_qps else math.nan
        result.bars.append(bar(
            f"{label}, monitoring statements/s per server", ratio, 2.0, "x",
            detail=f"{many.monitor_qps:.1f} vs {one.monitor_qps:.1f} q/s on the busiest server"))
        result.bars.append(bar(
            f"{label}, client connections per server", many.client_connections, high + 4, "",
            detail=f"bar: one pooled connection per process + 4 = {high + 4}"))
        result.bars.append(bar(
            f"{label}, replica share", many.replica_share, one.replica_share, "%",
            at_least=True, detail=f"{many.replica_reads} of {many.reads} reads"))
        for q, a, b in (("p50", many.p50, one.p50), ("p99", many.p99, one.p99)):
            # No worse than one process beyond what sampling alone moves it by: the upper
            # end of N=1's interval (its own figure when its reads bound none).
            mine, theirs = many.intervals.get(q), one.intervals.get(q)
            limit = theirs[1] if theirs is not None and math.isfinite(theirs[1]) else b
            result.bars.append(bar(
                f"{label}, read latency {q}", a * 1000, limit * 1000, "ms",
                detail=f"N={low}: {b * 1000:.2f} ms{_ms_interval(theirs)} of {one.reads} "
                f"reads; N={high}: {a * 1000:.2f} ms{_ms_interval(mine)} of {many.reads}"))
    pool = by.get(("pgpool", high))
    if pool is not None:
        result.bars.append(reported(
            f"fleet (pgpool): N={high} monitoring statements/s per server", pool.monitor_qps,
            unit="", readme=False, detail=f"{pool.client_connections} client connections "
            "per server"))
