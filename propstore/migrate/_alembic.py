"""alembic, pointed at one shard primary at a time.

alembic is the migration engine; this module only builds its ``Config`` (script location =
the installed ``migrations/`` folder) and hands it a connection to the primary being
migrated, so each shard keeps its own ``alembic_version``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.pool import NullPool


def script_location() -> Path:
    """Folder holding ``env.py`` and ``versions/`` (the repository's ``migrations/``)."""
    module = importlib.import_module("propstore._migrations")
    assert module.__file__ is not None
    return Path(module.__file__).parent


def alembic_config() -> Config:
    """An alembic ``Config`` for propstore's migrations (no ini file needed)."""
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    return config


def head_revision() -> str | None:
    """The newest revision in ``migrations/versions``."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


@contextmanager
def engine_for(dsn: str, connect_timeout: float = 5.0) -> Iterator[sa.Engine]:
    """A single-connection SQLAlchemy engine on ``dsn`` (a libpq connection string).

    The DSN is passed to psycopg as-is through ``creator`` rather than turned into a URL, so
    no password is ever rendered into an SQLAlchemy URL (which appears in errors and logs).
    """
    engine = sa.create_engine(
        "postgresql+psycopg://",
        creator=lambda: psycopg.connect(dsn, connect_timeout=max(1, round(connect_timeout))),
        poolclass=NullPool,
    )
    try:
        yield engine
    finally:
        engine.dispose()


def current_revision(dsn: str) -> str | None:
    """The revision a node's database is at (None before the first migration)."""
    with engine_for(dsn) as engine, engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(dsn: str, revision: str = "head") -> None:
    """Run ``alembic upgrade`` against the primary at ``dsn``."""
    config = alembic_config()
    with engine_for(dsn) as engine, engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def downgrade(dsn: str, revision: str) -> None:
    """Run ``alembic downgrade`` against the primary at ``dsn``."""
    config = alembic_config()
    with engine_for(dsn) as engine, engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)
