"""``propstore lag``: every node's lag, as the router sees it; a table, JSON, a live view, or a
monitoring check (exit status 1 when some shard has no replica within a budget).

rich, the monitor and the store are imported where they are used: `lag --help` loads
neither (the CLI's start-up time, tools/ scenario cli-startup).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any

import click

from propstore._durations import format_bound, format_bytes, format_duration
from propstore.cli._budget import BUDGET_RULES, profile_option, read_budget, staleness_option
from propstore.cli._context import (
    DURATION,
    EXIT_CHECK_FAILED,
    EXIT_OK,
    WIDE_HELP,
    CliState,
    emit,
    output_console,
    pass_state,
)
from propstore.cli._signals import signals_as_interrupt

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.text import Text

    from propstore.cli._table import Column, FittedTable
    from propstore.config import Topology
    from propstore.monitor import LagReport, LagRow
    from propstore.monitor._health import AgentStatus, FiguresSource
    from propstore.store import PropertyStore

Refusals = Mapping[str, Mapping[str, Mapping[str, int]]]

_STATE_STYLES = {
    "up": "green", "paused": "yellow", "paused (settings)": "bold yellow",
    "receiver disconnected": "yellow", "down": "bold red",
    "wrong role": "bold red", "foreign": "bold red", "unknown": "dim",
    "other timeline": "bold red",
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
    from propstore.monitor import lag_report

    return lag_report(store.shard_views(), store.topology.profiles,
                      store.monitor.state.clock())


@dataclass(frozen=True, slots=True)
class LagLine:
    """One row of the lag table: a node's report row, and whether it opens its shard."""

    row: LagRow
    first: bool
    budgets: tuple[float, ...]


def _bound_text(line: LagLine) -> Text:
    from rich.text import Text

    row, budgets = line.row, line.budgets
    if row.is_primary:
        return Text("-")
    if math.isinf(row.staleness_bound):
        return Text(format_bound(row.staleness_bound) if row.serves_replica_reads else "-",
                    style="red")
    style = "green" if budgets and row.staleness_bound <= min(budgets) else (
        "yellow" if budgets and row.staleness_bound <= max(budgets) else "red"
    )
    return Text(format_duration(row.staleness_bound), style=style)


def _eligible(profile: str, line: LagLine) -> str | Text:
    from rich.text import Text

    if profile not in line.row.eligible:
        return "-"
    ok = line.row.eligible[profile]
    return Text("yes" if ok else "no", style="green" if ok else "red")


def lag_columns(profiles: Mapping[str, float], *, state_time: bool = False
                ) -> list[Column[LagLine]]:
    """The lag table's columns. At 80 terminal columns shard, node, role, state, staleness
    and the eligibility per profile always show; the rest go by priority (highest first):
    proofs, address, recv-replay, lsn, behind, for."""
    from rich.text import Text

    from propstore.cli._table import Column

    columns: list[Column[LagLine]] = [
        Column("shard", lambda line: line.row.shard if line.first else ""),
        Column("node", lambda line: line.row.node),
        Column("address", lambda line: line.row.address, priority=5),
        Column("role", lambda line: line.row.role or f"({line.row.configured_role})"),
        Column("state", lambda line: Text(line.row.state,
                                          style=_STATE_STYLES.get(line.row.state, "")),
               shrink="wrap"),
    ]
    if state_time:
        columns.append(Column("for", lambda line: format_duration(line.row.state_seconds),
                              priority=1, justify="right"))
    columns += [
        Column("lsn", lambda line: "-" if line.row.lsn is None else str(line.row.lsn),
               priority=3, justify="right"),
        Column("behind", lambda line: format_bytes(line.row.bytes_behind), priority=2,
               justify="right"),
        Column("staleness", _bound_text, justify="right"),
        Column("recv-replay", lambda line: format_bytes(line.row.receive_replay_gap),
               priority=4, justify="right"),
    ]
    columns += [Column(f"{profile} ({format_duration(budget)})", partial(_eligible, profile),
                       shrink="wrap", justify="center")
                for profile, budget in profiles.items()]
    # How the node's reads are proven (direct, session/transaction pooler, load balancer).
    columns.append(Column("proofs", lambda line: line.row.proofs, priority=6, shrink="wrap"))
    return columns


