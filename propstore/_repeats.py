"""Which of a stream of repeated log events to emit: the first of each kind at once, then one
per interval carrying how many were held back. Pure bookkeeping over an injectable clock.

A frozen replica fails every read that tries it the same way ("no connection before the
read deadline"); one event per read is thousands a second of the same line, which buries
the events that say something new. structlog has no rate limit of its own (its processors
see one event at a time), hence this small class, used before the event is built.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable


class Repeats:
    """Per key (e.g. node and reason): an occurrence is emitted when none of that key was
    in the last ``interval`` seconds (so the first is emitted at once), with the count held
    back since the one before; the others are held back. Memory is bounded: at most
    ``max_keys`` keys are remembered; past that every key is forgotten (the next occurrence
    of each is emitted as a first: more events for a moment, never fewer).
    """

    __slots__ = ("_clock", "_keys", "_lock", "interval", "max_keys")

    def __init__(self, interval: float = 10.0, max_keys: int = 256,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        #: key -> [when the last emitted one was, how many were held back since].
        self._keys: dict[Hashable, list[float]] = {}

    def emit(self, key: Hashable) -> int | None:
        """One occurrence of ``key``: None to hold it back, else how many occurrences were
        held back since the last one emitted (0 for a first)."""
        now = self._clock()
        with self._lock:
            entry = self._keys.get(key)
            if entry is None:
                if len(self._keys) >= self.max_keys:
                    self._keys.clear()
                self._keys[key] = [now, 0.0]
                return 0
            if now - entry[0] < self.interval:
                entry[1] += 1
                return None
            held = int(entry[1])
            entry[0], entry[1] = now, 0.0
            return held


__all__ = ["Repeats"]
