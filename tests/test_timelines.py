"""Timelines in tokens and proofs: a failover that loses acknowledged writes is detected.

Reproduced without an HA manager: a standby whose receiver was cut misses the last writes,
the primary dies and that standby is promoted (timeline 2 branches off timeline 1 before
them). The other standby had received them: its WAL is not a prefix of the new history.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from propstore import PropertyStore, Token, Topology, WriteLostError
from propstore.lsn import LSN
from propstore.timeline import TimelineHistory, WriteMark
from tests.test_store import wait_for


def test_history_file_places_positions_and_writes() -> None:
    history = TimelineHistory.parse(3, "1\t0/3000060\tno recovery target specified\n\n"
                                       "2\t0/5000A28\tno recovery target specified\n")
    switch = LSN.parse("0/5000A28")
    assert history.holds(3, LSN(1 << 40)) and history.holds(2, switch)
    assert not history.holds(2, LSN(switch + 1)) and not history.holds(4, LSN(0))
    assert history.verdict(WriteMark(2, switch, LSN(switch - 100))) == "held"
    assert history.verdict(WriteMark(2, LSN(switch + 200), LSN(switch))) == "lost"
    assert history.verdict(WriteMark(2, LSN(switch + 200), LSN(switch - 8))) == "unknown"
    assert history.verdict(WriteMark(4, LSN(0), LSN(0))) == "ahead"
    assert history.verdict(WriteMark(None, LSN(1 << 40), LSN(0))) == "held"
    unknown = TimelineHistory.unknown(3)
    assert unknown.holds(2, LSN(0)) is None and unknown.verdict(WriteMark(2, LSN(9), LSN(1))) == (
        "unknown"
    )


def test_token_string_carries_timelines_and_old_tokens_still_parse() -> None:
    mark = WriteMark(2, LSN.parse("0/5000B10"), LSN.parse("0/5000A00"))
    older = WriteMark(1, LSN.parse("0/4FFFF00"), LSN.parse("0/4FFFE00"))
    token = Token((("s0", mark),)) | Token((("s0", older),)) | Token.of({"s1": 0x10})
    text = str(token)
    assert text == "pst2.s0.1-4ffff00-100_2-5000b10-110.s1.0-10-0"
    assert Token.parse(text) == token and token.marks_for("s0") == (older, mark)
    assert token.lsn_for("s0") == mark.lsn
    legacy = Token.parse("pst1.s0.5000b10")
    assert legacy.marks_for("s0") == (WriteMark(None, mark.lsn, mark.lsn),)


def test_lost_writes_raise_and_a_diverged_standby_never_serves(cluster_factory: Any) -> None:
    from propstore.migrate import upgrade

    cluster = cluster_factory(shards=1, replicas=2)
    upgrade(cluster.shards[0].primary.dsn)
    cluster.wait_caught_up()
    old, new, diverged = (cluster.shards[0].primary, *cluster.shards[0].replicas)
    topology = Topology.load(cluster.config_path)
    shard = topology.shards[0].name
    with PropertyStore(topology) as store:
        kept = [store.set("acme", f"kept-{i}", {"v": 1}) for i in range(20)]
        cluster.wait_caught_up()
        new.disconnect_receiver()
        lost = [store.set("acme", f"lost-{i}", {"v": 1}) for i in range(20)]
        wait_for(lambda: (diverged.replay_lsn() or 0) >= max(t.lsn_for(shard) or 0 for t in lost))
        old.kill()
        new.promote()
        wait_for(lambda: (p := store.shard_views()[0].primary) is not None
                 and p.name == new.name and store.shard_views()[0].timelines is not None
                 and store.shard_views()[0].timelines.complete, timeout=30)
        view = store.shard_views()[0]
        assert view.timelines is not None and view.timelines.timeline == 2
        for _ in range(200):  # the diverged standby holds newer LSNs than anyone: never used
            result = store.read("acme", "kept-0", max_staleness=60)
            assert result.node != diverged.name
        # The standby that received the lost writes is on timeline 1 past the switch point.
        wait_for(lambda: _node(store, diverged.name).state == "other timeline")
        for i, token in enumerate(kept):
            result = store.read("acme", f"kept-{i}", after=token)
            assert result.props == {"v": 1} and result.node != diverged.name
        detected = 0
        for i, token in enumerate(lost):
            with pytest.raises(WriteLostError, match=shard) as caught:
                store.read("acme", f"lost-{i}", after=str(token))
            assert caught.value.timeline == 1
            detected += 1
        # Writes go on on timeline 2 and their tokens say so.
        token = store.set("acme", "after", {"v": 2})
        assert [m.timeline for m in token.marks_for(shard)] == [2]
        assert store.get("acme", "after", after=token) == {"v": 2}
    print(f"timelines: lost-write tokens detected {detected}/{len(lost)}, "
          f"kept {len(kept)}/{len(kept)} readable")


def _node(store: PropertyStore, name: str) -> Any:
    return next(n for n in store.shard_views()[0].nodes if n.name == name)


def test_a_token_read_right_after_start_waits_for_the_first_primary_poll(
    topology: Topology,
) -> None:
    # The monitor's first round can outlast start-up on a busy host: until it has seen the
    # primary, a token's timeline cannot be placed. The read waits for it (bounded by
    # primary_deadline) instead of refusing what the healthy primary can serve.
    with PropertyStore(topology, start_monitor=False) as store:
        token = store.set("acme", "first-poll", {"v": 1})
        shard = topology.shard_index_of("acme", "first-poll")
        assert store.shard_views()[shard].timelines is None
        starter = threading.Timer(0.3, store.monitor.start)
        starter.start()
        try:
            assert store.get("acme", "first-poll", after=token) == {"v": 1}
        finally:
            starter.join(10)
