"""Routing decisions over monitor views (pure)."""

from __future__ import annotations

from propstore import STRONG, Freshness, Token
from propstore.monitor._state import apply_observation, initial_views
from propstore.router import FallbackLimiter, route
from tests.test_monitor_state import TOPO, primary_poll, replica_poll


def shard_with_replica(replica_lsn: int, primary_lsn: int = 100, **kw: bool):  # type: ignore[no-untyped-def]
    view = initial_views(TOPO.shards, 0.0)[0]
    view = apply_observation(view, 0, primary_poll(0.0, 100), 16)
    view = apply_observation(view, 0, primary_poll(1.0, primary_lsn), 16)
    return apply_observation(view, 1, replica_poll(1.0, replica_lsn, **kw), 16)


def test_fresh_replica_is_the_candidate() -> None:
    decision = route(shard_with_replica(100), Freshness.bounded(1.0), 1.5)
    assert [c.node.name for c in decision.candidates] == ["a-replica1"]
    assert decision.fallback_reason is None


def test_stale_replica_sends_the_read_to_the_primary_with_a_reason() -> None:
    decision = route(shard_with_replica(100, primary_lsn=200), Freshness.bounded(0.2), 1.5)
    assert decision.candidates == ()
    assert decision.fallback_reason == "replica_stale"
    assert "a-primary" in decision.explain()


def test_token_beyond_replay_rejects_the_replica() -> None:
    token = Token.of({"a": 150})
    assert route(shard_with_replica(149), Freshness.after_token(token), 1.0).candidates == ()
    assert route(shard_with_replica(150), Freshness.after_token(token), 1.0).candidates


def test_strong_reads_never_consider_replicas() -> None:
    decision = route(shard_with_replica(100), STRONG, 1.0)
    assert decision.candidates == () and decision.fallback_reason == "strong"


def test_shard_without_replicas_says_so() -> None:
    view = initial_views(TOPO.shards, 0.0)[1]
    assert route(view, Freshness.bounded(5), 1.0).fallback_reason == "no_replica"


def test_fallback_limiter_caps_the_rate() -> None:
    limiter = FallbackLimiter(10, now=0.0)
    assert sum(limiter.try_acquire(0.0) for _ in range(50)) == 10
    assert sum(limiter.try_acquire(0.5) for _ in range(50)) == 5
    assert FallbackLimiter(0, 0.0).try_acquire(0.0)


def test_streaming_replica_short_of_a_token_is_tried_tentatively() -> None:
    token = Token.of({"a": 150})
    decision = route(shard_with_replica(140), Freshness.after_token(token), 1.0)
    assert decision.candidates == () and [c.node.name for c in decision.tentative] == [
        "a-replica1"
    ]
    paused = route(shard_with_replica(140, paused=True), Freshness.after_token(token), 1.0)
    assert paused.tentative == ()  # a paused replica will not catch up: straight to primary


def test_a_cached_decision_equals_route_until_a_candidate_could_leave_the_budget() -> None:
    from propstore.router import DecisionCache

    cache, view, budget = DecisionCache(1), shard_with_replica(100), Freshness.bounded(1.0)
    # Replica at the primary's newest sample (sent at 1.0): admitted until t = 2.0.
    for at in (1.1, 1.5, 1.99, 2.01, 2.5):
        cached, fresh = cache.decide(view, budget, at, 0), route(view, budget, at)
        assert [c.node.name for c in cached.candidates] == [
            c.node.name for c in fresh.candidates], at
        assert cached.fallback_reason == fresh.fallback_reason, at
    assert cache.decide(view, budget, 2.01, 0).candidates == ()  # past it: re-decided
    # A new view (the monitor's next observation) is never answered from the old one.
    later = apply_observation(view, 1, replica_poll(3.0, 100), 16)
    assert cache.decide(later, budget, 3.0, 0).shard is later


def test_a_cached_token_decision_equals_route_for_every_token_on_the_same_view() -> None:
    from propstore.router import DecisionCache

    cache = DecisionCache(1)
    for view in (shard_with_replica(149), shard_with_replica(150),
                 shard_with_replica(140, paused=True)):
        # Tokens each side of the replica's LSN, in an order that reuses every cached key;
        # one naming only another shard (no position required on this one).
        for lsn in (150, 149, 100, 151, 150, 10_000, 149):
            for token in (Token.of({"a": lsn}), Token.of({"b": lsn})):
                budget = Freshness.after_token(token)
                cached, fresh = cache.decide(view, budget, 1.0, 0), route(view, budget, 1.0)
                assert cached.freshness is budget and cached.shard is view  # its own token
                for part in ("candidates", "tentative", "rejected"):
                    assert [(type(c).__name__, c.node.name) for c in getattr(cached, part)] == [
                        (type(c).__name__, c.node.name) for c in getattr(fresh, part)], (
                        lsn, part)
                assert [r.reason for r in cached.rejected] == [r.reason for r in fresh.rejected]
                assert cached.fallback_reason == fresh.fallback_reason, lsn
    # A budget with a token and a staleness bound is routed afresh (it depends on the time).
    both = Freshness.after_token(Token.of({"a": 150})) & Freshness.bounded(1.0)
    assert cache.decide(shard_with_replica(150), both, 1.5, 0).candidates
    assert cache.decide(shard_with_replica(150), both, 2.5, 0).candidates == ()
