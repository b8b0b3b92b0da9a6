"""The workload's acknowledgement history (tests/_workload.py): exact floors, bounded by time.

The workload's other guarantees (a dead thread fails the test, every budget is checked) are
shown against the real cluster with a deliberately broken store: see ``tests/_breakage.py``.
"""

from __future__ import annotations

from tests._workload import AckHistory


def test_floor_is_the_newest_write_acknowledged_before_the_cutoff() -> None:
    history = AckHistory(["u"])
    assert history.floor("u", 10.0) is None
    for seq, at in enumerate([1.0, 2.0, 3.0, 4.0], start=1):
        history.add("u", at, seq)
    assert history.floor("u", 0.5) is None
    assert history.floor("u", 2.0) == 1  # acknowledged *before* the cut-off, not at it
    assert history.floor("u", 2.5) == 2
    assert history.floor("u", 99.0) == 4 == history.latest("u")


def test_pruning_keeps_every_entry_a_later_cutoff_needs_and_no_more() -> None:
    history = AckHistory(["u"])
    for i in range(10_000):  # far more than any count-bounded history would keep
        history.add("u", i / 100, i)
    cutoffs = [c / 100 for c in range(5_000, 10_001, 7)]
    wanted = {c: history.floor("u", c) for c in cutoffs}
    history.prune("u", 50.0)
    assert {c: history.floor("u", c) for c in cutoffs} == wanted
    assert history.size() == 5_001  # everything from 50 s on, plus the floor before it
