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

Cluster kinds: ``--propstore-cluster=local`` (the default, or ``$PROPSTORE_TEST_CLUSTER``)
runs the servers as local processes; ``--propstore-cluster=containers`` makes the same
fixtures return a :class:`~propstore.sandbox.ContainerCluster` (Docker, image
``$PROPSTORE_PG_IMAGE``; ``tools/docker_env.sh`` prepares an engine and an image). Without an
engine every cluster test is skipped with the reason; a test that needs what only local
processes offer (pids, data folders, daemon mode) is skipped naming the missing capability.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from propstore.sandbox import ContainerCluster, LocalCluster

    Cluster = LocalCluster | ContainerCluster

_KINDS = ("local", "containers")


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--propstore-cluster=local|containers``: what the cluster fixtures start."""
    parser.addoption(
        "--propstore-cluster", choices=_KINDS,
        default=os.environ.get("PROPSTORE_TEST_CLUSTER", "local"),
        help="run the propstore cluster fixtures on local servers (default) or on Docker "
             "containers (env: PROPSTORE_TEST_CLUSTER)",
    )


def pytest_report_header(config: pytest.Config) -> str:
    """Say which cluster kind the run uses."""
    kind = config.getoption("--propstore-cluster")
    if kind == "containers":
        image = os.environ.get("PROPSTORE_PG_IMAGE", "postgres:16")
        return f"propstore cluster: containers (image {image})"
    return "propstore cluster: local"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Report a test that needs a capability the container cluster lacks as skipped."""
    report = yield
    if call.excinfo is not None and report.failed:
        from propstore.sandbox._container_node import CapabilityMissing

        if call.excinfo.errisinstance(CapabilityMissing):
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0,
                               f"Skipped: {call.excinfo.value}")
    return report


def _cluster_kind(config: pytest.Config) -> str:
    return str(config.getoption("--propstore-cluster"))


def _new_cluster(config: pytest.Config, shards: int, replicas: int, *,
                 bucket_count: int = 4096, pg_bin: str | Path | None = None) -> Cluster:
    from propstore.sandbox import ContainerCluster, LocalCluster, docker_available

    if _cluster_kind(config) == "local":
        return LocalCluster(shards=shards, replicas=replicas, bucket_count=bucket_count,
                            pg_bin=pg_bin)
    if pg_bin is not None:
        from propstore.sandbox._container_node import missing

        missing("cluster", "pg_bin", "its binaries are the image's")
    available, reason = docker_available(timeout=5.0)
    if not available:
        pytest.skip(f"--propstore-cluster=containers: {reason}")
    return ContainerCluster(shards=shards, replicas=replicas, bucket_count=bucket_count)

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
def local_cluster(pytestconfig: pytest.Config) -> Iterator[Cluster]:
    """The session's shared cluster, started once and stopped after the last test.

    A :class:`~propstore.sandbox.LocalCluster`, or with ``--propstore-cluster=containers`` a
    :class:`~propstore.sandbox.ContainerCluster` of the same shape.
    """
    shards, replicas = _shape_from_env()
    with _sigterm_as_interrupt(), _new_cluster(pytestconfig, shards, replicas) as started:
        yield started


@pytest.fixture(scope="session")
def cluster_config(local_cluster: Cluster) -> Path:
    """Path of the shared cluster's topology TOML."""
    assert local_cluster.config_path is not None
    return local_cluster.config_path


@pytest.fixture
def cluster(local_cluster: Cluster) -> Iterator[Cluster]:
    """The shared cluster, with every fault injected by the test undone afterwards."""
    yield local_cluster
    local_cluster.reset_faults()


@pytest.fixture
def cluster_factory(pytestconfig: pytest.Config) -> Iterator[Callable[..., Cluster]]:
    """Start private clusters (``make(shards=1, replicas=1, **kwargs)``) for one test.

    Of the run's cluster kind; ``pg_bin`` is a local-cluster capability.
    """
    started: list[Cluster] = []

    def make(
        shards: int = 1, replicas: int = 1, *, bucket_count: int = 4096,
        pg_bin: str | Path | None = None,
    ) -> Cluster:
        new = _new_cluster(pytestconfig, shards, replicas, bucket_count=bucket_count,
                           pg_bin=pg_bin)
        started.append(new)
        return new.start()

    yield make
    for each in started:
        each.stop()


@pytest.fixture
def propstore_clean_state(cluster: Cluster) -> Cluster:
    """Empty ``user_properties`` on every primary if it exists; replicas catch up first."""
    for shard in cluster.shards:
        if shard.primary.scalar("SELECT to_regclass('user_properties') IS NOT NULL"):
            shard.primary.execute("TRUNCATE user_properties")
    cluster.wait_caught_up()
    return cluster
