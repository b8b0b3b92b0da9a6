"""Schema and config changes rolled out shard by shard, gated on replica lag."""

from propstore.migrate._alembic import current_revision, downgrade, head_revision, upgrade

__all__ = ["current_revision", "downgrade", "head_revision", "upgrade"]
