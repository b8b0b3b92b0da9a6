"""Create user_properties: one JSON document per (tenant_id, user_id).

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "user_properties",
        sa.Column("tenant_id", sa.Text(), primary_key=True),
        sa.Column("user_id", sa.Text(), primary_key=True),
        sa.Column("bucket", sa.Integer(), nullable=False),
        sa.Column("props", JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("version", sa.BigInteger(), nullable=False, server_default=sa.text("1")),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False,
            server_default=sa.func.now(),
        ),
        sa.CheckConstraint(
            "char_length(tenant_id) BETWEEN 1 AND 255", name="tenant_id_length"
        ),
        sa.CheckConstraint("char_length(user_id) BETWEEN 1 AND 255", name="user_id_length"),
        sa.CheckConstraint("jsonb_typeof(props) = 'object'", name="props_is_object"),
    )
    op.create_index("user_properties_bucket", "user_properties", ["bucket"])


def downgrade() -> None:
    op.drop_index("user_properties_bucket", table_name="user_properties")
    op.drop_table("user_properties")
