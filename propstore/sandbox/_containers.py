"""ContainerCluster: the LocalCluster shape on Docker, through testcontainers.

Per shard, one container from the official ``postgres`` image as primary and N containers as
replicas on a private Docker network; each replica clones its primary with
``pg_basebackup -R -X stream`` before starting as a hot standby. Container ports are
published on 127.0.0.1 only. Offered for machines without local PostgreSQL binaries; the
local cluster is faster and supports more faults (kill, promote, repoint).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import psycopg
import structlog

from propstore.sandbox._datadir import DATABASE, SUPERUSER
from propstore.sandbox._errors import SandboxError
from propstore.sandbox._replication import Role, SqlNode, wait_caught_up
from propstore.sandbox._topology import bucket_ranges, render_config
from propstore.sandbox._waiting import wait_for

log = structlog.get_logger(__name__)

_CONTAINER_PORT = "5432/tcp"
_SERVER_FLAGS = (
    "-c wal_level=replica -c hot_standby=on -c hot_standby_feedback=on "
    "-c synchronous_commit=on -c fsync=off -c wal_receiver_status_interval=1s "
    "-c max_wal_senders=10 -c max_replication_slots=10 -c wal_keep_size=256MB "
    "-c shared_buffers=16MB -c listen_addresses='*'"
)
# Inside the private Docker network; the host only reaches the ports published on loopback.
_HBA_LINES = (
    "local all all trust",
    "local replication all trust",
    "host all all all trust",
    "host replication all all trust",
)


def docker_available(timeout: float = 2.0) -> tuple[bool, str]:
    """Whether a Docker engine answers a ping within ``timeout`` seconds, and why not."""
    try:
        import docker  # type: ignore[import-untyped]
    except ImportError:
        return False, "the docker SDK is not installed (pip install propstore[testcontainers])"
    try:
        client = docker.from_env(timeout=max(1, round(timeout)))
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # the SDK raises DockerException, requests and OS errors alike
        return False, f"no Docker engine answered: {type(exc).__name__}: {exc}"
    return True, "Docker engine answered"


class ContainerNode(SqlNode):
    """A server in a container; freeze and thaw are ``docker pause`` / ``unpause``."""

    def __init__(self, name: str, role: Role, container: Any) -> None:
        self.name = name
        self.role = role
        self.container = container
        self.port = 0

    @property
    def dsn(self) -> str:
        """``host=127.0.0.1 port=N dbname=propstore user=postgres`` (the published port)."""
        return f"host=127.0.0.1 port={self.port} dbname={DATABASE} user={SUPERUSER}"

    def freeze(self) -> None:
        """Pause every process of the container (cgroup freezer)."""
        self.container.get_wrapped_container().pause()
        log.info("sandbox.node_frozen", node=self.name)

    def thaw(self) -> None:
        """Undo :meth:`freeze`."""
        self.container.get_wrapped_container().unpause()
        log.info("sandbox.node_thawed", node=self.name)


class ContainerShard:
    """Primary, replicas and bucket range of one containerised shard."""

    def __init__(self, name: str, primary: ContainerNode, replicas: list[ContainerNode],
                 buckets: tuple[int, int]) -> None:
        self.name = name
        self.primary = primary
        self.replicas = replicas
        self.buckets = buckets

    @property
    def nodes(self) -> list[ContainerNode]:
        """Primary first, then replicas."""
        return [self.primary, *self.replicas]

    def wait_caught_up(self, timeout: float = 60.0) -> None:
        """Wait until every replica replayed the primary's current flushed WAL (seconds)."""
        wait_caught_up(self.primary, self.replicas, timeout)


