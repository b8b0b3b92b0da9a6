"""The rolling migration: one shard at a time, each gated on its replicas' lag.

For every shard, in topology order: (1) pre-flight — the primary answers and every replica
is up and proven within ``max_lag`` (else wait, up to ``wait_timeout``); (2) ``alembic
upgrade`` (or ``downgrade``) on the primary; (3) catch-up — read the primary's flushed WAL
position after the migration committed and wait until every replica has replayed it (up to
``catchup_timeout``); only then (4) the next shard. The first failure stops the run; the
shards after it are left untouched. alembic's per-shard ``alembic_version`` makes a re-run
continue where the last one stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from propstore._durations import format_duration
from propstore.config import ShardConfig, Topology
from propstore.errors import MigrationError
from propstore.migrate import _alembic
from propstore.migrate._alembic import Direction, PlannedRevision, ScriptLocation
from propstore.migrate._lag import Clock, ReplicaLag, ShardLag, ShardProbe
from propstore.migrate._primary import observed_shard
from propstore.migrate._status import ShardPlan, plan_shard, select_shards

log = structlog.get_logger("propstore.migrate")

Step = Literal["plan", "pre-flight", "migrate", "catch-up"]
Outcome = Literal["done", "already at target", "failed", "not started", "not selected"]
EventKind = Literal[
    "run_started", "shard_started", "already_at_target", "preflight_waiting",
    "preflight_passed", "migrating", "migrated", "catchup_waiting", "caught_up",
    "shard_done", "shard_failed", "canary_reached", "run_finished",
]


@dataclass(frozen=True, slots=True)
class MigrationEvent:
    """Something a rolling migration did or is waiting for (also logged with structlog as
    ``migrate.<kind>``).

    Attributes:
        kind: what happened (``preflight_waiting``, ``migrated``, ...).
        shard: the shard concerned (None for run-wide events).
        step: the step in progress.
        message: one human-readable line.
        replicas: the replicas' lag at this moment, when measured.
        remaining: seconds left before the step's timeout, while waiting.
    """

    kind: EventKind
    shard: str | None
    step: Step | None
    message: str
    replicas: tuple[ReplicaLag, ...] = ()
    remaining: float | None = None

    def __str__(self) -> str:
        where = " ".join(part for part in (self.shard or "migration", self.step) if part)
        countdown = "" if self.remaining is None else (
            f" [{format_duration(max(0.0, self.remaining))} left]")
        return f"{where}: {self.message}{countdown}"


@dataclass(frozen=True, slots=True)
class ShardResult:
    """How one shard fared.

    Attributes:
        shard: its name.
        outcome: ``done``, ``already at target``, ``failed``, ``not started`` or
            ``not selected``.
        before, after: its revision before and after (``after`` only when done).
        step: where it failed (``pre-flight`` and ``plan`` changed nothing; ``migrate``
            rolled back; ``catch-up`` means the primary is migrated but replicas lag).
        error: why it failed or was not started.
        seconds: time spent on the shard.
    """

    shard: str
    outcome: Outcome
    before: str | None = None
    after: str | None = None
    step: Step | None = None
    error: str | None = None
    seconds: float = 0.0

    def __str__(self) -> str:
        text = f"{self.shard:<16} {self.outcome}"
        if self.outcome == "done":
            text += f": {self.before or 'base'} -> {self.after or 'base'}"
            text += f" in {format_duration(self.seconds)}"
        elif self.outcome == "already at target":
            text += f" ({self.before or 'base'})"
        elif self.outcome == "failed":
            text += f" at {self.step}: {self.error}"
        elif self.error:
            text += f" ({self.error})"
        return text


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """The per-shard outcome of a :class:`RollingMigration` run."""

    target: str | None
    direction: Direction
    results: tuple[ShardResult, ...]
    stopped: str | None = None

    @property
    def ok(self) -> bool:
        """No shard failed (a canary stop is fine)."""
        return not any(r.outcome == "failed" for r in self.results)

    @property
    def migrated(self) -> tuple[str, ...]:
        """Shards migrated by this run."""
        return tuple(r.shard for r in self.results if r.outcome == "done")

    @property
    def nothing_to_do(self) -> bool:
        """Every selected shard was already at the target."""
        return all(r.outcome in ("already at target", "not selected") for r in self.results)

    def result(self, shard: str) -> ShardResult:
        """One shard's result (``KeyError`` if unknown)."""
        for each in self.results:
            if each.shard == shard:
                return each
        raise KeyError(shard)

    def __str__(self) -> str:
        if self.nothing_to_do:
            head = f"Nothing to do: every shard is at {self.target or 'base'}."
        elif self.ok and self.stopped is None:
            head = f"Every shard is at {self.target or 'base'}."
        else:
            head = f"Stopped: {self.stopped}." if self.stopped else "Finished."
        return "\n".join([head, *(f"  {r}" for r in self.results)])


class _ShardFailed(Exception):
    def __init__(self, step: Step, message: str) -> None:
        super().__init__(message)
        self.step = step


