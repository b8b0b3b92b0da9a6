"""Shared monitoring (``[monitor] sharing``): the processes on a host that use one topology
share one lag monitor, and every read stays proven within its budget."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import gc
import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from propstore import ConfigError, MonitorSettings, Topology
from propstore.lsn import LSN
from propstore.metrics import AGENT_METRIC_NAMES
from propstore.monitor import LagMonitor, MonitorState, Observation
from propstore.monitor._agent import repeats
from propstore.monitor._health import TRACE_MEMORY_ENV, AgentStatus, RefusalTally, agent_status
from propstore.monitor._hub import Hub, pace_for, paces
from propstore.monitor._messages import (
    VERSION,
    Ask,
    Beat,
    Counts,
    Failed,
    Hello,
    HistoryRead,
    Join,
    Message,
    Pace,
    Polled,
    decode,
    decode_request,
    encode,
    encode_request,
)
from propstore.monitor._shared import HELLO_WAIT, AgentPaths, SharedMonitor, stale_after
from propstore.proof import ServerRun
from propstore.sandbox import LocalCluster
from propstore.timeline import TimelineHistory
from tests._agent_worker import Fleet, Status, agent_dir
from tests.claims import (
    CHAOS_PROCESSES,
    FLEET_QUERY_RATIO,
    HERD_OWN_MONITORS,
    HERD_PROCESSES,
    SHARE_PROCESSES,
)
from tests.conftest import users_on_shard

#: Growth of the agent's traced memory that counts as flat over 1,000 stores and 500 polls
#: per node (a leak of 32 bytes per store would show as 32 KB; between two snapshots the
#: agent's buffers in flight move it by about 10 KB either way).
FLAT_AGENT_BYTES = 32 * 1024

#: Stores started at once on a host with no agent (``PROPSTORE_START_PROCESSES``; the
#: chaos bar's 32 passed at load 30-65, 48 too), and the seconds they have to all follow
#: one agent, counted from their start (their interpreters start first: a few seconds of
#: CPU each on two shared cores; the chaos test gives its first wait as long).
START_PROCESSES = 16
START_DEADLINE = 60.0

TOPOLOGY = """
[[shards]]
name = "a"
buckets = ["0-4095"]
primary = "host=127.0.0.1 port=6001 dbname=propstore user=postgres"
"""


def test_sharing_defaults_to_host_and_can_be_turned_off() -> None:
    assert Topology.from_toml(TOPOLOGY, environ={}).monitor.sharing == "host"
    off = Topology.from_toml("[monitor]\nsharing = \"off\"\n" + TOPOLOGY, environ={})
    assert off.monitor.sharing == "off"
    env = Topology.from_toml(TOPOLOGY, environ={"PROPSTORE_MONITOR_SHARING": "off"})
    assert env.monitor.sharing == "off"


@pytest.mark.parametrize("text", ['sharing = "process"', "sharing = true"])
def test_bad_sharing_is_a_clear_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match=r"monitor\.sharing = .* is not one of 'host', 'off'"):
        Topology.from_toml(f"[monitor]\n{text}\n" + TOPOLOGY, environ={})
    with pytest.raises(ConfigError, match="PROPSTORE_MONITOR_SHARING"):
        Topology.from_toml(TOPOLOGY, environ={"PROPSTORE_MONITOR_SHARING": "yes"})
    with pytest.raises(ConfigError, match="is not one of"):
        MonitorSettings(sharing="process")  # type: ignore[arg-type]


# ---------------------------------------------------------------- on real clusters
#
# Every figure below is counted on the servers themselves (``pg_stat_activity``,
# ``pg_stat_database``), never taken from the store's own report; every read is checked on
# the data against the acknowledged writes of its process (``tests/_workload.py``).

MONITORS = ("propstore-monitor", "propstore-agent")


def _monitoring_connections(topology: Topology) -> dict[str, Counter[str]]:
    """Per node: the monitoring connections its server has, by application name."""
    found: dict[str, Counter[str]] = {}
    for shard in topology.shards:
        for node in shard.nodes:
            with psycopg.connect(node.dsn, autocommit=True) as conn:
                rows = conn.execute(
                    "SELECT application_name, count(*) FROM pg_stat_activity "
                    "WHERE application_name = ANY(%s) GROUP BY 1", (list(MONITORS),)
                ).fetchall()
            found[node.name] = Counter({str(name): int(n) for name, n in rows})
    return found


def _poll_rates(topology: Topology, seconds: float) -> dict[str, float]:
    """Per node: monitoring queries per second its server ran, counted on the server by
    sampling ``pg_stat_activity`` (each poll gives its backend a new ``query_start``) every
    few milliseconds for ``seconds`` (a sample missed makes the count lower, never higher;
    ``pg_stat_database`` counters flush too lazily to count a 100 ms poll)."""
    conns = {node.name: psycopg.connect(node.dsn, autocommit=True)
             for shard in topology.shards for node in shard.nodes}
    seen: dict[str, set[tuple[int, object]]] = {name: set() for name in conns}
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            for name, conn in conns.items():
                seen[name].update(conn.execute(
                    "SELECT pid, query_start FROM pg_stat_activity "
                    "WHERE application_name = ANY(%s)", (list(MONITORS),)).fetchall())
        elapsed = time.monotonic() - t0
    finally:
        for conn in conns.values():
            conn.close()
    return {name: len(starts) / elapsed for name, starts in seen.items()}


def _ended(pid: int) -> bool:
    """Whether process ``pid`` ended (gone, or a zombie its parent has not reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _settled_connections(topology: Topology, timeout: float = 30.0
                         ) -> dict[str, Counter[str]]:
    """The monitoring connections per node once every store's own monitor closed (a store
    that polled for itself until it joined closes its connections as it joins)."""
    deadline = time.monotonic() + timeout
    while True:
        found = _monitoring_connections(topology)
        if all(c == Counter({"propstore-agent": 1}) for c in found.values()) or (
            time.monotonic() > deadline
        ):
            return found
        time.sleep(0.2)


def _all_shared(statuses: list[Status]) -> bool:
    pids = {s.agent_pid for s in statuses}
    return all(s.source == "agent" for s in statuses) and len(pids) == 1


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Path]:
    """A private agent folder for this test's stores and workers (agents of other tests
    and engineers never answer them); agents left at the end are ended here."""
    with agent_dir(tmp_path / "agents") as folder:
        yield folder
    _end_agents(folder)


