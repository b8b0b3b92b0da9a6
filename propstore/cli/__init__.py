"""The ``propstore`` command: a thin layer that parses, calls the library and prints.

Every command's work is a library call (``PropertyStore``, :func:`propstore.monitor.lag_report`,
:class:`propstore.metrics.StoreMetrics`, :func:`propstore.cli._demo.run_demo`), so whatever
the CLI shows, a program can compute too.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from propstore.cli._context import EXIT_ERROR, EXIT_INTERRUPTED, CliState, configure_logging
from propstore.cli._demo_command import demo_command
from propstore.cli._lag import lag_command
from propstore.cli._metrics import metrics_command
from propstore.cli._sandbox import sandbox
from propstore.cli._shards import shards_command
from propstore.cli._users import (
    delete_command,
    get_command,
    route_command,
    set_command,
    unset_command,
)
from propstore.errors import PropStoreError
from propstore.sandbox import SandboxError


class _Failure(click.ClickException):
    """An error shown as one line on stderr, exit status 2."""

    exit_code = EXIT_ERROR


def _one_line(exc: BaseException) -> str:
    """The error for people: its first line; the type too when it is not one of ours."""
    lines = str(exc).strip().splitlines() or [""]
    text = lines[0]
    if not isinstance(exc, PropStoreError | SandboxError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        return f"{text} (--debug shows the traceback)"
    return text + (" (--debug shows more)" if len(lines) > 1 else "")


class _Main(click.Group):
    """Turns any error of a command into one line on stderr (exit status 2), unless
    ``--debug`` asks for the traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort, click.UsageError):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
        except click.ClickException as exc:
            raise _Failure(exc.format_message()) from exc
        except Exception as exc:
            state = ctx.find_object(CliState)
            if state is not None and state.debug:
                raise
            raise _Failure(_one_line(exc)) from None


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", envvar="PROPSTORE_CONFIG", metavar="FILE",
              type=click.Path(dir_okay=False),
              help="Topology file (docs/config.md) [env: PROPSTORE_CONFIG].")
@click.option("--debug", is_flag=True,
              help="Show the library's log events and full tracebacks on errors.")
@click.version_option(package_name="propstore")
@click.pass_context
def main(ctx: click.Context, config: str | None, debug: bool) -> None:
    """propstore: a sharded user-property store that reads from a replica only when it is
    provably fresh enough.

    Start with `propstore demo`. Against a cluster, point --config (or PROPSTORE_CONFIG) at
    its topology file; `propstore sandbox up` starts a local one and prints it.

    \b
    Exit status:
      0  success (for `lag --max-staleness/--profile`: every shard has a replica in budget)
      1  `lag` check failed (some shard has no replica within the budget), or
         `demo` saw a budget violation
      2  error: bad usage, unreadable config, unreachable primary, refused input, ...
      130  interrupted (Ctrl-C) before the command finished
    """
    ctx.obj = CliState(config=config, debug=debug)
    ctx.call_on_close(configure_logging(debug))


for _command in (
    lag_command, route_command, get_command, set_command, unset_command, delete_command,
    shards_command, metrics_command, demo_command, sandbox,
):
    main.add_command(_command)


def _add_migration_commands(group: click.Group) -> None:
    """Add ``migrate`` and ``config`` from ``propstore.cli._migrate`` when it exists (it is
    written separately; the CLI works without it)."""
    try:
        module = importlib.import_module("propstore.cli._migrate")
    except ModuleNotFoundError as exc:
        if exc.name != "propstore.cli._migrate":
            raise
        return
    for attribute in ("migrate", "config_group"):
        command = getattr(module, attribute, None)
        if isinstance(command, click.Command):
            group.add_command(command)


_add_migration_commands(main)

__all__ = ["main"]
