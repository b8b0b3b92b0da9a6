"""Failover as users run it: a 3-member Patroni cluster (etcd, pg_rewind, asynchronous
replication unless stated), the topology file naming the first leader as primary.

One cluster for the module, the tests in order: switchovers, failovers that lose the writes
the standbys never received (the diverged ex-leader rejoining), each followed with Patroni's
REST API as discovery source (``members`` with ``patroni`` endpoints in the file) and
without one (the file naming the first leader as primary; roles observed in-band), by a
store following its host's agent (the default: the agent polls and asks Patroni); a leader
whose Patroni hangs while its server keeps accepting writes; synchronous mode. Each asserts
on the data: which acknowledged writes the new leader holds.
"""

from __future__ import annotations

import fcntl
import http.server
import os
import random
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from propstore import (
    Degrade,
    PropertyStore,
    PropStoreError,
    StaleReadError,
    Token,
    Topology,
    WriteLostError,
)
from propstore.monitor._health import agent_status
from propstore.monitor._place import AgentPaths
from propstore.sandbox._patroni import PatroniCluster, PatroniMember, patroni_available
from tests._agent_worker import Fleet, Status, agent_dir
from tests._workload import Workload
from tests.claims import FLEET_QUERY_RATIO
from tests.test_agent import (
    _all_shared,
    _cli,
    _end_agents,
    _monitoring_connections,
    _poll_rates,
)
from tests.test_store import wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not patroni_available(), reason="apt-get install patroni etcd-server"),
]

#: The routing a Patroni user should set (docs/deployment.md): writes wait out a failover.
FAILOVER_WINDOW = 40.0


@pytest.fixture(scope="module")
def patroni() -> Iterator[PatroniCluster]:
    from propstore.migrate import upgrade

    with PatroniCluster(3, ttl=10, loop_wait=1, retry_timeout=4) as cluster:
        leader = cluster.leader()
        assert leader is not None
        upgrade(cluster.member(leader).dsn)
        yield cluster


SOURCES = [pytest.param(True, id="patroni-source"), pytest.param(False, id="no-source")]
#: The slow variants CI leaves out (~30 s each; the in-band path they repeat is also
#: tested by tests/test_timelines.py): PROPSTORE_TEST_PATRONI_ALL=1 runs them too, as for
#: the figures in docs/deployment.md.
EVERY_SOURCE = SOURCES if os.environ.get("PROPSTORE_TEST_PATRONI_ALL") else SOURCES[:1]


def _topology(cluster: PatroniCluster, source: bool = False) -> Topology:
    # Without a source: the file as it was written when the cluster started (the first
    # leader is "primary"). With one: the members and their REST endpoints, no roles.
    assert cluster.config_path is not None
    path = cluster.config_path
    if source:
        path = cluster.write_config(path.with_name("propstore-discovery.toml"), discovery=True)
    topology = Topology.load(path)
    assert bool(topology.shards[0].patroni_endpoints) == source
    return replace(topology, routing=replace(topology.routing,
                                             write_failover_time=FAILOVER_WINDOW))


def _leader_observed(store: PropertyStore, name: str) -> bool:
    primary = store.shard_views()[0].primary
    return primary is not None and primary.name == name


def _observed_leader(patroni: PatroniCluster, store: PropertyStore) -> PatroniMember:
    """The current leader, once the store holds it as the primary."""
    name = patroni.leader()
    assert name is not None
    wait_for(lambda: _leader_observed(store, name), timeout=30)
    return patroni.member(name)


def _followed_the_agent(store: PropertyStore) -> None:
    """The store's monitoring was its host agent's all along (sharing is the default, with
    a Patroni source too): the fault was followed on the agent's polls and answers."""
    monitor = store.monitor
    source, fallbacks = getattr(monitor, "source", None), getattr(monitor, "fallbacks", None)
    assert (source, fallbacks) == ("agent", 0), (source, fallbacks,
                                                 getattr(monitor, "own_reason", None))


