"""Choosing who serves a read: replicas the monitor can prove fresh enough, else the primary.

Pure decisions over a :class:`~propstore.monitor.ShardView` snapshot; no I/O. The store then
*proves* the choice on the connection it uses (``store``), so a decision made on an
out-of-date view can cost a fallback, never a stale answer.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from propstore._durations import format_bound
from propstore._limiter import LimiterState
from propstore.degrade import Degrade
from propstore.freshness import Freshness
from propstore.lsn import LSN
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
        ``Degrade.serve_stale``); one that answers its deadlines before one that does not."""
        pool = [*self.candidates] + [
            Candidate(-1, r.node, r.staleness_bound) for r in self.rejected
            if r.reason in ("replica_stale", "replica_timeout")
        ]
        return min(pool, key=lambda c: (_late(c), c.staleness_bound), default=None)

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
    # A replica that missed a deadline since its last answer is tried last: no new proof,
    # not down (a starved machine makes healthy replicas late too), but a frozen one would
    # cost every read that tries it first the whole replica deadline. When only late ones
    # are left and the primary answers, the primary serves (replica_timeout) until one of
    # them answers again: a frozen replica then costs one read its deadline, not every read
    # until the silence limit marks it down. The late ones stay rejected with their bounds,
    # for serve-stale, and are tried as before while the primary does not answer.
    candidates.sort(key=_late)
    answering = _answering(candidates)
    if not answering and candidates and _primary_answers(view):
        rejected.extend(Rejection(c.node, "replica_timeout", c.staleness_bound)
                        for c in candidates)
        candidates = []
        tentative = [c for c in tentative if not _late(c)]
    if answering > 1 and rotation:
        shift = rotation % answering
        candidates = candidates[shift:answering] + candidates[:shift] + candidates[answering:]
    return RouteDecision(
        view, freshness, at, tuple(candidates), tuple(rejected),
        None if candidates else _reason(rejected),
        () if candidates else tuple(tentative[:1]),
    )


class DecisionCache:
    """Decisions of :func:`route`, reused while provably equal.

    A decision depends on the shard view (a new snapshot on every monitor observation), the
    budget and the time, and on the time only through the candidates' bounds, which grow
    with it: rejections stay rejected, and every candidate stays admitted until its bound
    reaches ``max_staleness``. So until then (``valid_until``) ``route`` on the same view
    would return the same candidates and rejections; only the bounds differ, and the store
    recomputes the bound it reports from the data it read. Rotations are kept per entry, so
    a cached decision costs no allocation. Bounded: at most ``size`` budgets per shard.

    A budget that is a token alone (no ``max_staleness``) differs per write, but its decision
    does not depend on the time, and on the token only through which replicas' LSNs (in the
    view) reach the token's position on the shard: ``route`` admits a replica iff its LSN is
    at least that position, and makes every other up replica tentative. So per view the
    replicas' LSNs are kept sorted, and the decision's parts per number of them below the
    token's position; a read builds only the decision itself, with its own token and time.
    Any other budget with a token is routed afresh.
    """

    __slots__ = ("_entries", "_tokens", "size")

    def __init__(self, shards: int, size: int = 8) -> None:
        self._entries: list[list[_Slot]] = [[] for _ in range(shards)]
        self._tokens = [_TokenSlot() for _ in range(shards)]
        self.size = size

    def decide(self, view: ShardView, freshness: Freshness, at: float, rotation: int
               ) -> RouteDecision:
        """``route(view, freshness, at, rotation)``, from the cache when it provably holds."""
        if freshness.after is not None:
            if freshness.max_staleness is not None or freshness.strong:
                return route(view, freshness, at, rotation)
            return self._tokens[view.index].decide(view, freshness, at, rotation)
        # Found by identity (budgets repeat as the same object: the store memoises them),
        # in a few slots updated in place: a read that hits allocates nothing.
        slots = self._entries[view.index]
        for slot in slots:
            if slot.freshness is freshness:
                break
        else:
            slot = _Slot(freshness)
            if len(slots) >= self.size:
                del slots[0]
            slots.append(slot)
        decision = slot.decision
        if decision is None or slot.view is not view or not slot.at <= at < slot.valid_until:
            decision = route(view, freshness, at)
            slot.view, slot.at, slot.decision = view, at, decision
            slot.valid_until = _valid_until(decision, at)
            slot.rotations = _rotations(decision)
        rotations = slot.rotations
        if rotations is None:
            return decision
        return rotations[rotation % len(rotations)]


