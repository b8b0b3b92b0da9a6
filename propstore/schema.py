"""The database schema, as SQLAlchemy Core metadata: the single source the migrations follow.

One table per shard, ``user_properties``: a JSON document per ``(tenant_id, user_id)``. The
``bucket`` column stores the user's virtual bucket so that moving buckets between shards
(and checking a shard holds none of a bucket's users) is an indexed query.

Beside the table, migration ``0002`` creates two functions the store reads through,
``propstore_read(tenant, user_id)`` and ``propstore_read_many(tenant, user_ids)``: a verified
replica read in one statement (the replay LSN read before the data's snapshot; see
docs/architecture.md, "One statement, still sound"). SQLAlchemy metadata does not describe
functions, so they live in the revisions only (``0003`` makes ``propstore_read_many``'s
refusal name itself); a schema without them still works (reads are then verified with the
two-statement pipeline).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB

#: Longest tenant or user id accepted (characters).
MAX_ID_LENGTH = 255

metadata = MetaData()

user_properties = Table(
    "user_properties",
    metadata,
    Column("tenant_id", Text, primary_key=True),
    Column("user_id", Text, primary_key=True),
    Column("bucket", Integer, nullable=False),
    Column("props", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("version", BigInteger, nullable=False, server_default=text("1")),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint(
        f"char_length(tenant_id) BETWEEN 1 AND {MAX_ID_LENGTH}", name="tenant_id_length"
    ),
    CheckConstraint(f"char_length(user_id) BETWEEN 1 AND {MAX_ID_LENGTH}", name="user_id_length"),
    CheckConstraint("jsonb_typeof(props) = 'object'", name="props_is_object"),
    Index("user_properties_bucket", "bucket"),
)

__all__ = ["MAX_ID_LENGTH", "metadata", "user_properties"]
