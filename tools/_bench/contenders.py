"""The clients propstore is measured against, written the way a user would write them.

* :class:`LibpqNode` — the floor at propstore's own level: libpq through psycopg's ``pgconn``
  (``PQexecPrepared``), propstore's own prepared statements (``propstore._sql``) with text
  parameters, and exactly the decoding a caller needs (one ``json.loads`` of the document,
  ``int`` of the version). No routing, no deadline, no cursor.
* :class:`RawNode` — plain psycopg 3 through a ``Cursor`` on one server, prepared statements
  by primary key, no routing: what a hand-written client looks like (Python-side adaptation
  and row building included), one network round trip.
* Pgpool-II — a :class:`RawNode` on Pgpool's port: the same queries through the proxy.
  ``simple=True`` sends them with the simple query protocol: measured here, Pgpool 4.3.5
  applies ``delay_threshold`` only to simple-protocol queries and keeps load-balancing
  extended-protocol (prepared) SELECTs to a lagging standby, so its lag protection needs it.
* :class:`WaitingReader` — the behaviour behind the incidents: after a write it polls its
  replica until it has replayed the write, then reads there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from propstore import _sql  # the very statements propstore prepares: the same protocol work
from psycopg import pq
from psycopg.types.json import Jsonb

GET = "SELECT props, version FROM user_properties WHERE tenant_id = %s AND user_id = %s"
GET_SERVED_BY = (
    "SELECT props, version, inet_server_port() FROM user_properties"
    " WHERE tenant_id = %s AND user_id = %s"
)
GET_MANY = (
    "SELECT user_id, props FROM user_properties WHERE tenant_id = %s AND user_id = ANY(%s)"
)
# The shape propstore's get_many sends (one JSON object per shard), through a cursor.
GET_MANY_AGG = (
    "SELECT json_object_agg(user_id, props) FROM user_properties"
    " WHERE tenant_id = %s AND user_id = ANY(%s)"
)
# The merge a hand-written client would send: one upsert, committed on its own.
MERGE = (
    "INSERT INTO user_properties AS u (tenant_id, user_id, bucket, props)"
    " VALUES (%s, %s, %s, %s)"
    " ON CONFLICT (tenant_id, user_id) DO UPDATE SET props = u.props || EXCLUDED.props,"
    " version = u.version + 1, updated_at = now()"
    " RETURNING version"
)
FLUSH_LSN = "SELECT pg_current_wal_flush_lsn()::text"
REPLAYED = "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn"

Props = dict[str, Any]


class RawNode:
    """One autocommit psycopg connection to one server; every statement prepared."""

    def __init__(self, dsn: str, *, simple: bool = False) -> None:
        factory = psycopg.ClientCursor if simple else psycopg.Cursor
        self.conn: psycopg.Connection[Any] = psycopg.connect(
            dsn, autocommit=True, cursor_factory=factory
        )
        self.cur = self.conn.cursor()
        # The simple protocol cannot carry a prepared statement; everything else prepares.
        self._prepare: bool | None = None if simple else True

    def get(self, tenant: str, user: str) -> tuple[Props, int] | None:
        """A user's document and version (None when absent)."""
        self.cur.execute(GET, (tenant, user), prepare=self._prepare)
        row = self.cur.fetchone()
        return None if row is None else (row[0], row[1])

    def get_served_by(self, tenant: str, user: str) -> tuple[Props | None, int]:
        """A user's document and the port of the server that answered."""
        self.cur.execute(GET_SERVED_BY, (tenant, user), prepare=self._prepare)
        row = self.cur.fetchone()
        if row is None:
            return None, -1
        return row[0], row[2]

    def get_many(self, tenant: str, users: Sequence[str]) -> dict[str, Props]:
        """Documents of many users in one ``= ANY(...)`` query, a row per user."""
        self.cur.execute(GET_MANY, (tenant, list(users)), prepare=self._prepare)
        return dict(self.cur.fetchall())

    def get_many_agg(self, tenant: str, users: Sequence[str]) -> dict[str, Props]:
        """The same as one JSON object (``json_object_agg``), the shape of ``get_many``."""
        self.cur.execute(GET_MANY_AGG, (tenant, list(users)), prepare=self._prepare)
        row = self.cur.fetchone()
        return {} if row is None or row[0] is None else dict(row[0])

    def merge(self, tenant: str, user: str, bucket: int, props: Mapping[str, Any]) -> int:
        """Merge ``props`` into the user's document (committed); the new version."""
        self.cur.execute(MERGE, (tenant, user, bucket, Jsonb(dict(props))),
                         prepare=self._prepare)
        row = self.cur.fetchone()
        assert row is not None
        return int(row[0])

    def flush_lsn(self) -> str:
        """The primary's flushed WAL position (read after a commit: at or past it)."""
        self.cur.execute(FLUSH_LSN, prepare=self._prepare)
        row = self.cur.fetchone()
        assert row is not None
        return str(row[0])

    def replayed(self, lsn: str) -> bool:
        """On a replica: whether it has replayed up to ``lsn``."""
        self.cur.execute(REPLAYED, (lsn,), prepare=self._prepare)
        row = self.cur.fetchone()
        return bool(row and row[0])

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


