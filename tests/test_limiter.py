"""The primary's fallback limiter (pure): time is driven, never waited for."""

from __future__ import annotations

import tracemalloc

import pytest

from propstore._limiter import LimiterSettings, PrimaryLimiter, Turn


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run(limiter: PrimaryLimiter, clock: Clock, *, demand: int, latency: float,
        seconds: float, priority_share: int = 0, on_primary: float | None = None
        ) -> dict[str, int]:
    """Keep ``demand`` reads in flight for ``seconds`` of driven time, each taking
    ``latency`` (``on_primary`` of it on the primary: default all of it); every
    ``priority_share``-th read is a priority read. Counts outcomes."""
    counts = {"admitted": 0, "shed": 0, "priority_shed": 0, "priority": 0}
    end = clock.now + seconds
    n = 0
    while clock.now < end:
        admitted = []
        for _ in range(demand):
            n += 1
            priority = bool(priority_share) and n % priority_share == 0
            shed = limiter.admit(priority)
            if shed is None:
                admitted.append(priority)
                counts["priority" if priority else "admitted"] += 1
            else:
                counts["priority_shed" if priority else "shed"] += 1
        clock.now += latency
        for _ in admitted:
            limiter.done(latency, on_primary)
    return counts


def test_no_read_is_shed_while_the_primary_latency_stays_normal() -> None:
    clock = Clock()
    limiter = PrimaryLimiter(LimiterSettings(), clock)
    run(limiter, clock, demand=2, latency=0.001, seconds=1)  # the normal band is learned
    # A surge: 40x the in-flight reads, at the same latency (the primary carries it).
    counts = run(limiter, clock, demand=80, latency=0.0012, seconds=0.5)
    assert counts["admitted"] > 30_000 and counts["shed"] == 0
    assert limiter.limit >= 80 and limiter.healthy


def test_rising_latency_sheds_budgeted_reads_and_never_priority_reads() -> None:
    clock = Clock()
    limiter = PrimaryLimiter(LimiterSettings(tolerance=2.0), clock)
    run(limiter, clock, demand=20, latency=0.003, seconds=1)
    assert limiter.limit >= 20
    # The primary slows to 5x its normal latency under the same demand.
    counts = run(limiter, clock, demand=20, latency=0.015, seconds=2, priority_share=4)
    assert not limiter.healthy
    assert counts["shed"] > 0 and counts["priority_shed"] == 0 and counts["priority"] > 0
    assert limiter.limit < 20
    state = limiter.state()
    assert dict(state.shed)["primary_overloaded"] == counts["shed"]
    assert "congested" in str(state)


def test_the_limit_comes_back_when_latency_does() -> None:
    clock = Clock()
    limiter = PrimaryLimiter(LimiterSettings(), clock)
    run(limiter, clock, demand=20, latency=0.003, seconds=1)
    run(limiter, clock, demand=20, latency=0.03, seconds=2)
    assert not limiter.healthy
    counts = run(limiter, clock, demand=20, latency=0.003, seconds=2)
    assert limiter.healthy
    late = run(limiter, clock, demand=20, latency=0.003, seconds=1)
    assert late["shed"] == 0 and counts["admitted"] > 0


def test_a_short_overload_does_not_become_the_new_normal() -> None:
    clock = Clock()
    settings = LimiterSettings(baseline_window=60.0, tolerance=2.0)
    limiter = PrimaryLimiter(settings, clock)
    run(limiter, clock, demand=10, latency=0.002, seconds=2)
    run(limiter, clock, demand=10, latency=0.010, seconds=10)
    assert not limiter.healthy  # ten seconds at 5x: still an overload
    baseline = limiter.state().baseline
    # The band moved (the baseline creeps up with a 60 s time constant), not to the overload.
    assert baseline is not None and baseline < 0.002 * 2


def test_a_lasting_change_of_normal_latency_is_relearned() -> None:
    clock = Clock()
    limiter = PrimaryLimiter(LimiterSettings(baseline_window=5.0), clock)
    run(limiter, clock, demand=10, latency=0.002, seconds=2)
    run(limiter, clock, demand=10, latency=0.006, seconds=40)
    assert limiter.healthy


