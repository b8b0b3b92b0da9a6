"""Shared fixtures: the real local cluster comes from the ``propstore.testing`` plugin."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import structlog

from propstore import PropertyStore, Topology
from propstore.sandbox import LocalCluster
from tests import _breakage

#: Deliberately broken properties for this run (``PROPSTORE_TEST_BREAK``; normally none).
BROKEN = _breakage.apply_from_environment()


def pytest_configure(config: pytest.Config) -> None:
    """Library events go to the process's real stderr (fd 2, captured per test by pytest),
    never to ``sys.stdout`` as it is at each call, structlog's default: a background
    thread's event (a store's monitor joining its agent) during a ``CliRunner`` invocation
    otherwise landed in the command's captured stdout and broke its JSON (seen in CI)."""
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.__stderr__))


def pytest_report_header() -> str | None:
    """Say loudly when the store under test is deliberately broken."""
    return f"DELIBERATELY BROKEN STORE: {', '.join(BROKEN)}" if BROKEN else None


def users_on_shard(topology: Topology, shard: str, count: int, tenant: str = "acme",
                   prefix: str = "user") -> list[str]:
    """``count`` user ids of ``tenant`` that live on ``shard``."""
    found: list[str] = []
    i = 0
    while len(found) < count:
        user = f"{prefix}-{i}"
        if topology.shard_of(tenant, user).name == shard:
            found.append(user)
        i += 1
    return found


@pytest.fixture(scope="session")
def migrated_cluster(local_cluster: LocalCluster) -> LocalCluster:
    """The session cluster with every shard migrated to head."""
    from propstore.migrate import upgrade

    for shard in local_cluster.shards:
        upgrade(shard.primary.dsn)
    local_cluster.wait_caught_up()
    return local_cluster


@pytest.fixture
def topology(migrated_cluster: LocalCluster, propstore_clean_state: LocalCluster) -> Topology:
    """The session cluster's topology, tables empty, faults undone after the test."""
    assert propstore_clean_state.config_path is not None
    return Topology.load(propstore_clean_state.config_path)


@pytest.fixture
def store(topology: Topology) -> Iterator[PropertyStore]:
    """A store on the session cluster, closed after the test."""
    with PropertyStore(topology) as opened:
        yield opened
