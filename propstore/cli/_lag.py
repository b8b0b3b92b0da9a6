"""``propstore lag``: every node's lag, as the router sees it; a table, JSON, a live view, or a
monitoring check (exit status 1 when some shard has no replica within a budget)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import click
from rich import box
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from propstore._durations import format_bytes, format_duration
from propstore.cli._context import (
    DURATION,
    EXIT_CHECK_FAILED,
    EXIT_OK,
    CliState,
    emit,
    output_console,
    pass_state,
    sigterm_as_interrupt,
)
from propstore.config import Topology
from propstore.monitor import LagReport, LagRow, lag_report
from propstore.store import PropertyStore

_STATE_STYLES = {
    "up": "green", "paused": "yellow", "receiver disconnected": "yellow", "down": "bold red",
    "wrong role": "bold red", "foreign": "bold red", "unknown": "dim",
}


@dataclass(frozen=True, slots=True)
class LagCheck:
    """The outcome of ``lag --max-staleness``/``--profile``: shards with no replica within
    ``max_staleness`` seconds (``label`` names the budget for people)."""

    max_staleness: float
    label: str
    failing: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """Every shard has at least one replica within the budget."""
        return not self.failing

    def to_dict(self) -> dict[str, Any]:
        """The ``check`` object of ``lag --json``."""
        return {"max_staleness_seconds": self.max_staleness, "budget": self.label,
                "ok": self.ok, "failing_shards": list(self.failing)}

    def describe(self) -> str:
        """One line for people."""
        if self.ok:
            return f"OK: every shard has a replica within {self.label}"
        return f"FAILED: no replica within {self.label} on {', '.join(self.failing)}"


def current_report(store: PropertyStore) -> LagReport:
    """The lag report of a store's monitor now."""
    return lag_report(store.shard_views(), store.topology.profiles,
                      store.monitor.state.clock())


def _bound_text(row: LagRow, budgets: list[float]) -> Text:
    if row.is_primary:
        return Text("-")
    if math.isinf(row.staleness_bound):
        return Text("unproven" if row.serves_replica_reads else "-", style="red")
    style = "green" if budgets and row.staleness_bound <= min(budgets) else (
        "yellow" if budgets and row.staleness_bound <= max(budgets) else "red"
    )
    return Text(format_duration(row.staleness_bound), style=style)


