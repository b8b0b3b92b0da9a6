"""Where every shard stands (``shard_status``) and what a migration would run (``plan``)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
import sqlalchemy as sa

from propstore.config import DiscoverySettings, ShardConfig, Topology
from propstore.errors import MigrationError
from propstore.lsn import LSN
from propstore.migrate._alembic import (
    Direction,
    PlannedRevision,
    ScriptLocation,
    current_revision,
    offline_sql,
    resolve_target,
    revisions_between,
    script_directory,
)
from propstore.migrate._lag import Clock, ReplicaLag, ShardLag, ShardProbe
from propstore.migrate._primary import observed_shard


@dataclass(frozen=True, slots=True)
class ShardMigrationStatus:
    """One shard: its database revision against the scripts' head, and its replicas now.

    Attributes:
        shard: the shard's name.
        primary: the observed primary's name (``migrate._primary``).
        current: the primary's alembic revision (None: never migrated, or unreachable).
        head: the script directory's head revision.
        error: why the primary could not be read (None when it could).
        replicas: each replica's lag (state, replay LSN, bytes behind, proven staleness).
        primary_lsn: the primary's flushed WAL position, the replicas' yardstick.
    """

    shard: str
    primary: str
    current: str | None
    head: str | None
    error: str | None
    replicas: tuple[ReplicaLag, ...]
    primary_lsn: LSN | None = None

    @property
    def reachable(self) -> bool:
        """Whether the primary answered."""
        return self.error is None

    @property
    def at_head(self) -> bool:
        """Reachable and at the head revision."""
        return self.reachable and self.current == self.head

    def __str__(self) -> str:
        if not self.reachable:
            where = f"primary {self.primary} unreachable: {self.error}"
        else:
            where = f"at {self.current or 'base'}" + (
                " (head)" if self.at_head else f", head is {self.head or 'base'}") + (
                f", primary WAL at {self.primary_lsn}" if self.primary_lsn else "")
        return "\n".join([f"{self.shard}: {where}", *(f"  {r}" for r in self.replicas)])


def select_shards(topology: Topology, shards: Sequence[str] | None) -> list[ShardConfig]:
    """The named shards in topology order (all when None); unknown names raise."""
    if shards is None:
        return list(topology.shards)
    known = {s.name for s in topology.shards}
    unknown = [name for name in shards if name not in known]
    if unknown:
        raise MigrationError(f"no shard named {', '.join(unknown)} (have {sorted(known)})")
    return [s for s in topology.shards if s.name in set(shards)]


def settled_lag(probe: ShardProbe, settle: float, clock: Clock = time.monotonic,
                interval: float = 0.05) -> ShardLag:
    """Sample until every up replica has a finite bound, or ``settle`` seconds pass.

    A single primary sample proves nothing about a replica that has not replayed it yet;
    a few more samples give such a replica a bound from the earlier one.
    """
    deadline = clock() + settle
    while True:
        lag = probe.sample()
        unproven = [r for r in lag.replicas if r.state != "down" and math.isinf(r.staleness)]
        if not unproven or clock() >= deadline:
            return lag
        time.sleep(interval)


def shard_status(
    topology: Topology, *, script_location: ScriptLocation = None,
    shards: Sequence[str] | None = None, settle: float = 0.5,
) -> list[ShardMigrationStatus]:
    """Every (or the named) shard's revision against head, and its replicas' lag now.

    ``settle`` (seconds) bounds the extra sampling that proves a lagging replica's bound.
    """
    head = script_directory(script_location).get_current_head()
    result = []
    for shard in select_shards(topology, shards):
        try:
            shard = observed_shard(shard, topology.routing.connect_timeout, topology.discovery)
        except MigrationError as exc:
            result.append(ShardMigrationStatus(
                shard=shard.name, primary="none observed", current=None, head=head,
                error=str(exc),
                replicas=(), primary_lsn=None,
            ))
            continue
        with ShardProbe(shard, connect_timeout=topology.routing.connect_timeout) as probe:
            lag = settled_lag(probe, settle)
        current, error = None, lag.primary_error
        if lag.primary_up:
            try:
                current = current_revision(shard.primary.dsn,
                                           topology.routing.connect_timeout)
            except (psycopg.Error, sa.exc.SQLAlchemyError) as exc:
                error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
        result.append(ShardMigrationStatus(
            shard=shard.name, primary=shard.primary.name, current=current, head=head,
            error=error, replicas=lag.replicas, primary_lsn=lag.primary_lsn,
        ))
    return result


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """What a migration would run on one shard, in order.

    Attributes:
        shard: the shard's name.
        current: its revision now (None: base, or unreadable; see ``error``).
        target: the revision it would reach (None: base).
        steps: the revisions alembic would run, in run order.
        direction: ``"up"`` or ``"down"``.
        sql: alembic's offline SQL for the steps, when asked for.
        error: why the shard could not be planned (unreachable, unknown revision).
        reachable: False when the error is that the primary could not be read.
    """

    shard: str
    current: str | None
    target: str | None
    steps: tuple[PlannedRevision, ...]
    direction: Direction = "up"
    sql: str | None = None
    error: str | None = None
    reachable: bool = True

    @property
    def nothing_to_do(self) -> bool:
        """Planned fine and already at the target (or past it in this direction)."""
        return self.error is None and not self.steps

    def __str__(self) -> str:
        if self.error is not None:
            return f"{self.shard}: cannot plan: {self.error}"
        if not self.steps:
            return f"{self.shard}: at {self.current or 'base'}, nothing to do"
        verb = "upgrade" if self.direction == "up" else "downgrade"
        lines = [f"{self.shard}: {verb} {self.current or 'base'} -> {self.target or 'base'}"]
        return "\n".join([*lines, *(f"  {step}" for step in self.steps)])


def plan_shard(
    shard: ShardConfig, revision: str = "head", *, direction: Direction = "up",
    sql: bool = False, script_location: ScriptLocation = None, connect_timeout: float = 2.0,
    discovery: DiscoverySettings | None = None,
) -> ShardPlan:
    """The :class:`ShardPlan` of one shard (reads its primary's current revision; with
    ``discovery``, the primary observed now rather than the file's)."""
    script = script_directory(script_location)
    target = resolve_target(script, revision)
    if discovery is not None:
        try:
            shard = observed_shard(shard, connect_timeout, discovery)
        except MigrationError as exc:
            return ShardPlan(shard.name, None, target, (), direction, error=str(exc))
    try:
        current = current_revision(shard.primary.dsn, connect_timeout)
    except (psycopg.Error, sa.exc.SQLAlchemyError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return ShardPlan(shard.name, None, target, (), direction,
                         error=f"primary {shard.primary.name}: {type(exc).__name__}: {message}",
                         reachable=False)
    try:
        steps = revisions_between(script, current, target, direction)
    except MigrationError as exc:
        return ShardPlan(shard.name, current, target, (), direction, error=str(exc))
    text = None
    if sql and steps:
        try:
            text = offline_sql(current, target, direction, script_location)
        except Exception as exc:  # a revision that reads data cannot render offline
            return ShardPlan(shard.name, current, target, steps, direction,
                             error=f"cannot render offline SQL: {type(exc).__name__}: {exc}")
    return ShardPlan(shard.name, current, target, steps, direction, sql=text)


def plan(
    topology: Topology, revision: str = "head", *, direction: Direction = "up",
    sql: bool = False, shards: Sequence[str] | None = None,
    script_location: ScriptLocation = None,
) -> list[ShardPlan]:
    """Per shard, in rollout order, the revisions a migration to ``revision`` would run.

    With ``sql=True`` each plan carries alembic's offline SQL for its steps (``command.
    upgrade(config, "current:target", sql=True)``, captured). Raises
    :class:`MigrationError` for an unknown revision or shard name.
    """
    return [
        plan_shard(shard, revision, direction=direction, sql=sql,
                   script_location=script_location,
                   connect_timeout=topology.routing.connect_timeout,
                   discovery=topology.discovery)
        for shard in select_shards(topology, shards)
    ]
