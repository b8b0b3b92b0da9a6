"""``propstore sandbox up|status|down``: parse, call :mod:`propstore.sandbox`, print.

:mod:`propstore.sandbox` is imported by the commands' bodies: importing it loads psycopg and
the whole sandbox, which ``sandbox up --help`` does not need.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from propstore.cli._signals import signals_as_interrupt

if TYPE_CHECKING:
    from propstore.sandbox._poolers import FrontKind

F = TypeVar("F", bound=Callable[..., Any])

#: ``--front`` choices: propstore.sandbox._poolers.FRONT_KINDS, spelled here so that help
#: does not import the sandbox (tests/test_cli_startup.py keeps the two equal).
FRONT_CHOICES = ("pgbouncer-session", "pgbouncer-transaction", "pgbouncer-hosts",
                 "pgbouncer-prepared", "haproxy")


def _dir_option(function: F) -> F:
    decorator = click.option(
        "--dir", "base_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="Cluster folder [default: per-user state folder, see `sandbox status`].",
    )
    return decorator(function)


@click.group("sandbox")
def sandbox() -> None:
    """A local replicated PostgreSQL cluster to try propstore against."""


@sandbox.command("up")
@click.option("--shards", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--replicas", type=click.IntRange(min=0), default=2, show_default=True,
              help="Hot standbys per shard.")
@click.option("--pg-bin", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="PostgreSQL bin folder [default: $PROPSTORE_PG_BIN, system, wheel].")
@click.option("--no-migrate", is_flag=True,
              help="Leave the shards empty instead of migrating them to head.")
@click.option("--replace", is_flag=True,
              help="If a sandbox of another shape runs in the folder, stop and delete it "
                   "first (without this, that is an error).")
@click.option("--front", "fronts", multiple=True, type=click.Choice(FRONT_CHOICES),
              help="Put a pooler or proxy in front of every shard's replicas (repeatable); "
              "the topology file reaches them through it (docs/deployment.md).")
@_dir_option
def up_command(shards: int, replicas: int, pg_bin: Path | None, no_migrate: bool,
               replace: bool, fronts: tuple[FrontKind, ...], base_dir: Path | None) -> None:
    """Start the cluster in the background, migrate every shard to head and write its
    topology file.

    A sandbox of the same shape already running in the folder is reused; one of another
    shape is an error naming it, unless --replace. Ctrl-C, SIGTERM or SIGHUP while it
    starts stop the servers started so far.
    """
    from propstore.sandbox import SandboxError, up

    try:
        with signals_as_interrupt():
            cluster = up(base_dir, shards, replicas, pg_bin=pg_bin, migrate=not no_migrate,
                         replace=replace, fronts=fronts)
    except SandboxError as exc:
        raise click.ClickException(str(exc)) from exc
    for node in cluster.nodes:
        click.echo(f"{node.name:<20} {node.role:<8} {node.dsn}")
    for front in cluster.fronts:
        click.echo(f"{front.name:<20} {front.via:<8} {front.dsn}")
    seconds = "" if cluster.startup_seconds is None else f" in {cluster.startup_seconds:.1f}s"
    schema = "" if no_migrate else ", every shard migrated to head"
    click.echo(f"\nPostgreSQL {cluster.pg_version} cluster up{seconds}{schema}: "
               f"{cluster.base_dir}")
    click.echo(f"Topology file: {cluster.config_path}")
    click.echo("Point propstore at it with either of:")
    click.echo(f"  export PROPSTORE_CONFIG={cluster.config_path}")
    click.echo(f"  propstore --config {cluster.config_path} ...")
    stop_hint = "" if base_dir is None else f" --dir {cluster.base_dir}"
    click.echo(f"Stop it with: propstore sandbox down{stop_hint}")


@sandbox.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@_dir_option
def status_command(as_json: bool, base_dir: Path | None) -> None:
    """Show every node: role, port, pid, whether it runs, its WAL position."""
    from propstore.sandbox import SandboxError, default_base_dir, status

    folder = base_dir if base_dir is not None else default_base_dir()
    try:
        rows = status(folder)
    except SandboxError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{folder}")
    for row in rows:
        state = "running" if row["running"] else "down"
        if row["in_recovery"] is not None:
            state += ", in recovery" if row["in_recovery"] else ", accepting writes"
        click.echo(f"{row['name']:<20} {row['role']:<8} port {row['port']:<6} "
                   f"pid {row['pid'] or '-':<8} lsn {row['lsn'] or '-':<12} {state}")


@sandbox.command("down")
@_dir_option
def down_command(base_dir: Path | None) -> None:
    """Stop every server of the cluster and delete its files."""
    from propstore.sandbox import SandboxError, down

    try:
        stopped = down(base_dir)
    except SandboxError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"stopped {len(stopped)} servers" + (f": {', '.join(stopped)}" if stopped else ""))
