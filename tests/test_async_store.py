"""AsyncPropertyStore: same guarantees as the sync store, on the caller's event loop."""

from __future__ import annotations

import asyncio
import time

import pytest

from propstore import AsyncPropertyStore, ReadResult, Topology
from propstore.sandbox import LocalCluster
from tests import claims
from tests.conftest import users_on_shard
from tests.test_store import RawPrimaryReads, SchedulingLag, check_frozen_replica_timings


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

    deadline = topology.routing.replica_deadline
    assert deadline == claims.REPLICA_DEADLINE
    frozen = cluster.shards[0].replicas[0]

    raw = RawPrimaryReads(cluster.shards[0].primary.dsn)

    lags: list[float] = []

    async def main() -> list[tuple[float, ReadResult]]:
        async with AsyncPropertyStore(topology) as store:
            for user in users:
                await store.set("acme", user, {"v": 1})
            cluster.wait_caught_up()

            async def all_up() -> bool:
                return all(n.up for n in store.shard_views()[0].nodes)

            await wait_for_async(all_up)
            frozen.freeze()
            timings = []
            try:
                for i in range(claims.FROZEN_READS):
                    raw.read(users[i % 10])  # blocks the loop briefly: nothing else runs
                    lag.reset()
                    started = time.monotonic()
                    result = await store.read("acme", users[i % 10], max_staleness=5)
                    timings.append((time.monotonic() - started, result))
                    lags.append(lag.worst)
                    assert result.props == {"v": 1}
            finally:
                frozen.thaw()
            return timings

    with raw, SchedulingLag() as lag:
        timings = asyncio.run(main())
    check_frozen_replica_timings(timings, raw.worst, frozen.name, deadline, lags)
