"""AsyncPropertyStore: same guarantees as the sync store, on the caller's event loop."""

from __future__ import annotations

import asyncio
import time

import pytest

from propstore import AsyncPropertyStore, Topology
from propstore.sandbox import LocalCluster
from tests.conftest import users_on_shard


async def wait_for_async(condition, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


def test_async_read_your_writes_while_replay_is_paused(
    topology: Topology, cluster: LocalCluster
) -> None:
    (user,) = users_on_shard(topology, topology.shards[0].name, 1)

    async def main() -> None:
        async with AsyncPropertyStore(topology) as store:
            for replica in cluster.shards[0].replicas:
                replica.pause_replay()
            token = await store.set("acme", user, {"v": 1})
            result = await store.read("acme", user, after=token)
            assert result.props == {"v": 1} and not result.from_replica
            for replica in cluster.shards[0].replicas:
                replica.resume_replay()

            async def from_replica():  # type: ignore[no-untyped-def]
                r = await store.read("acme", user, after=token)
                return r.from_replica and r

            served = await wait_for_async(from_replica)
            assert served.props == {"v": 1}
            many = await store.get_many("acme", [user, "nobody"], after=token)
            assert many == {user: {"v": 1}, "nobody": None}

    asyncio.run(main())


@pytest.mark.slow
def test_async_frozen_replica_costs_at_most_the_deadline(
    topology: Topology, cluster: LocalCluster
) -> None:
    users = users_on_shard(topology, topology.shards[0].name, 10)

    async def main() -> float:
        async with AsyncPropertyStore(topology) as store:
            for user in users:
                await store.set("acme", user, {"v": 1})
            cluster.wait_caught_up()
            frozen = cluster.shards[0].replicas[0]
            frozen.freeze()
            worst = 0.0
            try:
                for i in range(200):
                    started = time.monotonic()
                    assert await store.get("acme", users[i % 10], max_staleness=5) == {"v": 1}
                    worst = max(worst, time.monotonic() - started)
            finally:
                frozen.thaw()
            return worst

    worst = asyncio.run(main())
    print(f"async frozen replica: worst read {worst * 1000:.1f} ms")
    assert worst < topology.routing.replica_deadline + 0.5
