"""Who leads, as an HA manager says: an optional source beside the monitor's own polls.

Without a source (the default) the monitor decides each shard's primary from
``pg_is_in_recovery()`` alone. With one (a shard whose members name their Patroni REST API,
``patroni = "http://host:8008"`` in the topology file), the monitor also asks Patroni's
``GET /cluster`` who holds the leader lock, and ``GET /history`` where each timeline ended:

- a primary the source says no longer leads (demoted, stopping, another member took the
  lock) is dropped at once: no write or primary read is sent to it, and attempts waiting
  for one of its connections give up;
- the member the source names as the new leader is polled at once, so writes reach it as
  soon as it answers as a primary;
- the source only ever *removes* candidates: a node becomes the primary only when its own
  poll says it is one (the in-band check decides), and a source that does not answer is
  ignored (the in-band observation alone, as without a source).
"""

from propstore.discovery._leadership import Leadership, MemberState, history_of, parse_cluster
from propstore.discovery._patroni import PatroniSource

__all__ = ["Leadership", "MemberState", "PatroniSource", "history_of", "parse_cluster"]
