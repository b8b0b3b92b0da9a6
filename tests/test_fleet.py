"""Fleets of worker processes: a store holds at most its connection budget, counted on the
servers, and the recommended fleet setup (a transaction pooler in front of each server)
keeps the servers' connections flat however many processes read through it.

Each store under test runs in a process of its own (spawned), so that what the servers
count (``pg_stat_activity``, matched to that process's TCP sockets) is exactly that
process's connections and nothing the test process holds.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from propstore import ConfigError, PropertyStore, PropStoreError, Topology
from propstore.sandbox import LocalCluster
from propstore.sandbox._poolers import front_available, wait_front_serves

TOPOLOGY = """
[[shards]]
name = "a"
buckets = ["0-2047"]
primary = "host=127.0.0.1 port=6001 dbname=propstore user=postgres"
replicas = ["host=127.0.0.1 port=6002 dbname=propstore user=postgres"]

[[shards]]
name = "b"
buckets = ["2048-4095"]
primary = "host=127.0.0.1 port=6003 dbname=propstore user=postgres"
"""

READ_SECONDS = 2.0
#: Server samples a run needs at least (each reads every server's pg_stat_activity).
SAMPLES = 20
USERS = [f"fleet-user-{i}" for i in range(64)]


# ------------------------------------------------------------------ the plan (no servers)


def _load(routing: str = "") -> Topology:
    return Topology.from_toml(f"[routing]\n{routing}\n" + TOPOLOGY, environ={})


def test_budget_defaults_to_64_and_splits_into_monitor_and_pools() -> None:
    default = _load().connections
    assert (default.total, default.stated, default.monitor) == (64, False, 3)
    assert default.pool_max_size == 8  # (64 - 3) // 3 = 20, capped by pool_max_size
    stated = _load("connection_budget = 12").connections
    assert (stated.total, stated.stated, stated.pool_max_size) == (12, True, 3)
    assert stated.ceiling <= stated.total
    assert str(stated) == "12 connections (stated): 3 monitor + 3 pools of 1..3"


def test_default_budget_holds_a_topology_of_more_than_32_nodes() -> None:
    shards = "\n".join(
        f'[[shards]]\nname = "s{i}"\nbuckets = ["{i}"]\n'
        f'primary = "host=127.0.0.1 port={7000 + i} dbname=propstore"\n'
        for i in range(40))
    big = Topology.from_toml(f"bucket_count = 40\n{shards}", environ={}).connections
    assert (big.total, big.pool_max_size, big.ceiling) == (80, 1, 80)


@pytest.mark.parametrize(("routing", "need"), [
    ("connection_budget = 5", "at least 6 connections"),
    ("connection_budget = 8\npool_min_size = 2", "at least 9 connections"),
])
def test_budget_below_the_topologys_minimum_is_a_clear_config_error(routing: str, need: str
                                                                    ) -> None:
    with pytest.raises(ConfigError, match=rf"routing\.connection_budget = \d+ cannot hold "
                                          rf"this topology: its 3 nodes need {need}"):
        _load(routing)


def test_bad_budget_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="connection_budget must be a non-negative integer"):
        _load('connection_budget = "many"')


# ------------------------------------------------------------------ counted on the servers


def _socket_ports(pid: int) -> set[int]:
    """Local TCP ports of the sockets process ``pid`` holds (its fds x /proc/net/tcp)."""
    inodes: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            parts = line.split()
            if parts[9] in inodes:
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


@dataclass
class ServerCount:
    """Peaks of the client connections the servers report while a fleet reads: in total
    per server, and per client process (matched by its sockets' ports) over all servers."""

    peak_by_server: dict[str, int] = field(default_factory=dict)
    peak_by_process: dict[int, int] = field(default_factory=dict)
    samples: int = 0

    def sample(self, conns: dict[str, psycopg.Connection[Any]], pids: list[int]) -> None:
        ports = {pid: _socket_ports(pid) for pid in pids}
        by_process = dict.fromkeys(pids, 0)
        for name, conn in conns.items():
            seen = [port for (port,) in conn.execute(
                "SELECT client_port FROM pg_stat_activity"
                " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()")]
            self.peak_by_server[name] = max(self.peak_by_server.get(name, 0), len(seen))
            for pid in pids:
                by_process[pid] += sum(1 for port in seen if port in ports[pid])
        for pid, count in by_process.items():
            self.peak_by_process[pid] = max(self.peak_by_process.get(pid, 0), count)
        self.samples += 1


@contextmanager
def _counting(servers: dict[str, str], pids: list[int]) -> Iterator[ServerCount]:
    """Sample the servers every 20 ms until the block ends."""
    counted = ServerCount()
    stop = threading.Event()
    conns = {name: psycopg.connect(dsn, autocommit=True) for name, dsn in servers.items()}

    def loop() -> None:
        while not stop.is_set():
            try:
                counted.sample(conns, pids)
            except FileNotFoundError:  # a process exited
                return
            stop.wait(0.02)

    sampler = threading.Thread(target=loop, name="fleet-count")
    sampler.start()
    try:
        yield counted
    finally:
        stop.set()
        sampler.join()
        for conn in conns.values():
            conn.close()


def _without_own_sharing(data: dict[str, Any]) -> dict[str, Any]:
    """The topology with each process polling itself, so that its monitor connections are
    its own and counted with it (``sharing = "off"``)."""
    data.setdefault("monitor", {})["sharing"] = "off"
    return data


def _reader(data: dict[str, Any], threads: int, kind: str, ready: Any, go: Any,
            stop: Any, out: Any) -> None:
    """Child process: open a store, signal ready, read from ``threads`` readers until
    ``stop``, report reads per node and errors."""
    topology = Topology.from_dict(data)
    served: dict[str, int] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def count(node: str) -> None:
        with lock:
            served[node] = served.get(node, 0) + 1

    if kind == "async":
        from propstore import AsyncPropertyStore

        async def main() -> None:
            async with AsyncPropertyStore(topology) as store:
                ready.set()
                go.wait()

                async def one(i: int) -> None:
                    while not stop.is_set():
                        user = USERS[i % len(USERS)]
                        try:
                            result = await store.read("acme", user, max_staleness=1)
                            count(result.node)
                        except PropStoreError:  # shed or refused: counted, not a bug
                            count("refused")
                        except Exception as exc:  # anything else fails the test
                            errors.append(repr(exc))
                        i += threads

                await asyncio.gather(*(one(i) for i in range(threads)))

        asyncio.run(main())
    else:
        with PropertyStore(topology) as store:
            ready.set()
            go.wait()

            def one(i: int) -> None:
                while not stop.is_set():
                    user = USERS[i % len(USERS)]
                    try:
                        count(store.read("acme", user, max_staleness=1).node)
                    except PropStoreError:  # shed or refused: counted, not a bug
                        count("refused")
                    except Exception as exc:  # anything else fails the test
                        errors.append(repr(exc))
                    i += threads

            workers = [threading.Thread(target=one, args=(i,)) for i in range(threads)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
    out.put((served, errors[:5], len(errors)))


@dataclass
class Fleet:
    """Client processes reading while the servers' connections from them are counted."""

    data: dict[str, Any]
    servers: dict[str, str]
    processes: int = 1
    threads: int = 16
    kind: str = "sync"
    #: Also count each process's own connections (by its sockets; slower sampling).
    per_process: bool = True
    #: Other processes (poolers) whose connections to the servers are counted by their sockets.
    poolers: list[int] = field(default_factory=list)
    served: list[dict[str, int]] = field(default_factory=list)

    def run(self) -> ServerCount:
        """Start the processes, let them read at once, count; every read must succeed."""
        ctx = multiprocessing.get_context("spawn")
        go, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
        children = []
        for _ in range(self.processes):
            ready = ctx.Event()
            child = ctx.Process(target=_reader, args=(self.data, self.threads, self.kind,
                                                      ready, go, stop, out))
            child.start()
            children.append((child, ready))
        try:
            for _child, ready in children:
                assert ready.wait(60), "a reader process did not open its store"
            pids = [child.pid for child, _ in children
                    if child.pid is not None and self.per_process] + self.poolers
            with _counting(self.servers, pids) as counted:
                go.set()
                # Read for READ_SECONDS and until the servers were sampled often enough
                # (sampling is slow on a loaded machine), at most a minute.
                began = time.monotonic()
                while (time.monotonic() - began < READ_SECONDS or counted.samples < SAMPLES
                       ) and time.monotonic() - began < 60:
                    time.sleep(0.05)
                stop.set()
                for _ in children:
                    served, sample, failed = out.get(timeout=60)
                    assert failed == 0, f"{failed} reads failed, e.g. {sample}"
                    self.served.append(served)
            return counted
        finally:
            stop.set()
            for child, _ in children:
                child.join(10)
                if child.is_alive():
                    child.kill()
                    child.join()


def _servers(cluster: LocalCluster) -> dict[str, str]:
    return {node.name: node.dsn for node in cluster.nodes}


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_store_holds_at_most_its_connection_budget_on_the_servers_under_concurrent_reads(
    kind: str, topology: Topology, migrated_cluster: LocalCluster,
) -> None:
    nodes = sum(len(s.nodes) for s in topology.shards)
    budget = 3 * nodes  # one monitor and two pooled per node: pools of 8 would go past it
    with PropertyStore(topology) as writer:
        for user in USERS:
            writer.set("acme", user, {"plan": "pro"})
    migrated_cluster.wait_caught_up()
    data = _without_own_sharing(_document(topology, {"connection_budget": budget}))
    fleet = Fleet(data, _servers(migrated_cluster), threads=24, kind=kind)
    counted = fleet.run()
    (peak,) = counted.peak_by_process.values()
    reads = sum(fleet.served[0].values())
    print(f"{kind}: budget {budget}, peak on the servers {peak} ({counted.samples} samples), "
          f"by server {counted.peak_by_server}, reads {reads}")
    assert reads > 0 and counted.samples >= SAMPLES
    assert peak <= budget
    # The readers wanted more than the minimum (pools grew): the budget was what held them.
    assert peak > 2 * nodes


def _document(topology: Topology, routing: dict[str, Any],
              replicas: dict[str, list[dict[str, str]]] | None = None) -> dict[str, Any]:
    """``topology`` as a document ``Topology.from_dict`` accepts, with routing settings and
    (optionally) replica entries replaced."""
    shards = []
    for shard in topology.shards:
        shards.append({
            "name": shard.name,
            "buckets": [str(r) for r in shard.buckets],
            "primary": {"name": shard.primary.name, "dsn": shard.primary.dsn},
            "replicas": (replicas or {}).get(shard.name) or [
                {"name": r.name, "dsn": r.dsn, "via": r.via} for r in shard.replicas],
        })
    return {"bucket_count": topology.bucket_count, "routing": routing, "shards": shards}


@pytest.mark.slow
def test_fleet_behind_a_transaction_pooler_holds_the_servers_connections_at_its_pool_size(
    topology: Topology, migrated_cluster: LocalCluster,
) -> None:
    reason = front_available("pgbouncer-transaction")
    if reason is not None:
        pytest.skip(reason)
    cluster = migrated_cluster
    shard = cluster.shards[0]
    with PropertyStore(topology) as writer:
        for user in USERS:
            writer.set("acme", user, {"plan": "pro"})
    cluster.wait_caught_up()
    fronts = [cluster.front("pgbouncer-transaction", 0, targets=[r]) for r in shard.replicas]
    try:
        for front in fronts:
            wait_front_serves(front)
        replicas = {shard.name: [
            {"name": f"{r.name}-pooled", "dsn": f.dsn, "via": "transaction_pooler"}
            for r, f in zip(shard.replicas, fronts, strict=True)]}
        nodes = sum(len(s.nodes) for s in topology.shards)
        data = _without_own_sharing(
            _document(topology, {"connection_budget": 3 * nodes}, replicas))
        processes = 6
        pooler_pids: list[int] = []
        for front in fronts:
            assert front.pid is not None, f"{front.name} has no pid"
            pooler_pids.append(front.pid)
        fleet = Fleet(data, {r.name: r.dsn for r in shard.replicas}, processes=processes,
                      threads=4, per_process=False, poolers=pooler_pids)
        counted = fleet.run()
        replica_reads = sum(n for s in fleet.served for k, n in s.items() if "pooled" in k)
        # Every process holds a monitor and a pooled connection (or more) to each pooled
        # replica, 2 x 6 = 12 client connections per PgBouncer at least ...
        print(f"{processes} processes through PgBouncer: replica reads {replica_reads}, "
              f"peak server connections {counted.peak_by_server}, of them PgBouncer's "
              f"{[counted.peak_by_process[pid] for pid in pooler_pids]} "
              f"({counted.samples} samples)")
        assert replica_reads > 0 and counted.samples >= SAMPLES
        # ... while each replica serves only PgBouncer's own pool (default_pool_size = 8).
        # Counted by PgBouncer's sockets: a server also sees connections that are not the
        # fleet's (an earlier store's host agent ends 5 s after its last store, for one).
        for pid in pooler_pids:
            assert 0 < counted.peak_by_process[pid] <= 8, counted.peak_by_process
    finally:
        for front in fronts:
            front.stop()
            cluster.fronts.remove(front)
