"""The ``propstore`` command: a thin layer that parses, calls the library and prints.

Every command's work is a library call (``PropertyStore``, :func:`propstore.monitor.lag_report`,
:class:`propstore.metrics.StoreMetrics`, :func:`propstore.cli._demo.run_demo`), so whatever
the CLI shows, a program can compute too.

The commands are listed in :data:`COMMANDS` (name, module, one-line summary) and a module is
imported only when its command runs: ``--help``, ``--version`` and ``shards`` never load
psycopg's connection machinery, SQLAlchemy, alembic or the store (about 1 s of imports).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import weakref
from dataclasses import dataclass
from typing import Any

import click

from propstore import __version__
from propstore.cli._context import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    CliState,
    add_global_options,
    global_options,
)
from propstore.errors import PropStoreError


@dataclass(frozen=True, slots=True)
class CommandEntry:
    """One subcommand: where it lives and what ``propstore --help`` says of it.

    Attributes:
        name: the subcommand's name.
        module: the module defining it, imported when the command is used.
        attribute: the ``click.Command`` in that module.
        summary: what ``propstore --help`` shows: the first sentence of the command's
            help (a test keeps the two equal).
        light: the command uses no part of the library that logs (``shards``), so the
            log set-up (structlog) is not loaded for it. Other commands set logging up
            when their body runs (not for their ``--help``).
    """

    name: str
    module: str
    attribute: str
    summary: str
    light: bool = False


#: Every subcommand, in the order ``propstore --help`` lists them.
COMMANDS: tuple[CommandEntry, ...] = (
    CommandEntry("lag", "propstore.cli._lag", "lag_command",
                 "Show every node's replication lag, grouped by shard."),
    CommandEntry("route", "propstore.cli._users", "route_command",
                 "Explain where a read of USER would be served now, and why."),
    CommandEntry("get", "propstore.cli._users", "get_command",
                 "Read USER's properties and say who served them and how fresh they are "
                 "proven."),
    CommandEntry("set", "propstore.cli._users", "set_command",
                 "Merge properties into USER's document; prints the token to read the write "
                 "back."),
    CommandEntry("unset", "propstore.cli._users", "unset_command",
                 "Remove KEYs from USER's properties (absent keys are ignored); prints the "
                 "token."),
    CommandEntry("delete", "propstore.cli._users", "delete_command",
                 "Delete all of USER's properties; prints the token."),
    CommandEntry("shards", "propstore.cli._shards", "shards_command",
                 "Show the topology: shards, the buckets each owns, their nodes and the "
                 "profiles.", light=True),
    CommandEntry("metrics", "propstore.cli._metrics", "metrics_command",
                 "Serve Prometheus metrics at http://HOST:PORT/metrics until Ctrl-C."),
    CommandEntry("agent", "propstore.cli._agent", "agent_group",
                 "The host's lag agent: its health (status) or the agent itself (run)."),
    CommandEntry("demo", "propstore.cli._demo_command", "demo_command",
                 "Show the whole idea in about a minute, on a local cluster."),
    CommandEntry("sandbox", "propstore.cli._sandbox", "sandbox",
                 "A local replicated PostgreSQL cluster to try propstore against."),
    CommandEntry("migrate", "propstore.cli._migrate", "migrate",
                 "Schema changes, rolled out shard by shard, gated on replica lag."),
    CommandEntry("config", "propstore.cli._migrate", "config_group",
                 "Topology file changes (diff) and PostgreSQL server settings (plan, apply)."),
)


class _Failure(click.ClickException):
    """An error shown as one line on stderr, exit status 2."""

    exit_code = EXIT_ERROR


def _one_line(exc: BaseException) -> str:
    """The error for people: its first line; the type too when it is not one of ours."""
    lines = str(exc).strip().splitlines() or [""]
    text = lines[0]
    if not _is_ours(exc):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        return f"{text} (--debug shows the traceback)"
    return text + (" (--debug shows more)" if len(lines) > 1 else "")


def _is_ours(exc: BaseException) -> bool:
    if isinstance(exc, PropStoreError):
        return True
    # Importing propstore.sandbox loads all of it; an error of it means it is loaded.
    sandbox_errors = sys.modules.get("propstore.sandbox._errors")
    return sandbox_errors is not None and isinstance(exc, sandbox_errors.SandboxError)


class _Main(click.Group):
    """The root group: commands from :data:`COMMANDS`, imported when used; turns any error
    of a command into one line on stderr (exit status 2), unless ``--debug`` asks for the
    traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [entry.name for entry in COMMANDS]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = entry_of(cmd_name)
        if entry is None:
            return None
        return load(entry)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # From the declared summaries: listing the commands must not import them.
        rows = [(entry.name, entry.summary) for entry in COMMANDS]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort, click.UsageError):
            raise
        except KeyboardInterrupt as exc:
            with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
                click.echo(f"interrupted ({exc})" if str(exc) else "interrupted", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
        except click.ClickException as exc:
            raise _Failure(exc.format_message()) from exc
        except Exception as exc:
            state = ctx.find_object(CliState)
            if state is not None and state.debug:
                raise
            raise _Failure(_one_line(exc)) from None


def entry_of(name: str) -> CommandEntry | None:
    """The :data:`COMMANDS` entry called ``name``."""
    return next((entry for entry in COMMANDS if entry.name == name), None)


def load(entry: CommandEntry) -> click.Command:
    """Import the command (once) and give it, and its subcommands, the global options (and,
    unless it is light, the log set-up when it runs)."""
    command = getattr(importlib.import_module(entry.module), entry.attribute)
    if not isinstance(command, click.Command):
        raise TypeError(f"{entry.module}.{entry.attribute} is not a click command")
    add_global_options(command)
    if not entry.light:
        _log_while_running(command)
    return command


_LOGGING: weakref.WeakSet[click.Command] = weakref.WeakSet()


def _log_while_running(command: click.Command) -> None:
    """Set up logging when the body of ``command`` (or of each of its subcommands) runs:
    not before, because the root's and a group's callbacks also run for a subcommand's
    ``--help``, which must not load structlog."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            _log_while_running(sub)
        return
    body = command.callback
    if body is None or command in _LOGGING:
        return

    @functools.wraps(body)
    def run(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        ctx.find_root().call_on_close(ctx.ensure_object(CliState).start_logging())
        return body(*args, **kwargs)

    command.callback = run
    _LOGGING.add(command)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@global_options
@click.version_option(version=__version__, prog_name="propstore")
@click.pass_context
def main(ctx: click.Context, config: str | None, debug: bool) -> None:
    """propstore: a sharded user-property store that reads from a replica only when it is
    provably fresh enough.

    Start with `propstore demo`. Against a cluster, point --config (or PROPSTORE_CONFIG) at
    its topology file; `propstore sandbox up` starts a local one and prints it. --config and
    --debug may also follow the command (`propstore lag --config FILE`).

    \b
    Exit status:
      0  success (for `lag --max-staleness/--profile`: every shard has a replica in budget)
      1  `lag` check failed (some shard has no replica within the budget), or
         `demo` saw a budget violation
      2  error: bad usage, unreadable config, unreachable primary, refused input, ...
      130  interrupted (Ctrl-C, SIGTERM, SIGHUP) before the command finished
    """
    state = ctx.ensure_object(CliState)
    state.config, state.debug = config, debug


__all__ = ["COMMANDS", "CommandEntry", "main"]