def _agent_pids(folder: Path) -> set[int]:
    """Pids of the agents whose lock files are in ``folder`` (``/proc/locks`` owners)."""
    inodes = {os.stat(p).st_ino for p in folder.glob("*.lock")}
    pids = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[4].isdigit() and (
            int(fields[5].split(":")[-1]) in inodes
        ):
            pids.add(int(fields[4]))
    return pids


def _end_agents(folder: Path) -> None:
    for pid in _agent_pids(folder):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


@pytest.mark.slow
def test_processes_on_one_topology_share_one_monitor_on_every_server(
    topology: Topology, cluster_config: Path, agents: Path,
) -> None:
    interval = topology.monitor.interval
    with Fleet(cluster_config, SHARE_PROCESSES) as fleet:
        statuses = fleet.wait_for(_all_shared, 30, "every worker follows one agent")
        assert all(s.states and set(s.states) == {"up"} for s in statuses), statuses
        connections = _monitoring_connections(topology)
        rates = _poll_rates(topology, 3.0)
        statuses = fleet.statuses()
        fleet.stop()
    print(f"{SHARE_PROCESSES} processes: monitoring queries/s per server "
          f"{ {n: round(r, 1) for n, r in rates.items()} }")
    assert _all_shared(statuses), statuses  # still one agent at the end of the window
    for node, seen in connections.items():
        assert seen == Counter({"propstore-agent": 1}), (node, connections)
    # Polls of one monitor, not of SHARE_PROCESSES: at most 2x one monitor's rate.
    for node, rate in rates.items():
        assert rate <= FLEET_QUERY_RATIO / interval, (node, rates)
        assert rate > 0, (node, rates)  # the agent did poll (seen on the server)


@pytest.mark.slow
def test_a_fleet_starting_at_once_with_no_agent_ends_up_following_one(
    topology: Topology, cluster_config: Path, agents: Path,
) -> None:
    """Many stores starting together on a host with no agent running (a fleet deployed at
    once, each reading and writing from its start): one agent is spawned, every store
    follows it within the deadline, and every server has one propstore-agent connection
    and no store polling for itself."""
    count = int(os.environ.get("PROPSTORE_START_PROCESSES", START_PROCESSES))
    with Fleet(cluster_config, count, users=lambda i: _users(topology, i, 4)) as fleet:
        statuses = fleet.wait_for(_all_shared, START_DEADLINE,
                                  f"every one of {count} workers follows one agent")
        connections = _settled_connections(topology)
        fleet.stop()
    assert _all_shared(statuses)
    for node, seen in connections.items():
        assert seen == Counter({"propstore-agent": 1}), (node, connections)


@pytest.mark.slow
def test_sharing_off_gives_every_process_its_own_monitor(
    topology: Topology, cluster_config: Path, agents: Path,
) -> None:
    with Fleet(cluster_config, 2, sharing="off") as fleet:
        fleet.wait_for(lambda st: all(set(s.states) == {"up"} for s in st), 30,
                       "every worker's monitor sees every node up")
        connections = _monitoring_connections(topology)
        fleet.stop()
    for node, seen in connections.items():
        assert seen == Counter({"propstore-monitor": 2}), (node, connections)
    assert not list(agents.glob("*.sock")), "sharing = off started an agent"


class _CountingMonitor(LagMonitor):
    """A process's own monitor that counts its connects begun and finished."""

    application_name = "propstore-monitor-cancel-test"

    def __init__(self, topology: Topology) -> None:
        super().__init__(topology)
        self.begun = self.finished = 0

    async def _connect(self, shard_index: int, node_index: int
                       ) -> psycopg.AsyncConnection[object]:
        self.begun += 1
        conn = await super()._connect(shard_index, node_index)
        self.finished += 1
        return conn


def _backends_named(topology: Topology, name: str) -> int:
    total = 0
    for shard in topology.shards:
        for node in shard.nodes:
            with psycopg.connect(node.dsn, autocommit=True) as conn:
                row = conn.execute("SELECT count(*) FROM pg_stat_activity "
                                   "WHERE application_name = %s", (name,)).fetchone()
            total += int(row[0]) if row else 0
    return total


def test_a_monitor_stopped_while_it_connects_leaves_no_connection_on_any_server(
    topology: Topology,
) -> None:
    """A store that joins its host's agent stops its own polls, often while they still
    connect (a fleet's processes start at once): no half-open connection may stay behind.
    They did, idle on the servers until a full garbage collection (70 client connections
    per server in the 64-process fleet run, bar 68); the collector is off here, so a leak
    stays for the test to see."""
    name = _CountingMonitor.application_name

    async def rounds() -> int:
        interrupted = 0
        for delay in [0.002 * i for i in range(40)]:
            monitor = _CountingMonitor(topology)
            task = asyncio.create_task(monitor.run())
            await asyncio.sleep(delay)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            interrupted += monitor.begun - monitor.finished
            deadline = time.monotonic() + 5.0  # a closed backend leaves within ms
            while (left := await asyncio.to_thread(_backends_named, topology, name)) and (
                time.monotonic() < deadline
            ):
                await asyncio.sleep(0.05)
            assert left == 0, f"{left} connections left after a stop {delay * 1000:.0f} ms in"
        return interrupted

    gc.disable()
    try:
        interrupted = asyncio.run(rounds())
    finally:
        gc.enable()
    assert interrupted > 0  # some stops did come while connecting