@dataclass(frozen=True)
class RollingMigration:
    """Migrate shard by shard, each only while its replicas keep up.

    Args:
        topology: the shards, in rollout order.
        revision: the target (``"head"``, a revision id, or ``"base"`` for down).
        max_lag: seconds of proven replica staleness allowed at pre-flight.
        wait_timeout: seconds the pre-flight may wait for the replicas.
        catchup_timeout: seconds to wait for the replicas to replay the migration.
        canary: stop after migrating this many shards (None: all).
        shards: names of the shards to consider (None: all).
        direction: ``"up"`` (alembic upgrade) or ``"down"`` (downgrade).
        on_event: called with every :class:`MigrationEvent` (progress display).
        script_location: an alembic script directory instead of propstore's own.
        check_interval: seconds between lag checks while waiting.
        report_interval: seconds between repeated waiting events.
        clock, sleep: injectable time.

    :meth:`run` returns a :class:`MigrationReport`; it raises only for bad arguments
    (unknown shard or revision: :class:`MigrationError`).
    """

    topology: Topology
    revision: str = "head"
    max_lag: float = 1.0
    wait_timeout: float = 60.0
    catchup_timeout: float = 60.0
    canary: int | None = None
    shards: Sequence[str] | None = None
    direction: Direction = "up"
    on_event: Callable[[MigrationEvent], None] | None = None
    script_location: ScriptLocation = None
    check_interval: float = 0.1
    report_interval: float = 1.0
    clock: Clock = field(default=time.monotonic, repr=False)
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    def __post_init__(self) -> None:
        if self.direction not in ("up", "down"):
            raise MigrationError(f"direction must be 'up' or 'down', not {self.direction!r}")
        if self.canary is not None and self.canary < 1:
            raise MigrationError("canary must be at least 1 shard")
        if self.max_lag <= 0 or self.wait_timeout < 0 or self.catchup_timeout < 0:
            raise MigrationError("max_lag must be > 0 and timeouts >= 0 seconds")

    # -- public -----------------------------------------------------------------------

    def run(self) -> MigrationReport:
        """Migrate every selected shard in order; stop at the first failure or the canary."""
        selected = {s.name for s in select_shards(self.topology, self.shards)}
        target = _alembic.resolve_target(
            _alembic.script_directory(self.script_location), self.revision)
        self._emit("run_started", None, None,
                   f"{'upgrade' if self.direction == 'up' else 'downgrade'} to "
                   f"{target or 'base'}, max lag {format_duration(self.max_lag)}")
        results: list[ShardResult] = []
        stopped: str | None = None
        for shard in self.topology.shards:
            if shard.name not in selected:
                results.append(ShardResult(shard.name, "not selected"))
            elif stopped is not None:
                results.append(ShardResult(shard.name, "not started", error=stopped))
            else:
                result = self._shard(shard, target)
                results.append(result)
                done = sum(r.outcome == "done" for r in results)
                if result.outcome == "failed":
                    stopped = f"{shard.name} failed at {result.step}"
                elif self.canary is not None and done >= self.canary:
                    stopped = f"canary: {done} shard(s) migrated"
                    self._emit("canary_reached", shard.name, None, stopped)
        report = MigrationReport(target, self.direction, tuple(results), stopped)
        self._emit("run_finished", None, None,
                   "ok" if report.ok else f"stopped: {stopped}")
        return report

    # -- one shard --------------------------------------------------------------------

    def _shard(self, shard: ShardConfig, target: str | None) -> ShardResult:
        began = self.clock()
        try:
            shard = observed_shard(shard, self.topology.routing.connect_timeout,
                                   self.topology.discovery)
        except MigrationError as exc:
            self._emit("shard_failed", shard.name, "plan", str(exc))
            return ShardResult(shard.name, "failed", step="plan", error=str(exc),
                               seconds=self.clock() - began)
        planned = self._plan(shard)
        before = planned.current if planned.error is None else None
        if planned.nothing_to_do:
            self._emit("already_at_target", shard.name, "plan",
                       f"already at {planned.current or 'base'}")
            return ShardResult(shard.name, "already at target", before=before)
        if planned.error is not None and planned.reachable:  # e.g. a revision unknown here
            self._emit("shard_failed", shard.name, "plan", planned.error)
            return ShardResult(shard.name, "failed", step="plan", error=planned.error,
                               seconds=self.clock() - began)
        try:
            with ShardProbe(shard, clock=self.clock,
                            connect_timeout=self.topology.routing.connect_timeout) as probe:
                self._emit("shard_started", shard.name, "pre-flight",
                           "checking primary and replicas")
                self._preflight(shard, probe)
                if planned.error is not None:
                    # The primary was unreachable at planning time; the pre-flight saw it
                    # answer, so read its revision again.
                    planned = self._plan(shard)
                    before = planned.current
                    if planned.error is not None:
                        raise _ShardFailed("plan", planned.error)
                    if planned.nothing_to_do:
                        return ShardResult(shard.name, "already at target", before=before)
                self._migrate(shard, planned.steps, target)
                self._catch_up(shard, probe)
        except _ShardFailed as failure:
            self._emit("shard_failed", shard.name, failure.step, str(failure))
            return ShardResult(shard.name, "failed", before=before, step=failure.step,
                               error=str(failure), seconds=self.clock() - began)
        seconds = self.clock() - began
        self._emit("shard_done", shard.name, None,
                   f"{before or 'base'} -> {target or 'base'} in {format_duration(seconds)}")
        return ShardResult(shard.name, "done", before=before, after=target, seconds=seconds)

    def _plan(self, shard: ShardConfig) -> ShardPlan:
        return plan_shard(shard, self.revision, direction=self.direction,
                          script_location=self.script_location,
                          connect_timeout=self.topology.routing.connect_timeout)

    def _wait(
        self, shard: ShardConfig, probe: ShardProbe, step: Step, timeout: float,
        done: Callable[[ShardLag], bool], describe: Callable[[ShardLag], str],
        waiting: EventKind,
    ) -> ShardLag:
        """Sample until ``done``; emit ``waiting`` events with a countdown; fail at the
        deadline with ``describe``'s explanation."""
        deadline = self.clock() + timeout
        last_report: float | None = None
        while True:
            lag = probe.sample()
            if done(lag):
                return lag
            now = self.clock()
            if now >= deadline:
                raise _ShardFailed(step, f"gave up after {format_duration(timeout)}: "
                                         f"{describe(lag)}")
            if last_report is None or now - last_report >= self.report_interval:
                last_report = now
                self._emit(waiting, shard.name, step, f"waiting: {describe(lag)}",
                           replicas=lag.replicas, remaining=deadline - now)
            self.sleep(min(self.check_interval, max(0.0, deadline - now)))

    def _preflight(self, shard: ShardConfig, probe: ShardProbe) -> None:
        lag = self._wait(
            shard, probe, "pre-flight", self.wait_timeout,
            done=lambda lag: lag.ready(self.max_lag),
            describe=lambda lag: lag.explain(self.max_lag), waiting="preflight_waiting",
        )
        self._emit("preflight_passed", shard.name, "pre-flight",
                   f"replicas within {format_duration(self.max_lag)} "
                   f"(worst {format_duration(lag.worst)})", replicas=lag.replicas)

    def _migrate(self, shard: ShardConfig, steps: Sequence[PlannedRevision],
                 target: str | None) -> None:
        self._emit("migrating", shard.name, "migrate",
                   "running " + ", ".join(step.revision for step in steps))
        attributes: dict[str, Any] = {
            _alembic.SHARD_ATTRIBUTE: shard.name,
            _alembic.PRIMARY_DSN_ATTRIBUTE: shard.primary.dsn,
            _alembic.REPLICA_DSNS_ATTRIBUTE: tuple(r.dsn for r in shard.replicas),
        }
        began = self.clock()
        run = _alembic.upgrade if self.direction == "up" else _alembic.downgrade
        try:
            run(shard.primary.dsn, target or "base", script_location=self.script_location,
                attributes=attributes)
        except Exception as exc:  # any revision error: report it, stop, touch nothing more
            log.warning("migrate.alembic_failed", shard=shard.name, exc_info=True)
            first = str(exc).strip().splitlines()
            raise _ShardFailed("migrate", f"{type(exc).__name__}: "
                                          f"{first[0] if first else ''}") from exc
        self._emit("migrated", shard.name, "migrate",
                   f"primary at {target or 'base'} in {format_duration(self.clock() - began)}")

    def _catch_up(self, shard: ShardConfig, probe: ShardProbe) -> None:
        # Sampled after alembic returned, i.e. after the migration's commit was
        # acknowledged, so this flushed LSN covers every change the migration made.
        first = probe.sample()
        if first.primary_lsn is None or not first.primary_up:
            raise _ShardFailed("catch-up", f"primary {first.primary}: "
                                           f"{first.primary_error or 'no WAL position'}")
        target = first.primary_lsn

        def describe(lag: ShardLag) -> str:
            behind = lag.behind(target)
            return f"replaying up to {target}: " + "; ".join(str(r) for r in behind)

        self._wait(shard, probe, "catch-up", self.catchup_timeout,
                   done=lambda lag: lag.caught_up_to(target), describe=describe,
                   waiting="catchup_waiting")
        self._emit("caught_up", shard.name, "catch-up",
                   f"every replica has replayed {target}")

    # -- events -----------------------------------------------------------------------

    def _emit(self, kind: EventKind, shard: str | None, step: Step | None, message: str,
              *, replicas: tuple[ReplicaLag, ...] = (), remaining: float | None = None
              ) -> None:
        event = MigrationEvent(kind, shard, step, message, replicas, remaining)
        level = log.warning if kind == "shard_failed" else log.info
        level(f"migrate.{kind}", shard=shard, step=step, message=message,
              remaining=None if remaining is None else round(remaining, 3),
              replicas=[str(r) for r in replicas] or None)
        if self.on_event is not None:
            self.on_event(event)