def lag_table(report: LagReport, *, state_time: bool = False, title: str | None = None
              ) -> Table:
    """The lag report as a table, a section per shard. Colours are dropped by a console
    that is not a terminal, so the same table serves both."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, title=title, title_justify="left",
                  pad_edge=False)
    for heading in ("shard", "node", "address", "role", "state"):
        table.add_column(heading, no_wrap=True)
    if state_time:
        table.add_column("for", justify="right", no_wrap=True)
    for heading in ("lsn", "behind", "staleness", "recv-replay"):
        table.add_column(heading, justify="right", no_wrap=True)
    for profile, budget in report.profiles.items():
        table.add_column(f"{profile} ({format_duration(budget)})", justify="center",
                         no_wrap=True)
    budgets = list(report.profiles.values())
    for shard in report.shards:
        rows = report.rows_of(shard)
        for i, row in enumerate(rows):
            cells: list[RenderableType] = [
                shard if i == 0 else "", row.node, row.address,
                row.role or f"({row.configured_role})",
                Text(row.state, style=_STATE_STYLES.get(row.state, "")),
            ]
            if state_time:
                cells.append(format_duration(row.state_seconds))
            cells += [
                str(row.lsn) if row.lsn is not None else "-",
                format_bytes(row.bytes_behind),
                _bound_text(row, budgets),
                format_bytes(row.receive_replay_gap),
            ]
            for profile in report.profiles:
                if profile not in row.eligible:
                    cells.append("-")
                else:
                    ok = row.eligible[profile]
                    cells.append(Text("yes" if ok else "no", style="green" if ok else "red"))
            table.add_row(*cells, end_section=i == len(rows) - 1)
    return table


def lag_errors(report: LagReport) -> Text | None:
    """The last poll error of every node whose last poll failed, one line each."""
    failed = [row for row in report.rows if row.last_error]
    if not failed:
        return None
    return Text("\n".join(f"{row.node}: {row.last_error}" for row in failed), style="red")


def lag_document(report: LagReport, check: LagCheck | None, generated_at: datetime
                 ) -> dict[str, Any]:
    """``lag --json``: the documented, stable shape (see docs/operating.md)."""
    return {
        "generated_at": generated_at.isoformat(timespec="milliseconds"),
        "profiles": {name: {"max_staleness_seconds": budget}
                     for name, budget in report.profiles.items()},
        "nodes": [row.to_dict() for row in report.rows],
        "check": None if check is None else check.to_dict(),
    }


def _budget(topology: Topology, max_staleness: float | None,
            profile: str | None) -> tuple[float, str] | None:
    if max_staleness is not None:
        return max_staleness, format_duration(max_staleness)
    if profile is None:
        return None
    found = topology.profiles.get(profile)
    if found is None:
        raise click.BadParameter(
            f"unknown profile {profile!r} (have {', '.join(sorted(topology.profiles))})",
            param_hint="--profile",
        )
    return found.max_staleness, f"{format_duration(found.max_staleness)} (profile {profile})"


@click.command("lag")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON (field names in docs/operating.md); with --watch one document "
                   "per line.")
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C (in place on a terminal).")
@click.option("--interval", type=DURATION, default="1s", show_default=True,
              help="Refresh period with --watch.")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="With --watch: stop after this many refreshes.")
@click.option("--max-staleness", type=DURATION, default=None,
              help="Check: exit 1 unless every shard has a replica proven this fresh.")
@click.option("--profile", default=None,
              help="Check against a reader profile's budget instead of --max-staleness.")
@pass_state
@click.pass_context
def lag_command(ctx: click.Context, state: CliState, as_json: bool, watch: bool,
                interval: float, count: int | None, max_staleness: float | None,
                profile: str | None) -> None:
    """Show every node's replication lag, grouped by shard.

    Per node: observed role and state (up, down, paused, receiver disconnected, wrong role),
    replay LSN, bytes behind the primary, the proven staleness bound the router uses,
    WAL received but not yet replayed, and whether it may serve each reader profile now.

    With --max-staleness or --profile it is a monitoring check: exit status 0 when every
    shard has at least one replica within the budget, 1 when some shard has none, 2 on an
    error (unreadable config, ...).
    """
    if max_staleness is not None and profile is not None:
        raise click.UsageError("give --max-staleness or --profile, not both")
    if interval <= 0:
        raise click.BadParameter("must be > 0", param_hint="--interval")
    topology = state.topology()
    budget = _budget(topology, max_staleness, profile)
    with state.open_store(topology) as store:

        def snapshot() -> tuple[LagReport, LagCheck | None]:
            report = current_report(store)
            check = None if budget is None else LagCheck(
                budget[0], budget[1], report.failing_shards(budget[0])
            )
            return report, check

        if watch:
            check = _watch(snapshot, as_json=as_json, interval=interval, count=count)
        else:
            report, check = snapshot()
            _print_once(report, check, as_json=as_json)
    ctx.exit(EXIT_OK if check is None or check.ok else EXIT_CHECK_FAILED)


def _print_once(report: LagReport, check: LagCheck | None, *, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(lag_document(report, check, datetime.now(UTC)), indent=2))
        return
    console = output_console()
    emit(console, lag_table(report))
    errors = lag_errors(report)
    if errors is not None:
        emit(console, errors)
    if check is not None:
        console.print(check.describe(), style="green" if check.ok else "bold red")


def _watch(snapshot: Callable[[], tuple[LagReport, LagCheck | None]], *, as_json: bool,
           interval: float, count: int | None) -> LagCheck | None:
    """Refresh until Ctrl-C (or ``count`` refreshes); returns the last check."""
    console = output_console()
    live = console.is_terminal and not as_json
    check: LagCheck | None = None
    done = 0

    def view() -> RenderableType:
        nonlocal check
        report, check = snapshot()
        stamp = datetime.now().astimezone().strftime("%H:%M:%S")
        parts: list[RenderableType] = [lag_table(
            report, state_time=True, title=f"propstore lag, {stamp} (every "
            f"{format_duration(interval)}, Ctrl-C to stop)",
        )]
        errors = lag_errors(report)
        if errors is not None:
            parts.append(errors)
        if check is not None:
            parts.append(Text(check.describe(), style="green" if check.ok else "bold red"))
        return Group(*parts)

    with sigterm_as_interrupt():
        try:
            if live:
                with Live(view(), console=console, auto_refresh=False) as display:
                    done = 1
                    while count is None or done < count:
                        time.sleep(interval)
                        display.update(view(), refresh=True)
                        done += 1
            else:
                while count is None or done < count:
                    if done:
                        time.sleep(interval)
                    if as_json:
                        report, check = snapshot()
                        click.echo(json.dumps(lag_document(report, check, datetime.now(UTC))))
                    else:
                        emit(console, view())
                        click.echo()
                    done += 1
        except KeyboardInterrupt:
            pass
    return check
