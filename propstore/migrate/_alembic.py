"""alembic, pointed at one shard primary at a time.

alembic is the migration engine; this module only builds its ``Config`` (script location =
the installed ``migrations/`` folder unless the caller names another one) and hands it a
connection to the primary being migrated, so each shard keeps its own ``alembic_version``.
It also answers "which revisions lie between here and there" from the script directory, and
renders alembic's offline SQL, so planning needs no home-made revision walking.
"""

from __future__ import annotations

import importlib
import io
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psycopg
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import Script, ScriptDirectory
from alembic.script.revision import RangeNotAncestorError, ResolutionError
from alembic.util import CommandError
from sqlalchemy.pool import NullPool

from propstore.errors import MigrationError

Direction = Literal["up", "down"]
ScriptLocation = str | Path | None

#: ``config.attributes`` keys the migrator fills for every shard (read them in a revision
#: with ``op.get_context().config.attributes``; :meth:`LagGuard.from_alembic` does).
SHARD_ATTRIBUTE = "propstore.shard"
PRIMARY_DSN_ATTRIBUTE = "propstore.primary_dsn"
REPLICA_DSNS_ATTRIBUTE = "propstore.replica_dsns"


def script_location() -> Path:
    """Folder holding ``env.py`` and ``versions/`` (the repository's ``migrations/``)."""
    module = importlib.import_module("propstore._migrations")
    assert module.__file__ is not None
    return Path(module.__file__).parent


def alembic_config(
    location: ScriptLocation = None,
    *,
    attributes: Mapping[str, object] | None = None,
    output_buffer: io.StringIO | None = None,
) -> Config:
    """An alembic ``Config`` (no ini file) for ``location`` (default: propstore's own)."""
    config = Config(output_buffer=output_buffer)
    config.set_main_option("script_location", str(location or script_location()))
    if attributes:
        config.attributes.update(attributes)
    return config


def script_directory(location: ScriptLocation = None) -> ScriptDirectory:
    """alembic's view of the revision files."""
    return ScriptDirectory.from_config(alembic_config(location))


def head_revision(location: ScriptLocation = None) -> str | None:
    """The newest revision in the script directory (propstore's ``migrations/`` by default)."""
    return script_directory(location).get_current_head()


@contextmanager
def engine_for(dsn: str, connect_timeout: float = 5.0) -> Iterator[sa.Engine]:
    """A single-connection SQLAlchemy engine on ``dsn`` (a libpq connection string).

    The DSN is passed to psycopg as-is through ``creator`` rather than turned into a URL, so
    no password is ever rendered into an SQLAlchemy URL (which appears in errors and logs).
    """
    engine = sa.create_engine(
        "postgresql+psycopg://",
        creator=lambda: psycopg.connect(
            dsn, connect_timeout=max(2, round(connect_timeout)),
            application_name="propstore-migrate",
        ),
        poolclass=NullPool,
    )
    try:
        yield engine
    finally:
        engine.dispose()


def current_revision(dsn: str, connect_timeout: float = 5.0) -> str | None:
    """The revision a node's database is at (None before the first migration)."""
    with engine_for(dsn, connect_timeout) as engine, engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def _run(
    dsn: str, direction: Direction, revision: str, location: ScriptLocation,
    attributes: Mapping[str, object] | None,
) -> None:
    config = alembic_config(location, attributes=attributes)
    # A plain connection, not engine.begin(): env.py's begin_transaction() then owns the
    # transaction, which is what lets a revision use op.get_context().autocommit_block()
    # (a batched backfill must commit as it goes; alembic asserts inside an outer one).
    with engine_for(dsn) as engine, engine.connect() as connection:
        config.attributes["connection"] = connection
        if direction == "up":
            command.upgrade(config, revision)
        else:
            command.downgrade(config, revision)


def upgrade(
    dsn: str, revision: str = "head", *, script_location: ScriptLocation = None,
    attributes: Mapping[str, object] | None = None,
) -> None:
    """Run ``alembic upgrade`` against the primary at ``dsn``.

    ``attributes`` are added to alembic's ``config.attributes`` (see the ``*_ATTRIBUTE``
    keys); ``script_location`` replaces propstore's ``migrations/`` folder.
    """
    _run(dsn, "up", revision, script_location, attributes)


def downgrade(
    dsn: str, revision: str, *, script_location: ScriptLocation = None,
    attributes: Mapping[str, object] | None = None,
) -> None:
    """Run ``alembic downgrade`` against the primary at ``dsn``."""
    _run(dsn, "down", revision, script_location, attributes)


@dataclass(frozen=True, slots=True)
class PlannedRevision:
    """One revision a shard would run: its id and the first line of its docstring."""

    revision: str
    message: str

    def __str__(self) -> str:
        return f"{self.revision} {self.message}".rstrip()


def resolve_target(script: ScriptDirectory, revision: str) -> str | None:
    """The revision id ``revision`` names (``head``, an id or a unique prefix); None for
    ``base``. Raises :class:`MigrationError` for anything alembic cannot resolve to one."""
    if revision == "base":
        return None
    try:
        found = script.get_revision(revision)
    except (ResolutionError, CommandError) as exc:
        raise MigrationError(f"unknown revision {revision!r}: {exc}") from None
    if found is None:
        raise MigrationError(f"revision {revision!r} names no single revision")
    return found.revision


def revisions_between(
    script: ScriptDirectory, current: str | None, target: str | None, direction: Direction
) -> tuple[PlannedRevision, ...]:
    """The revisions alembic would run to go from ``current`` to ``target``, in run order.

    Empty when the database is already at the target, or past it in the direction of travel
    (an upgrade never downgrades, and the reverse). Raises :class:`MigrationError` when
    ``current`` is unknown to the script directory.
    """
    if current == target:
        return ()
    upper, lower = (target, current) if direction == "up" else (current, target)
    if upper is None:
        return ()
    try:
        scripts: list[Script] = list(script.iterate_revisions(upper, lower or "base"))
    except RangeNotAncestorError:
        return ()  # already beyond the target in this direction: nothing to run
    except (ResolutionError, CommandError) as exc:
        raise MigrationError(
            f"database revision {current!r} is not in the script directory: {exc}"
        ) from None
    steps = tuple(PlannedRevision(s.revision, (s.doc or "").strip()) for s in scripts)
    return tuple(reversed(steps)) if direction == "up" else steps


def offline_sql(
    current: str | None, target: str | None, direction: Direction,
    location: ScriptLocation = None,
) -> str:
    """alembic's offline (``--sql``) rendering of the step from ``current`` to ``target``."""
    buffer = io.StringIO()
    config = alembic_config(location, output_buffer=buffer)
    start, end = current or "base", target or "base"
    if direction == "up":
        command.upgrade(config, end if current is None else f"{start}:{end}", sql=True)
    else:
        command.downgrade(config, f"{start}:{end}", sql=True)
    return buffer.getvalue()
