"""The state file (``<base_dir>/sandbox.json``) that lets another process find a cluster.

It records what cannot be rediscovered from the folders alone: ports, roles, upstreams, the
binaries used and the socket folder. ``sandbox status`` and ``sandbox down`` act on exactly
the servers it names.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog

from propstore.sandbox._account import ServerAccount
from propstore.sandbox._binaries import PgInstall
from propstore.sandbox._errors import SandboxError
from propstore.sandbox._node import LocalNode, running_postmaster
from propstore.sandbox._processes import ProcessId
from propstore.sandbox._shard import LocalShard

log = structlog.get_logger(__name__)

STATE_NAME = "sandbox.json"
_FORMAT = 1


def write(
    base_dir: Path,
    *,
    install: PgInstall,
    bucket_count: int,
    socket_dir: Path | None,
    config_path: Path | None,
    shards: Sequence[LocalShard],
    owner: ProcessId | None,
) -> None:
    """Record the cluster's current shape (written aside, then renamed into place).

    ``owner`` is the process whose exit must stop the servers (None for a daemon).
    """
    document = {
        "format": _FORMAT,
        "owner": None if owner is None else [owner.pid, owner.start_time],
        "pg_bin": str(install.bindir),
        "pg_version": install.version,
        "bucket_count": bucket_count,
        "socket_dir": None if socket_dir is None else str(socket_dir),
        "config_path": None if config_path is None else str(config_path),
        "shards": [
            {
                "name": shard.name,
                "buckets": list(shard.buckets),
                "nodes": [_node_entry(node) for node in shard.nodes],
            }
            for shard in shards
        ],
    }
    target = base_dir / STATE_NAME
    staging = base_dir / f".{STATE_NAME}.{os.getpid()}.tmp"
    staging.write_text(json.dumps(document, indent=2) + "\n")
    staging.replace(target)


def _node_entry(node: LocalNode) -> dict[str, Any]:
    return {
        "name": node.name,
        "role": node.role,
        "port": node.port,
        "upstream": None if node.upstream is None else node.upstream.name,
        "pid": node.pid,
    }


def read(base_dir: Path) -> dict[str, Any]:
    """The parsed state file; a clear error when there is none or it is not ours."""
    target = base_dir / STATE_NAME
    try:
        document: dict[str, Any] = json.loads(target.read_text())
    except FileNotFoundError:
        raise SandboxError(f"no sandbox cluster in {base_dir} (no {STATE_NAME})") from None
    except ValueError as exc:
        raise SandboxError(f"{target} is not valid JSON: {exc}") from exc
    if document.get("format") != _FORMAT:
        raise SandboxError(f"{target} has unknown format {document.get('format')!r}")
    return document


def owner_of(document: dict[str, Any]) -> ProcessId | None:
    """The owning process a state document names, if any."""
    owner = document.get("owner")
    return None if not owner else ProcessId(int(owner[0]), int(owner[1]))


def install_of(document: dict[str, Any]) -> PgInstall:
    """The installation a state document names (as recorded; not re-probed)."""
    version = str(document["pg_version"])
    return PgInstall(Path(document["pg_bin"]), version, int(version.split(".")[0]))


def rebuild_shards(
    document: dict[str, Any], base_dir: Path, install: PgInstall, account: ServerAccount
) -> list[LocalShard]:
    """Node and shard objects for the servers a state document names."""
    socket_dir = None if document["socket_dir"] is None else Path(document["socket_dir"])
    shards = []
    for shard_doc in document["shards"]:
        entries: list[dict[str, Any]] = shard_doc["nodes"]
        nodes: dict[str, LocalNode] = {}
        for index, entry in enumerate(entries):
            # Replicas were cloned from the shard's primary: that is the upstream to return
            # to after a repoint; the recorded one is where they stream now.
            original = None if index == 0 else nodes[entries[0]["name"]]
            nodes[entry["name"]] = LocalNode(
                entry["name"], entry["role"], int(entry["port"]), base_dir / entry["name"],
                install=install, account=account, socket_dir=socket_dir, upstream=original,
            )
        for entry in entries:
            if entry.get("upstream") in nodes:
                nodes[entry["name"]].upstream = nodes[entry["upstream"]]
        first, last = shard_doc["buckets"]
        members = list(nodes.values())
        shards.append(LocalShard(shard_doc["name"], members[0], members[1:], (first, last)))
    return shards


def clear_stale(base_dir: Path, planned: Sequence[str], account: ServerAccount) -> None:
    """Remove what a previous, stopped cluster left in ``base_dir``; refuse if one runs.

    Only folders that look like sandbox nodes (``data/PG_VERSION`` or ``server.log``) are
    removed, so a base_dir holding unrelated files loses nothing.
    """
    names = set(planned)
    state = base_dir / STATE_NAME
    if state.exists():
        try:
            document = read(base_dir)
            shards = rebuild_shards(document, base_dir, install_of(document), account)
        except (SandboxError, KeyError, TypeError, ValueError):
            log.warning("sandbox.state_unreadable", path=str(state))
        else:
            nodes = [node for shard in shards for node in shard.nodes]
            running = [node.name for node in nodes if node.is_running()]
            if running:
                raise SandboxError(
                    f"a sandbox cluster is already running in {base_dir} ({', '.join(running)});"
                    " attach to it or stop it first (propstore sandbox down)"
                )
            names |= {node.name for node in nodes}
        state.unlink()
    for name in sorted(names):
        folder = base_dir / name
        if not ((folder / "data" / "PG_VERSION").exists() or (folder / "server.log").exists()):
            continue
        if running_postmaster(folder / "data") is not None:
            raise SandboxError(f"{folder} holds a running server; stop it first")
        shutil.rmtree(folder)
