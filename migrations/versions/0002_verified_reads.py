"""Verified reads in one statement: propstore_read and propstore_read_many.

Each function reads the replica's replay LSN (and timeline) and then, in a statement of its
own, the user's document(s). A VOLATILE function takes a new snapshot for every statement
it runs (READ COMMITTED), so the data's snapshot is taken after the LSN was read: the order
the two-statement pipeline gives, in one protocol statement whose inner plans each server
backend caches (docs/architecture.md, "One statement, still sound"). The store falls back
to the pipeline on a schema without them. They are created on the primary and reach the
replicas by replication, like the table.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# VOLATILE (the default, written out because soundness rests on it): STABLE would run the
# data query on the calling statement's snapshot, taken before the LSN is read. SECURITY
# INVOKER (the default): the reader needs SELECT on the table, as for the plain query, and
# no SET search_path, so the table resolves exactly as the store's other statements resolve
# it (and no setting is switched per call). Under REPEATABLE READ every statement of the
# transaction shares the first one's snapshot, so the function refuses to run there.
# The two differ only in their data query; the LSN and timeline are _sql.REPLAY_LSN's
# (repeated, not formatted: SQL is never built by concatenation in propstore).
READ = """
CREATE FUNCTION propstore_read(p_tenant text, p_user_id text,
    OUT replay_lsn pg_lsn, OUT timeline integer, OUT props jsonb, OUT version bigint)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER AS $$
BEGIN
  IF current_setting('transaction_isolation') <> 'read committed' THEN
    RAISE EXCEPTION 'propstore_read needs READ COMMITTED (transaction_isolation is %)',
      current_setting('transaction_isolation') USING ERRCODE = 'invalid_transaction_state';
  END IF;
  SELECT pg_last_wal_replay_lsn(),
    COALESCE((SELECT received_tli FROM pg_stat_wal_receiver),
      GREATEST((SELECT timeline_id FROM pg_control_checkpoint()),
               (SELECT min_recovery_end_timeline FROM pg_control_recovery())))
    INTO replay_lsn, timeline;
  SELECT u.props, u.version INTO props, version FROM user_properties AS u
    WHERE u.tenant_id = p_tenant AND u.user_id = p_user_id;
END
$$
"""

READ_MANY = """
CREATE FUNCTION propstore_read_many(p_tenant text, p_user_ids text[],
    OUT replay_lsn pg_lsn, OUT timeline integer, OUT props json)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER AS $$
BEGIN
  IF current_setting('transaction_isolation') <> 'read committed' THEN
    RAISE EXCEPTION 'propstore_read needs READ COMMITTED (transaction_isolation is %)',
      current_setting('transaction_isolation') USING ERRCODE = 'invalid_transaction_state';
  END IF;
  SELECT pg_last_wal_replay_lsn(),
    COALESCE((SELECT received_tli FROM pg_stat_wal_receiver),
      GREATEST((SELECT timeline_id FROM pg_control_checkpoint()),
               (SELECT min_recovery_end_timeline FROM pg_control_recovery())))
    INTO replay_lsn, timeline;
  SELECT json_object_agg(u.user_id, u.props) INTO props FROM user_properties AS u
    WHERE u.tenant_id = p_tenant AND u.user_id = ANY (p_user_ids);
END
$$
"""


def upgrade() -> None:
    op.execute(READ)
    op.execute(READ_MANY)


def downgrade() -> None:
    op.execute("DROP FUNCTION propstore_read_many(text, text[])")
    op.execute("DROP FUNCTION propstore_read(text, text)")
