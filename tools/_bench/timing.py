"""Running contenders interleaved, in one thread, so they share every disturbance.

Each iteration runs every due contender once, in an order that rotates from one iteration to
the next (A B C, B C A, C A B, ...), so none always runs right after another's side effects.
Contenders that run only every n-th iteration make the set of due contenders change; each
distinct set rotates on its own count (:class:`Rotation`), so every contender takes every
position of every set it is in, whatever the iteration count's parity.
Iterations are grouped into blocks of about ``block_seconds``; a block is the unit of the
paired ratios in :mod:`_bench.stats`. A warm-up runs the same loop first and is discarded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from _bench.stats import Series

Op = Callable[[], object]


@dataclass
class Contender:
    """One timed operation and how often it runs.

    Attributes:
        name: label in the table.
        op: the timed operation.
        every: run on every ``every``-th iteration only (for slow operations).
        before: untimed preparation run right before ``op`` (a write whose token ``op``
            reads, say).
        errors: first error messages seen (an operation that raises is counted, not timed).
    """

    name: str
    op: Op
    every: int = 1
    before: Op | None = None
    errors: list[str] = field(default_factory=list)


class Rotation:
    """The order contenders run in: each distinct set of due contenders rotates on its own.

    A single counter shared by all sets (``iteration % len(active)``) does not rotate: with
    two contenders due every iteration and three more every other one, the odd iterations
    (two due) always got shift 1, so the same contender always ran first there.
    """

    def __init__(self) -> None:
        self._turns: dict[tuple[int, ...], int] = {}

    def order(self, due: Sequence[int]) -> list[int]:
        """``due`` (indices, in registration order) rotated one step further than last time
        this same set was due."""
        key = tuple(due)
        turn = self._turns.get(key, 0)
        self._turns[key] = turn + 1
        shift = turn % len(key) if key else 0
        return list(key[shift:] + key[:shift])


def due(everys: Sequence[int], iteration: int) -> list[int]:
    """Indices of the contenders due on ``iteration`` (each runs every ``every``-th one)."""
    return [i for i, every in enumerate(everys) if iteration % every == 0]


@dataclass(frozen=True)
class Event:
    """Something to do once, between iterations, ``at`` seconds into the timed run."""

    at: float
    action: Op
    label: str


@dataclass
class Run:
    """What :func:`interleave` measured: series by name and the times of the events."""

    series: dict[str, Series]
    event_times: dict[str, float]
    seconds: float


def interleave(contenders: Sequence[Contender], *, duration: float, warmup: float = 2.0,
               block_seconds: float = 1.0, events: Sequence[Event] = (),
               period: float = 0.0) -> Run:
    """Run ``contenders`` interleaved for ``duration`` seconds after ``warmup``.

    ``period`` (seconds) paces the loop: an iteration shorter than that is followed by an
    untimed sleep, for scenarios where the request rate itself matters.
    """
    _loop(contenders, warmup, block_seconds, None, (), period=period)
    series = {c.name: Series(c.name) for c in contenders}
    event_times: dict[str, float] = {}
    started = time.perf_counter()
    _loop(contenders, duration, block_seconds, series, events, event_times, period)
    return Run(series, event_times, time.perf_counter() - started)


def _loop(contenders: Sequence[Contender], duration: float, block_seconds: float,
          series: dict[str, Series] | None, events: Sequence[Event],
          event_times: dict[str, float] | None = None, period: float = 0.0) -> None:
    clock = time.perf_counter
    started = clock()
    end = started + duration
    block, block_end = 0, started + block_seconds
    pending = sorted(events, key=lambda e: e.at)
    everys = [c.every for c in contenders]
    rotation = Rotation()
    iteration = 0
    while True:
        now = clock()
        if now >= end and iteration > 0:
            break
        while pending and now - started >= pending[0].at:
            event = pending.pop(0)
            event.action()
            if event_times is not None:
                event_times[event.label] = clock() - started
        for index in rotation.order(due(everys, iteration)):
            contender = contenders[index]
            if contender.before is not None:
                contender.before()
            t0 = clock()
            try:
                contender.op()
            except Exception as exc:  # counted and reported: a benchmark keeps measuring
                if series is not None:
                    series[contender.name].errors += 1
                if len(contender.errors) < 3:
                    contender.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            elapsed = clock() - t0
            if series is not None:
                series[contender.name].add(elapsed, block, t0 - started)
        iteration += 1
        if period:
            time.sleep(max(0.0, period - (clock() - now)))
        if clock() >= block_end:
            block += 1
            block_end = clock() + block_seconds