@pytest.mark.slow
def test_a_store_starved_past_the_silence_limit_keeps_following_its_agent(
    topology: Topology, cluster_config: Path, agents: Path,
) -> None:
    """A process that gets no CPU for longer than the silence limit wakes to its agent's
    bytes and its own expired timer at once: it ran late, the agent did not, so it keeps
    following (on a loaded host a whole fleet took its agent for stuck and polled for
    itself, adding load). A really silent agent is still noticed: the chaos test."""
    silence = stale_after(topology.monitor.interval)
    with Fleet(cluster_config, 2) as fleet:
        before = fleet.wait_for(_all_shared, 30, "every worker follows one agent")
        starved = before[0].pid
        os.kill(starved, signal.SIGSTOP)
        try:
            time.sleep(silence * 1.5)  # the fault itself: no CPU for 1.5 silence limits
        finally:
            os.kill(starved, signal.SIGCONT)
        after = fleet.wait_for(
            lambda st: all(set(s.states) == {"up"} and s.joins >= 1 for s in st), 30,
            "every worker answers again")
        fleet.stop()
    assert _all_shared(after), after
    assert [s.fallbacks for s in after] == [0, 0], after
    assert after[0].agent_pid == before[0].agent_pid


#: CPU a store that follows its host's agent but does not read may spend following it,
#: seconds per second, measured on its monitor thread (``/proc``): 10-11 ms/s when every
#: store was sent every tick; 1-2 ms/s at a load average of 13 once sent at its pace.
IDLE_FOLLOWER_CPU = 0.005
#: Seconds over which the stores' wake-ups and CPU are counted.
PACE_WINDOW_SECONDS = 10.0


@pytest.mark.slow
def test_a_store_that_does_not_read_wakes_to_its_agent_at_the_slowest_pace_for_little_cpu(
    topology: Topology, cluster_config: Path, agents: Path,
) -> None:
    """Each store is sent its agent's facts as often as its reads need: one reading with
    a 100 ms budget at the fastest pace, one that does not read at the slowest (four
    sends within the silence that would make it poll for itself), its follower's CPU
    counted by the kernel."""
    fast, slow = paces(topology.monitor.interval)[0], paces(topology.monitor.interval)[-1]
    with Fleet(cluster_config, 3, users=lambda i: _users(topology, i) if i == 0 else []
               ) as fleet:
        before = fleet.wait_for(
            lambda st: _all_shared(st) and st[0].replica_reads > 0 and (
                [s.pace for s in st] == [fast, slow, slow]), 60,
            "the reading worker at the fastest pace, the others at the slowest")
        t0 = time.monotonic()
        time.sleep(PACE_WINDOW_SECONDS)  # the measurement window
        after = fleet.statuses()
        elapsed = time.monotonic() - t0
        fleet.stop()
    wakes = [(a.wakes - b.wakes) / elapsed for a, b in zip(after, before, strict=True)]
    cpu = [(a.monitor_cpu - b.monitor_cpu) / elapsed for a, b in zip(after, before, strict=True)]
    print(f"wake-ups/s {[round(w, 1) for w in wakes]}, follower CPU ms/s "
          f"{[round(c * 1000, 1) for c in cpu]} (reading, idle, idle; load "
          f"{os.getloadavg()[0]:.1f})")
    assert _all_shared(after) and [s.pace for s in after] == [fast, slow, slow], after
    for rate in wakes[1:]:
        assert rate <= 1.25 / slow, wakes  # one send per tick of its pace
    assert wakes[0] > 3 * max(wakes[1:]), wakes
    for used in cpu[1:]:
        assert used <= IDLE_FOLLOWER_CPU, cpu


