"""Threads of load for tests and benchmarks: each runs a loop until told to stop, and a
thread that dies fails the run instead of quietly lowering the load.

One helper for what every load generator here needs (``tests/_claims_load.py``, the
``surge`` benchmark): start the threads, a shared stop event, a shared counter, the time
the load really ran, and on :meth:`LoadThreads.stop` the joins, a check that none hung and
the first crash re-raised with its traceback.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any


class StopLoop(Exception):
    """Raised by a step of :meth:`LoadThreads.repeat` to end its own thread (not a crash)."""


class LoadCrashed(AssertionError):
    """A load thread raised an exception (or did not stop in time)."""


class LoadThreads:
    """Threads started by :meth:`start`/:meth:`repeat`, until :meth:`stop` (or the end of
    a ``with`` block). ``stopping`` is set on stop and as soon as a thread crashes."""

    def __init__(self, name: str = "load") -> None:
        self.name = name
        self.stopping = threading.Event()
        #: A counter the threads share (``next()`` on it is atomic in CPython).
        self.counter = itertools.count()
        self._threads: list[threading.Thread] = []
        self._crashes: list[tuple[str, BaseException, str]] = []
        self._started: float | None = None
        self._stopped: float | None = None

    def start(self, body: Callable[..., Any], *args: Any) -> None:
        """Run ``body(*args)`` in a new thread (it should return once ``stopping`` is set)."""
        thread = threading.Thread(target=self._guard, args=(body, *args), daemon=True,
                                  name=f"{self.name}-{len(self._threads)}")
        self._threads.append(thread)
        if self._started is None:
            self._started = time.monotonic()
        thread.start()

    def repeat(self, count: int, step: Callable[[int], None]) -> None:
        """``count`` threads each calling ``step(index)`` until ``stopping`` (or until the
        step raises :class:`StopLoop`)."""
        def loop(index: int) -> None:
            try:
                while not self.stopping.is_set():
                    step(index)
            except StopLoop:
                return

        for index in range(count):
            self.start(loop, index)

    @property
    def elapsed(self) -> float:
        """Seconds from the first thread's start to :meth:`stop` (or to now)."""
        if self._started is None:
            return 0.0
        return (self._stopped or time.monotonic()) - self._started

    def finish(self, timeout: float = 60.0) -> None:
        """Wait up to ``timeout`` seconds for the threads to end by themselves (their steps
        raised :class:`StopLoop`), then :meth:`stop`."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self.stop(timeout=0.0)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop and join every thread; raise :class:`LoadCrashed` for the first crash or a
        thread still running after ``timeout`` seconds."""
        if self._stopped is None:
            self._stopped = time.monotonic()
        self.stopping.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if self._crashes:
            name, exc, text = self._crashes[0]
            raise LoadCrashed(f"{name} died: {exc!r}\n{text}") from exc
        hung = [t.name for t in self._threads if t.is_alive()]
        if hung:
            raise LoadCrashed(f"load threads did not stop within {timeout:g} s: {hung}")

    def __enter__(self) -> LoadThreads:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.stop()
        else:  # already failing: stop the threads, keep the original error
            with contextlib.suppress(LoadCrashed):
                self.stop()

    def _guard(self, body: Callable[..., Any], *args: Any) -> None:
        try:
            body(*args)
        except BaseException as exc:  # re-raised by stop()
            self._crashes.append((threading.current_thread().name, exc,
                                  traceback.format_exc()))
            self.stopping.set()


__all__ = ["LoadCrashed", "LoadThreads", "StopLoop"]
