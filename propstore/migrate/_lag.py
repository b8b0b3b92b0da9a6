"""One shard's replication lag, measured now, as a sound time bound.

The pre-flight check, the catch-up wait, :class:`~propstore.migrate.LagGuard` and ``migrate
status`` all ask the same question, so they share :class:`ShardProbe`. It polls the shard's
primary (clock read *before* the poll is sent) and then each replica with the monitor's own
statement, and folds the answers into a monitor :class:`~propstore.monitor.ShardView`, so the
staleness bound is the monitor's argument exactly (``LagHistory``): a replica that has
replayed ``R >= P`` of a primary sample ``(t, P)`` holds every write acknowledged before
``t``, hence is at most ``now - t`` stale. Bytes behind are shown, never used to decide.
Each poll has a hard deadline (``_wire``), so a frozen server costs a timeout, not a hang.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

import psycopg

from propstore import _sql
from propstore._durations import format_bytes, format_duration
from propstore._wire import DeadlineExceeded, Statement, execute
from propstore.config import NodeConfig, ShardConfig
from propstore.lsn import LSN
from propstore.monitor import Observation, ShardView
from propstore.monitor._state import (
    apply_failure,
    apply_observation,
    initial_views,
    parse_hot_standby_settings,
)

Clock = Callable[[], float]




@dataclass(frozen=True, slots=True)
class ReplicaLag:
    """One replica at one measurement.

    Attributes:
        name: the node's configured name.
        state: the monitor's state name (``up``, ``paused``, ``paused (settings)``,
            ``receiver disconnected``,
            ``wrong role``, ``foreign``) or ``down`` when the poll failed.
        replay_lsn: last WAL position replayed (None when unknown).
        bytes_behind: primary's sampled LSN minus ``replay_lsn`` (display only).
        staleness: proven bound in seconds on how old its data is; ``inf`` if unprovable.
        error: why the poll failed, for a down replica.
    """

    name: str
    state: str
    replay_lsn: LSN | None
    bytes_behind: int | None
    staleness: float
    error: str | None = None

    @property
    def up(self) -> bool:
        """Reachable, replaying and streaming from this shard's primary."""
        return self.state == "up"

    def within(self, max_lag: float) -> bool:
        """Up, and proven at most ``max_lag`` seconds stale."""
        return self.up and self.staleness <= max_lag

    def __str__(self) -> str:
        if self.state == "down":
            return f"{self.name} down ({self.error or 'unreachable'})"
        bound = "unproven" if math.isinf(self.staleness) else f"≤ {format_duration(self.staleness)}"
        return (f"{self.name} {self.state}, staleness {bound}, "
                f"{format_bytes(self.bytes_behind)} behind, replay {self.replay_lsn or '-'}")


@dataclass(frozen=True, slots=True)
class ShardLag:
    """A shard's primary and replicas at one measurement (``at``: the probe's clock)."""

    shard: str
    at: float
    primary: str
    primary_lsn: LSN | None
    primary_error: str | None
    replicas: tuple[ReplicaLag, ...]

    @property
    def primary_up(self) -> bool:
        """The configured primary answered and is not in recovery."""
        return self.primary_error is None

    @property
    def worst(self) -> float:
        """The largest replica staleness bound (0 without replicas; ``inf`` if unprovable)."""
        return max((r.staleness for r in self.replicas), default=0.0)

    def blocking(self, max_lag: float) -> tuple[ReplicaLag, ...]:
        """Replicas that are not up or not proven within ``max_lag`` seconds."""
        return tuple(r for r in self.replicas if not r.within(max_lag))

    def ready(self, max_lag: float) -> bool:
        """Primary reachable and every replica up and within ``max_lag`` seconds."""
        return self.primary_up and not self.blocking(max_lag)

    def caught_up_to(self, lsn: LSN) -> bool:
        """Every replica has replayed ``lsn``."""
        return all(r.replay_lsn is not None and r.replay_lsn >= lsn for r in self.replicas)

    def behind(self, lsn: LSN) -> tuple[ReplicaLag, ...]:
        """Replicas that have not replayed ``lsn`` yet."""
        return tuple(r for r in self.replicas if r.replay_lsn is None or r.replay_lsn < lsn)

    def explain(self, max_lag: float) -> str:
        """Why the shard is not :meth:`ready` (empty when it is)."""
        reasons = [] if self.primary_up else [f"primary {self.primary}: {self.primary_error}"]
        reasons += [f"{r} (max lag {format_duration(max_lag)})" for r in self.blocking(max_lag)]
        return "; ".join(reasons)

    def __str__(self) -> str:
        primary = (f"{self.primary} at {self.primary_lsn}" if self.primary_up
                   else f"{self.primary} DOWN ({self.primary_error})")
        return "; ".join([primary, *(str(r) for r in self.replicas)])


def _describe(exc: BaseException) -> str:
    if isinstance(exc, DeadlineExceeded):
        return "poll timed out"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _lsn(value: bytes | None) -> LSN | None:
    return LSN.parse(value) if value else None


