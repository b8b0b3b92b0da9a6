"""``ReadStats``: a store's routing counters (reads, writes, refusals, waits, retries)."""

from __future__ import annotations

import threading
from collections import Counter

from propstore.store._program import ReadResult


class ReadStats:
    """Routing counters kept by a store: reads by (shard, served by, reason), refusals and
    waits by (shard, profile[, reason]). Bounded: the key spaces are shards x {replica,
    primary} x reasons and shards x profiles x reasons, whatever the traffic."""

    def __init__(self) -> None:
        self.reads: Counter[tuple[str, str, str]] = Counter()
        self.writes: Counter[str] = Counter()
        #: ``StaleReadError`` raised, by (shard, profile, reason the primary declined).
        self.refusals: Counter[tuple[str, str, str]] = Counter()
        #: Reads served after a ``Degrade.wait``, by (shard, profile).
        self.waits: Counter[tuple[str, str]] = Counter()
        #: Reads whose primary failed transiently (a restart, a failover) and that a retry
        #: within their deadline served, by (shard, ``replica`` or ``primary``).
        self.retried: Counter[tuple[str, str]] = Counter()
        # ``counter[key] += 1`` is a read then a write: concurrent threads could lose counts.
        self._lock = threading.Lock()

    def record(self, result: ReadResult) -> None:
        """Count one read."""
        key = (result.shard, "replica" if result.from_replica else "primary",
               result.fallback_reason or "fresh")
        with self._lock:
            self.reads[key] += 1

    def record_write(self, shard: str) -> None:
        """Count one write."""
        with self._lock:
            self.writes[shard] += 1

    def record_refusal(self, shard: str, profile: str, reason: str) -> None:
        """Count one ``StaleReadError``."""
        with self._lock:
            self.refusals[(shard, profile, reason)] += 1

    def refused(self, shard: str) -> dict[str, dict[str, int]]:
        """This store's ``StaleReadError`` on ``shard`` so far: ``{profile: {reason: n}}``."""
        with self._lock:
            items = sorted((k, n) for k, n in self.refusals.items() if k[0] == shard)
        by_profile: dict[str, dict[str, int]] = {}
        for (_shard, profile, reason), count in items:
            by_profile.setdefault(profile, {})[reason] = count
        return by_profile

    def record_retry(self, shard: str, from_replica: bool) -> None:
        """Count one read served by a retry after its primary failed transiently."""
        with self._lock:
            self.retried[(shard, "replica" if from_replica else "primary")] += 1

    def record_wait(self, shard: str, profile: str) -> None:
        """Count one read served after waiting under its degrade policy."""
        with self._lock:
            self.waits[(shard, profile)] += 1
