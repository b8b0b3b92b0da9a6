"""One Patroni member of the sandbox: its configuration, its Patroni process, its faults.

Patroni starts, clones (pg_basebackup) or rewinds (pg_rewind) the member's PostgreSQL
server itself; the sandbox only starts and stops Patroni, and for faults signals the
member's server processes by pid (``_processes``).
"""

from __future__ import annotations

import json
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import structlog

from propstore.sandbox._account import ServerAccount
from propstore.sandbox._daemons import spawn, terminate
from propstore.sandbox._datadir import DATABASE, SUPERUSER
from propstore.sandbox._errors import SandboxError
from propstore.sandbox._processes import (
    ProcessId,
    descendants,
    identify,
    signal_process,
    wait_gone,
)

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class DcsSettings:
    """Patroni's dynamic settings at bootstrap (seconds; Patroni's defaults: 30, 10, 10)."""

    ttl: int = 10
    loop_wait: int = 1
    retry_timeout: int = 4
    synchronous_mode: bool = False


@dataclass
class PatroniMember:
    """One Patroni member: its PostgreSQL server and REST API ports and its process."""

    name: str
    port: int
    rest_port: int
    member_dir: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    #: WAL senders stopped by :meth:`hold_replication`.
    held: list[ProcessId] = field(default_factory=list, repr=False)

    @property
    def dsn(self) -> str:
        """libpq connection string to the ``propstore`` database as ``postgres``."""
        return f"host=127.0.0.1 port={self.port} dbname={DATABASE} user={SUPERUSER}"

    @property
    def rest_url(self) -> str:
        """The member's Patroni REST API, ``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.rest_port}"

    @property
    def data_dir(self) -> Path:
        """The member's PostgreSQL data directory (created by Patroni)."""
        return self.member_dir / "data"

    @property
    def config_file(self) -> Path:
        """The member's Patroni configuration (JSON, which is YAML)."""
        return self.member_dir / "patroni.yml"

    def postmaster(self) -> ProcessId | None:
        """The running postmaster, from ``postmaster.pid`` (None when it is down)."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0].strip()
        except OSError:
            return None
        return identify(int(first)) if first.isdigit() else None

    def scalar(self, query: str) -> Any:
        """First value of a query on this member (a fresh autocommit connection)."""
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute(query.encode()).fetchone()
            return row[0] if row else None

    # ------------------------------------------------------------------ configuration

    def write_config(self, account: ServerAccount, etcd_port: int, bindir: Path,
                     dcs: DcsSettings) -> None:
        """Write the member's Patroni configuration (readable by the server account only)."""
        sockets = account.make_dir(self.member_dir / "sockets", 0o700)
        config = {
            "scope": "propstore", "name": self.name,
            "log": {"level": "INFO"},
            "restapi": {"listen": f"127.0.0.1:{self.rest_port}",
                        "connect_address": f"127.0.0.1:{self.rest_port}"},
            "etcd3": {"host": f"127.0.0.1:{etcd_port}"},
            "bootstrap": {
                "dcs": {
                    "ttl": dcs.ttl, "loop_wait": dcs.loop_wait,
                    "retry_timeout": dcs.retry_timeout,
                    "maximum_lag_on_failover": 1 << 30,
                    "synchronous_mode": dcs.synchronous_mode,
                    "postgresql": {
                        "use_pg_rewind": True, "use_slots": True,
                        "parameters": {
                            "wal_log_hints": "on", "synchronous_commit": "on",
                            "max_wal_senders": 10, "max_replication_slots": 10,
                            "hot_standby": "on", "wal_keep_size": "128MB",
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{self.port}",
                "connect_address": f"127.0.0.1:{self.port}",
                "data_dir": str(self.data_dir),
                "bin_dir": str(bindir),
                "pgpass": str(self.member_dir / "pgpass"),
                # A fast checkpoint: the default spread one makes each clone wait minutes.
                "basebackup": [{"checkpoint": "fast"}],
                "authentication": {
                    "superuser": {"username": SUPERUSER},
                    "replication": {"username": SUPERUSER},
                    "rewind": {"username": SUPERUSER},
                },
                "pg_hba": [
                    "local all all trust",
                    "host all all 127.0.0.1/32 trust",
                    "host replication all 127.0.0.1/32 trust",
                ],
                "parameters": {"unix_socket_directories": str(sockets)},
            },
        }
        self.config_file.write_text(json.dumps(config, indent=2))
        account.own(self.config_file, 0o600)

    # ------------------------------------------------------------------ process and faults

    def start(self, account: ServerAccount) -> None:
        """Start (or restart) the member's Patroni, which starts, clones or rewinds its
        server."""
        if self.process is not None and self.process.poll() is None:
            return
        self.process = spawn(account, ["patroni", str(self.config_file)],
                             self.member_dir / "patroni.log", self.member_dir)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the member cleanly (SIGTERM to Patroni: it shuts PostgreSQL down)."""
        self.release_replication()
        if self.process is not None:
            self.thaw_patroni()  # a stopped process would only die of the SIGKILL
            terminate(self.process, timeout)
            self.process = None
        self._kill_postmaster()  # left behind only if Patroni itself was killed

    def crash(self) -> None:
        """SIGKILL Patroni, the postmaster and every server process (a machine dying): the
        leader lock is not released, so the others wait for ``ttl``."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None
        self.held.clear()  # killed with the rest
        proc = self.postmaster()
        if proc is not None:
            children = [p for p in map(identify, descendants(proc.pid)) if p is not None]
            for victim in (proc, *children):
                signal_process(victim, signal.SIGKILL)
            for victim in (proc, *children):
                wait_gone(victim, 10.0)
        log.info("sandbox.patroni_member_crashed", member=self.name)

    def hold_replication(self) -> int:
        """SIGSTOP the member's WAL senders: it keeps acknowledging (asynchronous) commits
        that no standby receives, as when the network to the standbys stalls. Returns how
        many were stopped; :meth:`crash` ends them, :meth:`release_replication` resumes them."""
        proc = self.postmaster()
        if proc is None:
            raise SandboxError(f"{self.name} is not running")
        for pid in descendants(proc.pid):
            if "walsender" in _cmdline(pid):
                child = identify(pid)
                if child is not None and signal_process(child, signal.SIGSTOP):
                    self.held.append(child)
        return len(self.held)

    def release_replication(self) -> None:
        """SIGCONT the WAL senders :meth:`hold_replication` stopped (a stopped one would
        hold up the server's shutdown)."""
        for child in self.held:
            signal_process(child, signal.SIGCONT)
        self.held.clear()

    def freeze_patroni(self) -> bool:
        """SIGSTOP the member's Patroni only (a hung HA agent): its PostgreSQL keeps running
        and, on the leader, keeps accepting writes while the lock expires and another member
        is promoted (what Patroni's watchdog exists to prevent). :meth:`thaw_patroni` undoes
        it; Patroni then demotes and rewinds the server. Returns whether it was stopped."""
        proc = identify(self.process.pid) if self.process is not None else None
        return proc is not None and signal_process(proc, signal.SIGSTOP)

    def thaw_patroni(self) -> None:
        """SIGCONT the member's Patroni (after :meth:`freeze_patroni`)."""
        proc = identify(self.process.pid) if self.process is not None else None
        if proc is not None:
            signal_process(proc, signal.SIGCONT)

    def _kill_postmaster(self) -> None:
        proc = self.postmaster()
        if proc is not None and signal_process(proc, signal.SIGINT) and not wait_gone(proc, 30.0):
            signal_process(proc, signal.SIGKILL)
            wait_gone(proc, 10.0)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            "utf-8", "replace")
    except OSError:
        return ""


__all__ = ["DcsSettings", "PatroniMember"]
