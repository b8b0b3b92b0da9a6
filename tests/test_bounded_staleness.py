"""The core promise, tested as a property: no read is ever older than its budget.

Hypothesis drives random schedules of writes, replay pauses and resumes, apply delays, waits
and reads with random budgets against the real cluster. For every read, the value returned
must be at least as new as every write acknowledged more than ``max_staleness`` before the
read started, and token reads must see the write that made the token.
"""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from propstore import PropertyStore, Topology
from propstore.sandbox import LocalCluster
from tests import claims
from tests.conftest import users_on_shard

USERS = 3
BUDGETS = [0.0, 0.02, 0.1, 0.3, 1.0, 3.0]

reads = st.tuples(st.just("read"), st.integers(0, USERS - 1), st.sampled_from(BUDGETS))
ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, USERS - 1)),
        reads, reads, reads,
        st.tuples(st.just("token_read"), st.integers(0, USERS - 1)),
        st.tuples(st.just("pause"), st.integers(0, 1)),
        st.tuples(st.just("resume"), st.integers(0, 1)),
        st.tuples(st.just("delay"), st.integers(0, 1), st.sampled_from([0.05, 0.3, 1.0])),
        st.tuples(st.just("undelay"), st.integers(0, 1)),
        st.tuples(st.just("wait"), st.sampled_from([0.01, 0.05, 0.2])),
    ),
    min_size=20,
    max_size=60,
)


@pytest.mark.slow
def test_no_read_is_older_than_its_budget_under_random_lag(
    migrated_cluster: LocalCluster, propstore_clean_state: LocalCluster
) -> None:
    cluster = propstore_clean_state
    assert cluster.config_path is not None
    topology = Topology.load(cluster.config_path)
    replicas = cluster.shards[0].replicas
    checked = {"reads": 0, "replica_reads": 0, "examples": 0}

    with PropertyStore(topology) as store:

        @settings(max_examples=claims.HYPOTHESIS_SCHEDULES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(schedule=ops)
        def run(schedule: list[tuple[Any, ...]]) -> None:
            # Fresh users for every example: a replica still showing an earlier example's
            # (higher) seq must not pass for fresh data.
            checked["examples"] += 1
            users = users_on_shard(topology, topology.shards[0].name, USERS,
                                   prefix=f"prop{checked['examples']}")
            # acked[user] = [(ack time, seq)], seq increasing per user; before the first
            # write a read may find no user (seq -1).
            acked: dict[int, list[tuple[float, int]]] = {u: [(-math.inf, -1)]
                                                         for u in range(USERS)}
            tokens: dict[int, Any] = {}
            for u in range(USERS):
                tokens[u] = store.replace("acme", users[u], {"seq": 0})
                acked[u].append((time.monotonic(), 0))
            try:
                for op in schedule:
                    kind = op[0]
                    if kind == "write":
                        u = op[1]
                        seq = acked[u][-1][1] + 1
                        tokens[u] = store.replace("acme", users[u], {"seq": seq})
                        acked[u].append((time.monotonic(), seq))
                    elif kind == "read":
                        u, budget = op[1], op[2]
                        started = time.monotonic()
                        result = store.read("acme", users[u], max_staleness=budget)
                        required = max(s for t, s in acked[u] if t < started - budget)
                        seq = result.props["seq"] if result.props is not None else -1
                        assert seq >= required, (result, required)
                        assert result.staleness_bound <= budget
                        checked["reads"] += 1
                        checked["replica_reads"] += result.from_replica
                    elif kind == "token_read":
                        u = op[1]
                        result = store.read("acme", users[u], after=tokens[u])
                        assert result.props is not None
                        assert result.props["seq"] == acked[u][-1][1]
                        checked["reads"] += 1
                        checked["replica_reads"] += result.from_replica
                    elif kind == "pause":
                        replicas[op[1]].pause_replay()
                    elif kind == "resume":
                        replicas[op[1]].resume_replay()
                    elif kind == "delay":
                        replicas[op[1]].set_apply_delay(op[2])
                    elif kind == "undelay":
                        replicas[op[1]].clear_apply_delay()
                    elif kind == "wait":
                        time.sleep(op[1])  # part of the schedule: lets lag build up
            finally:
                for replica in replicas:
                    replica.clear_apply_delay()
                    replica.resume_replay()

        run()
    print(f"bounded staleness: {checked['examples']} schedules, {checked['reads']} reads "
          f"checked, {checked['replica_reads']} from replicas, 0 violations")
    assert checked["examples"] >= claims.HYPOTHESIS_SCHEDULES
    assert checked["reads"] > 0 and checked["replica_reads"] > 0