class _Slot:
    """One budget's cached decision (mutable: refreshed in place)."""

    __slots__ = ("at", "decision", "freshness", "rotations", "valid_until", "view")

    def __init__(self, freshness: Freshness) -> None:
        self.freshness = freshness
        self.view: ShardView | None = None
        self.at = math.inf
        self.valid_until = -math.inf
        self.decision: RouteDecision | None = None
        #: The decision with its candidates rotated by 0..n-1 (None: fewer than two).
        self.rotations: tuple[RouteDecision, ...] | None = None


class _TokenSlot:
    """A shard's decisions for budgets that are a token alone, on one view (see
    :class:`DecisionCache`): keyed by how many of the view's replica LSNs lie below the
    token's position, which fixes the replicas ``route`` admits (those at or past it)."""

    __slots__ = ("lsns", "parts", "view")

    def __init__(self) -> None:
        self.view: ShardView | None = None
        #: The LSNs ``route`` compares with a token, of the replicas it does not reject as
        #: down (``serves_replica_reads``), sorted.
        self.lsns: list[LSN] = []
        #: key -> (candidates per rotation, rejected, fallback reason, tentative).
        self.parts: dict[int, _Parts] = {}

    def decide(self, view: ShardView, freshness: Freshness, at: float, rotation: int
               ) -> RouteDecision:
        if self.view is not view:
            self.view, self.parts = view, {}
            self.lsns = sorted(
                node.lsn for index, node in enumerate(view.nodes)
                if node.lsn is not None and node.serves_replica_reads
                and not (index == view.primary_index and node.role != "replica")
            )
        required = freshness.required_lsn(view.name)
        key = 0 if required is None else bisect_left(self.lsns, required)
        parts = self.parts.get(key)
        if parts is None:
            decision = route(view, freshness, at)
            rotations = _rotations(decision)
            parts = self.parts[key] = (
                (decision.candidates,) if rotations is None else
                tuple(r.candidates for r in rotations),
                decision.rejected, decision.fallback_reason, decision.tentative)
        candidates, rejected, reason, tentative = parts
        # Its own budget (the token) and time; only the replicas' bounds are those of the
        # first read on this view (the store recomputes the bound it reports).
        return RouteDecision(view, freshness, at, candidates[rotation % len(candidates)],
                             rejected, reason, tentative)


_Parts = tuple[tuple[tuple[Candidate, ...], ...], tuple[Rejection, ...], FallbackReason | None,
               tuple[Candidate, ...]]


def _valid_until(decision: RouteDecision, at: float) -> float:
    limit = decision.freshness.max_staleness
    if not decision.candidates or limit is None:
        return math.inf
    # bound(t) = t - covered_since grows at most as fast as t: a candidate admitted at
    # ``at`` with bound b stays admitted until at + (limit - b), at least.
    return min(at + (limit - c.staleness_bound) for c in decision.candidates)


def _late(candidate: Candidate) -> bool:
    return candidate.node.unanswered_since is not None


def _answering(candidates: Sequence[Candidate]) -> int:
    """How many candidates lead the list before the late ones (it is sorted by lateness)."""
    return next((i for i, c in enumerate(candidates) if _late(c)), len(candidates))


def _rotations(decision: RouteDecision) -> tuple[RouteDecision, ...] | None:
    cands = decision.candidates
    answering = _answering(cands)  # late candidates stay last in every rotation
    if answering < 2:
        return None
    head, tail = cands[:answering], cands[answering:]
    return tuple(decision if not shift else
                 dataclasses.replace(decision, candidates=head[shift:] + head[:shift] + tail)
                 for shift in range(answering))


def _primary_answers(view: ShardView) -> bool:
    primary = view.primary
    return primary is not None and primary.unanswered_since is None


def _reason(rejected: list[Rejection]) -> FallbackReason:
    if any(r.reason == "replica_stale" for r in rejected):
        return "replica_stale"
    if any(r.reason == "replica_timeout" for r in rejected):
        return "replica_timeout"
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
    "DecisionCache",
    "FallbackLimiter",
    "FallbackReason",
    "Rejection",
    "RouteDecision",
    "route",
]