def test_the_configured_ceiling_caps_budgeted_reads_but_not_priority_reads() -> None:
    clock = Clock()
    limiter = PrimaryLimiter(LimiterSettings(adaptive=False, max_concurrency=3), clock)
    assert [limiter.admit(False) for _ in range(4)] == [None, None, None, "fallback_ceiling"]
    assert limiter.admit(True) is None and limiter.in_flight == 4
    limiter.done(0.001)
    limiter.done(0.001)
    assert limiter.admit(False) is None
    assert limiter.limit == 3


def test_reads_beyond_the_limit_queue_for_their_turn_first_come_first_served() -> None:
    clock = Clock()
    granted: list[Turn] = []
    limiter = PrimaryLimiter(LimiterSettings(adaptive=False, max_concurrency=2), clock,
                             granted.append)
    assert [limiter.admit(False) for _ in range(2)] == [None, None]
    first, second, third = Turn(), Turn(), Turn()
    assert [limiter.queue(t) for t in (first, second, third)] == ["fallback_ceiling"] * 3
    assert limiter.state().queued == 3 and limiter.state().shed == ()  # queued, not shed
    # A read arriving now does not overtake them; a priority read is admitted as ever.
    assert limiter.admit(False) == "fallback_ceiling"
    assert limiter.admit(True) is None and limiter.in_flight == 3
    limiter.done(0.001)
    assert granted == []  # 2 in flight: still no room
    limiter.done(0.001)
    assert granted == [first] and first.granted and limiter.in_flight == 2
    limiter.leave(second)  # gave up waiting (or a replica served it): out of the queue
    limiter.done(0.001)
    assert granted == [first, third] and not second.granted
    assert limiter.take(first) and limiter.take(third)
    # A turn granted but not used hands its place on.
    late = Turn()
    assert limiter.queue(late) == "fallback_ceiling"
    limiter.done(0.001)
    assert late.granted
    limiter.leave(late)
    assert limiter.in_flight == 1 and limiter.state().queued == 0
    # One that got no turn is counted as shed once its wait is over.
    never = Turn()
    assert limiter.admit(False) is None and limiter.queue(never) == "fallback_ceiling"
    assert not limiter.take(never)
    limiter.declined("fallback_ceiling")
    assert dict(limiter.state().shed) == {"fallback_ceiling": 2}
    assert limiter.state().queued == 0


def test_a_burst_that_its_turns_absorb_ends_the_episode_and_is_never_shed() -> None:
    clock = Clock()
    granted: list[Turn] = []
    limiter = PrimaryLimiter(LimiterSettings(min_queue=16, baseline_in_flight=8), clock,
                             granted.append)
    primary_of(limiter, clock, demand=1, cpu=0.001, seconds=2)
    primary_of(limiter, clock, demand=64, cpu=0.001, seconds=2)  # an overload: an episode
    assert not limiter.healthy
    # Bursts beyond the limit (12 reads every 5 ms, the limit at most 8), queued and granted
    # as reads end, in band (1 ms each): nothing more is shed, and once that lasted a
    # standing time the episode ends and the limit follows demand again.
    assert limiter.limit <= 8
    shed_before = sum(count for _, count in limiter.state().shed)
    queued, end = 0, clock.now + 2.0
    while clock.now < end:
        burst = [Turn() for _ in range(12)]
        waiting = [turn for turn in burst if limiter.queue(turn) is not None]
        queued += len(waiting)
        while limiter.in_flight:
            clock.now += 0.001 / max(1, limiter.in_flight)
            limiter.done(0.001)
        assert all(turn.granted and limiter.take(turn) for turn in waiting)
        clock.now += 0.005
    assert queued > 0 and len(granted) == queued
    assert sum(count for _, count in limiter.state().shed) == shed_before
    assert limiter.healthy and limiter.state().queued == 0


