"""Choosing who serves a read: replicas the monitor can prove fresh enough, else the primary.

Pure decisions over a :class:`~propstore.monitor.ShardView` snapshot; no I/O. The store then
*proves* the choice on the connection it uses (``store``), so a decision made on an
out-of-date view can cost a fallback, never a stale answer.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Literal

from propstore._durations import format_bound
from propstore._limiter import LimiterState
from propstore.degrade import Degrade
from propstore.freshness import Freshness
from propstore.monitor import NodeView, ShardView

FallbackReason = Literal[
    "replica_stale", "replica_down", "replica_timeout", "no_replica", "strong"
]


@dataclass(frozen=True, slots=True)
class Candidate:
    """A replica the monitor's latest observation admits for the budget."""

    index: int
    node: NodeView
    staleness_bound: float


@dataclass(frozen=True, slots=True)
class Rejection:
    """A replica left out, and why."""

    node: NodeView
    reason: FallbackReason
    staleness_bound: float


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Replicas to try (best first) and, if none serves, why the primary does."""

    shard: ShardView
    freshness: Freshness
    at: float
    candidates: tuple[Candidate, ...]
    rejected: tuple[Rejection, ...]
    fallback_reason: FallbackReason | None
    #: Streaming replicas the monitor saw just short of a token (a write a moment ago): worth
    #: one verified attempt before the primary, since they replay within milliseconds.
    tentative: tuple[Candidate, ...] = ()
    #: What the read does if the primary sheds it (set by the store's ``route``).
    degrade: Degrade | None = None
    #: The primary's fallback limiter now, as this process sees it (set by ``route``).
    primary_fallback: LimiterState | None = None

    @property
    def freshest(self) -> Candidate | None:
        """The up replica with the smallest bound, admitted or not (for
        ``Degrade.serve_stale``)."""
        pool = [*self.candidates] + [
            Candidate(-1, r.node, r.staleness_bound) for r in self.rejected
            if r.reason == "replica_stale"
        ]
        return min(pool, key=lambda c: c.staleness_bound, default=None)

    def explain(self) -> str:
        """A few lines a person can read: the budget, each replica's figures, the choice."""
        lines = [f"shard {self.shard.name}, budget: {self.freshness}"]
        for cand in self.candidates:
            lines.append(
                f"  candidate {cand.node.name} ({cand.node.config.address}): replay "
                f"{cand.node.lsn}, bound {format_bound(cand.staleness_bound)}"
            )
        for rej in self.rejected:
            lines.append(
                f"  rejected  {rej.node.name} ({rej.node.config.address}): {rej.reason}, "
                f"state {rej.node.state}, bound {format_bound(rej.staleness_bound)}"
            )
        primary = self.shard.primary
        target = primary.name if primary else "no reachable primary"
        if self.candidates:
            lines.append(
                f"  choice: {self.candidates[0].node.name} (verified on the connection; "
                f"primary {target} if that fails)"
            )
        elif self.tentative:
            lines.append(
                f"  choice: try {self.tentative[0].node.name} with its replay LSN checked in "
                f"the same round trip; primary {target} if it has not reached the token"
            )
        else:
            lines.append(f"  choice: primary {target} ({self.fallback_reason})")
        if self.primary_fallback is not None:
            lines.append(f"  primary fallback: {self.primary_fallback}")
        if self.freshness.strong or self.freshness.after is not None:
            lines.append("  if the primary is overloaded: served anyway (strong and token "
                         "reads are never shed)")
        elif self.degrade is not None:
            then = f"{self.degrade}, then StaleReadError" if self.degrade.steps else (
                "StaleReadError at once")
            lines.append(f"  if the primary sheds it: {then}")
        return "\n".join(lines)


def route(view: ShardView, freshness: Freshness, at: float, rotation: int = 0) -> RouteDecision:
    """Decide which replicas may serve ``freshness`` at time ``at``.

    Replicas whose bound the monitor proves within the budget are candidates; ties rotate
    (``rotation``) so equally fresh replicas share the load. With none, a streaming replica
    that only lacks a token's LSN is *tentative*: the store verifies it in the read's round
    trip (it has usually replayed a write made a moment ago) before falling back.
    """
    if freshness.strong:
        return RouteDecision(view, freshness, at, (), (), "strong")
    candidates: list[Candidate] = []
    rejected: list[Rejection] = []
    tentative: list[Candidate] = []
    for index, node in enumerate(view.nodes):
        if index == view.primary_index and node.role != "replica":
            continue
        if not node.serves_replica_reads:
            if node.role == "primary" or (node.role is None and node.config.role == "primary"):
                continue  # a second primary, or the configured primary not yet polled
            rejected.append(Rejection(node, "replica_down", math.inf))
            continue
        bound = view.staleness_bound(node, at)
        if freshness.admits(view.name, node.lsn, bound):
            candidates.append(Candidate(index, node, bound))
            continue
        rejected.append(Rejection(node, "replica_stale", bound))
        if freshness.after is not None and node.state == "up" and (
            freshness.max_staleness is None or bound <= freshness.max_staleness
        ):
            tentative.append(Candidate(index, node, bound))
    if len(candidates) > 1 and rotation:
        shift = rotation % len(candidates)
        candidates = candidates[shift:] + candidates[:shift]
    return RouteDecision(
        view, freshness, at, tuple(candidates), tuple(rejected),
        None if candidates else _reason(rejected),
        () if candidates else tuple(tentative[:1]),
    )


def _reason(rejected: list[Rejection]) -> FallbackReason:
    if any(r.reason == "replica_stale" for r in rejected):
        return "replica_stale"
    return "replica_down" if rejected else "no_replica"


class FallbackLimiter:
    """A token bucket capping reads that fall back to a shard's primary (``rate`` per second,
    bursts up to one second's worth). ``rate == 0`` disables the cap."""

    __slots__ = ("_clock_last", "_lock", "_tokens", "rate")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self._tokens = max(rate, 1.0)
        self._clock_last = now
        self._lock = threading.Lock()

    def try_acquire(self, now: float) -> bool:
        """Take one token if available."""
        if self.rate <= 0:
            return True
        with self._lock:
            self._tokens = min(
                max(self.rate, 1.0), self._tokens + (now - self._clock_last) * self.rate
            )
            self._clock_last = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False


__all__ = [
    "Candidate",
    "FallbackLimiter",
    "FallbackReason",
    "Rejection",
    "RouteDecision",
    "route",
]