class ShardProbe:
    """Measures one shard's replica lag on demand; keeps a connection per node open.

    Use as a context manager (or call :meth:`close`). The primary's samples accumulate in a
    bounded history across calls, so a replica far behind still gets a (looser) sound bound.

    Args:
        shard: the shard; its configured primary is the node whose LSNs are sampled.
        clock: monotonic seconds, injectable for tests.
        connect_timeout: seconds to open a connection (libpq rounds up to >= 2).
        poll_timeout: seconds a poll may take before the node counts as down.
        history_size: primary samples kept. Larger than the monitor's: a guard samples
            once per batch, hundreds of times a second, and a replica ``max_lag`` behind
            needs a sample from ``max_lag`` ago at fine resolution (older samples are
            thinned, which keeps bounds sound but makes them loose).
    """

    def __init__(
        self, shard: ShardConfig, *, clock: Clock = time.monotonic,
        connect_timeout: float = 2.0, poll_timeout: float = 2.0, history_size: int = 4096,
    ) -> None:
        self.shard = shard
        self._clock = clock
        self._connect_timeout = connect_timeout
        self._poll_timeout = poll_timeout
        self._history_size = history_size
        (self._view,) = initial_views((shard,), clock())
        self._conns: list[psycopg.Connection[Any] | None] = [None] * len(shard.nodes)

    @classmethod
    def from_dsns(cls, primary: str, replicas: Sequence[str], *, name: str = "shard",
                  **kwargs: Any) -> ShardProbe:
        """A probe for a primary and replicas given as DSNs (nodes named like the config's
        defaults: ``<name>-primary``, ``<name>-replicaN``)."""
        shard = ShardConfig(
            name=name, buckets=(),
            primary=NodeConfig(f"{name}-primary", primary, "primary"),
            replicas=tuple(NodeConfig(f"{name}-replica{i}", dsn, "replica")
                           for i, dsn in enumerate(replicas, 1)),
        )
        return cls(shard, **kwargs)

    def __enter__(self) -> ShardProbe:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close every connection."""
        for i, conn in enumerate(self._conns):
            if conn is not None:
                conn.close()
                self._conns[i] = None

    @property
    def view(self) -> ShardView:
        """The monitor-style view after the last :meth:`sample`."""
        return self._view

    def sample(self) -> ShardLag:
        """Poll the primary, then every replica; return the shard's lag now."""
        # The primary is polled first: a replica's replay LSN read afterwards can only be
        # newer, so comparing it with this sample never overstates freshness.
        for index in range(len(self.shard.nodes)):
            self._poll(index)
        view, at = self._view, self._clock()
        primary = view.nodes[0]
        if primary.failures:
            primary_error = primary.last_error or "unreachable"
        elif view.primary_index != 0 or primary.role != "primary":
            primary_error = "in recovery (not a primary)"
        else:
            primary_error = None
        replicas = tuple(
            ReplicaLag(
                name=node.name,
                state="down" if node.failures or not node.up else node.state,
                replay_lsn=node.lsn if node.role == "replica" else None,
                bytes_behind=view.bytes_behind(node) if node.role == "replica" else None,
                staleness=view.staleness_bound(node, at) if not node.failures else math.inf,
                error=node.last_error,
            )
            for node in view.nodes[1:]
        )
        return ShardLag(self.shard.name, at, primary.name, view.primary_lsn, primary_error,
                        replicas)

    def _connect(self, index: int) -> psycopg.Connection[Any]:
        conn = self._conns[index]
        if conn is None or conn.closed:
            conn = psycopg.connect(
                self.shard.nodes[index].dsn, autocommit=True,
                connect_timeout=max(2, round(self._connect_timeout)),
                application_name="propstore-migrate",
            )
            conn.execute(_sql.prepare_sql(_sql.POLL))
            self._conns[index] = conn
        return conn

    def _poll(self, index: int) -> None:
        try:
            conn = self._connect(index)
            sent_at = self._clock()
            (result,) = execute(cast(psycopg.Connection[object], conn),
                                [Statement(_sql.POLL)], time.monotonic() + self._poll_timeout)
        except (DeadlineExceeded, psycopg.Error, OSError) as exc:
            broken = self._conns[index]
            if broken is not None:
                broken.close()
                self._conns[index] = None
            # One failure is enough here: a migration must not proceed on a node it could
            # not see just now (the monitor's tolerance is for routing, not for gating).
            self._view = apply_failure(self._view, index, self._clock(), _describe(exc), 1)
            return
        row = [result.get_value(0, c) for c in range(7)]
        self._view = apply_observation(self._view, index, Observation(
            sent_at=sent_at,
            in_recovery=row[0] == b"t",
            lsn=_lsn(row[1]),
            receive_lsn=_lsn(row[2]),
            replay_paused=row[3] == b"t",
            receiver_streaming=row[4] == b"t",
            system_id=int(row[5]) if row[5] else None,
            hot_standby_settings=parse_hot_standby_settings(row[6]),
        ), self._history_size)
