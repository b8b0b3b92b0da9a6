"""Every SQL statement propstore sends, by name.

All values travel as bind parameters (``$n``); nothing is ever formatted into SQL text.
Where a connection keeps its server (direct, TCP proxy, session pooler) the statements are
prepared once per connection at the protocol level (Parse with a name), so a read costs one
Bind and Execute and no parse or plan on the server. Behind a transaction pooler each is
sent as an unnamed statement with its Sync in the same batch (``_wire``): one transaction,
so one server connection, which PgBouncer 1.18 accepts. SQL ``PREPARE`` is never used by
the store: PgBouncer passes it through untracked and it collides across server connections.
"""

from __future__ import annotations

from typing import Final

# Statement names, as bytes for libpq's send_query_prepared.
REPLAY_LSN: Final = b"propstore_replay_lsn"
FLUSH_LSN: Final = b"propstore_flush_lsn"
IS_PRIMARY: Final = b"propstore_is_primary"
GET: Final = b"propstore_get"
GET_MANY: Final = b"propstore_get_many"
MERGE: Final = b"propstore_merge"
REPLACE: Final = b"propstore_replace"
UNSET: Final = b"propstore_unset"
DELETE: Final = b"propstore_delete"
POLL: Final = b"propstore_poll"
# A write's transaction block (see MERGE): prepared at the protocol level like the rest (SQL
# PREPARE refuses transaction commands, so ``prepare_sql`` is never for these two).
BEGIN: Final = b"propstore_begin"
COMMIT: Final = b"propstore_commit"
# The verified reads in one statement (functions of migration 0002).
VERIFIED_GET: Final = b"propstore_verified_get"
VERIFIED_GET_MANY: Final = b"propstore_verified_get_many"
IDENTITY: Final = b"propstore_identity"
#: How many statements the server connection holds under propstore's own names: behind a
#: pooler that tracks prepared statements none (PgBouncer renames them ``PGBOUNCER_<n>``).
OWN_NAMES: Final = b"propstore_own_names"

#: Who answers (``proof.ServerRun``) and the server-side backend pid: a pooler shows a
#: BackendKeyData pid of its own, a direct connection or TCP proxy the server's.
IDENTITY_COLUMNS: Final = (
    "(SELECT system_identifier FROM pg_control_system()), inet_server_addr(),"
    " inet_server_port(), pg_postmaster_start_time()::text, pg_backend_pid()"
)

