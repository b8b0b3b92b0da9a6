"""What every command shares: the global options, opening a store, logging, option types."""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import click
import structlog
from rich.console import Console, RenderableType

from propstore._durations import parse_duration
from propstore.config import Topology
from propstore.errors import ConfigError
from propstore.monitor import ShardView
from propstore.store import PropertyStore

F = TypeVar("F", bound=Callable[..., Any])

_UNWRAPPED = 1000  # columns: wider than any table, so nothing is wrapped or left out

#: Exit statuses (also in ``propstore --help`` and docs/operating.md).
EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


@dataclass
class CliState:
    """The global options, handed to every command as ``ctx.obj``."""

    config: str | None
    debug: bool

    def topology(self) -> Topology:
        """The topology file named by ``--config`` / ``PROPSTORE_CONFIG``."""
        if not self.config:
            raise ConfigError("no topology file: pass --config FILE or set PROPSTORE_CONFIG")
        return Topology.load(self.config)

    def open_store(self, topology: Topology | None = None, settle: bool = True
                   ) -> PropertyStore:
        """A store on ``topology`` (default :meth:`topology`), its monitor past its first
        round; with ``settle``, also until every streaming replica has a proven bound (see
        :func:`wait_settled`)."""
        store = PropertyStore(topology if topology is not None else self.topology())
        try:
            if settle:
                wait_settled(store)
        except BaseException:
            store.close()
            raise
        return store

    def show_events(self, level: int = logging.INFO) -> None:
        """Show the library's events from ``level`` up (a long-running command's log), unless
        ``--debug`` already shows everything."""
        if not self.debug:
            structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level))


pass_state = click.make_pass_decorator(CliState)

#: ``--wide`` on every command that prints a table.
WIDE_HELP = ("Show every column, even wider than the terminal (by default the least "
             "important columns are left out when it is narrow).")


def output_console(wide: bool = False) -> Console:
    """A rich console on stdout: colour on a terminal; plain and never wrapped when piped.

    ``wide`` (``--wide``): as wide as the widest table, even on a narrower terminal.
    """
    console = Console(highlight=False)
    if not console.is_terminal:
        # Not COLUMNS: readline exports it into every child of an interactive Python.
        console = Console(highlight=False, no_color=True, width=_UNWRAPPED)
    elif wide:
        console = Console(highlight=False, width=_UNWRAPPED)
    return console


def emit(console: Console, renderable: RenderableType) -> None:
    """Print to a terminal as is; piped, without the padding that rich leaves at line ends."""
    if console.is_terminal:
        console.print(renderable)
        return
    with console.capture() as captured:
        console.print(renderable)
    click.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))


def settled(views: tuple[ShardView, ...], now: float) -> bool:
    """Whether every node was polled and every streaming replica has a finite bound.

    A monitor that has just started has one primary sample; a replica polled a moment
    before it may be behind that sample and prove nothing yet, though it is healthy. A
    paused or disconnected replica may never get a finite bound, so it is not waited for.
    """
    for view in views:
        for node in view.nodes:
            if node.state == "unknown":
                return False
            if node.state == "up" and node.role == "replica" and math.isinf(
                view.staleness_bound(node, now)
            ):
                return False
    return True


def wait_settled(store: PropertyStore, timeout: float | None = None) -> bool:
    """Wait (at most ``timeout`` s, default 10 monitor intervals, at least 1 s) until
    :func:`settled`; returns whether it did (the figures are shown either way)."""
    interval = store.topology.monitor.interval
    limit = timeout if timeout is not None else max(1.0, 10 * interval)
    clock = store.monitor.state.clock
    deadline = time.monotonic() + limit
    while not settled(store.shard_views(), clock()):
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(0.02, interval / 4))
    return True


if TYPE_CHECKING:
    _ParamType = click.ParamType[float]
else:  # click < 8.3 has no generic ParamType
    _ParamType = click.ParamType


class Duration(_ParamType):
    """A duration such as ``500ms``, ``2s`` or ``1.5`` (seconds), converted to seconds."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_duration(value, param.name if param and param.name else "duration")
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()


def budget_options(function: F) -> F:
    """``--max-staleness``, ``--after``, ``--profile``, ``--strong``: a read's budget."""
    options = [
        click.option("--max-staleness", type=DURATION, default=None,
                     help="Serve from a replica only if proven at most this stale "
                          "(e.g. 500ms, 2s)."),
        click.option("--after", "after", metavar="TOKEN", default=None,
                     help="Read-your-writes: include the writes that returned TOKEN."),
        click.option("--profile", default=None,
                     help="Use a reader profile's budget from the topology file."),
        click.option("--strong", is_flag=True, help="Read from the primary."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def budget_of(max_staleness: float | None, after: str | None, profile: str | None,
              strong: bool) -> dict[str, Any]:
    """The keyword arguments for ``PropertyStore.read``/``route``; empty: default profile."""
    budget: dict[str, Any] = {}
    if max_staleness is not None:
        budget["max_staleness"] = max_staleness
    if after is not None:
        budget["after"] = after
    if profile is not None:
        budget["profile"] = profile
    if strong:
        budget["consistency"] = "strong"
    return budget


def configure_logging(debug: bool) -> Callable[[], None]:
    """Send the library's structlog events to stderr (only errors unless ``debug``), so they
    never mix with a command's output; returns a function that restores the previous setup
    (the CLI may run inside another program, e.g. a test)."""
    previous = structlog.get_config()
    psycopg_logger = logging.getLogger("psycopg")
    previous_level = psycopg_logger.level
    level = logging.DEBUG if debug else logging.ERROR
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    # psycopg-pool logs every failed reconnection to a down node; the table says it already.
    psycopg_logger.setLevel(level)

    def restore() -> None:
        structlog.configure(**previous)
        psycopg_logger.setLevel(previous_level)

    return restore


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while long-running commands run, so a service manager's
    stop still closes the store and stops a sandbox the command started."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
