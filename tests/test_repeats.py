"""Repeated log events (pure): the first of a kind at once, then one per interval with the
count held back; memory bounded. Time is driven, never waited for."""

from __future__ import annotations

import tracemalloc

from propstore._repeats import Repeats


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_first_occurrence_is_emitted_at_once_then_one_per_interval_with_the_count() -> None:
    clock = Clock()
    repeats = Repeats(interval=10.0, clock=clock)
    assert repeats.emit(("n1", "frozen")) == 0  # the first: at once
    emitted = []
    for _ in range(1000):  # 1,000 more over 25 s
        clock.now += 0.025
        held = repeats.emit(("n1", "frozen"))
        if held is not None:
            emitted.append(held)
    assert emitted == [399, 399]  # at 10 s and 20 s, each with those held back before it
    assert repeats.emit(("n2", "frozen")) == 0  # per key: another node is a first
    assert repeats.emit(("n1", "other reason")) == 0
    clock.now += 10.0  # silent for an interval: the next is emitted at once, with the rest
    assert repeats.emit(("n1", "frozen")) == 200


def test_memory_is_bounded_by_the_number_of_keys() -> None:
    clock = Clock()
    repeats = Repeats(interval=10.0, max_keys=64, clock=clock)
    for i in range(64):
        repeats.emit(("node", i))
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(20_000):  # a key per occurrence: the worst case
            clock.now += 0.001
            assert repeats.emit(("node", 64 + i)) == 0
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename")
                if stat.traceback[0].filename.endswith("_repeats.py"))
    assert grown < 8192 and len(repeats._keys) <= 64
