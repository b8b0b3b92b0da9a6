"""propstore_read_many's READ COMMITTED refusal names propstore_read_many.

Migration 0002 gave both verifying functions the same refusal text, ``propstore_read needs
READ COMMITTED``, so a batch refused under REPEATABLE READ named the single-user function.
This revision replaces propstore_read_many's body with the same body and its own name in
the message; its downgrade puts 0002's body back. Nothing else changes: same signature,
VOLATILE, SECURITY INVOKER (0002's comments say why each matters for soundness).

The guard and the replay LSN/timeline query stay written out in both functions, not
factored into one function both call: a plpgsql call from plpgsql costs every verified
read measurable server time. Measured on a replica, backend CPU per call
(``/proc/<pid>/schedstat``), 20 interleaved rounds of 1,000 ``propstore_read`` calls by
raw libpq, load 5-7: 0002's body 59.7 us and an identical copy 57.2 us, against 64.1 us
with the shared part in a helper read by ``SELECT ... INTO`` and 62.1 us by assignment
(+4-7 us a read, beyond the two identical bodies' 2.5 us spread).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# 0002's READ_MANY with its own name in the refusal (written out: SQL is never built by
# concatenation in propstore).
READ_MANY = """
CREATE OR REPLACE FUNCTION propstore_read_many(p_tenant text, p_user_ids text[],
    OUT replay_lsn pg_lsn, OUT timeline integer, OUT props json)
LANGUAGE plpgsql VOLATILE SECURITY INVOKER AS $$
BEGIN
  IF current_setting('transaction_isolation') <> 'read committed' THEN
    RAISE EXCEPTION 'propstore_read_many needs READ COMMITTED (transaction_isolation is %)',
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

# 0002's body exactly, for the downgrade.
READ_MANY_0002 = """
CREATE OR REPLACE FUNCTION propstore_read_many(p_tenant text, p_user_ids text[],
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
    op.execute(READ_MANY)


def downgrade() -> None:
    op.execute(READ_MANY_0002)
