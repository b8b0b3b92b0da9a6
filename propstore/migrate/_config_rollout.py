"""The configuration rollout: node by node, each step gated, verified and baked.

For each step of a :class:`ConfigPlan`: (1) pre-flight — the shard's primary answers and
every replica is up and proven within ``max_lag`` (:class:`ShardProbe`, as the schema
migrator); (2) apply — ``ALTER SYSTEM SET`` and ``pg_reload_conf()``, then a restart through
the :class:`NodeController` when a setting needs one; (3) verify — a new session's
``pg_settings`` shows every value and no ``pending_restart``; (4) settle — the shard is
ready again (a restarted node answers, its replicas stream and are within ``max_lag``);
(5) bake — for ``bake`` seconds the shard must stay ready: a paused replay (either kind),
a bound past ``max_lag``, a node down or not streaming is a regression. A regression
reverts every node this change has touched, newest first (the reverse of a safe order is
safe), and stops with a report. The servers tell a re-run which nodes run with the new
values; the :class:`ConfigJournal` keeps the values they had before, and which of them passed
their bake: a step applied by a run that stopped before the end of its bake is settled and
baked again before the re-run goes on (and reverted like any other on a regression).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import psycopg
import structlog
from psycopg import sql

from propstore._durations import format_duration
from propstore.config import NodeConfig, ShardConfig, Topology
from propstore.errors import MigrationError
from propstore.migrate._config_journal import ConfigJournal
from propstore.migrate._config_plan import ConfigPlan, ConfigStep, NodeSetting, read_settings
from propstore.migrate._config_report import (
    ConfigEvent,
    ConfigEventKind,
    ConfigReport,
    Phase,
    Regression,
    StepResult,
)
from propstore.migrate._controller import NodeController
from propstore.migrate._lag import Clock, ReplicaLag, ShardLag, ShardProbe
from propstore.migrate._settings import HOT_STANDBY_PARAMETERS, same_value

log = structlog.get_logger("propstore.config")


class _StepFailed(Exception):
    def __init__(self, phase: Phase, message: str) -> None:
        super().__init__(message)
        self.phase = phase


class _Regressed(Exception):
    def __init__(self, regression: Regression) -> None:
        super().__init__(str(regression))
        self.regression = regression


@dataclass
class ConfigRollout:
    """Roll a planned configuration change out, node by node.

    Args:
        topology: the shards (the plan's nodes are among them).
        plan: from :func:`plan_config_change`.
        controller: restarts a node for ``postmaster``-context settings (required when
            the plan restarts anything).
        max_lag: seconds of proven replica staleness allowed at pre-flight, settle, bake.
        bake: seconds each step is watched after it settled.
        wait_timeout: seconds a pre-flight may wait for the replicas.
        settle_timeout: seconds a step may take to become ready after it was applied
            (restart, WAL receiver reconnect, catch-up); past it: a regression.
        verify_timeout: seconds until ``pg_settings`` must show the new values.
        restart_timeout: seconds a restart may take.
        canary: stop after this many steps were applied and baked (None: all).
        journal: file keeping the values before (None: kept in memory only).
        on_event: called with every :class:`ConfigEvent`.
        check_interval, report_interval: seconds between lag samples / repeated events.
        clock, sleep: injectable time.

    :meth:`run` returns a :class:`ConfigReport`.
    """

    topology: Topology
    plan: ConfigPlan
    controller: NodeController | None = None
    max_lag: float = 1.0
    bake: float = 10.0
    wait_timeout: float = 60.0
    settle_timeout: float = 60.0
    verify_timeout: float = 10.0
    restart_timeout: float = 120.0
    canary: int | None = None
    journal: Path | None = None
    on_event: Callable[[ConfigEvent], None] | None = None
    check_interval: float = 0.1
    report_interval: float = 1.0
    clock: Clock = field(default=time.monotonic, repr=False)
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    _applied: list[ConfigStep] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_lag <= 0 or min(self.bake, self.wait_timeout, self.settle_timeout,
                                    self.verify_timeout) < 0:
            raise MigrationError("max_lag must be > 0 seconds and bake/timeouts >= 0")
        if self.canary is not None and self.canary < 1:
            raise MigrationError("canary must be at least 1 step")
        if self.plan.needs_restart and self.controller is None:
            raise MigrationError("the plan restarts nodes and no node controller was given")

    # -- public -----------------------------------------------------------------------

    def run(self) -> ConfigReport:
        """Apply every pending step in order; revert all on a regression; stop at a
        failure or the canary."""
        journal = ConfigJournal(self.journal)
        self._applied = [s for s in self.plan.steps if s.applied]
        self._emit("run_started", None, None, f"{self.plan.change}: {len(self.plan.pending)} "
                   f"of {len(self.plan.steps)} step(s) to do, max lag "
                   f"{format_duration(self.max_lag)}, bake {format_duration(self.bake)}")
        results: list[StepResult] = []
        stopped: str | None = None
        regression: Regression | None = None
        probes: dict[str, ShardProbe] = {}
        try:
            for step in self.plan.steps:
                if stopped is not None:
                    results.append(StepResult(step.number, step.shard.name, step.node.name,
                                              "not started", error=stopped))
                    continue
                rebake = step.applied and journal.unbaked(step.node.name)
                if step.applied and not rebake:
                    self._emit("step_skipped", step, None, "already applied (servers show "
                               "every new value)")
                    results.append(StepResult(step.number, step.shard.name, step.node.name,
                                              "already applied"))
                    continue
                probe = probes.get(step.shard.name)
                if probe is None:
                    probe = probes[step.shard.name] = self._probe(step.shard)
                try:
                    result = (self._rebake(step, probe, journal) if rebake
                              else self._step(step, probe, journal))
                except _Regressed as failure:
                    regression = failure.regression
                    results.append(StepResult(step.number, step.shard.name, step.node.name,
                                              "failed", regression.phase,
                                              regression.measurement, rebaked=rebake))
                    stopped = f"regression at step {step.number} ({step.node.name})"
                    continue
                results.append(result)
                if result.outcome == "failed":
                    stopped = f"step {step.number} ({step.node.name}) failed at {result.phase}"
                elif self.canary is not None and sum(
                        r.outcome == "done" for r in results) >= self.canary:
                    stopped = f"canary: {self.canary} step(s) applied; re-run to continue"
                    self._emit("canary_reached", step, None, stopped)
        finally:
            for probe in probes.values():
                probe.close()
        report = ConfigReport(self.plan, tuple(results), stopped)
        if regression is not None:
            report = self._revert(report, regression, journal)
        elif report.complete:
            journal.clear()
        self._emit("run_finished", None, None, "done" if report.complete else
                   f"stopped: {report.stopped}")
        return report

    # -- one step ---------------------------------------------------------------------

    def _probe(self, shard: ShardConfig) -> ShardProbe:
        return ShardProbe(shard, clock=self.clock,
                          connect_timeout=self.topology.routing.connect_timeout)

    def _step(self, step: ConfigStep, probe: ShardProbe, journal: ConfigJournal) -> StepResult:
        began = self.clock()
        self._emit("step_started", step, "pre-flight", ", ".join(
            str(s) for s in step.settings) + f" ({step.effect})")
        try:
            self._wait_ready(step, probe, "pre-flight", self.wait_timeout,
                             excused=self._repairs(step, include_self=True))
        except _StepFailed as failure:
            self._emit("step_failed", step, failure.phase, str(failure))
            return StepResult(step.number, step.shard.name, step.node.name, "failed",
                              failure.phase, str(failure), self.clock() - began)
        journal.record(step)  # before the node is touched: a crash now still reverts
        self._applied.append(step)
        try:
            unavailable = self._set(step, step.settings, "apply", revert=False)
        except _StepFailed as failure:
            raise _Regressed(Regression(step.number, step.node.name, failure.phase,
                                        str(failure), self.clock() - began)) from None
        return self._bake(step, probe, journal, began, "applied and baked",
                          unavailable=unavailable)

    def _rebake(self, step: ConfigStep, probe: ShardProbe, journal: ConfigJournal
                ) -> StepResult:
        """``step`` runs with its new values, but the run that applied them stopped before
        its bake passed: settle and bake it now (a regression reverts, as in a first run)."""
        began = self.clock()
        self._emit("step_rebaking", step, "settle", "applied by an interrupted run that "
                   "stopped before the end of its bake: baking it again")
        return self._bake(step, probe, journal, began, "baked again", rebaked=True)

    def _bake(self, step: ConfigStep, probe: ShardProbe, journal: ConfigJournal,
              began: float, what: str, *, unavailable: float | None = None,
              rebaked: bool = False) -> StepResult:
        self._settle_and_bake(step, probe)
        journal.baked(step.node.name)  # before step_done: a stop after it skips the node
        seconds = self.clock() - began
        self._emit("step_done", step, None, f"{what} in {format_duration(seconds)}")
        return StepResult(step.number, step.shard.name, step.node.name, "done",
                          seconds=seconds, unavailable=unavailable, rebaked=rebaked)

    def _set(self, step: ConfigStep, settings: Sequence[NodeSetting], phase: Phase, *,
             revert: bool) -> float | None:
        """Write the values (new ones, or the old ones when reverting), reload, restart
        if needed, verify. Returns the seconds the node was down for a restart."""
        node = step.node
        statements: list[sql.Composed] = []
        for setting in settings:
            if not setting.changes:
                continue
            name = sql.Identifier(setting.name)
            if revert and not setting.before_in_auto_conf:
                statements.append(sql.SQL("ALTER SYSTEM RESET {}").format(name))
            else:
                value = setting.before if revert else setting.after
                statements.append(sql.SQL("ALTER SYSTEM SET {} = {}").format(
                    name, sql.Literal(value)))
        statements.append(sql.SQL("SELECT pg_reload_conf()").format())
        try:
            with self._connect(node) as conn:
                self._emit("applying", step, phase, "; ".join(
                    statement.as_string(conn) for statement in statements))
                for statement in statements:
                    conn.execute(statement)
        except psycopg.Error as exc:
            raise _StepFailed(phase, f"{node.name}: {_first_line(exc)}") from exc
        unavailable = None
        if step.effect == "restart":
            unavailable = self._restart(step, phase)
        expected = {s.name: (s.before if revert else s.after) for s in settings}
        self._verify(step, phase, expected)
        return unavailable

    def _restart(self, step: ConfigStep, phase: Phase) -> float:
        assert self.controller is not None  # checked in __post_init__
        # What the store does meanwhile (docs/config-changes.md), said where it happens.
        meanwhile = ("reads and writes on it are retried" if step.role == "primary"
                     else "its readers fall back")
        self._emit("restarting", step, phase,
                   f"restarting {step.node.name} ({step.role}; {meanwhile})")
        try:
            # A checkpoint now makes the shutdown checkpoint (inside the downtime) short.
            with self._connect(step.node) as conn:
                conn.execute("CHECKPOINT")
        except psycopg.Error as exc:
            log.info("config.checkpoint_failed", node=step.node.name, error=_first_line(exc))
        began = self.clock()
        try:
            self.controller.restart(step.node, self.restart_timeout)
        except Exception as exc:  # any controller's failure stops the step, reported
            log.warning("config.restart_failed", node=step.node.name, exc_info=True)
            raise _StepFailed(phase, f"restart of {step.node.name} failed: "
                                     f"{_first_line(exc)}") from exc
        deadline = began + self.restart_timeout
        while True:
            try:
                with self._connect(step.node) as conn:
                    conn.execute("SELECT 1")
                break
            except psycopg.Error as exc:
                if self.clock() >= deadline:
                    raise _StepFailed(phase, f"{step.node.name} did not answer after its "
                                             f"restart: {_first_line(exc)}") from exc
                self.sleep(self.check_interval)
        down = self.clock() - began
        self._emit("applied", step, phase, f"{step.node.name} restarted, answering after "
                   f"{format_duration(down)}")
        return down

    def _verify(self, step: ConfigStep, phase: Phase, expected: dict[str, str]) -> None:
        deadline = self.clock() + self.verify_timeout
        infos = {s.name: s.info for s in step.settings}
        while True:
            live = read_settings(step.node, list(expected),
                                 self.topology.routing.connect_timeout)
            wrong = [f"{name} is {live[name].setting}"
                     f"{' (pending restart)' if live[name].pending_restart else ''}, "
                     f"expected {value}" for name, value in expected.items()
                     if not same_value(infos[name], live[name].setting, value)
                     or live[name].pending_restart]
            if not wrong:
                self._emit("verified", step, "verify" if phase == "apply" else phase,
                           "pg_settings shows " + ", ".join(
                               f"{k}={v}" for k, v in expected.items()))
                return
            if self.clock() >= deadline:
                raise _StepFailed("verify", f"{step.node.name}: " + "; ".join(wrong))
            self.sleep(self.check_interval)

    def _settle_and_bake(self, step: ConfigStep, probe: ShardProbe) -> None:
        began = self.clock()
        try:
            self._wait_ready(step, probe, "settle", self.settle_timeout,
                             excused=self._repairs(step, include_self=False))
        except _StepFailed as failure:
            raise _Regressed(Regression(step.number, step.node.name, "settle", str(failure),
                                        self.clock() - began)) from None
        began = self.clock()
        deadline = began + self.bake
        last_report: float | None = None
        while True:
            lag = probe.sample()
            now = self.clock()
            if not self._ready(lag, self._repairs(step, include_self=False)):
                measurement = lag.explain(self.max_lag)
                self._emit("regression", step, "bake", measurement, replicas=lag.replicas)
                raise _Regressed(Regression(step.number, step.node.name, "bake", measurement,
                                            now - began))
            if now >= deadline:
                return
            if last_report is None or now - last_report >= self.report_interval:
                last_report = now
                self._emit("baking", step, "bake", f"healthy, worst replica "
                           f"{format_duration(lag.worst)}", replicas=lag.replicas,
                           remaining=deadline - now)
            self.sleep(min(self.check_interval, max(0.0, deadline - now)))

    def _wait_ready(self, step: ConfigStep, probe: ShardProbe, phase: Phase,
                    timeout: float, excused: frozenset[str] = frozenset()) -> ShardLag:
        deadline = self.clock() + timeout
        last_report: float | None = None
        kind: ConfigEventKind = "preflight_waiting" if phase == "pre-flight" else "settling"
        while True:
            lag = probe.sample()
            if self._ready(lag, excused):
                if phase == "pre-flight":
                    waived = [r.name for r in lag.blocking(self.max_lag)]
                    healthy = [r.staleness for r in lag.replicas if r.name not in waived]
                    text = f"replicas within {format_duration(self.max_lag)}" + (
                        f" (worst {format_duration(max(healthy))})" if healthy else "")
                    if waived:
                        text += (f"; {', '.join(waived)} paused for insufficient settings, "
                                 "which this change repairs")
                    self._emit("preflight_passed", step, phase, text, replicas=lag.replicas)
                return lag
            now = self.clock()
            if now >= deadline:
                raise _StepFailed(phase, f"gave up after {format_duration(timeout)}: "
                                         f"{lag.explain(self.max_lag)}")
            if last_report is None or now - last_report >= self.report_interval:
                last_report = now
                self._emit(kind, step, phase, f"waiting: {lag.explain(self.max_lag)}",
                           replicas=lag.replicas, remaining=deadline - now)
            self.sleep(min(self.check_interval, max(0.0, deadline - now)))

    def _ready(self, lag: ShardLag, excused: frozenset[str]) -> bool:
        """The shard is ready, but for standbys this change is about to repair."""
        return lag.primary_up and all(r.name in excused and r.state == "paused (settings)"
                                      for r in lag.blocking(self.max_lag))

    def _repairs(self, step: ConfigStep, *, include_self: bool) -> frozenset[str]:
        """Standbys of ``step``'s shard that a pending step of this plan (``step`` itself
        too when ``include_self``) repairs: it raises a hot-standby parameter on them. When
        one is paused for insufficient settings it cannot heal by itself, so waiting for it
        before its own step would deadlock; once its step ran, settle and bake hold it to
        the same bar as every other node."""
        names = set()
        for other in self.plan.steps:
            if other.shard.name != step.shard.name or other.applied or other.role != "replica":
                continue
            if other.number < step.number or (other.number == step.number and not include_self):
                continue
            if any(s.name in HOT_STANDBY_PARAMETERS and s.changes
                   and int(s.after) > int(s.before) for s in other.settings):
                names.add(other.node.name)
        return frozenset(names)

    # -- revert -----------------------------------------------------------------------

    def _revert(self, report: ConfigReport, regression: Regression,
                journal: ConfigJournal) -> ConfigReport:
        began = self.clock()
        restored: list[str] = []
        error = None
        reverted_nodes = set()
        originals = journal.originals
        for step in reversed(self._applied):
            # The journal has the values from before the first run that touched the node.
            recorded = originals.get(step.node.name, {})
            settings = tuple(replace(s, before=recorded[s.name][0],
                                     before_in_auto_conf=recorded[s.name][1])
                             if s.name in recorded else s for s in step.settings)
            self._emit("reverting", step, "revert", ", ".join(
                f"{s.name} back to {s.info.shown(s.before)}" for s in settings if s.changes))
            try:
                self._set(step, settings, "revert", revert=True)
                self._resettle(step)
            except (_StepFailed, MigrationError) as failure:
                error = f"{step.node.name}: {failure}"
                self._emit("step_failed", step, "revert", error)
                break
            reverted_nodes.add(step.node.name)
            restored += [f"{step.node.name} {s.name}={s.info.shown(s.before)}"
                         for s in settings if s.changes]
            self._emit("reverted", step, "revert", "restored " + ", ".join(
                f"{s.name}={s.info.shown(s.before)}" for s in settings if s.changes))
        if error is None:
            journal.clear()
        results = tuple(replace(r, outcome="reverted") if r.node in reverted_nodes
                        and r.outcome in ("done", "already applied", "failed") else r
                        for r in report.results)
        return replace(report, results=results, regression=regression,
                       restored=tuple(restored), revert_seconds=self.clock() - began,
                       revert_error=error)

    def _resettle(self, step: ConfigStep) -> None:
        """Wait (bounded) until the reverted node's shard is ready again; the revert goes
        on regardless (the bake already failed: restoring every node matters more)."""
        with self._probe(step.shard) as probe:
            try:
                self._wait_ready(step, probe, "revert", self.settle_timeout)
            except _StepFailed as failure:
                log.warning("config.revert_unsettled", node=step.node.name, error=str(failure))

    # -- plumbing ---------------------------------------------------------------------

    def _connect(self, node: NodeConfig) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(node.dsn, autocommit=True,
                               connect_timeout=max(2, round(self.topology.routing.connect_timeout)),
                               application_name="propstore-config")

    def _emit(self, kind: ConfigEventKind, step: ConfigStep | None, phase: Phase | None,
              message: str, *, replicas: tuple[ReplicaLag, ...] = (),
              remaining: float | None = None) -> None:
        event = ConfigEvent(kind, step.number if step else None,
                            step.node.name if step else None,
                            step.shard.name if step else None, phase, message, replicas,
                            remaining)
        level = log.warning if kind in ("regression", "step_failed", "reverting") else log.info
        level(f"config.{kind}", step=event.step, node=event.node, shard=event.shard,
              phase=phase, message=message,
              remaining=None if remaining is None else round(remaining, 3),
              replicas=[str(r) for r in replicas] or None)
        if self.on_event is not None:
            self.on_event(event)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


__all__ = ["ConfigRollout"]
