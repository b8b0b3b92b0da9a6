"""The staleness arithmetic, driven by explicit times (no servers, no sleeping)."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from propstore import Freshness, Topology
from propstore.lsn import LSN
from propstore.monitor import LagHistory, Observation
from propstore.monitor._state import (
    apply_failure,
    apply_observation,
    apply_unanswered,
    initial_views,
)
from propstore.router import DecisionCache, route
from tests.test_config import BASE

TOPO = Topology.from_toml(BASE, environ={})


def primary_poll(at: float, lsn: int) -> Observation:
    return Observation(at, False, LSN(lsn), None, False, False, 1)


def replica_poll(at: float, lsn: int, *, paused: bool = False, streaming: bool = True
                 ) -> Observation:
    return Observation(at, True, LSN(lsn), LSN(lsn), paused, streaming, 1)


def test_idle_primary_keeps_a_caught_up_replica_fresh() -> None:
    # The classic now() - pg_last_xact_replay_timestamp() grows forever here.
    view = initial_views(TOPO.shards, 0.0)[0]
    for t in range(100):
        view = apply_observation(view, 0, primary_poll(float(t), 500), 16)
        view = apply_observation(view, 1, replica_poll(float(t), 500), 16)
    assert view.staleness_bound(view.nodes[1], 99.05) < 0.1


def test_disconnected_receiver_bound_grows_with_the_clock_never_zero() -> None:
    # "receive == replay means no lag" reads 0 here; the sound bound grows.
    view = initial_views(TOPO.shards, 0.0)[0]
    view = apply_observation(view, 0, primary_poll(0.0, 100), 16)
    view = apply_observation(view, 1, replica_poll(0.0, 100, streaming=False), 16)
    for t in range(1, 30):
        view = apply_observation(view, 0, primary_poll(float(t), 100 + t), 16)
    replica = view.nodes[1]
    assert replica.state == "receiver disconnected"
    assert view.staleness_bound(replica, 30.0) == 30.0


def test_paused_replica_is_reported_paused_and_ages() -> None:
    view = initial_views(TOPO.shards, 0.0)[0]
    view = apply_observation(view, 0, primary_poll(0.0, 100), 16)
    view = apply_observation(view, 1, replica_poll(0.0, 100, paused=True), 16)
    view = apply_observation(view, 0, primary_poll(5.0, 200), 16)
    assert view.nodes[1].state == "paused"
    assert view.staleness_bound(view.nodes[1], 6.0) == 6.0
    assert view.bytes_behind(view.nodes[1]) == 100


def test_history_stays_bounded_and_still_bounds_a_far_behind_replica() -> None:
    history = LagHistory()
    for t in range(10_000):
        history = history.record(float(t), LSN(100 + t), maxlen=16)
        assert len(history.lsns) <= 16
    assert history.bound(LSN(100), 10_000.0) == 10_000.0  # oldest sample is kept
    assert history.bound(LSN(99), 10_000.0) == math.inf   # older than any sample: unprovable
    assert history.bound(LSN(10_099), 10_000.0) == 1.0    # newest samples are exact


@given(st.lists(st.tuples(st.floats(0, 0.5), st.integers(0, 50)), min_size=1, max_size=60),
       st.integers(0, 3000), st.floats(0, 100))
def test_bound_is_the_latest_sample_covered_by_the_replay_lsn(
    steps: list[tuple[float, int]], replay: int, extra: float
) -> None:
    history, t, lsn, samples = LagHistory(), 0.0, 0, []
    for dt, dl in steps:
        t, lsn = t + dt, lsn + dl
        history = history.record(t, LSN(lsn), maxlen=1000)
        samples.append((t, lsn))
    now = t + extra
    covered = [ts for ts, p in samples if p <= replay]
    expected = max(0.0, now - max(covered)) if covered else math.inf
    assert history.bound(LSN(replay), now) == expected


def test_promotion_is_followed_and_old_history_dropped() -> None:
    view = initial_views(TOPO.shards, 0.0)[0]
    view = apply_observation(view, 0, primary_poll(0.0, 100), 16)
    view = apply_failure(view, 0, 1.0, "refused", 2)
    view = apply_failure(view, 0, 1.1, "refused", 2)
    assert view.nodes[0].state == "down" and view.primary is None
    view = apply_observation(view, 1, primary_poll(2.0, 150), 16)
    assert view.primary is view.nodes[1]
    assert view.history.lsns == (LSN(150),)


def test_two_failures_mark_a_node_down_and_one_success_brings_it_back() -> None:
    view = initial_views(TOPO.shards, 0.0)[0]
    view = apply_observation(view, 1, replica_poll(0.0, 1), 16)
    view = apply_failure(view, 1, 0.1, "refused", 2)
    assert view.nodes[1].up
    view = apply_failure(view, 1, 0.2, "refused", 2)
    assert view.nodes[1].state == "down"
    view = apply_observation(view, 1, replica_poll(0.3, 1), 16)
    assert view.nodes[1].up


def test_an_unanswered_poll_is_no_new_proof_and_never_down_by_itself() -> None:
    # A starved machine answers late: the replica stays up, its last observation keeps
    # proving a bound that grows with the clock, and it stays a candidate while that bound
    # is within the budget.
    view = initial_views(TOPO.shards, 0.0)[0]
    view = apply_observation(view, 0, primary_poll(0.0, 100), 16)
    view = apply_observation(view, 1, replica_poll(0.0, 100), 16)
    for k in range(1, 20):  # every poll and read late, for 1.9 s
        view = apply_unanswered(view, 1, 0.1 * k, "poll unanswered after 250 ms")
        view = apply_unanswered(view, 0, 0.1 * k, "read deadline exceeded")
    replica = view.nodes[1]
    assert replica.state == "up" and replica.unanswered_since == 0.1
    assert view.primary is view.nodes[0]
    assert view.staleness_bound(replica, 1.9) == 1.9
    assert [c.node.name for c in route(view, Freshness(max_staleness=5.0), 1.9).candidates] == [
        replica.name]
    assert not route(view, Freshness(max_staleness=1.0), 1.9).candidates  # the bound decides
    # The late answer is an observation like any other.
    view = apply_observation(view, 1, replica_poll(1.0, 100), 16)
    assert view.nodes[1].unanswered_since is None
    assert view.staleness_bound(view.nodes[1], 1.9) == 1.9  # the primary sample at 0 covers


def test_silence_for_the_limit_marks_down_at_once_shorter_silence_does_not() -> None:
    view = initial_views(TOPO.shards, 0.0)[0]
    view = apply_observation(view, 1, replica_poll(10.0, 1), 16)
    view = apply_failure(view, 1, 11.9, "no answer for 1.9 s", 2, silence_limit=2.0)
    assert view.nodes[1].up  # one failure, and silent for less than the limit
    view = apply_observation(view, 1, replica_poll(12.0, 1), 16)
    view = apply_failure(view, 1, 14.0, "no answer for 2.0 s", 2, silence_limit=2.0)
    assert view.nodes[1].state == "down" and view.nodes[1].failures == 1


TWO_REPLICAS = Topology.from_toml(BASE.replace(
    'replicas = ["host=127.0.0.1 port=6002 dbname=propstore user=postgres"]',
    'replicas = ["host=127.0.0.1 port=6002 dbname=propstore user=postgres", '
    '"host=127.0.0.1 port=6004 dbname=propstore user=postgres"]'), environ={})


def test_a_late_replica_is_tried_last_in_every_rotation_and_served_stale_last() -> None:
    # A frozen replica must not cost every other read its deadline, nor a slow one be
    # dropped: the replica that missed a deadline stays a candidate, behind the others.
    view = initial_views(TWO_REPLICAS.shards, 0.0)[0]
    view = apply_observation(view, 0, primary_poll(0.0, 100), 16)
    for node in (1, 2):
        view = apply_observation(view, node, replica_poll(0.0, 100), 16)
    budget = Freshness(max_staleness=5.0)
    firsts = {route(view, budget, 0.5, r).candidates[0].node.name for r in range(4)}
    assert len(firsts) == 2  # both answer: reads share them
    view = apply_unanswered(view, 1, 0.2, "read deadline exceeded")
    cache = DecisionCache(1)
    for r in range(4):
        for decision in (route(view, budget, 0.5, r), cache.decide(view, budget, 0.5, r)):
            assert [c.index for c in decision.candidates] == [2, 1]
    stale = route(view, Freshness(max_staleness=0.1), 0.5)
    assert not stale.candidates and stale.freshest is not None
    assert stale.freshest.node.name == view.nodes[2].name


def test_a_late_only_replica_gives_way_to_an_answering_primary_and_stays_for_serve_stale(
) -> None:
    # A frozen only replica must cost one read its deadline, not every read until the
    # silence limit: while the primary answers it serves, and the late replica is kept
    # (with its proven bound) for serve-stale and for reads whose primary is late too.
    view = initial_views(TOPO.shards, 0.0)[0]
    view = apply_observation(view, 0, primary_poll(0.0, 100), 16)
    view = apply_observation(view, 1, replica_poll(0.0, 100), 16)
    budget = Freshness(max_staleness=5.0)
    assert [c.index for c in route(view, budget, 0.5).candidates] == [1]
    view = apply_unanswered(view, 1, 0.2, "read deadline exceeded")
    cache = DecisionCache(1)
    for decision in (route(view, budget, 0.5), cache.decide(view, budget, 0.5, 0)):
        assert not decision.candidates and decision.fallback_reason == "replica_timeout"
        assert decision.freshest is not None and decision.freshest.index == -1
        assert decision.freshest.node.name == view.nodes[1].name
        assert decision.freshest.staleness_bound == view.staleness_bound(view.nodes[1], 0.5)
    late_primary = apply_unanswered(view, 0, 0.3, "poll unanswered after 250 ms")
    assert [c.index for c in route(late_primary, budget, 0.5).candidates] == [1]
    answered = apply_observation(view, 1, replica_poll(0.6, 100), 16)
    assert [c.index for c in route(answered, budget, 0.7).candidates] == [1]