def lag_table(report: LagReport, *, state_time: bool = False, title: str | None = None,
              wide: bool = False) -> FittedTable[LagLine]:
    """The lag report as a table, a section per shard, fitted to the width it is drawn at
    (``wide``: every column). Colours are dropped by a console that is not a terminal, so
    the same table serves both."""
    from propstore.cli._table import FittedTable

    budgets = tuple(report.profiles.values())
    sections = [[LagLine(row, i == 0, budgets) for i, row in enumerate(report.rows_of(shard))]
                for shard in report.shards]
    return FittedTable(lag_columns(report.profiles, state_time=state_time), sections,
                       wide=wide, title=title)


def lag_errors(report: LagReport) -> Text | None:
    """The last poll error of every node whose last poll failed, one line each."""
    from rich.text import Text

    failed = [row for row in report.rows if row.last_error]
    if not failed:
        return None
    return Text("\n".join(f"{row.node}: {row.last_error}" for row in failed), style="red")


def refusals_of(store: PropertyStore) -> dict[str, dict[str, dict[str, int]]]:
    """Reads the store refused, per shard: ``{shard: {profile: {reason: count}}}``."""
    return {shard.name: store.stats.refused(shard.name) for shard in store.topology.shards}


def refusal_text(refused: Mapping[str, Mapping[str, int]]) -> str:
    """``workflow: primary_overloaded 3; token: ...`` (``none`` when empty)."""
    return "; ".join(f"{profile}: " + ", ".join(f"{reason} {n}" for reason, n in reasons.items())
                     for profile, reasons in refused.items()) or "none"


def refusal_cover(status: AgentStatus) -> str:
    """What the host totals of the agent's ``status`` cover, for people."""
    return (f"reads refused on this host since agent pid {status.pid} started "
            f"{status.started_at} (stores: {len(status.stores)} connected, "
            f"{status.stores_total} joined, {status.refusal_reporters} refused reads)")


@dataclass(frozen=True, slots=True)
class Provenance:
    """Where ``lag``'s figures come from, and the refusals it shows: the host's totals
    (every store that follows the host's agent) or this process's own."""

    source: FiguresSource
    refusals: Refusals
    scope: str
    #: What the refusals cover, for people.
    cover: str


def provenance(store: PropertyStore) -> Provenance:
    """The store's figures' source (asking the host's agent) and the refusals to show."""
    from propstore.monitor._health import figures_source

    source = figures_source(store.monitor, store.topology)
    if source.status is not None:
        host = source.status.refusals
        every = {s.name: host.get(s.name, {}) for s in store.topology.shards}
        return Provenance(source, every, "host", refusal_cover(source.status))
    return Provenance(source, refusals_of(store), "process", "reads refused by this process")


def lag_refusals(refusals: Refusals) -> Text | None:
    """One line per shard where this process refused reads (None when it refused none)."""
    from rich.text import Text

    lines = [f"{shard}: reads refused by this process: {refusal_text(refused)}"
             for shard, refused in refusals.items() if refused]
    return Text("\n".join(lines), style="yellow") if lines else None


def lag_source(where: Provenance) -> Text:
    """Where the figures and the refusals come from (one or two lines)."""
    from rich.text import Text

    text = Text(where.source.describe(), style="dim")
    refused = {shard: r for shard, r in where.refusals.items() if r}
    if refused:
        lines = [f"{where.cover}:"] + [f"  {shard}: {refusal_text(r)}"
                                       for shard, r in refused.items()]
        text.append("\n" + "\n".join(lines), style="yellow")
    return text


def lag_document(report: LagReport, check: LagCheck | None, generated_at: datetime,
                 refusals: Refusals | None = None, where: Provenance | None = None,
                 ) -> dict[str, Any]:
    """``lag --json``: the documented, stable shape (see docs/operating.md); ``where``
    (the source and the refusals' scope) wins over ``refusals`` when given."""
    if where is not None:
        refusals = where.refusals
    return {
        "generated_at": generated_at.isoformat(timespec="milliseconds"),
        "profiles": {name: {"max_staleness_seconds": budget}
                     for name, budget in report.profiles.items()},
        "nodes": [row.to_dict() for row in report.rows],
        "check": None if check is None else check.to_dict(),
        "source": None if where is None else where.source.to_dict(),
        "refusals": {shard: {p: dict(r) for p, r in refused.items()}
                     for shard, refused in (refusals or {}).items()},
        "refusals_scope": "process" if where is None else where.scope,
    }


