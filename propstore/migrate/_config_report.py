"""What a configuration rollout did: events while it runs, a report when it ends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from propstore._durations import format_duration
from propstore.migrate._config_plan import ConfigPlan
from propstore.migrate._lag import ReplicaLag

Phase = Literal["pre-flight", "apply", "verify", "settle", "bake", "revert"]
StepOutcome = Literal["done", "already applied", "failed", "reverted", "not started"]
ConfigEventKind = Literal[
    "run_started", "step_started", "step_skipped", "step_rebaking", "preflight_waiting",
    "preflight_passed",
    "applying", "restarting", "applied", "verified", "settling", "baking", "step_done",
    "regression", "reverting", "reverted", "step_failed", "canary_reached", "run_finished",
]


@dataclass(frozen=True, slots=True)
class ConfigEvent:
    """Something a :class:`~propstore.migrate.ConfigRollout` did or waits for (also logged
    with structlog as ``config.<kind>``).

    Attributes:
        kind: what happened.
        step: the plan step's number (None for run-wide events).
        node: the node of that step.
        shard: its shard.
        phase: ``pre-flight``, ``apply``, ``verify``, ``settle``, ``bake`` or ``revert``.
        message: one human-readable line.
        replicas: the shard's replicas at this moment, when measured.
        remaining: seconds left in the phase (a bake, a wait), when counting down.
    """

    kind: ConfigEventKind
    step: int | None
    node: str | None
    shard: str | None
    phase: Phase | None
    message: str
    replicas: tuple[ReplicaLag, ...] = ()
    remaining: float | None = None

    def __str__(self) -> str:
        where = " ".join(p for p in (self.node or "config", self.phase) if p)
        countdown = "" if self.remaining is None else (
            f" [{format_duration(max(0.0, self.remaining))} left]")
        return f"{where}: {self.message}{countdown}"


@dataclass(frozen=True, slots=True)
class StepResult:
    """How one step fared.

    Attributes:
        step: its number in the plan.
        shard, node: where.
        outcome: ``done``, ``already applied`` (skipped), ``failed``, ``reverted`` (done,
            then undone by the automatic revert) or ``not started``.
        phase: where it failed.
        error: why it failed or was not started.
        seconds: time spent on the step (pre-flight to the end of the bake).
        unavailable: seconds the node did not answer during its restart (None: no restart).
        rebaked: the step had been applied by an earlier run that stopped before the end of
            its bake, so this run settled and baked it again (``seconds`` is that bake).
    """

    step: int
    shard: str
    node: str
    outcome: StepOutcome
    phase: Phase | None = None
    error: str | None = None
    seconds: float = 0.0
    unavailable: float | None = None
    rebaked: bool = False

    def __str__(self) -> str:
        text = f"{self.step:>2}. {self.node:<18} {self.outcome}"
        if self.outcome == "done" or (self.outcome == "reverted" and not self.error):
            text += f" in {format_duration(self.seconds)}"
        if self.rebaked:
            text += " (baked again: the run that applied it stopped during its bake)"
        if self.unavailable is not None:
            text += f" (restart: down {format_duration(self.unavailable)})"
        if self.outcome == "failed" or (self.outcome == "reverted" and self.error):
            text += f" after a regression at {self.phase}: {self.error}" if (
                self.outcome == "reverted") else f" at {self.phase}: {self.error}"
        elif self.error:
            text += f" ({self.error})"
        return text

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"step": self.step, "shard": self.shard, "node": self.node,
                "outcome": self.outcome, "phase": self.phase, "error": self.error,
                "seconds": round(self.seconds, 3),
                "unavailable_seconds": None if self.unavailable is None
                else round(self.unavailable, 3), "rebaked": self.rebaked}


@dataclass(frozen=True, slots=True)
class Regression:
    """What the bake (or settle) saw that started the automatic revert.

    Attributes:
        step, node: the step whose bake saw it.
        phase: ``settle`` (never became healthy) or ``bake``.
        measurement: the shard's replicas at that moment, explained.
        after: seconds into the phase.
    """

    step: int
    node: str
    phase: Phase
    measurement: str
    after: float

    def __str__(self) -> str:
        return (f"step {self.step} ({self.node}) {self.phase}, after "
                f"{format_duration(self.after)}: {self.measurement}")


@dataclass(frozen=True, slots=True)
class ConfigReport:
    """The outcome of a :class:`~propstore.migrate.ConfigRollout` run.

    Attributes:
        plan: what was planned.
        results: one per step, in plan order.
        stopped: why the run stopped early (canary, failure, regression), or None.
        regression: what triggered the automatic revert, if one ran.
        restored: ``node: setting value`` for every value the revert put back.
        revert_seconds: how long the revert took.
        revert_error: why the revert itself did not finish (the report then says which
            nodes still run with new values).
    """

    plan: ConfigPlan
    results: tuple[StepResult, ...]
    stopped: str | None = None
    regression: Regression | None = None
    restored: tuple[str, ...] = ()
    revert_seconds: float | None = None
    revert_error: str | None = None

    @property
    def ok(self) -> bool:
        """No step failed and nothing was reverted (a canary stop is fine)."""
        return self.regression is None and not any(
            r.outcome == "failed" for r in self.results)

    @property
    def reverted(self) -> bool:
        """The automatic revert ran (and finished without error)."""
        return self.regression is not None and self.revert_error is None

    @property
    def complete(self) -> bool:
        """Every step is done or was already applied."""
        return all(r.outcome in ("done", "already applied") for r in self.results)

    def result(self, node: str) -> StepResult:
        """The result of ``node``'s step (``KeyError`` if it has none)."""
        for each in self.results:
            if each.node == node:
                return each
        raise KeyError(node)

    def __str__(self) -> str:
        if self.complete:
            head = f"Done: {self.plan.change}."
        elif self.regression is not None:
            head = f"Reverted: regression at {self.regression}."
            if self.revert_error:
                head = f"Revert FAILED ({self.revert_error}) after regression at {self.regression}."
        else:
            head = f"Stopped: {self.stopped}." if self.stopped else "Finished."
        lines = [head, *(f"  {r}" for r in self.results)]
        if self.restored:
            took = format_duration(self.revert_seconds or 0.0)
            lines.append(f"  restored in {took}: " + "; ".join(self.restored))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``propstore config apply --json``)."""
        return {
            "ok": self.ok, "complete": self.complete, "stopped": self.stopped,
            "change": dict(self.plan.change.settings), "key": self.plan.key,
            "steps": [r.to_dict() for r in self.results],
            "regression": None if self.regression is None else {
                "step": self.regression.step, "node": self.regression.node,
                "phase": self.regression.phase, "measurement": self.regression.measurement,
                "after_seconds": round(self.regression.after, 3)},
            "restored": list(self.restored),
            "revert_seconds": None if self.revert_seconds is None
            else round(self.revert_seconds, 3),
            "revert_error": self.revert_error,
        }


__all__ = ["ConfigEvent", "ConfigEventKind", "ConfigReport", "Phase", "Regression",
           "StepOutcome", "StepResult"]