def _new_leader(patroni: PatroniCluster, old: str) -> str:
    """Wait for Patroni to name a running leader other than ``old``."""
    return str(wait_for(lambda: (name := patroni.leader()) not in (None, old) and name,
                        timeout=60))


@dataclass
class _Writes:
    """One new user per write, so that whether a write survived is a fact of the data."""

    acked: list[tuple[str, float, Token]] = field(default_factory=list)
    #: When each acknowledged write was sent.
    started: dict[str, float] = field(default_factory=dict)
    errors: int = 0
    longest: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, store: PropertyStore, prefix: str, stop: threading.Event) -> None:
        for k in range(1_000_000):
            if stop.is_set():
                return
            user = f"{prefix}-{k}"
            started = time.monotonic()
            try:
                token = store.set("acme", user, {"k": k})
            except PropStoreError:
                with self.lock:
                    self.errors += 1
                continue
            now = time.monotonic()
            with self.lock:
                self.acked.append((user, now, token))
                self.started[user] = started
                self.longest = max(self.longest, now - started)


def _run_writers(store: PropertyStore, writes: _Writes, stop: threading.Event, tag: str
                 ) -> list[threading.Thread]:
    threads = [threading.Thread(target=writes.run, args=(store, f"{tag}{i}", stop),
                                daemon=True) for i in range(2)]
    for thread in threads:
        thread.start()
    return threads


def _surviving(store: PropertyStore, writes: _Writes) -> set[str]:
    users = [user for user, _, _ in writes.acked]
    found: dict[str, Any] = {}
    for i in range(0, len(users), 500):
        found.update(store.get_many("acme", users[i:i + 500], consistency="strong"))
    return {user for user, props in found.items() if props is not None}


@pytest.mark.parametrize("source", SOURCES)
def test_switchover_is_followed_writes_wait_and_no_read_breaks_its_budget(
    patroni: PatroniCluster, source: bool,
) -> None:
    patroni.wait_streaming(120)
    users = [f"sw-{i}" for i in range(20)]
    with PropertyStore(_topology(patroni, source)) as store:
        for user in users:
            store.replace("acme", user, {"seq": 0})
        stop = threading.Event()
        writes = _Writes()
        with Workload(store, users, budgets=(0.5, 1.0, 5.0)) as load:
            threads = _run_writers(store, writes, stop, f"swx{source:d}")
            load.wait(1.0)
            started = time.monotonic()
            new = patroni.switchover()
            wait_for(lambda: _leader_observed(store, new), timeout=60)
            followed = time.monotonic() - started
            load.wait(2.0)
            stop.set()
            for thread in threads:
                thread.join(30)
            report = load.stop()
        survived = _surviving(store, writes)
        _followed_the_agent(store)
    lost = [user for user, _, _ in writes.acked if user not in survived]
    print(f"patroni switchover ({'source' if source else 'no source'}): followed in "
          f"{followed:.1f}s; writes {len(writes.acked)} "
          f"acknowledged, {writes.errors} failed, longest {writes.longest:.2f}s, {len(lost)} "
          f"lost; workload {report.writes} writes, {report.reads} reads, "
          f"{report.violations} violations, errors {dict(report.errors)}")
    assert report.reads > 0 and report.writes > 0 and writes.acked
    assert report.violations == 0, report.examples
    assert writes.errors == 0 and not any(k.startswith("write") for k in report.errors)
    assert lost == []  # a switchover stops the old leader cleanly: every write is kept
    assert writes.longest < FAILOVER_WINDOW


