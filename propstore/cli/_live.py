"""Rollout progress for ``migrate up|down`` and ``config apply``: a live table on a terminal
(one row per shard or node: its phase, its latest message with a countdown, its replicas'
lag), one line per event when piped.

rich is imported when a table is drawn, so the commands' ``--help`` does not load it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

import click

from propstore._durations import format_duration

if TYPE_CHECKING:
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    from propstore.migrate import ReplicaLag


class RolloutEvent(Protocol):
    """What :class:`~propstore.migrate.MigrationEvent` and
    :class:`~propstore.migrate.ConfigEvent` both carry."""

    @property
    def message(self) -> str:
        """One human-readable line."""

    @property
    def replicas(self) -> tuple[ReplicaLag, ...]:
        """The replicas' lag when the event was measured."""

    @property
    def remaining(self) -> float | None:
        """Seconds left in the phase, while counting down."""


def replica_lag_text(replica: ReplicaLag) -> str:
    """``name [state] ≤ bound`` (or ``unproven``, or ``name down``)."""
    if replica.state == "down":
        return f"{replica.name} down"
    bound = "unproven" if math.isinf(replica.staleness) else (
        f"≤ {format_duration(replica.staleness)}")
    state = "" if replica.up else f" {replica.state}"
    return f"{replica.name}{state} {bound}"


class LiveRollout:
    """Shows a rollout's events: :meth:`show` updates the row of a shard or node in a live
    table while :meth:`running` on a terminal, else prints the event as one line
    (``quiet``: prints nothing, for ``--json``)."""

    def __init__(self, console: Console, headings: tuple[str, str, str, str], *,
                 quiet: bool = False) -> None:
        self.console = console
        self.headings = headings
        self.quiet = quiet
        self.rows: dict[str, tuple[str, str, str]] = {}
        self._live: Live | None = None

    @contextmanager
    def running(self) -> Iterator[LiveRollout]:
        """Draw the table (on a terminal) while the rollout runs."""
        if self.quiet or not self.console.is_terminal:
            yield self
            return
        from rich.live import Live

        with Live(self._table(), console=self.console, refresh_per_second=8) as live:
            self._live = live
            try:
                yield self
            finally:
                self._live = None

    def show(self, event: RolloutEvent, key: str | None, phase: str | None) -> None:
        """``event`` concerns row ``key`` (None: the whole run, shown only as a line), now
        in ``phase`` (None: the row's phase stays)."""
        if self.quiet:
            return
        if self._live is None:
            click.echo(str(event))
            return
        if key is None:
            return
        countdown = "" if event.remaining is None else (
            f" ({format_duration(max(0.0, event.remaining))} left)")
        lag = ", ".join(replica_lag_text(r) for r in event.replicas)
        previous = self.rows.get(key, ("", "", ""))
        self.rows[key] = (phase or previous[0], event.message + countdown, lag or previous[2])
        self._live.update(self._table())

    def _table(self) -> Table:
        from rich.table import Table

        table = Table(*self.headings)
        for key, cells in self.rows.items():
            table.add_row(key, *cells)
        return table


__all__ = ["LiveRollout", "RolloutEvent", "replica_lag_text"]