def test_priority_reads_are_admitted_whatever_the_budgeted_load() -> None:
    clock = Clock()
    limiter = PrimaryLimiter(LimiterSettings(max_concurrency=8), clock)
    # A steady stream of budgeted reads holding every slot, on a slow primary.
    counts = run(limiter, clock, demand=200, latency=0.05, seconds=5, priority_share=10)
    assert counts["priority"] > 0 and counts["priority_shed"] == 0
    assert counts["shed"] > 0


def test_limiter_memory_does_not_grow_with_traffic() -> None:
    clock = Clock()
    limiter = PrimaryLimiter(LimiterSettings(), clock)
    run(limiter, clock, demand=50, latency=0.001, seconds=0.2)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        counts = run(limiter, clock, demand=50, latency=0.004, seconds=2, priority_share=3)
        counts2 = run(limiter, clock, demand=50, latency=0.001, seconds=1)
        for _ in range(5000):  # turns queued, granted or left: none stays behind
            turn = Turn()
            if limiter.queue(turn) is not None:
                limiter.leave(turn)
            else:
                limiter.done(0.001)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert counts["admitted"] + counts["shed"] + counts2["admitted"] > 50_000
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename")
                if stat.traceback[0].filename.endswith("_limiter.py"))
    assert grown < 2048


def test_a_short_excursion_above_the_band_sheds_nothing_a_standing_queue_does() -> None:
    clock = Clock()
    settings = LimiterSettings(min_queue=4)
    limiter = PrimaryLimiter(settings, clock)
    run(limiter, clock, demand=4, latency=0.002, seconds=2)  # normal: 2 ms
    # A burst (or a stall of the machine): 40 reads at 10x the normal latency, shorter
    # than standing_time. Every read is admitted, the limit follows the demand.
    burst = run(limiter, clock, demand=40, latency=0.02, seconds=settings.standing_time * 0.8)
    assert burst["shed"] == 0 and burst["admitted"] > 0
    run(limiter, clock, demand=4, latency=0.002, seconds=0.5)  # it drained
    # The same latency for longer than standing_time: a standing queue, shed.
    lasting = run(limiter, clock, demand=40, latency=0.02, seconds=settings.standing_time * 1.5)
    assert lasting["shed"] > 0
    assert not limiter.healthy


def test_a_queue_for_the_stores_own_connections_is_not_the_primarys_congestion() -> None:
    clock = Clock()
    settings = LimiterSettings(min_queue=4)
    limiter = PrimaryLimiter(settings, clock)
    run(limiter, clock, demand=2, latency=0.001, seconds=2)  # normal: 1 ms
    # 40 reads in flight for 3 standing times, each 20 ms of which 19 waiting for one of
    # the store's connections (a pool opening them, or too small): the primary answers in
    # 1 ms, so shedding would relieve it of nothing.
    queued = run(limiter, clock, demand=40, latency=0.02, on_primary=0.001,
                 seconds=settings.standing_time * 3)
    assert queued["admitted"] > 0 and queued["shed"] == 0 and limiter.healthy
    state = limiter.state()
    assert state.recent is not None and state.recent < 0.002
    # The same in-flight time spent on the primary: congested, shed.
    slow = run(limiter, clock, demand=40, latency=0.02, on_primary=0.02,
               seconds=settings.standing_time * 3)
    assert slow["shed"] > 0 and not limiter.healthy


