"""ContainerCluster: the LocalCluster shape on Docker, through testcontainers.

Per shard, one container as primary and N containers as streaming hot standbys, each cloned
from its primary with ``pg_basebackup -R -X stream``. Every container uses host networking and
its server listens on its own ``127.0.0.1`` port, so the topology file, the DSNs and the
replication connections are the same as :class:`~propstore.sandbox.LocalCluster`'s, and so is
fault injection: paused replay, apply delay, freeze (``docker pause``), kill and restart,
promotion, a cut or moved WAL receiver.

Nothing is left behind: testcontainers' reaper (ryuk) needs a registry to be pulled, so
propstore labels its containers with the owning process and removes them itself: on
:meth:`~ContainerCluster.stop`, at interpreter exit, and, for a process that died without
either (SIGKILL), at the next start on the same machine.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import weakref
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog
from psycopg import sql

from propstore.sandbox._cluster import CONFIG_NAME, LocalCluster
from propstore.sandbox._container_node import (
    LABEL,
    CapabilityMissing,
    ContainerNode,
    missing,
    owner_labels,
)
from propstore.sandbox._datadir import DATABASE, free_port
from propstore.sandbox._errors import SandboxError
from propstore.sandbox._locations import scratch_root
from propstore.sandbox._processes import ProcessId, identify, is_alive
from propstore.sandbox._sharded import ShardedCluster, StreamingShard, run_parallel
from propstore.sandbox._topology import bucket_ranges, render_config
from propstore.sandbox._waiting import wait_for

log = structlog.get_logger(__name__)

#: Image used when neither the argument nor ``$PROPSTORE_PG_IMAGE`` names one.
DEFAULT_IMAGE = "postgres:16"
_PORT_ATTEMPTS = 5
# Folder of a cluster's topology file; its name carries the owner, for the reaper.
_FOLDER_PREFIX = "propstore-containers-"

__all__ = ["CapabilityMissing", "ContainerCluster", "ContainerNode", "ContainerShard",
           "docker_available"]


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
        where = os.environ.get("DOCKER_HOST") or "the default socket"
        return False, (f"no Docker engine answered at {where} ({type(exc).__name__}: {exc}); "
                       "tools/docker_env.sh prepares one")
    return True, "Docker engine answered"


class ContainerShard(StreamingShard[ContainerNode]):
    """Primary, replicas and bucket range of one containerised shard."""

    def __init__(self, name: str, primary: ContainerNode, replicas: list[ContainerNode],
                 buckets: tuple[int, int]) -> None:
        self.name = name
        self.primary = primary
        self.replicas = replicas
        self.buckets = buckets


class ContainerCluster(ShardedCluster[ContainerNode]):
    """Like :class:`~propstore.sandbox.LocalCluster`, but every server is a container.

    Same node names, topology file and fault methods; what only a local process allows (pids,
    data folders, daemon mode, choosing binaries) raises
    :class:`~propstore.sandbox._containers.CapabilityMissing`.

    Args:
        shards: number of shards (``shard0`` ...).
        replicas: hot standbys per shard.
        image: PostgreSQL image; default ``$PROPSTORE_PG_IMAGE``, else ``postgres:16``. It
            must be present or pullable: with no registry, ``tools/docker_env.sh`` builds
            ``local/postgres:15`` from Debian packages.
        bucket_count: virtual buckets written to the topology file, split evenly.
    """

    def __init__(self, shards: int = 2, replicas: int = 2, image: str | None = None,
                 bucket_count: int = 4096) -> None:
        if shards < 1 or replicas < 0 or bucket_count < shards:
            raise SandboxError(
                f"need shards >= 1, replicas >= 0 and bucket_count >= shards "
                f"(got {shards}, {replicas}, {bucket_count})"
            )
        self.shard_count = shards
        self.replica_count = replicas
        self.image = image or os.environ.get("PROPSTORE_PG_IMAGE") or DEFAULT_IMAGE
        self.bucket_count = bucket_count
        self.shards: list[ContainerShard] = []
        self._config_dir: Path | None = None
        self.config_path: Path | None = None
        self.startup_seconds: float | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def __getattr__(self, name: str) -> Any:
        if name == "base_dir":
            missing("cluster", name, "its servers' data live in the containers "
                    "(config_path names the topology file)")
        if not name.startswith("__") and hasattr(LocalCluster, name) and not hasattr(
                type(self), name):
            missing("cluster", name, "a LocalCluster feature needing local server processes "
                    "(binaries, folders, daemon mode, poolers)")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def pg_version(self) -> int:
        """Major version of the servers (15, 16, ...)."""
        if not self.shards:
            raise SandboxError("start the cluster before asking its version")
        return int(self.shards[0].primary.scalar("SHOW server_version_num")) // 10000

    def __repr__(self) -> str:
        return f"<ContainerCluster {self.shard_count}x{self.replica_count} {self.image}>"

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> ContainerCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self, timeout: float = 180.0) -> ContainerCluster:
        """Start every container, wait until every replica streams, write ``propstore.toml``.

        ``timeout`` (seconds) bounds each server start and the wait for streaming.
        """
        available, reason = docker_available()
        if not available:
            raise SandboxError(reason)
        if self.shards:
            raise SandboxError(f"{self!r} is already started")
        began = time.monotonic()
        reap_orphans()
        _require_image(self.image)
        owner = identify(os.getpid())
        assert owner is not None  # this very process
        labels = owner_labels(owner.pid, owner.start_time)
        self._config_dir = Path(tempfile.mkdtemp(
            prefix=f"{_FOLDER_PREFIX}{owner.pid}-{owner.start_time}-", dir=scratch_root()))
        self.shards = self._plan_shards(labels)
        # Registered before the first container exists: a failure half-way, or an exit
        # without stop(), still removes them.
        self._finalizer = weakref.finalize(self, _remove_all, list(self.nodes),
                                           self._config_dir)
        try:
            run_parallel([partial(self._start_shard, shard, timeout) for shard in self.shards])
            for shard in self.shards:
                wait_for(partial(_streaming, shard), timeout=timeout,
                         what=f"{shard.name}'s replicas to stream")
            self.write_config()
        except BaseException:
            log.error("sandbox.start_failed", image=self.image)
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        log.info("sandbox.started", kind="containers", image=self.image,
                 shards=self.shard_count, replicas=self.replica_count,
                 seconds=round(self.startup_seconds, 3))
        return self

    def stop(self) -> None:
        """Remove every container (paused ones included) and the topology file's folder."""
        nodes = self.nodes
        if self._finalizer is not None:
            self._finalizer()  # runs _remove_all once, then detaches itself
            self._finalizer = None
        self.shards = []
        log.info("sandbox.stopped", kind="containers", nodes=len(nodes))

    def _plan_shards(self, labels: dict[str, str]) -> list[ContainerShard]:
        shards = []
        for index, buckets in enumerate(bucket_ranges(self.bucket_count, self.shard_count)):
            primary = ContainerNode(f"shard{index}-primary", "primary", free_port(),
                                    image=self.image, labels=labels)
            replicas = [ContainerNode(f"shard{index}-replica{r}", "replica", free_port(),
                                      image=self.image, labels=labels, upstream=primary)
                        for r in range(1, self.replica_count + 1)]
            shards.append(ContainerShard(f"shard{index}", primary, replicas, buckets))
        return shards

    def _start_shard(self, shard: ContainerShard, timeout: float) -> None:
        _create_with_free_port(shard.primary, timeout)
        shard.primary.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)),
                              dbname="postgres")
        run_parallel([partial(_create_with_free_port, replica, timeout)
                      for replica in shard.replicas])

    # -- topology file ---------------------------------------------------------------------

    def write_config(self, path: str | Path | None = None) -> Path:
        """Write the topology TOML (docs/config.md); by default into a temporary folder.

        That folder is removed with the containers; :attr:`config_path` names the file.
        """
        if not self.shards or self._config_dir is None:
            raise SandboxError("start the cluster before writing its configuration")
        target = Path(path) if path is not None else self._config_dir / CONFIG_NAME
        target.write_text(render_config(self.shards, self.bucket_count))
        self.config_path = target
        return target