class ContainerCluster:
    """Like :class:`~propstore.sandbox.LocalCluster`, but every server is a container.

    Args:
        shards: number of shards.
        replicas: hot standbys per shard.
        image: official postgres image tag to run.
        bucket_count: virtual buckets written to the topology file.
    """

    def __init__(self, shards: int = 2, replicas: int = 2, image: str = "postgres:16",
                 bucket_count: int = 4096) -> None:
        self.shard_count = shards
        self.replica_count = replicas
        self.image = image
        self.bucket_count = bucket_count
        self.shards: list[ContainerShard] = []
        self.config_path: Path | None = None
        self._network: Any = None

    @property
    def nodes(self) -> list[ContainerNode]:
        """Every node, shard by shard, primary first."""
        return [node for shard in self.shards for node in shard.nodes]

    def __enter__(self) -> ContainerCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self, timeout: float = 180.0) -> ContainerCluster:
        """Create the network and containers, wait until every replica streams."""
        from testcontainers.core.network import Network

        available, reason = docker_available()
        if not available:
            raise SandboxError(reason)
        self._network = Network().create()
        try:
            for index, buckets in enumerate(bucket_ranges(self.bucket_count, self.shard_count)):
                self.shards.append(self._start_shard(f"shard{index}", buckets, timeout))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Remove every container (thawing paused ones first) and the network."""
        for node in self.nodes:
            try:
                wrapped = node.container.get_wrapped_container()
                wrapped.reload()
                if wrapped.status == "paused":
                    wrapped.unpause()
                node.container.stop()
            except Exception:
                log.exception("sandbox.container_stop_failed", node=node.name)
        self.shards = []
        if self._network is not None:
            self._network.remove()
            self._network = None

    def write_config(self, path: str | Path) -> Path:
        """Write the topology TOML for the published ports to ``path``."""
        target = Path(path)
        target.write_text(render_config(self.shards, self.bucket_count))
        self.config_path = target
        return target

    def wait_caught_up(self, timeout: float = 60.0) -> None:
        """Wait until every replica of every shard has caught up (seconds)."""
        for shard in self.shards:
            shard.wait_caught_up(timeout)

    def _start_shard(self, shard: str, buckets: tuple[int, int],
                     timeout: float) -> ContainerShard:
        alias = f"{shard}-primary"
        primary = ContainerNode(alias, "primary", self._container(alias, _primary_script(alias)))
        _publish_and_start(primary)
        _await_connectable(primary, timeout)
        replicas = []
        for number in range(1, self.replica_count + 1):
            name = f"{shard}-replica{number}"
            replica = ContainerNode(name, "replica",
                                    self._container(name, _replica_script(name, alias)))
            _publish_and_start(replica)
            replicas.append(replica)
        for replica in replicas:
            _await_connectable(replica, timeout)
        wait_for(lambda: _streaming(primary, replicas), timeout=timeout,
                 what=f"{shard}'s replicas to stream")
        return ContainerShard(shard, primary, replicas, buckets)

    def _container(self, name: str, script: str) -> Any:
        from testcontainers.core.container import DockerContainer

        container = DockerContainer(self.image, entrypoint=["bash", "-c", script])
        container.with_env("POSTGRES_HOST_AUTH_METHOD", "trust")
        container.with_env("POSTGRES_DB", DATABASE)
        container.with_network(self._network).with_network_aliases(name)
        return container


def _primary_script(name: str) -> str:
    hba = " ".join(shlex.quote(line) for line in _HBA_LINES)
    return (
        f"printf '%s\\n' {hba} > /etc/propstore_hba.conf && "
        f"exec docker-entrypoint.sh postgres -c hba_file=/etc/propstore_hba.conf "
        f"-c cluster_name={name} {_SERVER_FLAGS}"
    )


def _replica_script(name: str, primary: str) -> str:
    slot = name.replace("-", "_")
    data = "/var/lib/postgresql/replica"
    return (
        f"until pg_isready -q -h {primary} -U {SUPERUSER}; do sleep 0.2; done && "
        f"mkdir -p {data} && chown postgres {data} && chmod 700 {data} && "
        f"gosu postgres pg_basebackup -h {primary} -U {SUPERUSER} -D {data} "
        f"-R -X stream -C -S {slot} --checkpoint=fast && "
        f"exec gosu postgres postgres -D {data} -c cluster_name={name} {_SERVER_FLAGS}"
    )


def _publish_and_start(node: ContainerNode) -> None:
    # testcontainers types host ports as int, but docker-py accepts (address, port): this is
    # how the port is published on loopback only, with Docker choosing the port number.
    cast(Any, node.container).ports[_CONTAINER_PORT] = ("127.0.0.1", None)
    node.container.start()
    node.port = int(node.container.get_exposed_port(5432))


def _await_connectable(node: ContainerNode, timeout: float) -> None:
    def answers() -> bool:
        try:
            node.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    try:
        wait_for(answers, timeout=timeout, what=f"{node.name} to accept connections")
    except SandboxError as exc:
        logs = node.container.get_wrapped_container().logs(tail=40).decode("utf-8", "replace")
        raise SandboxError(f"{exc}; container log:\n{logs}") from exc


def _streaming(primary: ContainerNode, replicas: Sequence[ContainerNode]) -> bool:
    rows = primary.execute(
        "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'"
    )
    return {replica.name for replica in replicas} <= {row[0] for row in rows}
