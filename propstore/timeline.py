"""Timelines: which WAL history a position lies on. Pure; no I/O.

An LSN alone does not name data: every promotion starts a new *timeline* at a *switch
point* on its parent, and two servers may hold different WAL at the same LSN once their
histories fork (a failover that lost the old leader's last acknowledged writes, a diverged
ex-leader before ``pg_rewind``). PostgreSQL records each timeline's ancestry in
``pg_wal/<TLI>.history``: one line per ancestor, ``<ancestor tli>\\t<switch LSN>\\t<reason>``,
where WAL of the ancestor *before* the switch LSN is shared with the descendant and WAL at or
after it is not.

So a position ``(tli, lsn)`` lies on the history of timeline ``T`` when ``tli == T``, or when
``tli`` is an ancestor of ``T`` and ``lsn <= switch``. A write whose commit record begins at
or after the switch of its timeline is not on ``T``'s history: it is lost. See the freshness
argument in ``docs/architecture.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from propstore.lsn import LSN

#: ``held``: the position is on the history; ``lost``: provably not; ``ahead``: on a newer
#: timeline than the history (the observer has not caught up with a promotion); ``unknown``:
#: the history needed to decide could not be read.
Verdict = Literal["held", "lost", "ahead", "unknown"]


@dataclass(frozen=True, slots=True)
class WriteMark:
    """Where a caller's writes on one shard are in its WAL.

    Attributes:
        timeline: the primary's timeline when the writes committed (None for a token
            made before timelines were recorded: checked by LSN alone).
        lsn: at or after the end of every commit record (the flush LSN read after the ack).
        start: at or before the start of the latest write (the insert LSN read before it);
            ``start >= switch`` proves that write's commit is not on a descendant timeline.
    """

    timeline: int | None
    lsn: LSN
    start: LSN

    def covers(self, other: WriteMark) -> bool:
        """Whether requiring this mark also requires ``other`` (same timeline, not older)."""
        return self.timeline == other.timeline and self.lsn >= other.lsn and (
            self.start >= other.start
        )


@dataclass(frozen=True, slots=True)
class TimelineHistory:
    """Timeline :attr:`timeline` and the LSN where each of its ancestors ended.

    ``complete`` is False when only the timeline number is known (the history file could not
    be read): positions on the timeline itself are still decided, ancestors are not.
    """

    timeline: int
    #: ``(ancestor timeline, switch LSN)``, oldest first.
    ancestors: tuple[tuple[int, LSN], ...] = ()
    complete: bool = True

    @classmethod
    def parse(cls, timeline: int, text: str) -> TimelineHistory:
        """Read a ``<TLI>.history`` file's text (blank lines and ``#`` comments skipped).

        Raises ``ValueError`` on a malformed line.
        """
        ancestors: list[tuple[int, LSN]] = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) < 2 or not fields[0].isdigit():
                raise ValueError(f"malformed timeline history line {line[:80]!r}")
            ancestors.append((int(fields[0]), LSN.parse(fields[1])))
        if any(tli >= timeline for tli, _ in ancestors):
            raise ValueError(f"timeline {timeline}'s history names a later timeline")
        return cls(timeline, tuple(ancestors))

    @classmethod
    def unknown(cls, timeline: int) -> TimelineHistory:
        """A timeline whose ancestry could not be read (timeline 1 has none: complete)."""
        return cls(timeline, (), complete=timeline == 1)

    def switch_of(self, timeline: int) -> LSN | None:
        """Where ``timeline`` (an ancestor) ended on the way to this one, if it is one."""
        for tli, switch in self.ancestors:
            if tli == timeline:
                return switch
        return None

    def holds(self, timeline: int, lsn: LSN) -> bool | None:
        """Whether WAL up to ``lsn`` on ``timeline`` is a prefix of this history (a replica
        there holds nothing this history lacks); None when it cannot be decided."""
        if timeline == self.timeline:
            return True
        if timeline > self.timeline:
            return False
        switch = self.switch_of(timeline)
        if switch is not None:
            return lsn <= switch
        return False if self.complete else None

    def verdict(self, mark: WriteMark) -> Verdict:
        """Whether the writes of ``mark`` are on this history."""
        if mark.timeline is None or mark.timeline == self.timeline:
            return "held"
        if mark.timeline > self.timeline:
            return "ahead"
        switch = self.switch_of(mark.timeline)
        if switch is None:
            # Not an ancestor: the writes were made on a branch this history never contained.
            return "lost" if self.complete else "unknown"
        if mark.lsn <= switch:
            return "held"
        # A switch point is a record boundary: a commit that began at or after it is not
        # shared. Between start and lsn the commit may lie on either side: undecidable.
        return "lost" if mark.start >= switch else "unknown"

    def __str__(self) -> str:
        chain = " -> ".join(f"{tli} (to {switch})" for tli, switch in self.ancestors)
        known = "" if self.complete else " (ancestry unknown)"
        return f"timeline {self.timeline}" + (f" from {chain}" if chain else "") + known


def history_file_name(timeline: int) -> str:
    """``pg_wal/0000000N.history`` relative to the data directory."""
    return f"pg_wal/{timeline:08X}.history"


def timeline_of_wal_file(name: str) -> int:
    """The timeline in a WAL file name (its first 8 hex digits)."""
    return int(name[:8], 16)


__all__ = [
    "TimelineHistory", "Verdict", "WriteMark", "history_file_name", "timeline_of_wal_file",
]
