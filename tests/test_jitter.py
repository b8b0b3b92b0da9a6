"""propstore's backoff: tenacity's jittered exponential wait, drawn from a generator of its
own, so that background retries leave an application's seeded ``random`` sequence alone."""

from __future__ import annotations

import random

from tenacity import RetryCallState, Retrying

from propstore._jitter import wait_jittered


def _attempt(n: int) -> RetryCallState:
    state = RetryCallState(Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = n
    return state


def test_backoff_leaves_the_applications_random_sequence_alone() -> None:
    wait = wait_jittered(multiplier=0.05, max=0.5, jitter=0.05)
    random.seed(12345)
    expected = [random.random() for _ in range(5)]
    random.seed(12345)
    waits = [wait(_attempt(1)) for _ in range(200)]
    assert [random.random() for _ in range(5)] == expected
    assert len(set(waits)) > 100  # it did draw: every wait has its own jitter


def test_backoff_grows_exponentially_with_jitter_within_its_bounds() -> None:
    wait = wait_jittered(multiplier=0.04, max=0.1, jitter=0.02)
    for n, floor in ((1, 0.04), (2, 0.08)):
        samples = [wait(_attempt(n)) for _ in range(500)]
        assert all(floor <= s <= min(floor + 0.02, 0.1) for s in samples)
        assert max(samples) - min(samples) > 0.01  # spread over the jitter, not a constant
    assert {wait(_attempt(n)) for n in (3, 10, 5000)} == {0.1}  # capped, overflow included
