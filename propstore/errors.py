"""Exceptions raised by propstore.

Every error a caller may want to catch derives from :class:`PropStoreError`::

    PropStoreError
    ├── ConfigError             the topology file or an option is invalid
    ├── InvalidInputError       a tenant, user id, property document or key was refused
    │   └── InvalidTokenError   a token string is malformed or names an unknown shard
    ├── StaleReadError          no node could serve the read within its freshness budget
    ├── ShardUnavailableError   the shard's primary cannot be reached (writes, strong and
    │                           token reads; a budgeted read gets StaleReadError instead)
    ├── WriteLostError          a token's write is provably not in the shard's history
    └── MigrationError          a rolling migration stopped (pre-flight, failure, catch-up)

Messages name the shard, node or input at fault. Passwords never appear in them.
"""

from __future__ import annotations

from propstore.lsn import LSN


class PropStoreError(Exception):
    """Base class of every error propstore raises on purpose."""


class ConfigError(PropStoreError):
    """The topology configuration is invalid (file, keys, values, bucket map)."""


class InvalidInputError(PropStoreError, ValueError):
    """An argument was refused before anything was sent to a database.

    Attributes:
        field: which argument was refused (``"tenant"``, ``"user_id"``, ``"props"``, ...).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"invalid {field}: {message}")
        self.field = field


class InvalidTokenError(InvalidInputError):
    """A token string could not be parsed, or it names a shard the topology lacks."""

    def __init__(self, message: str) -> None:
        super().__init__("token", message)


class StaleReadError(PropStoreError):
    """No replica was provably within the budget and the primary could not take the read.

    Raised for a budgeted read when the shard primary did not serve it (its limiter shed
    it: the primary's latency left its normal band, or a configured ceiling was reached; or
    the primary read failed: connection lost, restarting, failing over) and every step of
    the read's degrade policy failed too. The message names the shard, the budget, the
    primary's state and what was tried; the same facts are attributes. A failed primary
    read is also the exception's ``__cause__`` (a :class:`ShardUnavailableError`).

    Attributes:
        shard: the shard's name.
        budget: the read's budget, as text.
        reason: why the primary did not serve it: ``primary_overloaded``,
            ``fallback_ceiling`` or ``primary_unavailable``.
        tried: what the read tried, in order, one line each.
    """

    def __init__(self, shard: str, message: str, *, budget: str = "", reason: str = "",
                 tried: tuple[str, ...] = ()) -> None:
        super().__init__(f"shard {shard}: {message}")
        self.shard = shard
        self.budget = budget
        self.reason = reason
        self.tried = tried


class ShardUnavailableError(PropStoreError):
    """The shard's primary could not be reached (after bounded retries)."""

    def __init__(self, shard: str, message: str) -> None:
        super().__init__(f"shard {shard}: {message}")
        self.shard = shard


class WriteLostError(PropStoreError):
    """A read-your-writes token names a write that a failover provably lost.

    The shard's primary is on a timeline that branched off the token's timeline *before*
    the write's commit record (asynchronous replication had not sent it to the standby that
    was promoted), so no node can ever serve it: the caller's write is gone and must be
    redone if it matters. Raised instead of answering with data that lacks the write.

    Attributes:
        shard: the shard.
        timeline: the timeline the write was made on.
        lsn: the token's position on that timeline.
        switch: where the shard's current history left that timeline.
    """

    def __init__(self, shard: str, timeline: int, lsn: LSN, switch: LSN | None,
                 current: int) -> None:
        where = (f"timeline {current} branched off it at {switch}" if switch is not None
                 else f"timeline {timeline} is not an ancestor of the current timeline "
                      f"{current}")
        super().__init__(
            f"shard {shard}: the write at {lsn} on timeline {timeline} was lost in a "
            f"failover ({where}, before the write): read-your-writes cannot hold"
        )
        self.shard = shard
        self.timeline = timeline
        self.lsn = lsn
        self.switch = switch


class MigrationError(PropStoreError):
    """A rolling migration or lag-guarded batch job stopped before completing."""


__all__ = [
    "ConfigError",
    "InvalidInputError",
    "InvalidTokenError",
    "MigrationError",
    "PropStoreError",
    "ShardUnavailableError",
    "StaleReadError",
    "WriteLostError",
]
