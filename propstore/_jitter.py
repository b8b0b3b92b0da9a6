"""Jittered exponential backoff for tenacity, drawn from propstore's own random generator.

tenacity's ``wait_exponential_jitter`` draws its jitter from the ``random`` module's shared
generator. propstore retries in background threads (a monitor reconnecting, a pool opening
connections), so each draw would move the sequence of an application that seeded
``random`` for itself (a reproducible simulation, a seeded test; Hypothesis warns of it
while generating data). This is tenacity's strategy with the same formula; only the
generator is ours. (psycopg-pool still draws from the shared one for its connections'
lifetimes and reconnect delays; that one is not ours to change.)
"""

from __future__ import annotations

import random

from tenacity import RetryCallState
from tenacity.wait import wait_exponential_jitter

#: The generator of every propstore backoff (jitter only: not for security).
_RNG = random.Random()


class wait_jittered(wait_exponential_jitter):
    """``multiplier * 2**(n - 1) + uniform(0, jitter)``, within ``[min, max]``, as
    :class:`tenacity.wait.wait_exponential_jitter`, with the jitter from a generator of
    propstore's own."""

    def __call__(self, retry_state: RetryCallState) -> float:
        jitter = _RNG.uniform(0, self.jitter)
        try:
            result = self.multiplier * self.exp_base ** (retry_state.attempt_number - 1) + jitter
        except OverflowError:
            result = self.max
        return max(max(0.0, self.min), min(result, self.max))


__all__ = ["wait_jittered"]