def _create_with_free_port(node: ContainerNode, timeout: float) -> None:
    # free_port() cannot reserve the port and host networking shares the host's ports: a
    # clash is retried on another port with a fresh container; any other failure is reported.
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        try:
            node.create(timeout)
            return
        except SandboxError:
            tail = node.log_tail()
            node.remove()
            if attempt == _PORT_ATTEMPTS or "could not bind" not in tail:
                raise
            log.warning("sandbox.port_taken", node=node.name, port=node.port)
            if node.upstream is not None:  # the clone's slot was made with the old container
                node.upstream.execute("SELECT pg_drop_replication_slot(slot_name) FROM "
                                      "pg_replication_slots WHERE slot_name = %s",
                                      (node.slot_name,))
            node.port = free_port()


def _streaming(shard: ContainerShard) -> bool:
    rows = shard.primary.execute(
        "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'"
    )
    return {replica.name for replica in shard.replicas} <= {row[0] for row in rows}


def _remove_all(nodes: Iterable[ContainerNode], folder: Path) -> None:
    """Finalizer and stop(): remove every container, then the folder of the topology file."""
    for node in nodes:
        try:
            node.remove()
        except Exception:
            log.exception("sandbox.container_remove_failed", node=node.name)
    shutil.rmtree(folder, ignore_errors=True)


def _require_image(image: str) -> None:
    # Checked once here, not by each node's thread, so a missing image is one clear error.
    import docker

    client = docker.from_env()
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        try:
            client.images.pull(image)
        except docker.errors.APIError as exc:
            raise SandboxError(
                f"image {image} is not present and cannot be pulled ({exc.explanation}); "
                "without a registry, tools/docker_env.sh builds local/postgres:15 from Debian "
                "packages (then set PROPSTORE_PG_IMAGE=local/postgres:15)") from exc
    finally:
        client.close()


def reap_orphans() -> int:
    """Remove sandbox containers of this machine whose owning process is gone.

    The owner (pid and start time, so a reused pid is not mistaken for it) is in the labels;
    containers of live owners and of other machines sharing the engine are left alone.
    Their topology files' folders go too. Returns how many containers were removed.
    """
    import docker

    client = docker.from_env()
    removed = 0
    try:
        for container in client.containers.list(all=True, filters={"label": LABEL}):
            labels = container.labels
            if labels.get(f"{LABEL}.host") != socket.gethostname():
                continue
            try:
                owner = ProcessId(int(labels[f"{LABEL}.owner_pid"]),
                                  int(labels[f"{LABEL}.owner_start"]))
            except (KeyError, ValueError):
                continue
            if is_alive(owner):
                continue
            container.remove(force=True, v=True)
            removed += 1
            log.warning("sandbox.orphan_reaped", container=container.short_id,
                        node=labels.get(f"{LABEL}.node"), owner_pid=owner.pid)
    finally:
        client.close()
    for folder in scratch_root().glob(f"{_FOLDER_PREFIX}*"):
        pid, start = folder.name.removeprefix(_FOLDER_PREFIX).split("-")[:2]
        if pid.isdigit() and start.isdigit() and not is_alive(ProcessId(int(pid), int(start))):
            shutil.rmtree(folder, ignore_errors=True)
    return removed
