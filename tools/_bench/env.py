"""The cluster a benchmark runs on: started here (or reused), migrated and loaded with users.

A reused cluster (``--config``) is attached through the sandbox state file next to its
topology file when there is one, so fault injection works on it too; a topology without a
sandbox behind it still runs the scenarios that inject no fault.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import structlog
from propstore import PropertyStore, Topology
from propstore.migrate import upgrade
from propstore.sandbox import LocalCluster, LocalNode, SandboxError

from _bench import affinity

log = structlog.get_logger("bench")

TENANT = "bench"


class Skip(Exception):
    """A scenario (or contender) cannot run here; the message says why."""


def document(index: int) -> dict[str, object]:
    """A typical small property document (~100 bytes of JSON)."""
    return {"plan": "pro" if index % 3 else "free", "locale": "en-GB", "score": index % 97,
            "seq": 0, "tags": ["newsletter", "beta"][: index % 3]}


@dataclass
class BenchEnv:
    """A migrated, loaded cluster and what the scenarios need to know about it.

    Attributes:
        topology: the topology every contender uses.
        config_path: its file.
        cluster: the sandbox behind it (None for a reused topology without a sandbox).
        users: every loaded user id of :data:`TENANT`.
        users_by_shard: the same ids grouped by shard index.
    """

    topology: Topology
    config_path: Path
    cluster: LocalCluster | None
    users: list[str]
    users_by_shard: dict[int, list[str]] = field(default_factory=dict)

    @property
    def tenant(self) -> str:
        """The tenant all benchmark users belong to."""
        return TENANT

    def primary_dsn(self, shard: int = 0) -> str:
        """The configured primary of a shard."""
        return self.topology.shards[shard].primary.dsn

    def replica_dsn(self, shard: int = 0, replica: int = 0) -> str:
        """A configured replica of a shard; :class:`Skip` when the shard has none."""
        replicas = self.topology.shards[shard].replicas
        if len(replicas) <= replica:
            raise Skip(f"shard {self.topology.shards[shard].name} has no replica {replica + 1}")
        return replicas[replica].dsn

    def local_node(self, name: str) -> LocalNode:
        """The sandbox node called ``name`` for fault injection; :class:`Skip` without one."""
        if self.cluster is None:
            raise Skip("needs a local sandbox cluster for fault injection (run without "
                       "--config, or point --config at a `propstore sandbox up` folder)")
        return self.cluster.node(name)

    def replica_name(self, shard: int = 0, replica: int = 0) -> str:
        """The configured name of a shard's replica."""
        self.replica_dsn(shard, replica)
        return self.topology.shards[shard].replicas[replica].name

    def open_store(self) -> PropertyStore:
        """A new store on the topology (its monitor started)."""
        return PropertyStore(self.topology)

    def shard_users(self, shard: int, count: int | None = None, offset: int = 0) -> list[str]:
        """``count`` users of a shard starting at ``offset`` (all from there when None)."""
        users = self.users_by_shard.get(shard, [])
        end = None if count is None else offset + count
        chosen = users[offset:end]
        if count is not None and len(chosen) < count:
            raise Skip(f"only {len(users)} users on shard {shard}; load more with --users")
        return chosen

    def bucket(self, user: str) -> int:
        """The user's virtual bucket (the raw writers store it, as propstore does)."""
        return self.topology.bucket_of(TENANT, user)

    def reset(self, timeout: float = 120.0) -> None:
        """Undo injected faults and wait until every replica has caught up."""
        if self.cluster is not None:
            self.cluster.reset_faults(timeout)
        wait_caught_up(self.topology, timeout)


def wait_caught_up(topology: Topology, timeout: float = 60.0) -> None:
    """Wait until every replica has replayed what its primary had flushed at the call."""
    deadline = time.monotonic() + timeout
    for shard in topology.shards:
        with psycopg.connect(shard.primary.dsn, autocommit=True) as conn:
            target = conn.execute("SELECT pg_current_wal_flush_lsn()").fetchone()
        for replica in shard.replicas:
            with psycopg.connect(replica.dsn, autocommit=True) as conn:
                while True:
                    row = conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn",
                                       target).fetchone()
                    if row is not None and row[0]:
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{replica.name} did not catch up in {timeout:g}s")
                    time.sleep(0.02)


def load_users(topology: Topology, count: int) -> tuple[list[str], dict[int, list[str]]]:
    """Replace the benchmark tenant's rows with ``count`` users, bulk-loaded with COPY.

    Each user goes to the shard the topology maps it to, so propstore finds it.
    """
    users = [f"u{index:07d}" for index in range(count)]
    by_shard: dict[int, list[tuple[int, str]]] = {}
    for index, user in enumerate(users):
        by_shard.setdefault(topology.shard_index_of(TENANT, user), []).append((index, user))
    for shard_index, shard in enumerate(topology.shards):
        with psycopg.connect(shard.primary.dsn, autocommit=True) as conn:
            with conn.transaction():
                conn.execute("DELETE FROM user_properties WHERE tenant_id = %s", (TENANT,))
                with conn.cursor().copy(
                    "COPY user_properties (tenant_id, user_id, bucket, props) FROM STDIN"
                ) as copy:
                    for index, user in by_shard.get(shard_index, []):
                        copy.write_row((TENANT, user, topology.bucket_of(TENANT, user),
                                        json.dumps(document(index))))
            # Fresh statistics, so the planner uses the primary key from the first query.
            conn.execute("ANALYZE user_properties")
    grouped = {shard: [user for _, user in pairs] for shard, pairs in by_shard.items()}
    return users, grouped


@contextmanager
def bench_env(config: Path | None, *, shards: int, replicas: int, users: int,
              pin: bool = False, cpus: set[int] | None = None) -> Iterator[BenchEnv]:
    """A ready cluster: started here (stopped on exit) or reused from ``config``.

    With ``pin``, the servers of a cluster started here run on ``cpus`` (default: the CPUs
    the client does not use, ``_bench.affinity``); a reused cluster's servers are not ours
    to move.
    """
    cluster: LocalCluster | None = None
    owned = config is None
    try:
        if config is None:
            cluster = LocalCluster(shards=shards, replicas=replicas).start()
            assert cluster.config_path is not None
            config = cluster.config_path
            if pin:
                pin_cluster(cluster, cpus)
        else:
            cluster = _attach(config)
        topology = Topology.load(config)
        for shard in topology.shards:
            upgrade(shard.primary.dsn)
        loaded, by_shard = load_users(topology, users)
        wait_caught_up(topology)
        rng = random.Random(7)  # a fixed order, so runs read the same users
        for ids in by_shard.values():
            rng.shuffle(ids)
        yield BenchEnv(topology, Path(config), cluster, loaded, by_shard)
    finally:
        if cluster is not None:
            if owned:
                cluster.stop()
            else:
                # Leave a reused cluster as we found it: no fault of ours stays injected.
                cluster.reset_faults()


def pin_cluster(cluster: LocalCluster, cpus: set[int] | None = None) -> None:
    """Move every server of ``cluster`` (and the backends it will fork) to ``cpus`` (default:
    every CPU but the client's)."""
    affinity.pin_servers([pid for node in cluster.nodes if (pid := node.pid) is not None],
                         cpus if cpus is not None else affinity.server_cpus())


def _attach(config: Path) -> LocalCluster | None:
    try:
        return LocalCluster.attach(config.parent)
    except (SandboxError, FileNotFoundError, KeyError, ValueError):
        log.info("bench.no_sandbox", config=str(config),
                 note="fault-injecting scenarios will be skipped")
        return None