@pytest.mark.parametrize("source", EVERY_SOURCE)
def test_failover_lost_writes_raise_and_the_diverged_ex_leader_never_serves(
    patroni: PatroniCluster, source: bool,
) -> None:
    patroni.wait_streaming(120)  # the previous leader has rejoined
    with PropertyStore(_topology(patroni, source)) as store:
        old = _observed_leader(patroni, store)
        old_name = old.name
        stop = threading.Event()
        writes = _Writes()
        reads: list[tuple[str, float, float, bool, str]] = []
        stale_served = [0]
        read_errors: dict[str, int] = {}

        def reader(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                with writes.lock:
                    count = len(writes.acked)
                    user = writes.acked[rng.randrange(count)][0] if count else ""
                if not count:
                    stop.wait(0.01)
                    continue
                budget = rng.choice((1.0, 5.0))
                # Half the reads would rather have stale data than an error (docs/degrade.md).
                policy = rng.choice(("refuse", "serve_stale"))
                started = time.monotonic()
                try:
                    result = store.read("acme", user, max_staleness=budget,
                                        degrade=Degrade.parse(policy))
                except PropStoreError as exc:
                    key = f"{policy}:{type(exc).__name__}"
                    read_errors[key] = read_errors.get(key, 0) + 1
                    continue
                # The bound the read claims: its budget, or (served stale) its proven bound.
                claimed = budget if result.within_budget else result.staleness_bound
                stale_served[0] += not result.within_budget
                reads.append((user, started, claimed, result.props is not None, result.node))

        threads = _run_writers(store, writes, stop, f"fo{source:d}-") + [
            threading.Thread(target=reader, args=(i,), daemon=True) for i in range(2)]
        for thread in threads[2:]:
            thread.start()
        time.sleep(1.0)  # let the load run before the fault
        assert patroni.hold_replication(old) >= 2  # the standbys receive nothing more
        time.sleep(1.0)
        crashed_at = time.monotonic()
        patroni.crash_member(old)
        new = _new_leader(patroni, old_name)
        wait_for(lambda: _leader_observed(store, new), timeout=60)
        followed_at = time.monotonic()
        outage = followed_at - crashed_at
        # The ex-leader restarts on its forked timeline, is rewound and rejoins.
        rejoin_started = time.monotonic()
        patroni.start_member(old)
        patroni.wait_streaming(120)
        rejoined = time.monotonic() - rejoin_started
        time.sleep(1.0)
        stop.set()
        for thread in threads:
            thread.join(60)
        survived = _surviving(store, writes)
        _followed_the_agent(store)
        lost = [(user, token) for user, _, token in writes.acked if user not in survived]
        detected = {"WriteLostError": 0, "StaleReadError": 0}
        for user, token in lost:
            try:
                result = store.read("acme", user, after=str(token))
            except (WriteLostError, StaleReadError) as exc:
                detected[type(exc).__name__] += 1
                continue
            raise AssertionError(f"lost write {user} read after its token: {result}")
        kept = [(user, token) for user, _, token in writes.acked if user in survived]
        for user, token in kept[-200:]:
            assert store.get("acme", user, after=token) is not None
        # Reads of lost writes must find nothing anywhere (served by the ex-leader before its
        # rewind they would return data that no history holds).
        for user, _ in lost[:100]:
            for _ in range(5):
                assert store.get("acme", user, max_staleness=60) is None
    acked_at = {user: at for user, at, _ in writes.acked}
    violations = [r for r in reads if not r[3] and r[0] in survived
                  and acked_at[r[0]] < r[1] - r[2]]
    # Before the crash the old leader held those writes: only later reads must not see them.
    phantom = [r for r in reads if r[3] and r[0] not in survived and r[1] > followed_at]
    print(f"patroni failover ({'source' if source else 'no source'}): write unavailability "
          f"{writes.longest:.1f}s (leader crash to "
          f"new leader observed {outage:.1f}s), ex-leader rejoined in {rejoined:.1f}s; "
          f"{len(writes.acked)} writes acknowledged, {writes.errors} failed, {len(lost)} lost; "
          f"lost-write tokens detected {sum(detected.values())}/{len(lost)} {detected}; "
          f"{len(reads)} reads, {len(violations)} violations, {len(phantom)} served lost "
          f"data, read errors {read_errors}, {stale_served[0]} served stale (within_budget "
          f"False, with their proven bound)")
    assert reads and writes.acked and lost, "the fault must lose writes to test anything"
    assert sum(detected.values()) == len(lost)
    assert violations == [] and phantom == []
    # During the gap a read that prefers stale data gets it, with its proven bound, not an
    # error (the replicas stay up); one that refuses gets StaleReadError.
    assert not any(key.startswith("serve_stale:") for key in read_errors), read_errors
    assert writes.errors == 0 and writes.longest < FAILOVER_WINDOW


@pytest.mark.parametrize("source", EVERY_SOURCE)
def test_a_leader_whose_patroni_hangs_is_dropped_when_another_takes_the_lock(
    patroni: PatroniCluster, source: bool,
) -> None:
    # The leader cut off from the other members (its Patroni frozen, its WAL senders
    # stopped) but not from clients: its server still answers as a primary and accepts
    # writes after the lock expired and another member was promoted (no watchdog). The
    # source says who holds the lock; the promoted member's newer timeline says it too.
    patroni.wait_streaming(120)
    with PropertyStore(_topology(patroni, source)) as store:
        old = _observed_leader(patroni, store)
        old_name = old.name
        stop = threading.Event()
        writes = _Writes()
        threads = _run_writers(store, writes, stop, f"zombie{source:d}-")
        wait_for(lambda: len(writes.acked) > 20, timeout=30)
        assert old.hold_replication() >= 2 and old.freeze_patroni()
        try:
            new = _new_leader(patroni, old_name)
            promoted_at = time.monotonic()
            wait_for(lambda: _leader_observed(store, new), timeout=30)
            followed_at = time.monotonic()
            still_primary = old.scalar("SELECT NOT pg_is_in_recovery()")
            wait_for(lambda: writes.acked and writes.acked[-1][1] > followed_at, timeout=30)
            time.sleep(0.5)
            stop.set()
            for thread in threads:
                thread.join(60)
        finally:
            # Fenced at last (killed), then restarted: Patroni rewinds it to the new leader.
            patroni.crash_member(old)
            patroni.start_member(old)
        patroni.wait_streaming(120)
        survived = _surviving(store, writes)
        _followed_the_agent(store)
        lost = [(user, at, token) for user, at, token in writes.acked if user not in survived]
        detected = 0
        for user, _, token in lost:
            with pytest.raises((WriteLostError, StaleReadError)):
                store.read("acme", user, after=str(token))
            detected += 1
    late = [user for user, _, _ in lost if writes.started[user] > followed_at]
    print(f"patroni hung leader agent ({'source' if source else 'no source'}): new leader "
          f"{new} followed {followed_at - promoted_at:.2f}s "
          f"after the promotion (old server still primary: {still_primary}); "
          f"{len(writes.acked)} writes acknowledged, {writes.errors} failed, {len(lost)} lost "
          f"(written to the old server before the switch was known), tokens detected "
          f"{detected}/{len(lost)}, {len(late)} lost after the new leader was observed")
    assert still_primary, "the fault must leave the old server accepting writes"
    assert writes.errors == 0 and late == []
    assert detected == len(lost)


# ---------------------------------------------------------------- shared monitoring
#
# Worker processes on one host and one Patroni topology (tests/_agent_worker.py): their
# monitoring connections are counted on the servers (pg_stat_activity), their Patroni
# requests on the endpoints (a counting front before each member's REST API).


class _CountingFront:
    """An HTTP front for one member's REST API that forwards every GET and counts it."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.gets: Counter[str] = Counter()
        self.lock = threading.Lock()
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with front.lock:
                    front.gets[self.path] += 1
                try:
                    with urllib.request.urlopen(front.target + self.path, timeout=5) as answer:
                        status, body = answer.status, answer.read()
                except urllib.error.HTTPError as exc:  # Patroni answers 503 on some paths
                    status, body = exc.code, exc.read()
                except OSError:
                    self.send_error(502)
                    return
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def count(self, path: str = "/cluster") -> int:
        with self.lock:
            return self.gets[path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fronted(patroni: PatroniCluster, tmp_path: Path
            ) -> Iterator[tuple[Path, list[_CountingFront]]]:
    """The discovery topology file with each member's endpoint behind a counting front,
    and a private agent folder for the test's workers."""
    fronts = [_CountingFront(m.rest_url) for m in patroni.members]
    path = patroni.write_config(tmp_path / "fronted.toml", discovery=True)
    text = path.read_text()
    for member, front in zip(patroni.members, fronts, strict=True):
        assert text.count(f'"{member.rest_url}"') == 1
        text = text.replace(f'"{member.rest_url}"', f'"{front.url}"')
    path.write_text(text)
    try:
        with agent_dir(tmp_path / "agents") as folder:
            yield path, fronts
        _end_agents(folder)
    finally:
        for front in fronts:
            front.close()


def _cluster_asks(fronts: list[_CountingFront], seconds: float) -> float:
    """``GET /cluster`` per second the members' endpoints received over ``seconds``."""
    before = sum(f.count() for f in fronts)
    started = time.monotonic()
    deadline = started + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return (sum(f.count() for f in fronts) - before) / (time.monotonic() - started)


def _all_up(statuses: list[Status]) -> bool:
    return _all_shared(statuses) and all(set(s.states) == {"up"} for s in statuses)


def test_processes_on_a_patroni_topology_share_one_monitor_and_its_patroni_asks(
    patroni: PatroniCluster, fronted: tuple[Path, list[_CountingFront]],
) -> None:
    """Three processes: one monitoring connection per server and one process's Patroni
    asks; an agent that cannot be replaced makes each ask Patroni itself (its own
    monitor); a switchover
    and a killed agent under shared monitoring serve no read outside its budget and lose
    no acknowledged write."""
    patroni.wait_streaming(120)
    config, fronts = fronted
    topology = Topology.load(config)
    interval = topology.discovery.interval
    # The previous tests' agents (other topology files, so other keys) end once idle.
    wait_for(lambda: not any(_monitoring_connections(topology).values()), timeout=30)
    count = 3
    users = [f"pshare-{i}" for i in range(6 * count)]
    with Fleet(config, count, users=lambda i: users[6 * i:6 * i + 6],
               routing={"write_failover_time": FAILOVER_WINDOW}) as fleet:
        first = fleet.wait_for(_all_up, 60, "every worker follows one agent, every node up")
        agent = first[0].agent_pid
        assert agent is not None
        connections = _monitoring_connections(topology)
        polls = _poll_rates(topology, 3.0)
        shared_asks = _cluster_asks(fronts, 5.0)
        status = agent_status(topology)
        assert status is not None and status.pid == agent and status.healthy, status
        (lead,) = status.leaders
        assert lead.leader == patroni.leader() and lead.answers >= 5 and lead.misses == 0
        shown = _cli("agent", "status", "--config", str(config)).stdout
        assert f"shard0: Patroni names {lead.leader}" in shown, shown
        lag = _cli("lag", "--config", str(config))
        assert f"figures from the host agent (pid {agent}" in lag.stdout, lag
        assert "Patroni's leader asked by the agent too" in lag.stdout, lag
        # An agent that cannot be replaced (its spawn lock held, as by a store whose agent
        # never answers): once the herd's wait for it is over, every store polls, and asks
        # Patroni, itself.
        spawn_lock = os.open(AgentPaths.of(topology).spawn_lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(spawn_lock, fcntl.LOCK_EX)
            os.kill(agent, signal.SIGKILL)
            fleet.wait_for(lambda st: all(s.source == "own" for s in st), 60,
                           "every worker polls for itself")
            # Reporting "own" comes before each own monitor's connections are all open.
            own_connections = wait_for(
                lambda: (found := _monitoring_connections(topology)) and all(
                    c["propstore-monitor"] == count for c in found.values()) and found,
                timeout=30)
            own_polls = _poll_rates(topology, 3.0)
            own_asks = _cluster_asks(fronts, 5.0)
        finally:
            os.close(spawn_lock)
        replaced = fleet.wait_for(
            lambda st: _all_up(st) and st[0].agent_pid not in (None, agent), 60,
            "every worker follows a new agent")
        agent = replaced[0].agent_pid
        assert agent is not None
        leader = patroni.leader()
        new = patroni.switchover()
        fleet.wait_for(_all_up, 60, "every worker follows the new leader, shared")
        after_switch = _cluster_asks(fronts, 3.0)
        os.kill(agent, signal.SIGKILL)
        again = fleet.wait_for(lambda st: _all_up(st) and st[0].agent_pid != agent, 60,
                               "every worker follows a new agent")
        fleet.wait_for(lambda st: all(s.replica_reads > r.replica_reads + 10
                                      for s, r in zip(st, again, strict=True)), 60,
                       "every worker reads again")
        reports = fleet.stop()
    print(f"patroni shared ({count} processes): monitoring connections "
          f"{ {n: dict(c) for n, c in connections.items()} }, monitoring queries/s "
          f"{ {n: round(r, 1) for n, r in polls.items()} } (each its own "
          f"{ {n: round(r, 1) for n, r in own_polls.items()} }), GET /cluster/s shared "
          f"{shared_asks:.2f}, each process its own {own_asks:.2f} "
          f"({ {n: dict(c) for n, c in own_connections.items()} }), after the switchover "
          f"{leader} -> {new} {after_switch:.2f}; "
          + "; ".join(r.summary() for r in reports))
    for node, seen in connections.items():
        assert seen == Counter({"propstore-agent": 1}), (node, connections)
    for node, rate in polls.items():  # one monitor's polls, counted on the server
        assert 0 < rate <= FLEET_QUERY_RATIO / topology.monitor.interval, (node, polls)
    for node, seen in own_connections.items():
        assert seen["propstore-monitor"] == count, (node, own_connections)
    # One asker (every discovery.interval), not one per process; each asks once it polls.
    assert 0 < shared_asks <= 1.5 / interval, shared_asks
    assert after_switch <= 1.5 / interval + 1 / topology.discovery.fast_interval, after_switch
    assert own_asks > 1.5 / interval, own_asks
    for report in reports:
        # Reads whose budget runs out in the switchover's gap are refused (StaleReadError,
        # docs/architecture.md, "a failover's gap"); every other one is within budget, and
        # no write failed or was sent to the demoted leader (its writes would fail).
        report.check(errors_allowed=True)
        assert set(report.errors) <= {"read:StaleReadError"}, (report.errors, report.examples)


def test_migrate_acts_on_the_observed_primary_not_the_files(patroni: PatroniCluster) -> None:
    from propstore.migrate import RollingMigration, plan, shard_status

    patroni.wait_streaming(120)
    stale = _topology(patroni)  # names the first leader as primary
    if patroni.leader() == stale.shards[0].primary.name:
        patroni.switchover()
        patroni.wait_streaming(120)
    leader = patroni.leader()
    assert leader is not None and leader != stale.shards[0].primary.name
    for topology in (stale, _topology(patroni, source=True)):
        (status,) = shard_status(topology)
        assert status.error is None and status.primary == leader
        assert status.current == status.head and status.current is not None
        assert len(status.replicas) == 2 and all(r.state != "down" for r in status.replicas)
        (planned,) = plan(topology)
        assert planned.error is None and planned.nothing_to_do
        report = RollingMigration(topology, wait_timeout=30).run()
        assert report.ok and report.results[0].outcome == "already at target", report


def _synchronous_leader(patroni: PatroniCluster) -> str:
    """Turn on Patroni's synchronous_mode and wait for the leader's synchronous standby;
    the leader's name."""
    patroni.wait_streaming(120)
    patroni.set_dynamic(synchronous_mode=True)
    leader = patroni.leader()
    assert leader is not None
    wait_for(lambda: patroni.member(leader).scalar(
        "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'") == 1, timeout=60)
    return leader


def test_synchronous_mode_loses_no_acknowledged_write(patroni: PatroniCluster) -> None:
    leader = _synchronous_leader(patroni)
    with PropertyStore(_topology(patroni, source=True)) as store:
        wait_for(lambda: _leader_observed(store, leader), timeout=30)
        stop = threading.Event()
        writes = _Writes()
        threads = _run_writers(store, writes, stop, "sync")
        time.sleep(1.5)
        patroni.hold_replication(patroni.member(leader))  # commits now wait in SyncRep
        time.sleep(0.5)
        patroni.crash_member(patroni.member(leader))
        new = _new_leader(patroni, leader)
        wait_for(lambda: _leader_observed(store, new), timeout=60)
        wait_for(lambda: len(writes.acked) > 0 and writes.acked[-1][1] > time.monotonic() - 1,
                 timeout=FAILOVER_WINDOW)
        stop.set()
        for thread in threads:
            thread.join(60)
        survived = _surviving(store, writes)
    lost = [user for user, _, _ in writes.acked if user not in survived]
    print(f"patroni synchronous_mode failover: {len(writes.acked)} acknowledged writes, "
          f"{len(lost)} lost, {writes.errors} failed, longest write {writes.longest:.1f}s")
    patroni.start_member(patroni.member(leader))
    assert writes.acked and lost == []


def test_a_synchronous_failover_under_shared_monitoring_serves_every_process_in_budget(
    patroni: PatroniCluster, fronted: tuple[Path, list[_CountingFront]],
) -> None:
    """Three processes following one agent through the leader's crash (synchronous_mode,
    so no acknowledged write may be lost): every read of every
    process is checked against its acknowledged writes, token reads included, and the
    processes never stop following the agent."""
    leader = _synchronous_leader(patroni)
    config, _ = fronted
    names = [n.name for n in Topology.load(config).shards[0].nodes]
    users = [f"pfail-{i}" for i in range(18)]
    with Fleet(config, 3, users=lambda i: users[6 * i:6 * i + 6],
               routing={"write_failover_time": FAILOVER_WINDOW}) as fleet:
        first = fleet.wait_for(_all_up, 60, "every worker follows one agent, every node up")
        agent = first[0].agent_pid
        before = fleet.wait_for(lambda st: all(s.every_budget_checked and s.replica_reads > 20
                                               for s in st), 60, "every budget checked")
        patroni.crash_member(patroni.member(leader))
        new = _new_leader(patroni, leader)
        fleet.wait_for(lambda st: all(s.states[names.index(new)] == "up"
                                      and s.replica_reads > b.replica_reads + 20
                                      for s, b in zip(st, before, strict=True)), 60,
                       "every worker writes to the new leader and reads replicas again")
        patroni.start_member(patroni.member(leader))
        patroni.wait_streaming(120)
        last = fleet.wait_for(_all_up, 60, "the old leader rejoins as a replica")
        reports = fleet.stop()
    print(f"patroni synchronous failover, shared ({leader} -> {new}): "
          + "; ".join(r.summary() for r in reports))
    assert all(s.agent_pid == agent and s.fallbacks == 0 for s in last), last
    for report in reports:
        report.check(errors_allowed=True)  # reads refused in the gap (StaleReadError) only
        assert set(report.errors) <= {"read:StaleReadError"}, (report.errors, report.examples)