def primary_of(limiter: PrimaryLimiter, clock: Clock, *, demand: int, cpu: float,
               seconds: float, pool: int = 8, priority_share: int = 0) -> dict[str, float]:
    """A primary that shares its CPU between the reads on it (each needs ``cpu`` seconds of
    it alone), behind a pool of ``pool`` connections: ``demand`` reads ask each round, those
    admitted run ``pool`` at a time. Counts outcomes and the reads on the primary at once."""
    counts = {"admitted": 0, "shed": 0, "priority_shed": 0, "rounds": 0, "on_primary": 0.0}
    end, n = clock.now + seconds, 0
    while clock.now < end:
        admitted = 0
        for _ in range(demand):
            n += 1
            priority = bool(priority_share) and n % priority_share == 0
            if limiter.admit(priority) is None:
                admitted += 1
                counts["admitted"] += 1
            else:
                counts["priority_shed" if priority else "shed"] += 1
        at_once = min(admitted, pool)
        on_primary = cpu * at_once
        waves = -(-admitted // pool)
        for i in range(admitted):
            clock.now += on_primary * waves / admitted
            limiter.done(on_primary * (i // pool + 1), on_primary)
        counts["rounds"] += 1
        counts["on_primary"] += at_once
    counts["on_primary"] /= max(1, counts["rounds"])
    return counts


def test_a_baseline_first_learned_under_a_surge_comes_down_to_the_quiet_answers() -> None:
    clock = Clock()
    limiter = PrimaryLimiter(LimiterSettings(min_queue=4), clock)
    # The first fallback reads come with the surge, already slowed by it (traced: 7.6 ms),
    # then the primary answers some reads at its quiet speed between the queued ones.
    run(limiter, clock, demand=4, latency=0.0076, seconds=0.2)
    for _ in range(20):
        run(limiter, clock, demand=4, latency=0.0003, seconds=0.001)
        run(limiter, clock, demand=4, latency=0.006, seconds=0.05)
    state = limiter.state()
    assert state.baseline is not None and state.baseline < 0.001  # the band: its floor
    # The band is back at its floor: a standing 8 ms on the primary is an overload.
    lasting = run(limiter, clock, demand=40, latency=0.008, seconds=3)
    assert lasting["shed"] > 0 and not limiter.healthy


def test_an_overload_is_shed_until_the_primary_is_back_in_its_band_not_until_our_queue_is() -> None:
    clock = Clock()
    limiter = PrimaryLimiter(LimiterSettings(min_queue=16, baseline_in_flight=8), clock)
    primary_of(limiter, clock, demand=1, cpu=0.001, seconds=2)  # normal: 1 ms alone
    # Twice what the pool carries in band: 8 reads on the primary take 8 ms each (the band
    # is 5 ms: 5x the normal 1 ms), and 64 callers queue for the pool's 8 connections.
    primary_of(limiter, clock, demand=64, cpu=0.001, seconds=2, priority_share=32)
    held = primary_of(limiter, clock, demand=64, cpu=0.001, seconds=3, priority_share=32)
    # Shedding relieves the primary, not only our queue: fewer of our reads on it at once
    # than the pool would put there, its latency back near the top of its band.
    assert held["shed"] > 0 and held["priority_shed"] == 0
    assert held["on_primary"] <= 6.5
    assert not limiter.healthy and limiter.limit <= 8
    # The surge ends: the episode ends once nothing was shed for a standing time, and the
    # limit follows demand again.
    primary_of(limiter, clock, demand=4, cpu=0.001, seconds=2)
    after = primary_of(limiter, clock, demand=40, cpu=0.0001, seconds=1)
    assert after["shed"] == 0 and limiter.healthy


def test_an_overload_held_at_the_pools_latency_is_shed() -> None:
    clock = Clock()
    limiter = PrimaryLimiter(LimiterSettings(min_queue=16, baseline_in_flight=8), clock)
    primary_of(limiter, clock, demand=1, cpu=0.0006, seconds=2)  # normal: 0.6 ms alone
    # 64 callers on a pool of 8: the primary's reads take 8 x 0.6 = 4.8 ms, never more (the
    # pool caps what it sees), 8x normal. A 5 ms floor on the band kept this "healthy".
    primary_of(limiter, clock, demand=64, cpu=0.0006, seconds=2)
    held = primary_of(limiter, clock, demand=64, cpu=0.0006, seconds=3)
    assert held["shed"] > 0 and held["on_primary"] <= 5.0
    assert not limiter.healthy


def test_a_primary_slow_whatever_our_load_is_not_shed_at_for_long() -> None:
    clock = Clock()
    limiter = PrimaryLimiter(LimiterSettings(min_queue=4), clock)
    run(limiter, clock, demand=4, latency=0.001, seconds=2)  # normal: 1 ms
    # A stall of the machine (or another client's load): 20 ms a read however few of ours
    # are on the primary. An episode cuts the limit to its least; a standing time there
    # with the primary still slow ends it (shedding ours relieves nothing), and no new one
    # begins while the primary stays slow: the first seconds shed, the rest are served.
    first = run(limiter, clock, demand=40, latency=0.02, seconds=3)
    rest = run(limiter, clock, demand=40, latency=0.02, seconds=6)
    assert first["shed"] > 0 and rest["shed"] == 0
    # Once the primary was back in its band, an overload our load causes is shed again.
    primary_of(limiter, clock, demand=1, cpu=0.001, seconds=1)
    again = primary_of(limiter, clock, demand=64, cpu=0.001, seconds=3)
    assert again["shed"] > 0 and again["on_primary"] <= 6.5



def test_an_episode_at_its_least_limit_outlasts_a_standing_time_of_the_primary_draining(
) -> None:
    clock = Clock()
    settings = LimiterSettings(min_queue=4)
    assert settings.stall_time > 2 * settings.standing_time
    limiter = PrimaryLimiter(settings, clock)
    run(limiter, clock, demand=4, latency=0.001, seconds=2)  # normal: 1 ms
    # An overload: the limit comes down to its least, and the primary is still slow there
    # for a while (it drains what was admitted before the cut, and reads only it serves).
    run(limiter, clock, demand=40, latency=0.02, seconds=settings.standing_time * 2)
    assert limiter.limit == settings.min_limit and not limiter.healthy
    # Held there for most of a stall time: still the overload's episode, still shedding.
    held = run(limiter, clock, demand=40, latency=0.02, seconds=settings.stall_time * 0.7)
    assert held["shed"] > 0 and not limiter.healthy
    late = run(limiter, clock, demand=40, latency=0.02, seconds=settings.standing_time / 2)
    assert late["shed"] > 0 and late["admitted"] > 0
    # Past the stall time the slowness is not ours: no more shedding.
    run(limiter, clock, demand=40, latency=0.02, seconds=settings.stall_time)
    after = run(limiter, clock, demand=40, latency=0.02, seconds=settings.stall_time)
    assert after["shed"] == 0 and after["admitted"] > 0


def queued_primary(limiter: PrimaryLimiter, clock: Clock, *, phases: list[tuple[int, float]],
                   cpu: float, wait: float, pool: int = 8) -> list[dict[str, float]]:
    """Readers that each keep one budgeted read going the store's way: ``queue`` for a turn,
    then wait up to ``wait`` for it (``take``, or ``declined``) and ask again, as many as
    each ``(readers, seconds)`` phase says, for its seconds (a reader beyond the phase's
    count asks no more). Admitted reads run ``pool`` at a time on a primary that shares its
    CPU between them (each needs ``cpu`` seconds of it alone), time moving in steps of a
    tenth of that. Per phase: outcomes, the reads on the primary at once on average, and
    at its end the limit and whether the limiter said the primary was healthy."""
    step = cpu / 10
    waiting: dict[Turn, float] = {}  # turn -> when its wait ends
    pending: list[float] = []  # admitted, waiting for a connection: since when
    running: list[list[float]] = []  # [cpu left, admitted at, on a connection at]
    out: list[dict[str, float]] = []
    readers = 0

    def ask(wanted: int) -> None:
        nonlocal readers
        if readers >= wanted:
            return
        readers += 1
        turn = Turn()
        if limiter.queue(turn) is None:
            pending.append(clock.now)
        else:
            waiting[turn] = clock.now + wait

    for wanted, seconds in phases:
        counts = {"served": 0, "declined": 0, "on_primary": 0.0}
        steps, end = 0, clock.now + seconds
        while readers < wanted:
            ask(wanted)
        while clock.now < end:
            for turn, until in list(waiting.items()):
                if turn.granted and limiter.take(turn):
                    del waiting[turn]
                    pending.append(clock.now)
                elif clock.now >= until:
                    del waiting[turn]
                    assert not limiter.take(turn)
                    limiter.declined("primary_overloaded")
                    counts["declined"] += 1
                    readers -= 1
                    ask(wanted)
            while pending and len(running) < pool:
                running.append([cpu, pending.pop(0), clock.now])
            clock.now += step
            share = step / max(1, len(running))
            for read in running:
                read[0] -= share
            for read in [r for r in running if r[0] <= 1e-12]:
                running.remove(read)
                limiter.done(clock.now - read[1], clock.now - read[2])
                counts["served"] += 1
                readers -= 1
                ask(wanted)
            counts["on_primary"] += len(running)
            steps += 1
        counts["on_primary"] /= max(1, steps)
        counts["healthy"], counts["limit"] = limiter.healthy, limiter.limit
        out.append(counts)
    return out


def test_an_episode_holds_while_reads_queue_for_their_turn_though_none_is_shed() -> None:
    clock = Clock()
    limiter = PrimaryLimiter(LimiterSettings(), clock)
    # 64 readers that would rather wait (200 ms) than be refused, on a primary whose reads
    # each need 0.6 ms of its CPU: with the pool's 8 on it, 4.8 ms each, above the band
    # (5 x 0.6 ms). An episode begins; the limit then holds the reads on the primary near
    # the top of its band, and every read beyond it waits its turn and is served in it, so
    # none is shed. A limiter that ended the episode for want of sheds (traced in the surge
    # benchmark: an episode a second, each over within 50 ms as the cut brought the
    # primary back into its band) gave the whole demand back to the primary at once.
    # The readers then go: the queue drains, and a standing time later the episode is over.
    quiet, surge, held, gone = queued_primary(
        limiter, clock, phases=[(1, 1.0), (64, 2.5), (64, 2.0), (1, 1.5)], cpu=0.0006,
        wait=0.2)
    assert quiet["served"] > 1000 and quiet["healthy"] and surge["served"] > 1000
    assert held["served"] > 1000 and held["declined"] == 0
    assert not held["healthy"] and held["limit"] < 8
    assert held["on_primary"] <= 5.5  # the band's top: 5 reads sharing the CPU
    assert limiter.state().shed == ()
    assert gone["served"] > 1000 and gone["healthy"]


def test_the_expected_wait_for_a_turn_counts_the_turns_ahead() -> None:
    clock = Clock()
    limiter = PrimaryLimiter(LimiterSettings(adaptive=False, max_concurrency=2), clock)
    assert limiter.expected_wait() == 0.0  # room
    # Two reads in flight, each 4 ms from admission to its end: one ends every 2 ms.
    for _ in range(2):
        assert limiter.admit(False) is None
    for _ in range(200):
        limiter.done(0.004)
        assert limiter.admit(False) is None
    assert limiter.expected_wait() == pytest.approx(0.002)  # full: the next read's turn
    turns = [Turn() for _ in range(9)]
    for turn in turns:
        assert limiter.queue(turn) == "fallback_ceiling"
    assert limiter.expected_wait() == pytest.approx(0.020)  # nine ahead, then its own
    for turn in turns:
        limiter.leave(turn)
    assert limiter.expected_wait() == pytest.approx(0.002)


def test_writes_pay_for_the_stamp_only_while_reads_fall_back_to_the_primary() -> None:
    clock = Clock()
    limiter = PrimaryLimiter(LimiterSettings(), clock)
    assert not limiter.serving_fallbacks  # no read has fallen back yet
    assert limiter.admit(False) is None
    assert limiter.serving_fallbacks  # one in flight
    clock.now += 0.001
    limiter.done(0.001)
    clock.now += 1.0
    assert limiter.serving_fallbacks  # one ended lately: the writes are its witness
    clock.now += 5.0
    assert not limiter.serving_fallbacks  # quiet: nothing the writes' latency would decide
