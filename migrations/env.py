"""alembic environment: migrates one shard's primary at a time.

propstore's rolling migrator (``propstore.migrate``) passes an open SQLAlchemy connection in
``config.attributes["connection"]`` for each shard in turn. Offline mode (``--sql``) renders
PostgreSQL SQL without connecting.
"""

from __future__ import annotations

from alembic import context

from propstore.schema import metadata

config = context.config


def run_offline() -> None:
    """Render SQL for the PostgreSQL dialect without a database."""
    context.configure(
        url="postgresql+psycopg://",
        target_metadata=metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    """Migrate the shard primary whose connection the caller provided."""
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError(
            "propstore migrations run through `propstore migrate` (one shard at a time), "
            "which supplies the connection; plain `alembic upgrade` is not supported"
        )
    context.configure(connection=connection, target_metadata=metadata)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
