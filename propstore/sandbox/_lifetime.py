"""Making sure no server (nor a pooler or proxy in front of one) outlives the process that
started it.

Two nets: a finalizer (also run at interpreter exit) that stops every front and crashes every
server of a cluster nobody stopped, and, for processes that died without running it
(SIGKILL, os._exit), a reaper that the next throwaway cluster runs over the scratch folder.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path

import structlog

from propstore.sandbox import _state
from propstore.sandbox._account import ServerAccount
from propstore.sandbox._errors import SandboxError
from propstore.sandbox._node import LocalNode
from propstore.sandbox._poolers import Front, stop_fronts_in
from propstore.sandbox._processes import is_alive

log = structlog.get_logger(__name__)

_emergency_lock = threading.Lock()


def emergency_stop(nodes: Iterable[LocalNode], folders: Iterable[Path],
                   fronts: Iterable[Front] = ()) -> None:
    """Finalizer: stop every front (``fronts`` may grow after registration: the cluster
    appends each one it starts), thaw and crash every running node, then delete the
    throwaway folders."""
    with _emergency_lock:
        for front in list(fronts):
            try:
                front.stop(timeout=2.0)
            except Exception:
                log.exception("sandbox.emergency_stop_failed", node=front.name)
        for node in nodes:
            try:
                node.thaw()
                if node.is_running():
                    node.kill()
            except Exception:
                log.exception("sandbox.emergency_stop_failed", node=node.name)
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def reap_orphans(root: Path, account: ServerAccount) -> list[Path]:
    """Stop and delete throwaway clusters under ``root`` whose owning process is gone.

    The state file names the owner (pid and start time). Only folders of this user are
    considered, and only clusters with a recorded, dead owner: daemons (no owner) and live
    owners are left alone. A cluster that cannot be stopped keeps its folder, so its servers
    can still be found. Returns the folders removed.
    """
    reaped = []
    for folder in sorted(root.glob("propstore-cluster-*")):
        try:
            if folder.stat().st_uid != os.geteuid():
                continue
            document = _state.read(folder)
            owner = _state.owner_of(document)
            if owner is None or is_alive(owner):
                continue
            # Fronts first (by their pid files, checking the program): they are the owner's too.
            stop_fronts_in(folder / "fronts")
            shards = _state.rebuild_shards(document, folder, _state.install_of(document), account)
            for node in (node for shard in shards for node in shard.nodes):
                node.stop()
        except (OSError, SandboxError, KeyError, TypeError, ValueError) as exc:
            log.warning("sandbox.orphan_not_reaped", base_dir=str(folder), error=str(exc))
            continue
        shutil.rmtree(folder, ignore_errors=True)
        log.warning("sandbox.orphan_reaped", base_dir=str(folder), owner_pid=owner.pid)
        reaped.append(folder)
    return reaped