# Timelines (REPLAY_LSN, POLL; the text is repeated, not formatted, so that every statement
# is a literal). A standby's is the receiver's while it runs (WAL replayed on an older
# timeline is then at or below its switch point, so on this timeline's history too), else
# the last restartpoint's, which is never newer than the replay timeline: an old timeline
# can only make a replica look diverged, never make a diverged one look current. A
# primary's is the one its WAL is written on: the first 8 hex digits of the WAL file name
# (pg_walfile_name refuses to run during recovery, hence the CASE around it in POLL).
STATEMENTS: Final[dict[bytes, str]] = {
    # The third column: the pipeline's order proves nothing unless each statement takes a
    # snapshot of its own (READ COMMITTED; under REPEATABLE READ the data statement shares
    # this one's, taken before the LSN was read). The store checks it on every verified
    # pipelined read (docs/architecture.md, "One statement, still sound").
    REPLAY_LSN: (
        "SELECT pg_last_wal_replay_lsn(),"
        " COALESCE((SELECT received_tli FROM pg_stat_wal_receiver),"
        " GREATEST((SELECT timeline_id FROM pg_control_checkpoint()),"
        " (SELECT min_recovery_end_timeline FROM pg_control_recovery()))),"
        " current_setting('transaction_isolation')"
    ),
    FLUSH_LSN: "SELECT pg_current_wal_flush_lsn(), pg_walfile_name(pg_current_wal_flush_lsn())",
    BEGIN: "BEGIN",
    COMMIT: "COMMIT",
    IS_PRIMARY: "SELECT NOT pg_is_in_recovery()",
    GET: (
        "SELECT props, version FROM user_properties WHERE tenant_id = $1 AND user_id = $2"
    ),
    # One JSON object for the whole batch: a single json.loads in the client instead of one
    # per row (measured ~2.5x cheaper to decode for 10,000 users).
    GET_MANY: (
        "SELECT json_object_agg(user_id, props) FROM user_properties"
        " WHERE tenant_id = $1 AND user_id = ANY($2::text[])"
    ),
    # A write is sent as BEGIN, the write, COMMIT, FLUSH_LSN and one Sync (``_writes``):
    # COMMIT, a transaction command, commits as soon as it is executed (not at the Sync), so
    # FLUSH_LSN, run next in a transaction of its own, reads a position at or after the end
    # of the commit record (synchronous_commit=on flushed it before COMMIT returned). One
    # Sync, so one server flush and one wake-up of the client: measured ~6% of a write
    # cheaper than a Sync after the write (paired raw libpq, load 2-4). A failed write leaves
    # the block aborted, which ``_wire`` rolls back.
    # Each write returns (new version or NULL, pg_current_wal_insert_lsn()), one row always:
    # the insert LSN is read inside the write's own transaction, so it is at or before the
    # commit record whatever order the two are evaluated in (the commit is written after the
    # statement, at COMMIT), which is all a token's start needs (``timeline.WriteMark``).
    # The write is a data-modifying WITH, run to completion whether or not the outer SELECT
    # reads it (the CTE costs the server ~2% of a plain upsert, measured).
    # One statement, so concurrent merges on the same user lose no key: the row lock taken
    # by ON CONFLICT serialises them and each merges into the latest committed document.
    MERGE: (
        "WITH w AS (INSERT INTO user_properties AS u (tenant_id, user_id, bucket, props)"
        " VALUES ($1, $2, $3::int, $4::jsonb)"
        " ON CONFLICT (tenant_id, user_id) DO UPDATE SET props = u.props || EXCLUDED.props,"
        " version = u.version + 1, updated_at = now()"
        " WHERE octet_length((u.props || EXCLUDED.props)::text) <= $5::int"
        " RETURNING version)"
        " SELECT (SELECT version FROM w), pg_current_wal_insert_lsn()"
    ),
    REPLACE: (
        "WITH w AS (INSERT INTO user_properties AS u (tenant_id, user_id, bucket, props)"
        " VALUES ($1, $2, $3::int, $4::jsonb)"
        " ON CONFLICT (tenant_id, user_id) DO UPDATE SET props = EXCLUDED.props,"
        " version = u.version + 1, updated_at = now()"
        " WHERE octet_length(EXCLUDED.props::text) <= $5::int"
        " RETURNING version)"
        " SELECT (SELECT version FROM w), pg_current_wal_insert_lsn()"
    ),
    UNSET: (
        "WITH w AS (UPDATE user_properties AS u SET props = u.props - $3::text[],"
        " version = u.version + 1, updated_at = now()"
        " WHERE tenant_id = $1 AND user_id = $2 RETURNING version)"
        " SELECT (SELECT version FROM w), pg_current_wal_insert_lsn()"
    ),
    DELETE: (
        "WITH w AS (DELETE FROM user_properties WHERE tenant_id = $1 AND user_id = $2)"
        " SELECT NULL::int, pg_current_wal_insert_lsn()"
    ),
    # REPLAY_LSN's two columns, then GET's (GET_MANY's): the functions read the LSN first
    # and the data in a statement of their own, on a snapshot taken after it (migration
    # 0002; docs/architecture.md, "One statement, still sound"). Columns are named, not
    # ``*``, so a later migration adding an OUT column changes nothing here.
    VERIFIED_GET: (
        "SELECT replay_lsn, timeline, props, version FROM propstore_read($1, $2)"
    ),
    VERIFIED_GET_MANY: (
        "SELECT replay_lsn, timeline, props FROM propstore_read_many($1, $2::text[])"
    ),
    IDENTITY: "SELECT " + IDENTITY_COLUMNS,
    OWN_NAMES: "SELECT count(*) FROM pg_prepared_statements WHERE starts_with(name, 'propstore_')",
    # The monitor's poll: role, the LSN that matters for the role, receive position, replay
    # pause and whether a WAL receiver is streaming (a disconnected receiver is not lag 0),
    # the system identifier, the hot-standby parameters (current_setting: cheap, no
    # pg_settings scan: a standby paused with one below its primary's is paused for
    # insufficient settings) and the timeline of the node's WAL.
    # Then (from column 8) the identity of the server run that answered, so the observation
    # is a fact about that run and nothing else (``proof``).
    POLL: (
        "SELECT pg_is_in_recovery(),"
        " CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
        " ELSE pg_current_wal_flush_lsn() END,"
        " pg_last_wal_receive_lsn(),"
        " CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END,"
        " EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming'),"
        " (SELECT system_identifier FROM pg_control_system()),"
        " concat_ws(',', current_setting('max_connections'),"
        " current_setting('max_locks_per_transaction'),"
        " current_setting('max_prepared_transactions'), current_setting('max_wal_senders'),"
        " current_setting('max_worker_processes')),"
        " CASE WHEN pg_is_in_recovery() THEN"
        " COALESCE((SELECT received_tli FROM pg_stat_wal_receiver),"
        " GREATEST((SELECT timeline_id FROM pg_control_checkpoint()),"
        " (SELECT min_recovery_end_timeline FROM pg_control_recovery())))"
        " ELSE ('x' || substr(pg_walfile_name(pg_current_wal_flush_lsn()), 1, 8))::bit(32)::int"
        " END,"
        # = IDENTITY_COLUMNS (written out: SQL is never built by concatenation here)
        " (SELECT system_identifier FROM pg_control_system()), inet_server_addr(),"
        " inet_server_port(), pg_postmaster_start_time()::text, pg_backend_pid()"
    ),
}