def lag_check_budget(topology: Topology, max_staleness: float | None, profile: str | None
                     ) -> tuple[float, str] | None:
    """The check's bound in seconds and its label, through the same rules as a read's
    budget (:func:`~propstore.cli._budget.read_budget`); None when no check was asked for."""
    if max_staleness is None and profile is None:
        return None
    freshness = read_budget(topology, max_staleness=max_staleness, profile=profile).freshness
    bound = freshness.max_staleness
    if bound is None:  # a profile always has a bound; kept for the type checker
        raise click.BadParameter("has no staleness bound", param_hint="'--profile'")
    label = format_duration(bound)
    if profile is not None and bound == topology.profiles[profile].max_staleness:
        label += f" (profile {profile})"
    return bound, label


@click.command("lag", epilog=BUDGET_RULES)
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON (field names in docs/operating.md); with --watch one document "
                   "per line.")
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C (in place on a terminal).")
@click.option("--interval", type=DURATION, default="1s", show_default=True,
              help="Refresh period with --watch.")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="With --watch: stop after this many refreshes.")
@click.option("--wide", is_flag=True, help=WIDE_HELP)
@staleness_option("Check: exit 1 unless every shard has a replica proven this fresh.")
@profile_option("Check against a reader profile's budget.")
@pass_state
@click.pass_context
def lag_command(ctx: click.Context, state: CliState, as_json: bool, watch: bool,
                interval: float, count: int | None, wide: bool, max_staleness: float | None,
                profile: str | None) -> None:
    """Show every node's replication lag, grouped by shard.

    Per node: observed role and state (up, down, paused, receiver disconnected, wrong role),
    replay LSN, bytes behind the primary, the proven staleness bound the router uses,
    WAL received but not yet replayed, and whether it may serve each reader profile now.

    With --max-staleness or --profile it is a monitoring check: exit status 0 when every
    shard has at least one replica within the budget, 1 when some shard has none, 2 on an
    error (unreadable config, ...).
    """
    if interval <= 0:
        raise click.BadParameter("must be > 0", param_hint="'--interval'")
    topology = state.topology()
    budget = lag_check_budget(topology, max_staleness, profile)
    with state.open_store(topology) as store:

        def snapshot() -> tuple[LagReport, LagCheck | None]:
            report = current_report(store)
            check = None if budget is None else LagCheck(
                budget[0], budget[1], report.failing_shards(budget[0])
            )
            return report, check

        where = partial(provenance, store)
        if watch:
            check = _watch(snapshot, where, as_json=as_json, interval=interval,
                           count=count, wide=wide)
        else:
            report, check = snapshot()
            _print_once(report, check, where(), as_json=as_json, wide=wide)
    ctx.exit(EXIT_OK if check is None or check.ok else EXIT_CHECK_FAILED)


def _print_once(report: LagReport, check: LagCheck | None, where: Provenance, *,
                as_json: bool, wide: bool) -> None:
    if as_json:
        click.echo(json.dumps(lag_document(report, check, datetime.now(UTC), where=where),
                              indent=2))
        return
    console = output_console(wide)
    emit(console, lag_table(report, wide=wide))
    for extra in (lag_errors(report), lag_source(where)):
        if extra is not None:
            emit(console, extra)
    if check is not None:
        console.print(check.describe(), style="green" if check.ok else "bold red")


def _watch(snapshot: Callable[[], tuple[LagReport, LagCheck | None]],
           where: Callable[[], Provenance], *,
           as_json: bool, interval: float, count: int | None, wide: bool) -> LagCheck | None:
    """Refresh until Ctrl-C (or ``count`` refreshes); returns the last check."""
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    console = output_console(wide)
    live = console.is_terminal and not as_json
    check: LagCheck | None = None
    done = 0

    def view() -> RenderableType:
        nonlocal check
        report, check = snapshot()
        stamp = datetime.now().astimezone().strftime("%H:%M:%S")
        parts: list[RenderableType] = [lag_table(
            report, state_time=True, wide=wide, title=f"propstore lag, {stamp} (every "
            f"{format_duration(interval)}, Ctrl-C to stop)",
        )]
        parts += [extra for extra in (lag_errors(report), lag_source(where()))
                  if extra is not None]
        if check is not None:
            parts.append(Text(check.describe(), style="green" if check.ok else "bold red"))
        return Group(*parts)

    with signals_as_interrupt():
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
                        click.echo(json.dumps(lag_document(report, check, datetime.now(UTC),
                                                           where=where())))
                    else:
                        emit(console, view())
                        click.echo()
                    done += 1
        except KeyboardInterrupt:
            pass
    return check
