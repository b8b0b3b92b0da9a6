"""How much fallback load a shard's primary takes: an adaptive concurrency limit driven by
the primary's measured latency. Pure arithmetic over an injectable clock; no I/O.

The store already times every read that falls back to the primary and every write; those
durations are the limiter's only input (no probe queries). Each fallback read gives two:
its time *on the primary* (from sending its statements to its answer's arrival at this
host, as the kernel stamped it: the primary's own latency, its queue included, without the
wait of the reader's thread to run once the answer came; ``_wire.Arrival``) and its time
*in flight* (from admission: also the wait for one of this store's connections, which is
this process's queue). From the former come

* ``recent``: an exponential average of the last few dozen samples (what the primary is
  doing now);
* ``baseline``: the primary's normal latency. It drops at once to any sample below it
  (Vegas's base latency: the least the primary took is its time without a queue; a first
  sample, which seeds it, often comes with the surge itself), rises towards ``recent`` with
  a time constant of ``baseline_window`` seconds, and only from reads that finished with at
  most ``baseline_in_flight`` reads in flight: a surge's queueing must not become the new
  normal, while a primary whose normal latency really changed is relearned within a few
  windows.

The *band* is ``max(tolerance * baseline, latency_floor)``. A **congestion episode** begins
only when

1. every read for ``standing_time`` seconds was in flight longer than the band (a standing
   queue, as in CoDel: a burst that drains, or one slow answer on a noisy machine, is not
   one);
2. the primary itself is slow: its recent latency is above the band. A queue only for this
   store's connections (a pool still opening them after a quiet spell, or more reads in
   flight than connections) is this process's backlog: the primary never sees more than
   the pool, and shedding would relieve nothing but refuse reads it answers at its normal
   speed;
3. this process has ``min_queue`` reads queued by Vegas's estimate.

A store still opening its connections to the primary is no exception (it was, until the
primary's latency came from the kernel's stamp): a cold pool's queue is in the reads' time
in flight, not on the primary, so condition 2 keeps it out; and a surge that meets a cold
pool (a replica gone stale sends its readers to a primary whose pool was idle) is the
incident the limiter exists for. Waiting a standing time after the pool's last connection
opened left the primary unprotected for the surge's first 1-2 s in the surge benchmark.

Until then the limit follows demand: a read that finds the limit full raises it (up to the
configured ceiling) and is admitted, so **no read is shed while the primary's latency stays
in its band, or leaves it only briefly**. During an episode, each sample moves the limit by
the gradient of the latency against the band, as in Netflix's *concurrency-limits*
Gradient2 limiter: while the primary's own latency is above it, a cut by ``band / latency``
(the in-flight time or the primary's own, the larger cut; at most by half per sample,
smoothed, never below ``min_limit``), while it is within it, one more read per few
samples. The limit settles where the load on the primary keeps its latency at the top of
its band, which is Little's law's way of saying "as much as it can serve without
queueing", and it can settle below the pool's size: the primary, not only our queue, is
relieved. The episode lasts, whatever our own queue does, until the limit stopped binding
(no read shed, or queued for its turn, for ``standing_time``) with the primary's latency
back in its band, or until the limit held our load at ``min_limit`` for ``stall_time``
with the primary still slow (then the slowness is not ours to relieve: a stall of the
machine, or another client's load; no new episode begins until the primary's latency was
back in its band). A queued read is the limit binding as much as a shed one: counting
only sheds, an episode at 2x the primary's capacity ended within 50 ms of each start (the
cut brought the primary back into its band, and the reads beyond the limit queued, none
shed), and the whole demand went back to the primary, second after second. (Ending
it at the first read that found no queue of ours, as before, gave the whole demand back
to the primary at once, and a new episode needed a new ``standing_time`` of queue: at 2x
the primary's capacity the limit spent most of the time at the demand, 8 of our reads on
the primary as with no limit at all.) A concurrency limit rather than a rate because it
needs no capacity figure: a slower primary completes fewer reads per second at the same
in-flight count, and the limit holds without being told.

A budgeted read that finds the limit full during an episode (or the configured ceiling
reached) may **queue for its turn** (:class:`Turn`) instead of being declined at once: an
ending read hands its place to the oldest turn waiting, first come first served, one wake
per ending read. A burst beyond the limit then waits a few milliseconds where it was shed
(CoDel's good queue: it drains), and only a queue that does not drain within the read's
time to wait is shed; a read that would rather wait (``Degrade.wait``) waits in that queue,
ahead of any read arriving after it. New arrivals do not overtake queued turns.

Priority reads (strong, and token reads: only the primary can serve them) are always
admitted; they count in flight, so under pressure it is the budgeted reads that give way to
them, and no stream of budgeted reads can lock them out. The state is a handful of floats
per shard primary and one turn per read queued *now*: nothing grows with traffic, readers
or users.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

#: Why the limiter declined a budgeted read.
ShedReason = Literal["primary_overloaded", "fallback_ceiling"]


@dataclass(frozen=True, slots=True)
class LimiterSettings:
    """Tuning of :class:`PrimaryLimiter` (seconds unless stated).

    Attributes:
        adaptive: adapt the limit to latency; False leaves only ``max_concurrency``.
        max_concurrency: ceiling on fallback reads in flight per shard primary (0: none).
        tolerance: latency above ``tolerance`` times the baseline counts as congestion.
        latency_floor: latency below this is always healthy, whatever the baseline (a
            sub-millisecond baseline would otherwise turn jitter into shedding).
        baseline_window: how slowly the baseline follows latency upwards.
        min_queue: shed only while at least this many of this process's reads queue at
            the primary (Vegas's estimate ``in_flight * (1 - baseline / recent)``): slow
            answers to a few reads are the machine's noise, not load this process can shed.
        standing_time: congestion is latency above the band for every read over this
            long (CoDel's *interval*): shorter excursions are bursts that drain, or noise.
        baseline_in_flight: only reads finishing with at most this many in flight (no
            queue of ours in their latency) may raise the baseline.
        min_limit: the adaptive limit never falls below this many reads in flight.
        stall_time: an episode whose limit has held this process's load at ``min_limit``
            this long with the primary still slow ends: that slowness is not this
            process's to relieve (a stall of the machine, another client's load).
        initial_limit: the limit before any demand raised it.
        queue_time: how long a budgeted read that found no room waits for its turn before
            it is declined (its degrade policy's own wait comes after, in the same queue).
    """

    adaptive: bool = True
    max_concurrency: int = 0
    tolerance: float = 5.0
    # 2 ms, not the 5 ms it was: a primary whose every read is ~0.6 ms of one CPU takes
    # 8 x 0.6 = 4.8 ms with a pool of 8 on it, so at twice its capacity (the surge
    # benchmark, traced) its reads stayed at 4.4-4.9 ms, under a 5 ms band, and nothing was
    # shed. Jitter is kept out by the standing-queue and queued-reads conditions instead.
    latency_floor: float = 0.002
    min_queue: int = 8
    baseline_window: float = 60.0
    # 0.2 s, not the 1 s it was: with the primary's latency from the kernel's stamp, a
    # standing queue with the primary itself slow (and two pools' worth of ours queued) is
    # not this process's noise, and a surge is unprotected until the limit engages: in the
    # surge benchmark the probe's slowest reads at 2x came in that time, at 1 s and 0.5 s.
    standing_time: float = 0.2
    baseline_in_flight: int = 8
    min_limit: int = 2
    # Longer than the standing time: at the least limit, the primary still has to drain
    # what was admitted before the cut, and the reads only it can serve. At 0.2 s (the
    # standing time) a surge at 2x ended its episode as "not ours" within the window and
    # the limit went back to 64 (the surge benchmark, s14).
    stall_time: float = 1.0
    initial_limit: int = 16
    # A burst on a primary in its band drains within a few of its reads: the surge
    # benchmark's reads with no limit at 0.9x its capacity had a p99 of 24-29 ms.
    queue_time: float = 0.02


@dataclass(frozen=True, slots=True)
class LimiterState:
    """A snapshot of one primary's limiter, for people and metrics.

    Attributes:
        limit: reads allowed in flight now (``inf`` when nothing limits them).
        in_flight: fallback reads on the primary now (priority reads included).
        recent: smoothed recent fallback read latency (seconds), None before any sample.
        baseline: the primary's normal read latency (seconds), None before any sample.
        healthy: whether recent latency is within the normal band.
        shed: budgeted reads declined so far, by reason.
        write_recent: smoothed recent write latency (seconds).
        write_baseline: normal write latency (seconds).
        queued: budgeted reads waiting for their turn now.
    """

    limit: float
    in_flight: int
    recent: float | None
    baseline: float | None
    healthy: bool
    shed: tuple[tuple[ShedReason, int], ...]
    write_recent: float | None = None
    write_baseline: float | None = None
    queued: int = 0

    def __str__(self) -> str:
        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value * 1000:.2f}ms"

        limit = "none" if math.isinf(self.limit) else f"{self.limit:.0f}"
        health = "healthy" if self.healthy else "congested"
        queued = f", {self.queued} queued" if self.queued else ""
        text = (f"{health}: {self.in_flight} in flight{queued}, limit {limit}, read latency "
                f"{ms(self.recent)} (normal {ms(self.baseline)})")
        if self.write_recent is not None:
            text += f", write latency {ms(self.write_recent)} (normal {ms(self.write_baseline)})"
        return text


class Turn:
    """A budgeted read's place in the queue for room on the primary (see
    :meth:`PrimaryLimiter.queue`). ``granted`` once the limiter counted it in flight;
    ``wake``, set by whoever blocks on the turn, is called (from the thread that granted it,
    through the limiter's ``on_grant``) to wake it."""

    __slots__ = ("granted", "wake")

    def __init__(self) -> None:
        self.granted = False
        self.wake: Callable[[], None] | None = None


class _Latency:
    """Smoothed recent and normal latency of one kind of work on the primary."""

    __slots__ = ("above_since", "at", "baseline", "recent")

    def __init__(self) -> None:
        self.recent: float | None = None
        self.baseline: float | None = None
        self.at = -math.inf
        #: When the current run of samples above the band began (None: the last was in it).
        self.above_since: float | None = None

    def follow(self, seconds: float, now: float) -> None:
        """One sample of ``recent`` only (no baseline: the in-flight times)."""
        self.at = now
        self.recent = seconds if self.recent is None else (
            self.recent + (seconds - self.recent) * PrimaryLimiter.RECENT_WEIGHT)

    def learn(self, seconds: float, now: float, window: float, rise: bool = True) -> None:
        """One sample; ``rise``: it may raise the baseline (no queue of ours in it)."""
        elapsed, self.at = max(0.0, now - self.at), now
        if self.recent is None or self.baseline is None:
            self.recent = self.baseline = seconds
            return
        self.recent += (seconds - self.recent) * PrimaryLimiter.RECENT_WEIGHT
        if seconds < self.baseline:
            # Vegas's base latency: the least the primary took is its latency without a
            # queue. A first sample (seeding the baseline) often comes when the surge does,
            # already queued: traced, 7.6 ms against 0.1-0.5 ms quiet answers, a band of
            # 38 ms and nothing shed at 2x. A baseline too low only brings the band to its
            # floor.
            self.baseline = seconds
            return
        if self.recent > self.baseline and not rise:
            return
        # Down ten times faster than up; not at once, or a quiet moment on a busy machine
        # would set a baseline that ordinary noise then exceeds by the tolerance.
        tau = window if self.recent > self.baseline else window / 10
        self.baseline += (self.recent - self.baseline) * -math.expm1(-elapsed / tau)

    def band(self, tolerance: float, floor: float) -> float:
        """The top of the normal band (seconds)."""
        return max(tolerance * (self.baseline or 0.0), floor)

    def mark(self, seconds: float, band: float, now: float) -> None:
        """Track the run of samples above ``band`` (CoDel's "first above time")."""
        if seconds <= band:
            self.above_since = None
        elif self.above_since is None:
            self.above_since = now

    def standing(self, standing_time: float, now: float) -> bool:
        """Every sample for ``standing_time`` was above the band, and one came lately."""
        return (self.above_since is not None and now - self.above_since >= standing_time
                and now - self.at <= _FORGET_AFTER)

    def excess(self, tolerance: float, floor: float, now: float) -> float:
        """``recent`` over the top of the normal band (<= 1 is healthy)."""
        if self.recent is None or self.baseline is None or now - self.at > _FORGET_AFTER:
            return 0.0
        return self.recent / max(tolerance * self.baseline, floor)


#: A latency figure this old (seconds) says nothing about the primary now.
_FORGET_AFTER = 2.0
#: How much wider the writes' normal band is than the reads'.
_WRITE_BAND = 4.0
#: During an episode, how much a sample within the band raises the limit (reads in flight).
_GROWTH = 0.2


class PrimaryLimiter:
    """The fallback limit of one shard primary (thread-safe; see the module docstring).

    ``admit`` before a fallback read, ``done`` with its duration after it (also when it
    failed); ``sample`` feeds durations of writes, kept apart (a write's fsync makes it
    slower than a read, and a change in the mix must not look like congestion).
    """

    __slots__ = ("_at_min_since", "_clock", "_episode", "_flights", "_last_bound", "_limit",
                 "_lock", "_not_ours", "_on_grant", "_reads", "_shed", "_turns", "_writes",
                 "in_flight", "settings")

    #: Weight of a new sample in ``recent`` (about the last 20 samples count).
    RECENT_WEIGHT = 0.05

    def __init__(self, settings: LimiterSettings = LimiterSettings(),
                 clock: Callable[[], float] = time.monotonic,
                 on_grant: Callable[[Turn], None] | None = None) -> None:
        """``on_grant`` is called with each queued :class:`Turn` the limiter grants, outside
        its lock (by default the turn's own ``wake``)."""
        self.settings = settings
        self._clock = clock
        self._on_grant = on_grant or _wake
        self._lock = threading.Lock()
        self._limit = float(settings.initial_limit)
        if settings.max_concurrency:
            self._limit = min(self._limit, float(settings.max_concurrency))
        self.in_flight = 0
        #: Fallback reads' time on the primary (its health: recent, baseline, band) ...
        self._reads = _Latency()
        #: ... and their time in flight, our own wait for a connection included (the
        #: standing queue, Vegas's estimate of it, the gradient).
        self._flights = _Latency()
        self._writes = _Latency()
        #: Whether a congestion episode is under way (entered as ``_overloaded`` says, left
        #: once the limit stopped binding with the primary back in its band).
        self._episode = False
        #: When a budgeted read last found the limit full (shed, or queued for its turn).
        self._last_bound = -math.inf
        #: Since when the episode's limit has been at ``min_limit`` (None: above it).
        self._at_min_since: float | None = None
        #: An episode ended with the primary slow whatever our load: no new one until its
        #: latency has been back in its band.
        self._not_ours = False
        self._shed: dict[ShedReason, int] = {}
        #: Budgeted reads queued for room, oldest first (one per read waiting now).
        self._turns: deque[Turn] = deque()

    # ------------------------------------------------------------------ admission

    def admit(self, priority: bool) -> ShedReason | None:
        """Count a read in flight and return None, or return why it is declined (counted as
        shed). A budgeted read does not overtake reads queued for their turn.

        ``priority`` reads are always admitted (only the primary can serve them).
        """
        with self._lock:
            if priority:
                self.in_flight += 1
                return None
            woken = self._grant()
            reason = self._room()
            if reason is None:
                self.in_flight += 1
            else:
                self._count_shed(reason)
        self._notify(woken)
        return reason

    def queue(self, turn: Turn) -> ShedReason | None:
        """Admit a budgeted read now (None, and ``turn.granted``), or queue its ``turn``
        behind those already waiting and return why it waits (not counted as shed). The
        turn is granted, in order, as reads end; then the reader calls :meth:`take`, or
        :meth:`leave` if it will not use it."""
        with self._lock:
            woken = self._grant()
            reason = self._room()
            if reason is None:
                self.in_flight += 1
                turn.granted = True
            else:
                self._turns.append(turn)
                self._bound(reason)
        self._notify(woken)
        return reason

    def expected_wait(self) -> float:
        """Seconds a budgeted read queueing now would wait for its turn: 0 with room;
        else the turns ahead of it and its own, one per read ending, reads ending at the
        rate of those in flight over their time in flight (Little's law)."""
        s = self.settings
        with self._lock:
            # Full as ``_room`` would find it, without its raising the limit to the demand
            # (this is a question, not an admission).
            full = self.in_flight >= (s.max_concurrency or math.inf) or (
                s.adaptive and self._episode and self.in_flight >= self._limit)
            if not self._turns and not full:
                return 0.0
            flight = self._flights.recent
            if flight is None:
                return 0.0
            return (len(self._turns) + 1) * flight / max(1, self.in_flight)

    def take(self, turn: Turn) -> bool:
        """Whether ``turn`` was granted (the read is in flight: :meth:`done` follows); if
        not, it leaves the queue."""
        with self._lock:
            if turn.granted:
                return True
            self._drop(turn)
            return False

    def leave(self, turn: Turn) -> None:
        """The read will not use ``turn``: out of the queue, or, if granted meanwhile, its
        place goes to the next turn."""
        woken: list[Turn] = []
        with self._lock:
            if turn.granted:
                turn.granted = False
                self.in_flight = max(0, self.in_flight - 1)
                woken = self._grant()
            else:
                self._drop(turn)
        self._notify(woken)

    def declined(self, reason: ShedReason) -> None:
        """A budgeted read that queued got no turn: count it as shed."""
        with self._lock:
            self._count_shed(reason)

    def done(self, seconds: float, on_primary: float | None = None) -> None:
        """A read admitted by :meth:`admit` finished ``seconds`` after it, of which it spent
        ``on_primary`` on the way and on the primary (None: all of them)."""
        s = self.settings
        with self._lock:
            queued_behind = self.in_flight > s.baseline_in_flight
            self.in_flight = max(0, self.in_flight - 1)
            if _usable(seconds):
                reads, flights, now = self._reads, self._flights, self._clock()
                # Judged against the band before this sample moves it.
                flights.mark(seconds, reads.band(s.tolerance, s.latency_floor), now)
                flights.follow(seconds, now)
                primary = seconds if on_primary is None or not _usable(on_primary) else (
                    min(on_primary, seconds))
                reads.learn(primary, now, s.baseline_window, rise=not queued_behind)
                self._adapt()
            woken = self._grant()
        self._notify(woken)

    def sample(self, seconds: float) -> None:
        """A write on the primary took ``seconds``."""
        with self._lock:
            if _usable(seconds):
                self._writes.learn(seconds, self._clock(), self.settings.baseline_window)
                self._adapt()

    # ------------------------------------------------------------------ insight

    @property
    def limit(self) -> float:
        """Reads allowed in flight now (``inf`` with neither adaptation nor ceiling)."""
        s = self.settings
        if not s.adaptive:
            return float(s.max_concurrency) if s.max_concurrency else math.inf
        return self._limit

    @property
    def serving_fallbacks(self) -> bool:
        """Whether reads are on this primary past its replicas now, or ended lately (within
        the time a latency figure says something about it): then what the writes' latency
        says matters, and a write pays for the kernel's stamp of its answer."""
        return self.in_flight > 0 or self._clock() - self._reads.at <= _FORGET_AFTER

    @property
    def healthy(self) -> bool:
        """Whether the primary is not congested (no episode under way, and no standing
        queue above its normal band; an episode begins only when enough reads queue too:
        see ``min_queue``)."""
        with self._lock:
            return not (self._episode or self._overloaded())

    def state(self) -> LimiterState:
        """A snapshot for ``propstore route``, the lag report and metrics."""
        with self._lock:
            return LimiterState(self.limit, self.in_flight, self._reads.recent,
                                self._reads.baseline, not (self._episode or self._overloaded()),
                                tuple(sorted(self._shed.items())), self._writes.recent,
                                self._writes.baseline, len(self._turns))

    # ------------------------------------------------------------------ arithmetic

    def _count_shed(self, reason: ShedReason) -> None:
        self._bound(reason)
        self._shed[reason] = self._shed.get(reason, 0) + 1

    def _bound(self, reason: ShedReason) -> None:
        """A budgeted read found the adaptive limit full: it binds (the episode goes on)."""
        if reason == "primary_overloaded":
            self._last_bound = self._clock()

    def _room(self) -> ShedReason | None:
        """Why a budgeted read may not start now, or None (the limit then follows demand
        outside an episode: a read that finds it full raises it, up to the ceiling)."""
        s = self.settings
        ceiling = s.max_concurrency or math.inf
        if self.in_flight >= ceiling:
            return "fallback_ceiling"
        if s.adaptive and self.in_flight >= self._limit:
            if self._congested():
                return "primary_overloaded"
            # Healthy: the limit follows demand (the latency will say if it was too much).
            self._limit = min(ceiling, float(self.in_flight + 1))
        return None

    def _grant(self) -> list[Turn]:
        """Grant queued turns, oldest first, while there is room (under the lock)."""
        woken: list[Turn] = []
        while self._turns and self._room() is None:
            turn = self._turns.popleft()
            turn.granted = True
            self.in_flight += 1
            woken.append(turn)
        return woken

    def _drop(self, turn: Turn) -> None:
        with contextlib.suppress(ValueError):  # granted or dropped meanwhile
            self._turns.remove(turn)  # the queue holds only the reads waiting now

    def _notify(self, woken: list[Turn]) -> None:
        for turn in woken:
            self._on_grant(turn)

    def _excess(self, now: float) -> float:
        """The primary's own latency over the top of its band (reads on the primary, and
        writes with their wider band: a second witness); <= 1 is within it."""
        s = self.settings
        # Writes' fsync makes them noisy (the disk is shared), and a surge of reads slows
        # them without the primary being in trouble: only far beyond their band do they count.
        return max(self._reads.excess(s.tolerance, s.latency_floor, now),
                   self._writes.excess(s.tolerance * _WRITE_BAND,
                                       s.latency_floor * _WRITE_BAND, now))

    def _overloaded(self) -> bool:
        """A standing queue above the reads' band while the primary's own latency is above
        it too, or writes far beyond theirs."""
        s, now = self.settings, self._clock()
        if self._flights.standing(s.standing_time, now) and (
                self._reads.excess(s.tolerance, s.latency_floor, now) > 1.0):
            return True
        return self._writes.excess(s.tolerance * _WRITE_BAND, s.latency_floor * _WRITE_BAND,
                                   now) > 1.0

    def _congested(self) -> bool:
        """Whether budgeted reads beyond the limit are shed now: during a congestion
        episode. One begins as ``_overloaded`` says and this process has ``min_queue`` reads
        queued (Vegas); it lasts, whatever our queue does, until the limit stopped binding
        (no read shed or queued for ``standing_time``) with the primary's own latency back
        in its band, or the limit held our load at ``min_limit`` for ``stall_time`` with
        the primary still slow, or the primary goes quiet."""
        s, now = self.settings, self._clock()
        if self._episode:
            if now - self._reads.at > _FORGET_AFTER or (
                    now - self._last_bound >= s.standing_time and self._excess(now) <= 1.0):
                self._end_episode()
            elif self._at_min_since is not None and now - self._at_min_since >= s.stall_time:
                # The limit has held our load at its least for a stall time and the
                # primary is still slow: the slowness is not ours to relieve (a stall of
                # the machine, or another client's load), and shedding more would refuse
                # reads for nothing. No new episode until the primary was back in its band.
                self._end_episode()
                self._not_ours = True
            return self._episode
        if self._not_ours:
            if self._excess(now) > 1.0:
                return False
            self._not_ours = False
        if not self._overloaded():
            return False
        reads, flights = self._reads, self._flights
        if reads.baseline is not None and flights.recent is not None:
            queued = self.in_flight * (1.0 - reads.baseline / max(flights.recent, 1e-9))
            if queued < s.min_queue:
                return False
        self._episode = True  # (without read samples: only the writes say so)
        return True

    def _end_episode(self) -> None:
        self._episode, self._at_min_since = False, None
        self._flights.above_since = None

    def _adapt(self) -> None:
        """During an episode, move the limit by the gradient of the primary's own latency
        against its band, as Gradient2 does: cut (at most by half, smoothed) while above it,
        one more read in flight per five samples while within it. The limit settles where
        the primary's latency is at the top of its band, and our queue beyond the limit is
        shed rather than held on the primary's connections."""
        s = self.settings
        if not s.adaptive or not self._congested():
            return
        excess = self._excess(self._clock())
        if excess <= 1.0:
            # The primary is back in its band: one more read in flight per few samples, as
            # long as the limit is what holds them.
            if self.in_flight + 1 >= self._limit:
                self._limit = min(s.max_concurrency or math.inf, self._limit + _GROWTH)
            if self._limit > s.min_limit:
                self._at_min_since = None
            return
        # Cut from what is really in flight: a limit raised by an earlier burst would
        # otherwise take many samples to come down to the load causing the latency. By the
        # time in flight against the band, our own queue included: a queue beyond the
        # primary's connections is cut too, and once it is gone that time is the primary's.
        flights = self._flights.recent or 0.0
        band = self._reads.band(s.tolerance, s.latency_floor)
        limit = min(self._limit, float(max(self.in_flight, s.min_limit)))
        target = limit * max(0.5, min(1.0, band / max(flights, 1e-9), 1.0 / excess))
        # Smoothed like Gradient2's: one slow sample must not halve the limit.
        self._limit = max(float(s.min_limit), limit + (target - limit) * 0.2)
        if self._limit > s.min_limit:
            self._at_min_since = None
        elif self._at_min_since is None:
            self._at_min_since = self._clock()


def _wake(turn: Turn) -> None:
    if turn.wake is not None:
        turn.wake()


def _usable(seconds: float) -> bool:
    return seconds >= 0 and not math.isinf(seconds)


__all__ = ["LimiterSettings", "LimiterState", "PrimaryLimiter", "ShedReason", "Turn"]
