"""Whether a token read can be proven at all on a shard: its write's timeline must lie on
the observed primary's history (``docs/architecture.md``, rule 6). Pure: the shard's view
and the token in, a verdict or the caller's error out."""

from __future__ import annotations

from propstore.errors import ShardUnavailableError, StaleReadError, WriteLostError
from propstore.freshness import Token
from propstore.monitor import ShardView


def unplaced(view: ShardView, shard: str, token: Token) -> bool:
    """A token read whose timelines cannot be placed yet: no primary observed so far."""
    if view.timelines is not None:
        return False
    return any(mark.timeline is not None for mark in token.marks_for(shard))


def check(view: ShardView, shard: str, token: Token) -> None:
    """Refuse a token read that no node of the shard can prove: the token's write was
    lost in a failover (:class:`~propstore.WriteLostError`), or its timeline cannot be
    placed on the observed primary's history yet."""
    marks = token.marks_for(shard)
    if not marks or all(mark.timeline is None for mark in marks):
        return
    timelines = view.timelines
    for mark in marks:
        if mark.timeline is None:
            continue
        if timelines is None:
            raise ShardUnavailableError(
                shard, f"no primary observed yet to place the token's timeline "
                f"{mark.timeline} on"
            )
        verdict = timelines.verdict(mark)
        if verdict == "lost":
            raise WriteLostError(shard, mark.timeline, mark.lsn,
                                 timelines.switch_of(mark.timeline), timelines.timeline)
        if verdict == "ahead":
            raise ShardUnavailableError(
                shard, f"the token's write is on timeline {mark.timeline}, newer than the "
                f"observed primary's {timelines.timeline} (failover in progress)"
            )
        if verdict == "unknown":
            raise StaleReadError(
                shard, f"cannot prove the token's write at {mark.lsn} on timeline "
                f"{mark.timeline} survived: {timelines} (the monitor needs to read "
                "timeline history files, see docs/security.md)"
            )
