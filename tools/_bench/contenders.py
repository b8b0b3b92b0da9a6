"""The clients propstore is measured against, written the way a user would write them.

* :class:`RawNode` — plain psycopg 3 on one server, prepared statements by primary key, no
  routing: one network round trip, the floor.
* Pgpool-II — a :class:`RawNode` on Pgpool's port: the same queries through the proxy.
  ``simple=True`` sends them with the simple query protocol: measured here, Pgpool 4.3.5
  applies ``delay_threshold`` only to simple-protocol queries and keeps load-balancing
  extended-protocol (prepared) SELECTs to a lagging standby, so its lag protection needs it.
* :class:`WaitingReader` — the behaviour behind the incidents: after a write it polls its
  replica until it has replayed the write, then reads there.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

GET = "SELECT props, version FROM user_properties WHERE tenant_id = %s AND user_id = %s"
GET_SERVED_BY = (
    "SELECT props, version, inet_server_port() FROM user_properties"
    " WHERE tenant_id = %s AND user_id = %s"
)
GET_MANY = (
    "SELECT user_id, props FROM user_properties WHERE tenant_id = %s AND user_id = ANY(%s)"
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
        """Documents of many users in one ``= ANY(...)`` query."""
        self.cur.execute(GET_MANY, (tenant, list(users)), prepare=self._prepare)
        return dict(self.cur.fetchall())

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
