"""Replication control that needs nothing but a SQL connection.

Shared by the local nodes and the container nodes: querying positions, pausing and resuming
replay, delaying apply, and waiting for replicas to catch up.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Literal, LiteralString

import psycopg
import structlog
from psycopg import sql
from psycopg.abc import Params

from propstore.lsn import LSN
from propstore.sandbox._datadir import SUPERUSER
from propstore.sandbox._errors import SandboxError
from propstore.sandbox._waiting import wait_for

log = structlog.get_logger(__name__)

Role = Literal["primary", "replica"]
#: A statement psycopg can run with parameters (str only as a literal, against injection).
Statement = LiteralString | bytes | sql.SQL | sql.Composed


class SqlNode(ABC):
    """One PostgreSQL server of a sandbox cluster, driven through SQL.

    Attributes:
        name: ``shard0-primary``, ``shard0-replica1``, ...
        role: the role the sandbox gave it; :meth:`promote` turns a replica into a primary.
    """

    name: str
    role: Role

    @property
    @abstractmethod
    def dsn(self) -> str:
        """libpq connection string to the ``propstore`` database as ``postgres``."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.role} {self.dsn!r}>"

    def connect(
        self, *, dbname: str | None = None, connect_timeout: float = 10.0
    ) -> psycopg.Connection[tuple[Any, ...]]:
        """A new autocommit connection (caller closes it); ``dbname`` overrides propstore."""
        extra: dict[str, Any] = {"connect_timeout": max(1, round(connect_timeout))}
        if dbname is not None:
            extra["dbname"] = dbname
        return psycopg.connect(self.dsn, autocommit=True, **extra)

    def execute(
        self, query: Statement, params: Params | None = None, *, dbname: str | None = None
    ) -> list[tuple[Any, ...]]:
        """Run one statement on a fresh autocommit connection and return its rows (or [])."""
        with self.connect(dbname=dbname) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description is not None else []

    def scalar(self, query: Statement, params: Params | None = None) -> Any:
        """First column of the first row of ``query``."""
        rows = self.execute(query, params)
        return rows[0][0] if rows else None

    def is_in_recovery(self) -> bool:
        """Whether the server is currently a standby (``pg_is_in_recovery()``)."""
        return bool(self.scalar("SELECT pg_is_in_recovery()"))

    def flush_lsn(self) -> LSN:
        """On a primary: the WAL position flushed locally, i.e. what replicas can receive."""
        return LSN.parse(self.scalar("SELECT pg_current_wal_flush_lsn()::text"))

    def replay_lsn(self) -> LSN | None:
        """On a replica: the last WAL position replayed (None before any replay)."""
        value = self.scalar("SELECT pg_last_wal_replay_lsn()::text")
        return None if value is None else LSN.parse(value)

    def receive_lsn(self) -> LSN | None:
        """On a replica: the last WAL position received and flushed by the WAL receiver."""
        value = self.scalar("SELECT pg_last_wal_receive_lsn()::text")
        return None if value is None else LSN.parse(value)

    def pause_replay(self, timeout: float = 30.0) -> None:
        """Stop applying WAL (``pg_wal_replay_pause()``); WAL keeps being received.

        A pause takes effect before the next WAL record is applied; on PostgreSQL 14+ this
        returns only once the server reports it paused, so the replay position is frozen.
        """
        with self.connect() as conn:
            conn.execute("SELECT pg_wal_replay_pause()")
            if conn.info.server_version >= 140000:

                def paused() -> bool:
                    row = conn.execute("SELECT pg_get_wal_replay_pause_state()").fetchone()
                    return row is not None and row[0] == "paused"

                wait_for(paused, timeout=timeout, what=f"{self.name} to pause replay")
        log.info("sandbox.replay_paused", node=self.name)

    def resume_replay(self) -> None:
        """Undo :meth:`pause_replay` (``pg_wal_replay_resume()``)."""
        self.execute("SELECT pg_wal_replay_resume()")
        log.info("sandbox.replay_resumed", node=self.name)

    def is_replay_paused(self) -> bool:
        """Whether a pause was requested or is in effect."""
        return bool(self.scalar("SELECT pg_is_wal_replay_paused()"))

    def set_apply_delay(self, seconds: float) -> None:
        """Apply each commit only ``seconds`` after it was made on the primary.

        Uses ``recovery_min_apply_delay`` through ALTER SYSTEM and a reload, no restart.
        """
        self._reload_apply_delay(max(0, round(seconds * 1000)))
        log.info("sandbox.apply_delay_set", node=self.name, seconds=seconds)

    def clear_apply_delay(self) -> None:
        """Remove the apply delay again."""
        self._reload_apply_delay(None)
        log.info("sandbox.apply_delay_cleared", node=self.name)

    def apply_delay(self) -> float:
        """The apply delay in force, in seconds."""
        ms = self.scalar(
            "SELECT setting::int FROM pg_settings WHERE name = 'recovery_min_apply_delay'"
        )
        return int(ms) / 1000.0

    def _reload_apply_delay(self, ms: int | None, timeout: float = 30.0) -> None:
        statement: sql.Composable
        if ms is None:
            statement = sql.SQL("ALTER SYSTEM RESET recovery_min_apply_delay")
        else:
            statement = sql.SQL("ALTER SYSTEM SET recovery_min_apply_delay = {}").format(
                sql.Literal(f"{ms}ms")
            )
        with self.connect() as conn:
            conn.execute(statement)
            conn.execute("SELECT pg_reload_conf()")

            # The reload is asynchronous. Every server process handles SIGHUP before its next
            # step, so once this backend shows the new value the startup process has it too.
            def reloaded() -> bool:
                row = conn.execute(
                    "SELECT setting::int FROM pg_settings"
                    " WHERE name = 'recovery_min_apply_delay'"
                ).fetchone()
                return row is not None and row[0] == (ms or 0)

            wait_for(reloaded, timeout=timeout, what=f"{self.name} to reload its apply delay")