#: A row-per-user batch statement at the libpq level (propstore itself only has the
#: ``json_object_agg`` one), so both batch shapes have a libpq-level floor.
_GET_MANY_ROWS = b"bench_get_many_rows"
_GET_MANY_ROWS_SQL = (
    "SELECT user_id, props FROM user_properties"
    " WHERE tenant_id = $1 AND user_id = ANY($2::text[])"
)
_LIBPQ_STATEMENTS = (_sql.GET, _sql.GET_MANY)
#: The floor's upsert: propstore's merge (same conflict handling and size check) as a plain
#: statement, without the insert LSN propstore's own returns for its token.
_MERGE = b"bench_merge"
_MERGE_SQL = (
    "INSERT INTO user_properties AS u (tenant_id, user_id, bucket, props)"
    " VALUES ($1, $2, $3::int, $4::jsonb)"
    " ON CONFLICT (tenant_id, user_id) DO UPDATE SET props = u.props || EXCLUDED.props,"
    " version = u.version + 1, updated_at = now()"
    " WHERE octet_length((u.props || EXCLUDED.props)::text) <= $5::int"
    " RETURNING version"
)


class LibpqNode:
    """One autocommit connection driven through libpq (``pgconn``), as propstore drives it.

    Prepares propstore's own ``GET``/``GET_MANY`` statements (the same SQL, the same names)
    and its merge as a plain upsert (without the insert LSN propstore's returns), and sends
    them with ``PQexecPrepared`` and text parameters, the same Bind and Execute propstore
    sends; results are decoded exactly as far as a caller needs them. It blocks in libpq
    instead of polling with a deadline: the cheapest way to get the answer, which makes it
    the floor (propstore's deadline driver is measured on its own, see
    :meth:`get_with_deadline`).
    """

    def __init__(self, dsn: str) -> None:
        self.conn: psycopg.Connection[Any] = psycopg.connect(dsn, autocommit=True)
        for name in _LIBPQ_STATEMENTS:
            self.conn.execute(_sql.prepare_sql(name), prepare=False)
        self.conn.execute(f"PREPARE {_GET_MANY_ROWS.decode()} AS {_GET_MANY_ROWS_SQL}",
                          prepare=False)
        self.conn.execute(f"PREPARE {_MERGE.decode()} AS {_MERGE_SQL}", prepare=False)
        self.pgconn = self.conn.pgconn
        self._batch_prepared = False

    def _exec(self, name: bytes, params: Sequence[bytes]) -> pq.abc.PGresult:
        result = self.pgconn.exec_prepared(name, params)
        if result.status != pq.ExecStatus.TUPLES_OK:
            message = (result.error_message or b"").decode("utf-8", "replace").strip()
            status = pq.ExecStatus(result.status).name
            raise psycopg.DatabaseError(f"{name.decode()}: {status} {message}")
        return result

    def get(self, tenant: str, user: str) -> tuple[Props, int] | None:
        """A user's document and version (None when absent)."""
        result = self._exec(_sql.GET, (tenant.encode(), user.encode()))
        if not result.ntuples:
            return None
        props, version = result.get_value(0, 0), result.get_value(0, 1)
        assert props is not None and version is not None
        return json.loads(props), int(version)

    def get_with_deadline(self, tenant: str, user: str, seconds: float = 1.0
                          ) -> tuple[Props, int] | None:
        """:meth:`get` through propstore's own deadline-capable I/O driver (``_wire``):
        non-blocking send, ``poll`` on the socket. The driver's cost without any routing."""
        from propstore._wire import Statement, execute

        results = execute(self.conn, [Statement(_sql.GET, (tenant.encode(), user.encode()))],
                          time.monotonic() + seconds)
        result = results[0]
        if not result.ntuples:
            return None
        props, version = result.get_value(0, 0), result.get_value(0, 1)
        assert props is not None and version is not None
        return json.loads(props), int(version)

    def get_many(self, tenant: str, users: Sequence[str]) -> dict[str, Props]:
        """propstore's batch statement (``json_object_agg``): one ``json.loads`` per call."""
        result = self._exec(_sql.GET_MANY, (tenant.encode(), _sql.text_array(list(users))))
        value = result.get_value(0, 0) if result.ntuples else None
        return json.loads(value) if value is not None else {}

    def get_many_rows(self, tenant: str, users: Sequence[str]) -> dict[str, Props]:
        """The same users, a row per user: one ``json.loads`` per row."""
        result = self._exec(_GET_MANY_ROWS, (tenant.encode(), _sql.text_array(list(users))))
        found: dict[str, Props] = {}
        for row in range(result.ntuples):
            user, props = result.get_value(row, 0), result.get_value(row, 1)
            assert user is not None and props is not None
            found[user.decode()] = json.loads(props)
        return found

    def merge(self, tenant: str, user: str, bucket: int, props: Mapping[str, Any],
              max_bytes: int = 1 << 20) -> int | None:
        """propstore's merge statement (committed); the new version (None: over size)."""
        result = self._exec(_MERGE, (
            tenant.encode(), user.encode(), str(bucket).encode(),
            json.dumps(dict(props), separators=(",", ":")).encode(), str(max_bytes).encode()))
        if not result.ntuples:
            return None
        value = result.get_value(0, 0)
        return None if value is None else int(value)

    def merge_with_position(self, tenant: str, user: str, bucket: int,
                            props: Mapping[str, Any], max_bytes: int = 1 << 20) -> str:
        """propstore's whole write batch sent raw, blocking in libpq: ``BEGIN``, its merge
        (which returns the insert LSN), ``COMMIT`` and the flush LSN with the WAL file name,
        one Sync. What a token costs the protocol alone (a position read after the
        commit), without propstore's Python; reported beside the floor, never the floor.
        Returns the flush LSN."""
        pgconn = self.pgconn
        if not self._batch_prepared:
            for name in (_sql.BEGIN, _sql.COMMIT, _sql.MERGE, _sql.FLUSH_LSN):
                pgconn.prepare(name, _sql.TEXT[name])  # protocol level: SQL PREPARE refuses BEGIN
            self._batch_prepared = True
        pgconn.enter_pipeline_mode()
        pgconn.send_query_prepared(_sql.BEGIN, ())
        pgconn.send_query_prepared(_sql.MERGE, (
            tenant.encode(), user.encode(), str(bucket).encode(),
            json.dumps(dict(props), separators=(",", ":")).encode(), str(max_bytes).encode()))
        pgconn.send_query_prepared(_sql.COMMIT, ())
        pgconn.send_query_prepared(_sql.FLUSH_LSN, ())
        pgconn.pipeline_sync()
        results = []
        for _ in range(4):
            result = pgconn.get_result()
            while pgconn.get_result() is not None:  # each statement's results end in a NULL
                pass
            results.append(result)
        sync = pgconn.get_result()
        pgconn.exit_pipeline_mode()
        for result in results:
            if result is None or result.status not in (pq.ExecStatus.COMMAND_OK,
                                                       pq.ExecStatus.TUPLES_OK):
                message = b"" if result is None else result.error_message or b""
                raise psycopg.DatabaseError(f"write batch: {message.decode('utf-8', 'replace')}")
        assert sync is not None and sync.status == pq.ExecStatus.PIPELINE_SYNC
        value = results[3].get_value(0, 0)
        assert value is not None
        return value.decode()

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()