@pytest.mark.slow
def test_a_store_starved_while_it_joins_joins_the_agent_that_answered(
    topology: Topology, cluster_config: Path, agents: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A store that gets no CPU between asking to join and its wait for the hello running
    out wakes to the hello and its expired timer at once: the agent answered, the store
    ran late, and it joins (taking that for no agent, a starved store of a 32-process
    chaos run would poll for itself and try again, each time as late, and never join)."""
    opened = asyncio.open_unix_connection

    async def then_starved(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        streams = await opened(path)
        # The fault: once the store has asked to join and waits for the hello, this process
        # runs nothing until 0.2 s past the wait (the hello arrives meanwhile).
        asyncio.get_running_loop().call_soon(time.sleep, HELLO_WAIT + 0.2)
        return streams

    with Fleet(cluster_config, 1) as fleet:
        fleet.wait_for(_all_shared, 30, "the worker follows an agent")
        paths = AgentPaths.of(topology)

        async def starved_join() -> tuple[bool, str, float]:
            monitor = SharedMonitor(topology)
            started = time.monotonic()
            link = await monitor._dial(paths)
            if link is not None:
                link.writer.close()
            return link is not None, monitor.join_error, time.monotonic() - started

        monkeypatch.setattr(asyncio, "open_unix_connection", then_starved)
        joined, error, took = asyncio.run(starved_join())
        monkeypatch.undo()
        fleet.stop()
    assert took >= HELLO_WAIT  # the wait did run out while the process was starved
    assert joined, error


def _users(topology: Topology, worker: int, count: int = 6) -> list[str]:
    return [f"agent-w{worker}-{i}" for i in range(count)]


@pytest.mark.slow
def test_killed_agent_readers_fall_back_then_share_again_with_no_read_outside_budget(
    topology: Topology, cluster: LocalCluster, cluster_config: Path, agents: Path,
) -> None:
    replica = cluster.shards[0].replicas[0]
    with Fleet(cluster_config, 3, users=lambda i: _users(topology, i)) as fleet:
        first = fleet.wait_for(_all_shared, 30, "every worker follows one agent")
        old = first[0].agent_pid
        assert old is not None and old in _agent_pids(agents)
        fleet.wait_for(lambda st: all(s.replica_reads > 20 and s.every_budget_checked
                                      for s in st), 30,
                       "replicas serve every worker, every budget checked")
        # A paused replica around the kill: a store that kept trusting the dead agent's
        # last word (instead of polling, or of letting the bound grow) would read stale.
        replica.pause_replay()
        os.kill(old, signal.SIGKILL)
        fleet.wait_for(lambda st: all(s.fallbacks >= 1 for s in st), 30,
                       "every worker notices the agent is gone")
        again = fleet.wait_for(
            lambda st: _all_shared(st) and st[0].agent_pid != old, 30,
            "every worker follows a new agent")
        replica.resume_replay()
        fleet.wait_for(lambda st: all(s.replica_reads > r.replica_reads + 20
                                      for s, r in zip(st, again, strict=True)), 30,
                       "replicas serve every worker again")
        connections = _monitoring_connections(topology)
        reports = fleet.stop()
    for node, seen in connections.items():
        assert seen == Counter({"propstore-agent": 1}), (node, connections)
    for report in reports:
        report.check(errors_allowed=False)


@pytest.mark.slow
@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stuck"])
def test_a_herd_that_lost_its_agent_waits_for_the_replacement_instead_of_each_polling_every_server(
    topology: Topology, cluster_config: Path, agents: Path, fault: signal.Signals,
) -> None:
    """A killed agent's stores do not each open a monitoring connection to every server at
    once (a host's 200 workers would be 200 more connections on every server, past
    PostgreSQL's default ``max_connections`` of 100: the fleet's own reads refused). The
    store that starts the replacement polls for itself meanwhile; the others wait for it.
    A stuck (stopped) agent holds its lock, so no replacement could start: its stores end
    it once it is silent and answers no new join, and then do the same. Counted on the
    servers, sampled from the fault until every store follows the new agent; every read
    meanwhile is checked on the data."""
    with Fleet(cluster_config, HERD_PROCESSES, users=lambda i: _users(topology, i, 4)) as fleet:
        first = fleet.wait_for(_all_shared, 60, "every worker follows one agent")
        old = first[0].agent_pid
        assert old is not None
        settled = _settled_connections(topology)
        assert all(c == Counter({"propstore-agent": 1}) for c in settled.values()), settled
        peak: Counter[str] = Counter()
        done = threading.Event()

        def sample() -> int:
            conns = {node.name: psycopg.connect(node.dsn, autocommit=True)
                     for shard in topology.shards for node in shard.nodes}
            rounds = 0
            try:
                while not done.is_set():
                    for name, conn in conns.items():
                        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE "
                                           "application_name = 'propstore-monitor'").fetchone()
                        peak[name] = max(peak[name], int(row[0]) if row else 0)
                    rounds += 1
            finally:
                for conn in conns.values():
                    conn.close()
            return rounds

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            sampler = pool.submit(sample)
            try:
                killed = time.monotonic()
                os.kill(old, fault)
                fleet.wait_for(lambda st: all(s.fallbacks >= 1 for s in st), 60,
                               "every worker notices the agent is gone")
                again = fleet.wait_for(lambda st: _all_shared(st) and st[0].agent_pid != old,
                                       60, "every worker follows a new agent")
                recovered = time.monotonic() - killed
                settled = _settled_connections(topology)
                if fault == signal.SIGSTOP:  # ended by its stores, not by this test
                    assert _ended(old), f"the stuck agent {old} still runs"
            finally:
                done.set()
                if fault == signal.SIGSTOP:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(old, signal.SIGCONT)
            rounds = sampler.result(30)  # a sampler that died fails the test here
        fleet.wait_for(lambda st: all(s.reads > r.reads + 5 and s.every_budget_checked
                                      for s, r in zip(st, again, strict=True)), 60,
                       "every worker reads on, every budget checked")
        reports = fleet.stop()
    print(f"{HERD_PROCESSES} processes lost their agent ({fault.name}): peak own-monitor "
          f"connections per server {dict(peak)} over {rounds} samples; all followed the new agent "
          f"{recovered:.1f} s after the kill; load "
          f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    assert rounds > 0
    assert max(peak.values()) <= HERD_OWN_MONITORS, peak
    assert all(c == Counter({"propstore-agent": 1}) for c in settled.values()), settled
    for report in reports:
        report.check(errors_allowed=False)


@pytest.mark.slow
def test_chaos_of_many_processes_serves_no_read_outside_its_budget(
    topology: Topology, cluster: LocalCluster, cluster_config: Path, agents: Path,
) -> None:
    """Paused replay, an apply delay, a stopped agent (its stores end it), a killed agent:
    every read of every process stays within its budget, and the processes end up sharing
    one agent again."""
    count = int(os.environ.get("PROPSTORE_CHAOS_PROCESSES", CHAOS_PROCESSES))
    paused = cluster.shards[0].replicas[0]
    delayed = cluster.shards[-1].replicas[-1]
    with Fleet(cluster_config, count, users=lambda i: _users(topology, i, 4)) as fleet:
        first = fleet.wait_for(_all_shared, 60, "every worker follows one agent")
        agent = first[0].agent_pid
        assert agent is not None
        fleet.wait_for(lambda st: all(s.every_budget_checked and s.replica_reads > 5
                                      for s in st), 60, "every budget checked everywhere")
        paused.pause_replay()
        delayed.set_apply_delay(1.0)
        os.kill(agent, signal.SIGSTOP)  # stuck: silent, but holding its lock
        try:
            fleet.wait_for(lambda st: all(s.fallbacks >= 1 for s in st), 60,
                           "every worker takes the stopped agent for stuck")
            resumed = fleet.wait_for(
                lambda st: _all_shared(st) and st[0].agent_pid not in (None, agent), 60,
                "every worker follows the stuck agent's replacement")
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(agent, signal.SIGCONT)
        agent = resumed[0].agent_pid
        assert agent is not None
        os.kill(agent, signal.SIGKILL)
        fleet.wait_for(lambda st: all(s.fallbacks >= 2 for s in st), 60,
                       "every worker notices the agent is gone")
        again = fleet.wait_for(lambda st: _all_shared(st) and st[0].agent_pid != agent, 60,
                               "every worker follows a new agent")
        paused.resume_replay()
        delayed.clear_apply_delay()
        fleet.wait_for(lambda st: all(s.reads > r.reads + 10
                                      for s, r in zip(st, again, strict=True)), 60,
                       "every worker reads on")
        reports = fleet.stop()
    reads, replica = sum(r.reads for r in reports), sum(r.replica_reads for r in reports)
    print(f"chaos, {count} processes: {reads} reads ({replica} from replicas), "
          f"{sum(r.writes for r in reports)} writes, "
          f"{sum(r.violations for r in reports)} outside their budget, "
          f"{sum(r.error_count for r in reports)} errors, "
          f"worst read {max(r.worst_read for r in reports) * 1000:.0f} ms, "
          f"load {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    for report in reports:
        report.check()


def test_agent_messages_round_trip_every_fact_with_its_server_run() -> None:
    run = ServerRun(7, "127.0.0.1", 5432, "2026-12-02 00:00:00.123456+00")
    messages: list[Message] = [
        Hello(42, 1.5, VERSION), Beat(2.0),
        Polled(1, 2, Observation(3.0, True, LSN(100), LSN(200), True, False, 7,
                                 (100, 64, 0, 10, 8), 2, run, True)),
        Polled(0, 0, Observation(3.5, False, None, None, False, False)),
        Failed(0, 1, 4.0, "poll timed out"),
        HistoryRead(1, TimelineHistory(3, ((1, LSN(5)), (2, LSN(9))))),
    ]
    for message in messages:
        assert decode(encode(message)) == message
    with pytest.raises(ValueError, match="malformed"):
        decode(b'{"k": "obs"}')
    counts = Counts((("a", "workflow", "fallback_ceiling", 3),))
    for request in (Join(), Ask(), counts):
        assert decode_request(encode_request(request)) == request
    too_many = Counts(tuple(("a", f"p{i}", "r" * 100, i + 1) for i in range(600)))
    bounded = decode_request(encode_request(too_many))
    assert isinstance(bounded, Counts) and len(bounded.refusals) == 512
    assert {len(r) for _s, _p, r, _n in bounded.refusals} == {64}
    with pytest.raises(ValueError, match="malformed"):
        decode_request(b'{"k": "counts", "r": [["a", "p"]]}')


# ---------------------------------------------------------------- operating the agent


def _cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``propstore ARGS`` in a process of its own (the environment's agent folder)."""
    return subprocess.run([sys.executable, "-m", "propstore.cli", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def _status_when(topology: Topology, condition: Callable[[AgentStatus], bool],
                 timeout: float = 60.0) -> AgentStatus:
    """The agent's status once ``condition`` holds (AssertionError at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        status = agent_status(topology)
        if status is not None and condition(status):
            return status
        assert time.monotonic() < deadline, f"agent status within {timeout} s: {status}"
        time.sleep(0.1)


@pytest.mark.slow
def test_agent_status_names_the_agent_its_stores_and_every_nodes_polls(
    topology: Topology, cluster_config: Path, agents: Path,
) -> None:
    missing = _cli("agent", "status", "--config", str(cluster_config))
    assert missing.returncode == 1, missing
    assert "no agent runs for this topology" in missing.stdout
    with Fleet(cluster_config, 2) as fleet:
        statuses = fleet.wait_for(_all_shared, 30, "every worker follows one agent")
        status = _status_when(topology, lambda st: min(n.polls for n in st.nodes) >= 5)
        shown = _cli("agent", "status", "--json", "--config", str(cluster_config))
        text = _cli("agent", "status", "--config", str(cluster_config))
        fleet.stop()
    assert status.pid == statuses[0].agent_pid
    assert {s.pid for s in statuses} <= set(status.stores), (statuses, status.stores)
    assert status.healthy, status.problems
    assert status.rss_bytes > 0 and status.uptime_seconds > 0
    names = [node.name for shard in topology.shards for node in shard.nodes]
    assert [n.node for n in status.nodes] == names
    for node in status.nodes:
        assert node.polls > 0 and node.polls_per_second > 0, node
        assert node.state == "up" and node.last_poll_age_seconds is not None
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    assert document["running"] is True and document["pid"] == status.pid
    assert document["healthy"] is True and len(document["nodes"]) == len(names)
    assert text.returncode == 0, text.stderr
    assert f"agent pid {status.pid} (started by a store)" in text.stdout
    assert "healthy: every node polled within" in text.stdout


@pytest.mark.slow
def test_agent_run_in_the_foreground_is_the_agent_stores_find_and_serves_metrics(
    topology: Topology, cluster_config: Path, agents: Path,
) -> None:
    agent = subprocess.Popen(
        [sys.executable, "-m", "propstore.cli", "agent", "run", "--metrics-port", "0",
         "--config", str(cluster_config)], stderr=subprocess.PIPE, text=True)
    try:
        assert agent.stderr is not None
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = agent.stderr.readline()
            assert line, f"agent run ended: {agent.wait()}"
            if line.startswith("metrics at "):
                url = line.split()[-1]
        assert url is not None
        twice = _cli("agent", "run", "--config", str(cluster_config))
        assert twice.returncode == 2 and "already runs" in twice.stderr, twice
        with Fleet(cluster_config, 2) as fleet:
            statuses = fleet.wait_for(_all_shared, 30, "every worker follows one agent")
            assert statuses[0].agent_pid == agent.pid  # found, not replaced
            _status_when(topology, lambda st: len(st.stores) == 2)
            families = {f.name: f for f in text_string_to_metric_families(
                urllib.request.urlopen(url, timeout=10).read().decode())}
            fleet.stop()
        status = agent_status(topology)
        assert status is not None and status.foreground and status.pid == agent.pid
    finally:
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(30)
    assert code == 0
    assert set(AGENT_METRIC_NAMES) <= set(families), set(AGENT_METRIC_NAMES) - set(families)
    (stores,) = families["propstore_agent_stores"].samples
    assert stores.value == 2
    polls = {s.labels["node"]: s.value for s in families["propstore_agent_polls"].samples
             if s.name.endswith("_total")}
    assert set(polls) == {n.name for s in topology.shards for n in s.nodes}
    assert all(v > 0 for v in polls.values()), polls
    assert families["propstore_node_up"].samples  # the agent's own view of the nodes
    assert not list(agents.glob("*.sock")), "the socket outlived agent run"


@pytest.mark.slow
def test_one_workers_refusals_appear_in_another_processs_lag_and_agent_status(
    topology: Topology, cluster_config: Path, agents: Path,
) -> None:
    shard = topology.shards[0].name
    (user,) = users_on_shard(topology, shard, 1, prefix="hostrefuse")
    with Fleet(cluster_config, 2, routing={"primary_fallback_rate": 1e-6}) as fleet:
        statuses = fleet.wait_for(_all_shared, 30, "every worker follows one agent")
        refused = fleet.refuse(0, user, 6)
        assert refused >= 5, refused  # the ceiling admits one read, then none
        deadline = time.monotonic() + 30
        while True:
            lag = _cli("lag", "--json", "--config", str(cluster_config))
            assert lag.returncode == 0, lag.stderr
            document = json.loads(lag.stdout)
            if document["refusals"].get(shard) or time.monotonic() > deadline:
                break
        text = _cli("lag", "--config", str(cluster_config))
        status = agent_status(topology)
        fleet.stop()
    assert document["refusals_scope"] == "host"
    assert document["source"]["monitor"] == "agent"
    assert document["source"]["agent_pid"] == statuses[0].agent_pid
    assert document["source"]["stores"] >= 3  # both workers and the lag command's own
    assert document["refusals"][shard] == {"max_staleness": {"fallback_ceiling": refused}}
    assert status is not None and status.refusal_reporters == 1
    assert status.refusals[shard] == {"max_staleness": {"fallback_ceiling": refused}}
    assert f"figures from the host agent (pid {statuses[0].agent_pid}, shared by" in text.stdout
    assert "reads refused on this host since agent pid" in text.stdout
    assert f"{shard}: max_staleness: fallback_ceiling {refused}" in text.stdout


def test_lag_of_an_unshared_store_shows_its_own_monitor_and_refusals(
    topology: Topology, tmp_path: Path,
) -> None:
    path = tmp_path / "off.toml"
    path.write_text(Path(topology.source).read_text() + '\n[monitor]\nsharing = "off"\n')
    lag = _cli("lag", "--json", "--config", str(path))
    assert lag.returncode == 0, lag.stderr
    document = json.loads(lag.stdout)
    assert document["source"] == {"monitor": "own", "agent_pid": None, "stores": None,
                                  "reason": 'sharing = "off"'}
    assert document["refusals_scope"] == "process"


@pytest.mark.slow
def test_agent_memory_stays_flat_however_many_stores_come_and_go_and_polls_it_makes(
    topology: Topology, cluster_config: Path, agents: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Measured in the real agent (spawned by a worker's store as always, tracing its own
    memory: the bytes its objects hold after a collection, from its status): two thousand
    stores joining, reporting refusal counters and leaving, and a thousand polls per node,
    leave it holding what it held."""
    monkeypatch.setenv(TRACE_MEMORY_ENV, "1")  # inherited by the workers and their agent
    fast = tmp_path / "fast.toml"
    fast.write_text(cluster_config.read_text() + '\n[monitor]\ninterval = "20ms"\n')
    fast_topology = Topology.load(fast)
    path = AgentPaths.of(fast_topology).socket
    shards = [s.name for s in topology.shards]

    def churn(stores: int) -> None:
        for i in range(stores):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(path))
                sock.sendall(encode_request(Join()) + encode_request(Counts(tuple(
                    (shard, f"profile{i % 7}", "fallback_ceiling", i + 1) for shard in shards))))
                sock.recv(1 << 16)  # the hello and the replay, at least in part

    def held(polls_at_least: int) -> AgentStatus:
        return _status_when(fast_topology,
                            lambda st: min(n.polls for n in st.nodes) >= polls_at_least, 120)

    with Fleet(fast, 1) as fleet:
        fleet.wait_for(_all_shared, 30, "the worker follows an agent")
        churn(200)  # warm-up: every bounded buffer, cache and free list at its working size
        rounds = [held(1000)]
        for _ in range(2):
            churn(1000)
            rounds.append(held(min(n.polls for n in rounds[-1].nodes) + 500))
        fleet.stop()
    traced = [r.traced_bytes for r in rounds]
    print(f"agent memory after 200, 1,200 and 2,200 stores and "
          f"{[min(n.polls for n in r.nodes) for r in rounds]} polls per node: traced {traced} B, "
          f"RSS {[round(r.rss_bytes / 1e6, 2) for r in rounds]} MB")
    assert rounds[-1].stores_total >= 2201
    assert None not in traced
    growth = max(b - a for a, b in itertools.pairwise(traced))  # type: ignore[operator]
    assert growth <= FLAT_AGENT_BYTES, traced


def test_every_agent_metric_name_is_documented() -> None:
    text = (Path(__file__).parent.parent / "docs" / "operating.md").read_text()
    for name in AGENT_METRIC_NAMES:
        assert f"`{name}" in text, name


def test_a_primarys_repeated_poll_gives_the_state_a_full_observation_gives() -> None:
    """``MonitorState.observe_again`` (the cheap path for the host agent's repeated
    primary polls) ends in the very state ``observe`` of the same poll would."""
    topology = Topology.from_toml(TOPOLOGY.replace(
        'user=postgres"', 'user=postgres"\nreplicas = ["host=127.0.0.1 port=6002 '
        'dbname=propstore user=postgres"]'), environ={})
    run = ServerRun(7, "127.0.0.1", 6001, "2026-12-02 00:00:00.1+00")
    replica_run = ServerRun(7, "127.0.0.1", 6002, "2026-12-02 00:00:00.2+00")
    primary = Observation(10.0, False, LSN(500), None, False, False, 7, (100, 64, 0, 10, 8),
                          1, run, False)
    replica = Observation(10.01, True, LSN(400), LSN(450), False, True, 7,
                          (100, 64, 0, 10, 8), 1, replica_run, False)
    full, cheap = MonitorState(topology), MonitorState(topology)
    for state in (full, cheap):
        state.observe(0, 0, primary)
        state.observe(0, 1, replica)
    for at in (10.1, 10.2, 10.35):
        full.observe(0, 0, dataclasses.replace(primary, sent_at=at))
        assert cheap.observe_again(0, 0, at)
        assert cheap.views == full.views and cheap.polls == full.polls
    for at in (10.4, 10.9):  # a replica's repeat, while its shard has its up primary
        full.observe(0, 1, dataclasses.replace(replica, sent_at=at))
        assert cheap.observe_again(0, 1, at)
        assert cheap.views == full.views and cheap.polls == full.polls
    full.fail(0, 0, "poll timed out", 11.0)
    cheap.fail(0, 0, "poll timed out", 11.0)
    assert not cheap.observe_again(0, 0, 11.1)  # after a failure: the full path
    for state in (full, cheap):
        for n in range(3):  # the primary down: a replica's poll may choose another
            state.fail(0, 0, "poll timed out", 11.2 + n)
    assert cheap.view(0).primary is None
    assert not cheap.observe_again(0, 1, 11.5)
    assert cheap.views == full.views
    line = encode(Polled(0, 0, primary))
    assert line.startswith(b'{"k":"obs","s":0,"n":0,"at":10.0,"rec":false,')  # what _repeat reads


def test_agent_forwards_a_replicas_poll_that_repeats_the_last_only_after_refresh() -> None:
    run = ServerRun(7, "127.0.0.1", 6002, "x")
    replica = Observation(1.0, True, LSN(400), LSN(450), False, True, 7, None, 1, run)
    later = dataclasses.replace(replica, sent_at=1.1)
    assert repeats(later, replica)
    for changed in (dict(lsn=LSN(401)), dict(replay_paused=True), dict(run=None),
                    dict(receiver_streaming=False), dict(in_recovery=False)):
        assert not repeats(dataclasses.replace(later, **changed), replica), changed  # type: ignore[arg-type]


def test_a_store_at_a_slower_pace_gets_every_fact_or_a_later_repeat_in_fewer_sends(
    tmp_path: Path,
) -> None:
    """Over the agent's real socket: a store that asked for the slowest pace is sent
    nothing but the agent's own lines (a subset of true facts); each failure and history,
    and each poll or a later one that says the same but its LSNs (for an unchanged
    replica: one that says the same), the newest sample of the primary among them; a
    timeline history before the polls after it; each node's polls in order; in a fifth of
    the fast store's sends or fewer. Its primary samples are the primary's own, and end at
    the fast store's newest."""
    interval = 0.1
    slow = paces(interval)[-1]
    assert pace_for(math.inf, interval) == slow and pace_for(0.0, interval) == paces(interval)[0]
    assert pace_for(1.0, interval) == 0.2
    run = ServerRun(7, "127.0.0.1", 6001, "x")
    replica_run = ServerRun(7, "127.0.0.1", 6002, "y")
    published: list[Message] = []

    async def scenario() -> tuple[list[list[bytes]], list[int]]:
        hub = Hub(2, RefusalTally(["a"]), interval=interval)
        path = str(tmp_path / "agent.sock")
        server = await asyncio.start_unix_server(hub.serve, path=path)
        clients = [await asyncio.open_unix_connection(path) for _ in range(2)]
        for i, (_, writer) in enumerate(clients):
            writer.write(encode_request(Join()) + (encode_request(Pace(slow)) if i else b""))
        got: list[list[bytes]] = [[], []]
        sends = [0, 0]

        async def receive(i: int) -> None:
            reader = clients[i][0]
            rest = b""
            while data := await reader.read(1 << 16):
                sends[i] += 1
                *lines, rest = (rest + data).split(b"\n")
                got[i].extend(lines)

        receivers = [asyncio.create_task(receive(i)) for i in range(2)]
        await asyncio.sleep(0.3)  # joined, paced
        sends[:] = [0, 0]
        t0, lsn = time.monotonic(), 100
        for step in range(40):
            at = time.monotonic()
            if step in (10, 25):
                lsn += 50  # writes: a new sample, never folded into the last
            if step == 20:
                message: Message = HistoryRead(0, TimelineHistory(2, ((1, LSN(120)),)))
                published.append(message)
                hub.publish(message)
            primary = Polled(0, 0, Observation(at, False, LSN(lsn), None, False, False, 7,
                                               None, 1, run))
            replica = Polled(0, 1, Observation(at, True, LSN(lsn - (step % 7 == 0) * 10),
                                               LSN(lsn), False, True, 7, None, 1, replica_run))
            for message in (primary, replica):
                published.append(message)
                hub.publish(message)
            if step == 30:
                failed = Failed(0, 1, time.monotonic(), "poll timed out")
                published.append(failed)
                hub.publish(failed)
            await asyncio.sleep(interval)
        elapsed = time.monotonic() - t0
        await asyncio.sleep(slow * 1.5)  # the last sends
        for _, writer in clients:
            writer.close()
        await asyncio.gather(*receivers, return_exceptions=True)
        server.close()
        assert elapsed < 8, elapsed
        return got, sends

    (fast, slow_lines), sends = asyncio.run(scenario())
    own = {encode(m).rstrip(b"\n") for m in published}

    by_line = {encode(m).rstrip(b"\n"): m for m in published}

    def facts(lines: list[bytes]) -> list[Message]:
        """The published messages themselves, in the order received (a line sent twice,
        to a store that changed pace, counts once)."""
        seen = [by_line[line] for line in lines if line in by_line]
        return [m for i, m in enumerate(seen) if m not in seen[:i]]

    for lines in (fast, slow_lines):
        others = [m for m in map(decode, filter(None, lines)) if not isinstance(m, Hello | Beat)]
        assert {encode(m).rstrip(b"\n") for m in others} <= own  # nothing but true facts
    fast_facts, slow_facts = facts(fast), facts(slow_lines)
    for received in (fast_facts, slow_facts):
        for message in published:  # each one, or a later poll that repeats it
            if not isinstance(message, Polled):
                assert message in received, message
                continue
            at = message.observation.sent_at
            assert any(isinstance(r, Polled) and r.node == message.node and (
                (repeats_all(r, message, lsns=True) and (
                    message.observation.in_recovery or r.observation.sent_at >= at))
                or (repeats_all(r, message, lsns=False) and r.observation.sent_at > at))
                for r in received), message
        primaries = [m for m in published if isinstance(m, Polled) and m.node == 0]
        assert primaries[-1] in received  # the newest sample goes
        for node in (0, 1):  # each node's polls in their order
            times = [m.observation.sent_at for m in received
                     if isinstance(m, Polled) and m.node == node]
            assert times == sorted(times)
        history = next(m for m in published if isinstance(m, HistoryRead))
        after = {id(m) for m in published[published.index(history):]}
        place = received.index(history)
        assert all(i > place for i, m in enumerate(received) if id(m) in after and m is not history)
    assert len(slow_facts) < len(fast_facts) / 2, (len(slow_facts), len(fast_facts))
    print(f"sends: fast {sends[0]}, slow {sends[1]}; facts: fast {len(fast_facts)}, "
          f"slow {len(slow_facts)} of {len(published)}")
    assert sends[1] * 5 <= sends[0], sends
    states = []
    topology = Topology.from_toml(TOPOLOGY.replace(
        'user=postgres"', 'user=postgres"\nreplicas = ["host=127.0.0.1 port=6002 '
        'dbname=propstore user=postgres"]'), environ={})
    for received in (fast_facts, slow_facts):
        state = MonitorState(topology)
        for m in received:
            if isinstance(m, Polled):
                state.observe(m.shard, m.node, m.observation)
            elif isinstance(m, Failed):
                state.fail(m.shard, m.node, m.error, m.at)
            elif isinstance(m, HistoryRead):
                state.record_history(m.shard, m.history)
        states.append(state.view(0))
    samples = [{*zip(v.history.times, v.history.lsns, strict=True)} for v in states]
    polled = {(m.observation.sent_at, m.observation.lsn) for m in published
              if isinstance(m, Polled) and m.node == 0}
    assert samples[1] <= polled and samples[0] <= polled  # only the primary's own samples
    assert states[0].history.times[-1] == states[1].history.times[-1]  # the newest of all
    assert states[0].nodes[1].lsn == states[1].nodes[1].lsn


def repeats_all(new: Polled, old: Polled, *, lsns: bool) -> bool:
    """Whether poll ``new`` says what ``old`` said but its time (and its LSNs, unless
    ``lsns``)."""
    def but(m: Polled) -> Observation:
        o = m.observation
        return dataclasses.replace(o, sent_at=0, lsn=o.lsn if lsns else None,
                                   receive_lsn=o.receive_lsn if lsns else None)
    return but(new) == but(old)