class StreamingNode(SqlNode):
    """A :class:`SqlNode` whose WAL receiver the sandbox steers through SQL.

    What :class:`~propstore.sandbox.LocalNode` and ``ContainerNode`` share: repointing,
    cutting and restoring the receiver, and undoing faults. Only the process side (freeze,
    start, kill) differs between them.
    """

    port: int
    upstream: StreamingNode | None
    _original_upstream: StreamingNode | None

    @property
    def slot_name(self) -> str:
        """Name of this replica's physical replication slot on its upstream."""
        return self.name.replace("-", "_")

    @abstractmethod
    def is_running(self) -> bool:
        """Whether the server is up."""

    @abstractmethod
    def start(self, timeout: float = 120.0) -> None:
        """Start the server and wait until it accepts connections."""

    @abstractmethod
    def thaw(self) -> None:
        """Undo a freeze (no-op when not frozen)."""

    def repoint(self, primary: StreamingNode, timeout: float = 30.0) -> None:
        """Stream from ``primary`` instead (ALTER SYSTEM primary_conninfo + reload).

        A slot of this node's name is created on ``primary`` if missing, so the new upstream
        keeps the WAL this replica still needs.
        """
        primary.execute(
            "SELECT pg_create_physical_replication_slot(%s, true) WHERE NOT EXISTS "
            "(SELECT 1 FROM pg_replication_slots WHERE slot_name = %s)",
            (self.slot_name, self.slot_name),
        )
        conninfo = (f"host=127.0.0.1 port={primary.port} user={SUPERUSER} "
                    f"application_name={self.name}")
        self._set_receiver(conninfo, self.slot_name)
        self.upstream = primary
        wait_for(lambda: self.streams_from(primary), timeout=timeout,
                 what=f"{self.name} to stream from {primary.name}")
        log.info("sandbox.node_repointed", node=self.name, upstream=primary.name)

    def disconnect_receiver(self, timeout: float = 30.0) -> None:
        """Cut the WAL receiver: the replica keeps serving reads but receives nothing new."""
        self._set_receiver("", None)
        wait_for(lambda: not self._receiver_running(), timeout=timeout,
                 what=f"{self.name}'s WAL receiver to stop")
        log.info("sandbox.receiver_disconnected", node=self.name)

    def reconnect_receiver(self, timeout: float = 30.0) -> None:
        """Undo :meth:`disconnect_receiver`: stream from :attr:`upstream` again."""
        if self.upstream is None:
            raise SandboxError(f"{self.name} has no upstream to reconnect to")
        self.repoint(self.upstream, timeout)

    def streams_from(self, primary: StreamingNode) -> bool:
        """Whether this replica's WAL receiver is streaming from ``primary`` right now."""
        rows = self.execute("SELECT status, sender_port FROM pg_stat_wal_receiver")
        return bool(rows) and rows[0][0] == "streaming" and rows[0][1] == primary.port

    def reset_faults(self, timeout: float = 120.0) -> None:
        """Undo every fault this node can be put through, except a promotion.

        Thaws, starts a killed server, resumes replay, clears the apply delay and streams
        from the original upstream again.
        """
        self.thaw()
        if not self.is_running():
            self.start(timeout)
        if self.role != "replica" or self._original_upstream is None:
            return
        if self.is_replay_paused():
            self.resume_replay()
        if self.apply_delay() != 0:
            self.clear_apply_delay()
        if self.upstream is not self._original_upstream or not self._receiver_running():
            self.repoint(self._original_upstream, timeout)

    def _receiver_running(self) -> bool:
        return bool(self.scalar("SELECT count(*) FROM pg_stat_wal_receiver"))

    def _set_receiver(self, conninfo: str, slot: str | None) -> None:
        with self.connect() as conn:
            conn.execute(sql.SQL("ALTER SYSTEM SET primary_conninfo = {}").format(
                sql.Literal(conninfo)))
            conn.execute(sql.SQL("ALTER SYSTEM SET primary_slot_name = {}").format(
                sql.Literal(slot or "")))
            conn.execute("SELECT pg_reload_conf()")


def wait_caught_up(primary: SqlNode, replicas: Sequence[SqlNode], timeout: float) -> None:
    """Wait until every replica has replayed everything the primary had flushed at the call.

    Raises :class:`~propstore.sandbox.SandboxError` naming the replica that is behind.
    """
    target = primary.flush_lsn()
    for replica in replicas:
        def caught_up(node: SqlNode = replica) -> bool:
            position = node.replay_lsn()
            return position is not None and position >= target

        wait_for(caught_up, timeout=timeout, what=f"{replica.name} to replay up to {target}")