class WaitingReader:
    """Writes on the primary, then waits for its replica to replay the write, then reads it.

    ``poll_interval`` (seconds) is how often the replica's replay position is checked;
    ``give_up`` caps one wait, so a replica paused for good cannot hang the benchmark.
    """

    def __init__(self, primary_dsn: str, replica_dsn: str, *, poll_interval: float = 0.005,
                 give_up: float = 120.0) -> None:
        self.primary = RawNode(primary_dsn)
        self.replica = RawNode(replica_dsn)
        self.poll_interval = poll_interval
        self.give_up = give_up

    def write(self, tenant: str, user: str, bucket: int, props: Mapping[str, Any]) -> str:
        """Merge on the primary; the LSN the replica must reach to show it."""
        self.primary.merge(tenant, user, bucket, props)
        return self.primary.flush_lsn()

    def read_after(self, tenant: str, user: str, lsn: str) -> Props | None:
        """Wait until the replica replayed ``lsn``, then read the user there."""
        deadline = time.monotonic() + self.give_up
        while not self.replica.replayed(lsn):
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica did not replay {lsn} in {self.give_up:g}s")
            time.sleep(self.poll_interval)
        row = self.replica.get(tenant, user)
        return None if row is None else row[0]

    def close(self) -> None:
        """Close both connections."""
        self.primary.close()
        self.replica.close()
