"""The sandbox commands as plain functions: the CLI only parses, calls these and prints.

``up`` leaves the servers running after the calling process exits; ``status`` and ``down``
find them again through the state file in the same folder.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import structlog

from propstore.sandbox._cluster import CONFIG_NAME, LocalCluster
from propstore.sandbox._errors import SandboxError
from propstore.sandbox._locations import default_base_dir
from propstore.sandbox._node import LocalNode
from propstore.sandbox._poolers import FrontKind, stop_fronts_in
from propstore.sandbox._state import STATE_NAME

log = structlog.get_logger(__name__)


def up(
    base_dir: str | Path | None = None,
    shards: int = 2,
    replicas: int = 2,
    *,
    pg_bin: str | Path | None = None,
    bucket_count: int = 4096,
    migrate: bool = True,
    replace: bool = False,
    fronts: Sequence[FrontKind] = (),
) -> LocalCluster:
    """Start a daemonised cluster in ``base_dir`` (default :func:`default_base_dir`), with
    every shard migrated to head unless ``migrate`` is false.

    If a cluster of the same shape (shards, replicas per shard, buckets) already runs there
    it is returned as found, after restarting any of its servers that are down. One of
    another shape is refused with a :class:`SandboxError` naming it, unless ``replace``:
    then it is stopped and its files deleted (:func:`down`) before the new one starts.

    ``fronts``: per kind (``pgbouncer-session``, ``pgbouncer-transaction``,
    ``pgbouncer-hosts``, ``pgbouncer-prepared``, ``haproxy``), one pooler or proxy in
    front of every shard's replicas; the topology file then reaches those replicas through
    them (with the matching ``via``). :func:`down` stops them too.
    """
    folder = Path(base_dir).absolute() if base_dir is not None else default_base_dir()
    if (folder / STATE_NAME).exists():
        try:
            existing = LocalCluster.attach(folder)
        except SandboxError:
            log.warning("sandbox.state_unreadable", base_dir=str(folder))
        else:
            running = [node.is_running() for node in existing.nodes]
            if any(running):
                wanted = (shards, replicas, bucket_count)
                if _shape(existing) == wanted:
                    # Bring back what crashed or was killed; the data is still there.
                    for node, is_up in zip(existing.nodes, running, strict=True):
                        if not is_up:
                            node.start()
                    log.info("sandbox.already_up", base_dir=str(folder))
                    return existing
                if not replace:
                    raise SandboxError(
                        f"a sandbox of {_describe(*_shape(existing))} is already running in "
                        f"{folder}; stop it first (propstore sandbox down --dir {folder}) or "
                        f"replace it with one of {_describe(*wanted)} (sandbox up --replace)"
                    )
                log.warning("sandbox.replacing", base_dir=str(folder),
                            running=_describe(*_shape(existing)), wanted=_describe(*wanted))
                down(folder)
    cluster = LocalCluster(shards, replicas, base_dir=folder, pg_bin=pg_bin,
                           bucket_count=bucket_count)
    cluster.start()
    try:
        if migrate:
            migrate_to_head(cluster)
        started = [cluster.front(kind, shard.name) for kind in fronts
                   for shard in cluster.shards]
        if started:
            cluster.write_config(fronts=started)
    except BaseException:
        cluster.stop()
        raise
    cluster.detach()
    return cluster


def _shape(cluster: LocalCluster) -> tuple[int, int, int]:
    return cluster.shard_count, cluster.replica_count, cluster.bucket_count


def _describe(shards: int, replicas: int, bucket_count: int) -> str:
    return (f"{shards} shard{'s' if shards != 1 else ''} x {replicas} "
            f"replica{'s' if replicas != 1 else ''} ({bucket_count} buckets)")


def migrate_to_head(cluster: LocalCluster) -> None:
    """Bring every shard's schema to the newest revision, and let the replicas catch up."""
    from propstore.migrate import upgrade  # the sandbox is usable without alembic loaded

    for shard in cluster.shards:
        upgrade(shard.primary.dsn)
    cluster.wait_caught_up()


def status(base_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """One dict per node: name, shard, role, port, dsn, pid, running, in_recovery, lsn.

    ``lsn`` is the primary's flushed WAL position or the replica's replay position (text),
    None when the node does not answer.
    """
    folder = Path(base_dir).absolute() if base_dir is not None else default_base_dir()
    cluster = LocalCluster.attach(folder)
    rows = []
    for shard in cluster.shards:
        for node in shard.nodes:
            rows.append({"shard": shard.name, **_node_status(node)})
    return rows


def _node_status(node: LocalNode) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": node.name, "role": node.role, "port": node.port, "dsn": node.dsn,
        "pid": node.pid, "running": node.is_running(), "in_recovery": None, "lsn": None,
        "data_dir": str(node.data_dir),
    }
    if not row["running"]:
        row["pid"] = None
        return row
    try:
        in_recovery = node.is_in_recovery()
        position = node.replay_lsn() if in_recovery else node.flush_lsn()
    except psycopg.Error as exc:
        log.warning("sandbox.status_query_failed", node=node.name, error=str(exc))
        return row
    row["in_recovery"] = in_recovery
    row["lsn"] = None if position is None else str(position)
    return row


def down(base_dir: str | Path | None = None) -> list[str]:
    """Stop the cluster's servers and delete its files (node folders, state, config).

    Returns the names of the nodes that were running. Files in ``base_dir`` that the sandbox
    did not create are left alone.
    """
    folder = Path(base_dir).absolute() if base_dir is not None else default_base_dir()
    cluster = LocalCluster.attach(folder)
    running = [node.name for node in cluster.nodes if node.is_running()]
    running += stop_fronts_in(folder / "fronts")
    shutil.rmtree(folder / "fronts", ignore_errors=True)
    cluster.stop()
    for node in cluster.nodes:
        shutil.rmtree(node.node_dir, ignore_errors=True)
    socket_dir = cluster.socket_dir
    if socket_dir is not None:
        shutil.rmtree(socket_dir, ignore_errors=True)
    for name in (STATE_NAME, CONFIG_NAME):
        (folder / name).unlink(missing_ok=True)
    log.info("sandbox.down", base_dir=str(folder), stopped=running)
    return running
