"""The lag report: one row per node with the figures the router uses. Pure; no I/O.

``propstore lag`` (table and ``--json``), the demo's live table and the metrics exporter all
read the monitor through :func:`lag_report`, so every view of lag agrees with what routing
decides. Programs can use it too::

    report = lag_report(store.shard_views(), store.topology.profiles,
                        store.monitor.state.clock())
    report.failing_shards(2.0)  # shards with no replica proven within 2 s
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from propstore.config import Profile
from propstore.lsn import LSN
from propstore.monitor._state import NodeRole, NodeStateName, NodeView, ShardView
from propstore.proof import describe_mode


@dataclass(frozen=True, slots=True)
class LagRow:
    """One node as the monitor sees it at :attr:`LagReport.at`.

    Attributes:
        shard: the shard's name.
        node: the node's configured name.
        address: ``host:port``.
        configured_role: the role the topology file expects.
        role: the role observed (``pg_is_in_recovery()``), None before a successful poll.
        state: ``up``, ``down``, ``paused`` (``pg_wal_replay_pause()``), ``paused
            (settings)`` (recovery paused by PostgreSQL: a hot-standby parameter below the
            primary's), ``receiver disconnected`` (not streaming), ``wrong role``,
            ``foreign``, ``other timeline`` (not on the primary's timeline history) or
            ``unknown`` (not polled yet).
        state_seconds: how long this process's monitor has seen the node in ``state``.
        lsn: replay LSN of a replica, flushed LSN of the primary (None when unknown).
        receive_lsn: last WAL position a replica received (None on a primary).
        bytes_behind: the primary's newest sampled LSN minus :attr:`lsn` (None if unknown).
        staleness_bound: proven bound, in seconds, on how stale the node's data is; 0 for
            the primary, ``inf`` when nothing can be proven (down, or behind every sample).
        receive_replay_gap: bytes received but not yet replayed (a paused or slow replay).
        eligible: per profile, whether the node may serve that profile's reads now (the
            bound is within the profile's budget); empty for the primary.
        serves_replica_reads: an up replica of this shard's primary.
        last_error: the last poll error, if the last poll failed.
        proofs: how reads on this node are proven, in a few words: ``direct: proofs tied
            to the server run``, ``session pooler: ...``, ``transaction pooler: per-read
            proofs only``, or for a load balancer which backend the figures describe
            (the monitor watches one backend per DSN).
    """

    shard: str
    node: str
    address: str
    configured_role: NodeRole
    role: NodeRole | None
    state: NodeStateName
    state_seconds: float
    lsn: LSN | None
    receive_lsn: LSN | None
    bytes_behind: int | None
    staleness_bound: float
    receive_replay_gap: int | None
    eligible: Mapping[str, bool]
    serves_replica_reads: bool
    last_error: str | None
    proofs: str = ""

    @property
    def is_primary(self) -> bool:
        """Whether this node is the shard's observed, reachable primary."""
        return self.role == "primary" and self.state == "up"

    def within(self, max_staleness: float) -> bool:
        """Whether this replica is proven within ``max_staleness`` seconds now."""
        return self.serves_replica_reads and self.staleness_bound <= max_staleness

    def to_dict(self) -> dict[str, Any]:
        """The row with the field names documented for ``propstore lag --json``."""
        bound = self.staleness_bound
        return {
            "shard": self.shard,
            "node": self.node,
            "address": self.address,
            "configured_role": self.configured_role,
            "role": self.role,
            "state": self.state,
            "state_seconds": round(self.state_seconds, 3),
            "lsn": None if self.lsn is None else str(self.lsn),
            "receive_lsn": None if self.receive_lsn is None else str(self.receive_lsn),
            "bytes_behind": self.bytes_behind,
            "staleness_bound_seconds": None if math.isinf(bound) else round(bound, 6),
            "receive_replay_gap_bytes": self.receive_replay_gap,
            "eligible": dict(self.eligible),
            "serves_replica_reads": self.serves_replica_reads,
            "last_error": self.last_error,
            "proofs": self.proofs,
        }


@dataclass(frozen=True, slots=True)
class LagReport:
    """Every node of every shard at one instant (``at``, on the monitor's clock)."""

    at: float
    rows: tuple[LagRow, ...]
    #: Budgets of the configured profiles, in seconds, by name.
    profiles: Mapping[str, float]

    @property
    def shards(self) -> tuple[str, ...]:
        """Shard names, in topology order."""
        return tuple(dict.fromkeys(row.shard for row in self.rows))

    def rows_of(self, shard: str) -> tuple[LagRow, ...]:
        """The rows of one shard (primary first, as configured)."""
        return tuple(row for row in self.rows if row.shard == shard)

    def row(self, node: str) -> LagRow:
        """The row of the node called ``node``; raises ``KeyError``."""
        for row in self.rows:
            if row.node == node:
                return row
        raise KeyError(node)

    def failing_shards(self, max_staleness: float) -> tuple[str, ...]:
        """Shards with no replica proven within ``max_staleness`` seconds (the ``lag``
        check: such a shard's reads with that budget all go to its primary)."""
        return tuple(
            shard for shard in self.shards
            if not any(row.within(max_staleness) for row in self.rows_of(shard))
        )


def lag_report(views: Iterable[ShardView], profiles: Mapping[str, Profile], now: float
               ) -> LagReport:
    """The report for these shard views at time ``now`` (the monitor's clock, seconds)."""
    rows: list[LagRow] = []
    for view in views:
        for node in view.nodes:
            bound = view.staleness_bound(node, now)
            is_primary = node.role == "primary" and view.primary is node
            gap = None
            if node.role == "replica" and node.receive_lsn is not None and node.lsn is not None:
                gap = max(0, node.receive_lsn - node.lsn)
            rows.append(LagRow(
                shard=view.name,
                node=node.name,
                address=node.config.address,
                configured_role=node.config.role,
                role=node.role,
                state=node.state,
                state_seconds=max(0.0, now - node.state_since),
                lsn=node.lsn,
                receive_lsn=node.receive_lsn if node.role == "replica" else None,
                bytes_behind=view.bytes_behind(node),
                staleness_bound=bound,
                receive_replay_gap=gap,
                eligible={} if is_primary else {
                    name: node.serves_replica_reads and bound <= profile.max_staleness
                    for name, profile in profiles.items()
                },
                serves_replica_reads=node.serves_replica_reads,
                last_error=node.last_error,
                proofs=_proofs(node),
            ))
    return LagReport(
        at=now, rows=tuple(rows),
        profiles={name: profile.max_staleness for name, profile in profiles.items()},
    )


def _proofs(node: NodeView) -> str:
    backend = None
    if node.run is not None:
        backend = f"{node.run.address}:{node.run.port}" if node.run.address else "unix socket"
    return describe_mode(node.config.via, node.pooler_seen if node.run else None,
                         backend=backend, proxied=_proxied(node),
                         tracks_prepared=node.config.pooler_tracks_prepared)


def _proxied(node: NodeView) -> bool:
    """Whether the DSN names several hosts, or the monitor's backend reports another port
    than the DSN's (something forwards the connection). A heuristic for display only."""
    host, _, port = node.config.address.rpartition(":")
    if "," in host or "," in port:
        return True
    return node.run is not None and node.run.port is not None and str(node.run.port) != port


__all__ = ["LagReport", "LagRow", "lag_report"]
