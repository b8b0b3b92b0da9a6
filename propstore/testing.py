"""pytest fixtures backed by a real local cluster (registered as the ``propstore`` plugin).

Fixtures:
    local_cluster: one session-wide :class:`~propstore.sandbox.LocalCluster` (2 shards x 2
        replicas; override with ``PROPSTORE_TEST_SHARDS`` / ``PROPSTORE_TEST_REPLICAS``).
    cluster: the same cluster for one test; every fault the test injected (freeze, kill,
        paused replay, apply delay, cut or moved WAL receiver) is undone afterwards and the
        replicas are caught up again. Promotion cannot be undone: use ``cluster_factory``.
    cluster_config: path of the session cluster's topology file.
    cluster_factory: ``make(shards=1, replicas=1)`` starts a private cluster for destructive
        tests (promotion, repointing); it is stopped when the test ends.
    propstore_clean_state: empties table ``user_properties`` on every primary (if the schema
        exists) before the test, and yields the session cluster.

The PostgreSQL binaries are found as described in :mod:`propstore.sandbox`
(``PROPSTORE_PG_BIN`` selects a version).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from propstore.sandbox import LocalCluster

def _shape_from_env() -> tuple[int, int]:
    shards = int(os.environ.get("PROPSTORE_TEST_SHARDS", "2"))
    replicas = int(os.environ.get("PROPSTORE_TEST_REPLICAS", "2"))
    return shards, replicas


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    # `timeout pytest ...` and CI runners stop a run with SIGTERM, whose default action kills
    # Python without running finalizers, leaving the servers behind. As an interrupt, the
    # fixtures tear down normally. Only a default handler in the main thread is replaced.
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[LocalCluster]:
    """The session's shared cluster, started once and stopped after the last test."""
    from propstore.sandbox import LocalCluster

    shards, replicas = _shape_from_env()
    with _sigterm_as_interrupt(), LocalCluster(shards=shards, replicas=replicas) as started:
        yield started


@pytest.fixture(scope="session")
def cluster_config(local_cluster: LocalCluster) -> Path:
    """Path of the shared cluster's topology TOML."""
    assert local_cluster.config_path is not None
    return local_cluster.config_path


@pytest.fixture
def cluster(local_cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The shared cluster, with every fault injected by the test undone afterwards."""
    yield local_cluster
    local_cluster.reset_faults()


@pytest.fixture
def cluster_factory() -> Iterator[Callable[..., LocalCluster]]:
    """Start private clusters (``make(shards=1, replicas=1, **kwargs)``) for one test."""
    from propstore.sandbox import LocalCluster

    started: list[LocalCluster] = []

    def make(
        shards: int = 1, replicas: int = 1, *, bucket_count: int = 4096,
        pg_bin: str | Path | None = None,
    ) -> LocalCluster:
        new = LocalCluster(shards=shards, replicas=replicas, bucket_count=bucket_count,
                           pg_bin=pg_bin)
        started.append(new)
        return new.start()

    yield make
    for each in started:
        each.stop()


@pytest.fixture
def propstore_clean_state(cluster: LocalCluster) -> LocalCluster:
    """Empty ``user_properties`` on every primary if it exists; replicas catch up first."""
    for shard in cluster.shards:
        if shard.primary.scalar("SELECT to_regclass('user_properties') IS NOT NULL"):
            shard.primary.execute("TRUNCATE user_properties")
    cluster.wait_caught_up()
    return cluster
