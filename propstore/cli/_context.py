"""What every command shares: the global options, opening a store, logging, option types.

Imported by every command, ``--help`` and ``--version`` included, so it imports only click
and the standard library at module level; rich, structlog and the store are imported by the
functions that use them (the CLI's start-up time, see tools/bench_cli_startup.py).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import click

from propstore._durations import parse_duration
from propstore.errors import ConfigError

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from propstore.config import Topology
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
    """The global options, handed to every command as ``ctx.obj``.

    ``--config`` and ``--debug`` are accepted before and after the subcommand; the last one
    given wins.
    """

    config: str | None = None
    debug: bool = False
    _restore_logging: Callable[[], None] | None = field(default=None, repr=False)

    def topology(self) -> Topology:
        """The topology file named by ``--config`` / ``PROPSTORE_CONFIG``."""
        from propstore.config import Topology

        if not self.config:
            raise ConfigError("no topology file: pass --config FILE or set PROPSTORE_CONFIG")
        return Topology.load(self.config)

    def open_store(self, topology: Topology | None = None, settle: bool = True
                   ) -> PropertyStore:
        """A store on ``topology`` (default :meth:`topology`), its monitor past its first
        round; with ``settle``, also until every streaming replica has a proven bound (see
        :func:`wait_settled`)."""
        from propstore.store import PropertyStore

        store = PropertyStore(topology if topology is not None else self.topology())
        try:
            if settle:
                wait_settled(store)
        except BaseException:
            store.close()
            raise
        return store

    def start_logging(self) -> Callable[[], None]:
        """Send the library's events to stderr (see :func:`configure_logging`); returns the
        function that restores the previous set-up."""
        restore = configure_logging(self.debug)
        self._restore_logging = restore

        def undo() -> None:
            self._restore_logging = None
            restore()

        return undo

    def enable_debug(self) -> None:
        """``--debug`` given after the subcommand: show everything from now on."""
        self.debug = True
        if self._restore_logging is not None:
            configure_logging(True)  # the first set-up's restore still undoes this one

    def show_events(self, level: int = logging.INFO) -> None:
        """Show the library's events from ``level`` up (a long-running command's log), unless
        ``--debug`` already shows everything."""
        import structlog

        if not self.debug:
            structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level))


def _state(ctx: click.Context) -> CliState:
    return ctx.ensure_object(CliState)


def _set_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is None:
        return
    _state(ctx).config = value
    # Commands that read the root's parameters (cli/_migrate.py) see it there too.
    ctx.find_root().params["config"] = value


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        _state(ctx).enable_debug()


def _global_params(root: bool) -> list[tuple[str, dict[str, Any]]]:
    """``(flag, click.Option arguments)`` of the global options. On the root they are its
    parameters (cli/_migrate.py reads them from the root context); after a subcommand,
    callbacks put them in the shared CliState."""
    where = "" if root else " (also accepted before the command)"
    return [
        ("--config", {"envvar": "PROPSTORE_CONFIG" if root else None, "metavar": "FILE",
                      "type": click.Path(dir_okay=False), "expose_value": root,
                      "callback": None if root else _set_config,
                      "help": f"Topology file (docs/config.md){where} [env: PROPSTORE_CONFIG]."}),
        ("--debug", {"is_flag": True, "expose_value": root,
                     "callback": None if root else _set_debug,
                     "help": f"Show the library's log events and full tracebacks on errors"
                             f"{where}."}),
    ]


def global_options(function: F) -> F:
    """``--config`` (also read from ``PROPSTORE_CONFIG``) and ``--debug`` on the root
    command, passed to it as ``config`` and ``debug``."""
    for flag, arguments in reversed(_global_params(root=True)):
        function = click.option(flag, **arguments)(function)
    return function


def add_global_options(command: click.Command) -> None:
    """Accept ``--config``/``--debug`` after ``command`` and its subcommands too (once)."""
    names = {param.name for param in command.params}
    command.params.extend(click.Option([flag], **arguments)
                          for flag, arguments in _global_params(root=False)
                          if flag[2:] not in names)
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            add_global_options(sub)


pass_state = click.make_pass_decorator(CliState)

#: ``--wide`` on every command that prints a table.
WIDE_HELP = ("Show every column, even wider than the terminal (by default the least "
             "important columns are left out when it is narrow).")


def output_console(wide: bool = False) -> Console:
    """A rich console on stdout: colour on a terminal; plain and never wrapped when piped.

    ``wide`` (``--wide``): as wide as the widest table, even on a narrower terminal.
    """
    from rich.console import Console

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
        what = param.name if param and param.name else "duration"
        if isinstance(value, str) and value.strip().startswith("-"):
            try:
                parse_duration(value.strip()[1:], what)
            except ValueError:
                pass
            else:
                self.fail("must be >= 0", param, ctx)
        try:
            return parse_duration(value, what)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()


def configure_logging(debug: bool) -> Callable[[], None]:
    """Send the library's structlog events to stderr (only errors unless ``debug``), so they
    never mix with a command's output; returns a function that restores the previous setup
    (the CLI may run inside another program, e.g. a test)."""
    import structlog

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