#: Statement texts as bytes, for unnamed (Parse with an empty name) execution.
TEXT: Final[dict[bytes, bytes]] = {name: sql.encode() for name, sql in STATEMENTS.items()}


#: Statements a pooled read/write connection needs that do not touch the table.
BASE_STATEMENTS: Final = (REPLAY_LSN, FLUSH_LSN, IS_PRIMARY, BEGIN, COMMIT)
#: Statements on ``user_properties`` (they fail to prepare before the shard is migrated).
TABLE_STATEMENTS: Final = (GET, GET_MANY, MERGE, REPLACE, UNSET, DELETE)
DATA_STATEMENTS: Final = BASE_STATEMENTS + TABLE_STATEMENTS
#: Statements on migration 0002's functions (they fail to prepare on a schema without them:
#: the store then verifies reads with the two-statement pipeline).
FUNCTION_STATEMENTS: Final = (VERIFIED_GET, VERIFIED_GET_MANY)
#: A data query -> the one statement that verifies it (replay LSN, timeline, its columns).
VERIFIED: Final[dict[bytes, bytes]] = {GET: VERIFIED_GET, GET_MANY: VERIFIED_GET_MANY}
#: Where a verified statement's data columns start.
VERIFIED_DATA_COLUMN: Final = 2


def prepare_sql(name: bytes) -> str:
    """The SQL ``PREPARE`` command for a statement (for direct connections only; the store
    prepares at the protocol level instead)."""
    return f"PREPARE {name.decode()} AS {STATEMENTS[name]}"


def text_array(values: list[str]) -> bytes:
    """A ``text[]`` literal for a bind parameter (quoted and escaped per element)."""
    quoted = (
        '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"' for value in values
    )
    return ("{" + ",".join(quoted) + "}").encode()
