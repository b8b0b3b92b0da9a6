"""Freshness budgets and read-your-writes tokens: what a read requires of a replica.

A read states how fresh it must be with a :class:`Freshness` value:

* a staleness bound (``max_staleness`` seconds): the answer must include every write
  acknowledged more than that long before the read;
* a :class:`Token` (``after``): the answer must include the writes that produced the token;
* ``strong``: the shard's primary answers.

The bounds and LSNs compared against a budget are *proven* figures (see ``monitor``), so a
replica that satisfies :meth:`Freshness.admits` is fresh enough by construction.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta

from propstore._durations import format_duration, parse_duration
from propstore.errors import InvalidInputError, InvalidTokenError
from propstore.lsn import LSN
from propstore.timeline import WriteMark

_TOKEN_PREFIX = "pst2"
_LEGACY_PREFIX = "pst1"
_SHARD_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,63}$")
_HEX_RE = re.compile(r"^[0-9a-f]{1,16}$")
_MARK_RE = re.compile(r"^([0-9a-f]{1,8})-([0-9a-f]{1,16})-([0-9a-f]{1,16})$")
#: Longest token string accepted by :meth:`Token.parse` (a token names each shard once).
MAX_TOKEN_LENGTH = 8192
#: Most timelines one shard's entry may carry (writes merged across failovers).
MAX_TIMELINES_PER_SHARD = 8


@dataclass(frozen=True, slots=True)
class Token:
    """Where a caller's writes reached, per shard: the timeline and WAL position.

    Returned by every write; pass it as ``after=`` to read your own writes. Tokens from
    several writes merge with ``|``. ``str(token)`` is a compact, URL- and cookie-safe form
    that :meth:`parse` reads back. A read with a token whose write a failover provably
    lost raises :class:`~propstore.WriteLostError` (see ``docs/architecture.md``).

    ``str(token)`` is ``pst2`` then, per shard, ``.<shard>.<tli>-<lsn>-<back>`` in hex (more
    ``_<tli>-<lsn>-<back>`` when writes on several timelines were merged): ``lsn`` is at or
    after the commit, ``lsn - back`` at or before the write's start. Tokens of the old form
    ``pst1.<shard>.<lsn>`` still parse; they carry no timeline and are checked by LSN alone,
    as they were when issued (a failover that lost their write cannot be detected).
    """

    marks: tuple[tuple[str, WriteMark], ...] = ()
    # Per shard: its marks and its newest position, computed once (every token read asks for
    # them several times: placing the token, routing, proving).
    _by_shard: dict[str, tuple[WriteMark, ...]] = field(
        init=False, repr=False, compare=False, hash=False)
    _lsns: dict[str, LSN] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if len(self.marks) == 1:  # a write's own token (every write builds one)
            ((name, mark),) = self.marks
            object.__setattr__(self, "_by_shard", {name: (mark,)})
            object.__setattr__(self, "_lsns", {name: mark.lsn})
            return
        by_shard: dict[str, tuple[WriteMark, ...]] = {}
        for name, mark in self.marks:
            by_shard[name] = (*by_shard.get(name, ()), mark)
        object.__setattr__(self, "_by_shard", by_shard)
        object.__setattr__(self, "_lsns", {
            name: max(mark.lsn for mark in marks) for name, marks in by_shard.items()})

    @classmethod
    def of(cls, positions: Mapping[str, int]) -> Token:
        """Build a token from ``{shard: lsn}`` (no timeline: checked by LSN alone)."""
        return cls.from_marks(
            (shard, WriteMark(None, LSN(lsn), LSN(lsn))) for shard, lsn in positions.items()
        )

    @classmethod
    def from_marks(cls, marks: Iterable[tuple[str, WriteMark]]) -> Token:
        """Build a token from ``(shard, mark)`` pairs; marks of one shard and timeline merge
        (the newest position, the latest start)."""
        merged: dict[tuple[str, int], WriteMark] = {}
        for shard, mark in marks:
            key = (shard, -1 if mark.timeline is None else mark.timeline)
            old = merged.get(key)
            if old is not None:
                mark = WriteMark(mark.timeline, max(old.lsn, mark.lsn),
                                 max(old.start, mark.start))
            merged[key] = mark
        return cls(tuple((shard, merged[shard, tli]) for shard, tli in sorted(merged)))

    @property
    def positions(self) -> tuple[tuple[str, LSN], ...]:
        """``(shard, newest LSN)`` per shard."""
        return tuple((shard, lsn) for shard in self.shards
                     if (lsn := self.lsn_for(shard)) is not None)

    def marks_for(self, shard: str) -> tuple[WriteMark, ...]:
        """What the token requires on ``shard`` (one mark per timeline; empty if nothing)."""
        return self._by_shard.get(shard, ())

    def lsn_for(self, shard: str) -> LSN | None:
        """The newest position required on ``shard``, or None when the token says nothing of
        it (compare it with a replay LSN only once the marks' timelines are checked)."""
        return self._lsns.get(shard)

    @property
    def shards(self) -> tuple[str, ...]:
        """The shards this token constrains."""
        return tuple(self._by_shard)

    def merge(self, *others: Token) -> Token:
        """The token that requires everything this one and ``others`` require."""
        return Token.from_marks(
            itertools.chain(self.marks, *(other.marks for other in others))
        )

    __or__ = merge

    def __bool__(self) -> bool:
        return bool(self.marks)

    def __str__(self) -> str:
        parts = [_TOKEN_PREFIX]
        for shard in self.shards:
            parts += [shard, "_".join(
                f"{mark.timeline or 0:x}-{int(mark.lsn):x}-{int(mark.lsn - mark.start):x}"
                for mark in self.marks_for(shard)
            )]
        return ".".join(parts)

    def __repr__(self) -> str:
        inner = ", ".join(
            f"{shard}={mark.lsn}" + (f"@tli{mark.timeline}" if mark.timeline else "")
            for shard, mark in self.marks
        )
        return f"Token({inner})"

    @classmethod
    def parse(cls, text: str, known_shards: Iterable[str] | None = None) -> Token:
        """Read the form ``str(token)`` produces (and the older ``pst1`` form).

        Raises :class:`InvalidTokenError` when the text is malformed, or names a shard that
        is not in ``known_shards`` (when given).
        """
        if not isinstance(text, str):
            raise InvalidTokenError(f"expected a string, got {type(text).__name__}")
        if len(text) > MAX_TOKEN_LENGTH:
            raise InvalidTokenError(f"longer than {MAX_TOKEN_LENGTH} characters")
        parts = text.strip().split(".")
        if parts[0] not in (_TOKEN_PREFIX, _LEGACY_PREFIX) or len(parts) % 2 != 1:
            raise InvalidTokenError(f"not a propstore token: {text[:80]!r}")
        legacy = parts[0] == _LEGACY_PREFIX
        known = set(known_shards) if known_shards is not None else None
        marks: list[tuple[str, WriteMark]] = []
        seen: set[str] = set()
        for shard, entry in zip(parts[1::2], parts[2::2], strict=True):
            if not _SHARD_NAME_RE.match(shard):
                raise InvalidTokenError(f"malformed shard name {shard!r}")
            if shard in seen:
                raise InvalidTokenError(f"shard {shard!r} appears twice")
            if known is not None and shard not in known:
                raise InvalidTokenError(f"unknown shard {shard!r}")
            seen.add(shard)
            marks += [(shard, mark) for mark in _parse_entry(shard, entry, legacy)]
        return cls.from_marks(marks)


def _parse_entry(shard: str, entry: str, legacy: bool) -> list[WriteMark]:
    if legacy:
        if not _HEX_RE.match(entry):
            raise InvalidTokenError(f"malformed entry {shard!r}.{entry!r}")
        lsn = LSN(int(entry, 16))
        return [WriteMark(None, lsn, lsn)]
    fields = entry.split("_")
    if len(fields) > MAX_TIMELINES_PER_SHARD:
        raise InvalidTokenError(f"shard {shard!r} names more than "
                                f"{MAX_TIMELINES_PER_SHARD} timelines")
    marks = []
    for field_ in fields:
        match = _MARK_RE.match(field_)
        if match is None:
            raise InvalidTokenError(f"malformed entry {shard!r}.{field_[:40]!r}")
        tli, position, back = (int(group, 16) for group in match.groups())
        if back > position:
            raise InvalidTokenError(f"malformed entry {shard!r}.{field_[:40]!r}")
        marks.append(WriteMark(tli or None, LSN(position), LSN(position - back)))
    return marks


def coerce_token(value: Token | str | None, known_shards: Iterable[str]) -> Token | None:
    """Accept a :class:`Token` or its string form; check that it names only known shards."""
    if value is None:
        return None
    if isinstance(value, str):
        return Token.parse(value, known_shards)
    if not isinstance(value, Token):
        raise InvalidTokenError(f"expected a Token or its string, got {type(value).__name__}")
    unknown = value._by_shard.keys() - set(known_shards)
    if unknown:
        raise InvalidTokenError(f"unknown shard(s) {', '.join(sorted(unknown))}")
    return value


@dataclass(frozen=True, slots=True)
class Freshness:
    """What a read requires: a staleness bound, a token, both, or the primary (``strong``).

    Build one with :meth:`bounded`, :meth:`after_token` or :data:`STRONG`; combine with ``&``.
    """

    max_staleness: float | None = None
    after: Token | None = None
    strong: bool = False
    label: str = field(default="", compare=False)
    #: Seconds within which the monitor's facts are worth having for this read (how often
    #: a host agent need send them, ``MonitorState.demand``): the budget, 0 with a token
    #: (the replicas' newest LSNs decide it), ``inf`` for a strong read (no facts needed).
    monitor_budget: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_staleness is not None and (
            not math.isfinite(self.max_staleness) or self.max_staleness < 0
        ):
            raise InvalidInputError("max_staleness", "must be a finite, non-negative duration")
        budget = math.inf if self.strong else 0.0 if (
            self.after is not None or self.max_staleness is None) else self.max_staleness
        object.__setattr__(self, "monitor_budget", budget)

    @classmethod
    def bounded(cls, max_staleness: float | timedelta | str, label: str = "") -> Freshness:
        """At most ``max_staleness`` (seconds, ``timedelta`` or ``"500ms"``) behind."""
        try:
            seconds = parse_duration(max_staleness, "max_staleness")
        except ValueError as exc:
            raise InvalidInputError("max_staleness", str(exc)) from None
        return cls(max_staleness=seconds, label=label)

    @classmethod
    def after_token(cls, token: Token) -> Freshness:
        """Includes the writes that returned ``token`` (read-your-writes)."""
        return cls(after=token)

    def __and__(self, other: Freshness) -> Freshness:
        bounds = [b for b in (self.max_staleness, other.max_staleness) if b is not None]
        after = self.after.merge(other.after) if self.after and other.after else (
            self.after or other.after
        )
        return Freshness(
            max_staleness=min(bounds) if bounds else None,
            after=after,
            strong=self.strong or other.strong,
            label=self.label or other.label,
        )

    def required_lsn(self, shard: str) -> LSN | None:
        """The replay position a replica of ``shard`` must have reached, if any."""
        return self.after.lsn_for(shard) if self.after is not None else None

    def admits(self, shard: str, replay_lsn: LSN | None, staleness_bound: float) -> bool:
        """Whether a replica with this proven replay LSN and staleness bound may serve."""
        if self.strong or replay_lsn is None:
            return False
        if self.max_staleness is not None and not staleness_bound <= self.max_staleness:
            return False
        required = self.required_lsn(shard)
        return required is None or replay_lsn >= required

    def __str__(self) -> str:
        if self.strong:
            return "strong"
        parts = []
        if self.label:
            parts.append(f"profile {self.label}")
        if self.max_staleness is not None:
            parts.append(f"≤ {format_duration(self.max_staleness)} stale")
        if self.after:
            parts.append(f"after {self.after!r}")
        return ", ".join(parts) or "any replica"


#: Read from the primary: always the latest committed data.
STRONG = Freshness(strong=True, label="strong")

__all__ = ["STRONG", "Freshness", "Token", "coerce_token"]
