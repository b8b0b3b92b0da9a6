"""Poolers and proxies in front of a shard's replicas: the topologies users deploy.

A :class:`Front` is one PgBouncer (session or transaction pooling, one server or a host list)
or one HAProxy (TCP round robin) on a free loopback port, started and stopped by pid, with
its files in its own folder. Tests use them to prove reads where the replica DSN does not
name one server; :meth:`Front.repoint` rewrites the targets and reloads (PgBouncer's RELOAD,
sent as SIGHUP), as an operator moving an entry would.

Both programs come from Debian (``apt-get install pgbouncer haproxy``);
:func:`front_available` says whether one is installed, so tests can skip with that reason.
Debian 12's PgBouncer (1.18) tracks no prepared statements; ``pgbouncer-prepared`` is a
transaction-mode entry of a newer one (1.21+, ``max_prepared_statements = 200``), found at
``$PROPSTORE_PGBOUNCER`` or where ``tools/build_pgbouncer.py`` builds Debian's newer source
package (:func:`pgbouncer_home`).

PgBouncer refuses to run as root, so both run as the sandbox's server account. A PgBouncer
host list takes one port for all hosts, while sandbox replicas share 127.0.0.1 on different
ports; the list therefore names per-target socket folders, each holding a symlink to that
replica's Unix socket under the one port PgBouncer dials (``connect()`` follows symlinks).
"""

from __future__ import annotations

import shutil
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psycopg
import structlog

from propstore.sandbox._account import ServerAccount
from propstore.sandbox._datadir import DATABASE, SUPERUSER, free_port
from propstore.sandbox._errors import SandboxError
from propstore.sandbox._node import LocalNode
from propstore.sandbox._pgbouncer import (
    MAX_PREPARED_STATEMENTS,
    pgbouncer_home,
    tracking_pgbouncer,
)
from propstore.sandbox._processes import (
    ProcessId,
    command_name,
    identify,
    is_alive,
    signal_process,
    wait_gone,
)
from propstore.sandbox._waiting import wait_for

log = structlog.get_logger(__name__)

#: What can stand in front of replicas: PgBouncer per pool mode (``pgbouncer-hosts`` is a
#: session-mode entry with a host list; ``pgbouncer-prepared`` a transaction-mode entry of
#: a PgBouncer that tracks protocol-level prepared statements), and HAProxy TCP round robin.
FrontKind = Literal["pgbouncer-session", "pgbouncer-transaction", "pgbouncer-hosts",
                    "pgbouncer-prepared", "haproxy"]
FRONT_KINDS: tuple[FrontKind, ...] = (
    "pgbouncer-session", "pgbouncer-transaction", "pgbouncer-hosts", "pgbouncer-prepared",
    "haproxy",
)
_PROGRAMS = {"pgbouncer": "/usr/sbin/pgbouncer", "haproxy": "/usr/sbin/haproxy"}
def _program(kind: FrontKind) -> str | None:
    if kind == "pgbouncer-prepared":
        return tracking_pgbouncer()
    name = "haproxy" if kind == "haproxy" else "pgbouncer"
    return shutil.which(name) or (
        _PROGRAMS[name] if Path(_PROGRAMS[name]).exists() else None
    )


def front_available(kind: FrontKind) -> str | None:
    """None when ``kind`` can run here, else the reason it cannot (for a test skip)."""
    if kind not in FRONT_KINDS:
        raise SandboxError(f"unknown front {kind!r} (have {', '.join(FRONT_KINDS)})")
    program = _program(kind)
    if program is None and kind == "pgbouncer-prepared":
        return ("no PgBouncer >= 1.21 here (Debian 12 ships 1.18): build one with "
                f"`python tools/build_pgbouncer.py` (into {pgbouncer_home()}) or set "
                "PROPSTORE_PGBOUNCER to its binary")
    if program is None:
        package = "haproxy" if kind == "haproxy" else "pgbouncer"
        return f"{package} is not installed (apt-get install -y {package})"
    if not ServerAccount.for_this_process().can_reach(Path(program)):
        return f"{program} is not reachable by the sandbox's server account"
    return None


@dataclass
class Front:
    """One pooler or proxy on ``127.0.0.1:port`` in front of ``targets``.

    Attributes:
        name: node name used in the topology file (``shard0-via-haproxy``).
        kind: see :data:`FrontKind`.
        targets: the replicas it sends connections to (a host list or round robin when
            there are several).
        folder: its configuration, pid file and log.
    """

    name: str
    kind: FrontKind
    targets: list[LocalNode]
    folder: Path
    account: ServerAccount
    port: int = field(default_factory=free_port)
    _process: ProcessId | None = None

    @property
    def dsn(self) -> str:
        """What a client puts in its topology file to reach the replicas through this."""
        return f"host=127.0.0.1 port={self.port} dbname={DATABASE} user={SUPERUSER}"

    @property
    def via(self) -> str:
        """What the topology file should declare for a node reached through this front."""
        if self.kind == "haproxy":
            return "load_balancer"
        return "transaction_pooler" if self.pool_mode == "transaction" else "session_pooler"

    @property
    def tracks_prepared(self) -> bool:
        """Whether it tracks protocol-level prepared statements (the topology file's
        ``pooler_tracks_prepared``)."""
        return self.kind == "pgbouncer-prepared"

    @property
    def pool_mode(self) -> str | None:
        """PgBouncer's ``pool_mode`` (None for HAProxy)."""
        if self.kind == "haproxy":
            return None
        return ("transaction" if self.kind in ("pgbouncer-transaction", "pgbouncer-prepared")
                else "session")

    @property
    def log_file(self) -> Path:
        """The program's log."""
        return self.folder / f"{self._program_name}.log"

    @property
    def _program_name(self) -> str:
        return "haproxy" if self.kind == "haproxy" else "pgbouncer"

    @property
    def _pid_file(self) -> Path:
        return self.folder / f"{self._program_name}.pid"

    @property
    def pid(self) -> int | None:
        """The process id of the running program (None when not started or stopped)."""
        return None if self._process is None else self._process.pid

    def is_running(self) -> bool:
        """Whether the process started by :meth:`start` is alive."""
        return self._process is not None and is_alive(self._process)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Front:
        """Write the configuration, start the daemon, wait until it accepts connections."""
        program = _program(self.kind)
        if program is None:
            raise SandboxError(str(front_available(self.kind)))
        self.account.make_dir(self.folder, 0o755)
        self._write_config()
        self._pid_file.unlink(missing_ok=True)
        argv: list[str | Path] = (
            [program, "-D", "-f", self.folder / "haproxy.cfg", "-p", self._pid_file]
            if self.kind == "haproxy" else [program, "-d", self.folder / "pgbouncer.ini"]
        )
        self.account.run(argv, cwd=self.folder, timeout=timeout)

        def started() -> bool:
            try:
                text = self._pid_file.read_text().strip()
            except OSError:
                return False
            return text.isdigit() and _accepts(self.port)

        wait_for(started, timeout=timeout, what=f"{self.name} to accept connections")
        self._process = identify(int(self._pid_file.read_text().strip()))
        if self._process is None:
            raise SandboxError(f"{self.name} exited right after starting:\n{self.log_tail()}")
        log.info("sandbox.front_started", front=self.name, kind=self.kind, port=self.port,
                 pid=self._process.pid, targets=[t.name for t in self.targets])
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process by its pid (SIGTERM, then SIGKILL); safe to call twice."""
        proc, self._process = self._process, None
        if proc is None or not is_alive(proc):
            return
        signal_process(proc, signal.SIGTERM)
        if not wait_gone(proc, timeout):
            signal_process(proc, signal.SIGKILL)
            wait_gone(proc, timeout)
        log.info("sandbox.front_stopped", front=self.name)

    def restart(self, timeout: float = 30.0) -> None:
        """Stop and start again on the same port (clients are cut, as in a pooler restart)."""
        self.stop()
        self.start(timeout)

    def repoint(self, targets: Sequence[LocalNode]) -> None:
        """Send new connections to ``targets`` instead (PgBouncer: rewrite + RELOAD).

        PgBouncer closes each server connection of the old entry once it is released; in
        transaction mode its clients stay connected and land on the new servers.
        """
        if self.kind == "haproxy":
            raise SandboxError("repointing is a PgBouncer RELOAD; restart HAProxy instead")
        self.targets = list(targets)
        self._write_config()
        if self._process is None or not signal_process(self._process, signal.SIGHUP):
            raise SandboxError(f"{self.name} is not running")
        log.info("sandbox.front_repointed", front=self.name,
                 targets=[t.name for t in self.targets])

    def show(self, what: str) -> list[dict[str, str]]:
        """PgBouncer's admin console ``SHOW <what>`` (``STATS``, ``SERVERS``...) as rows of
        column -> text; the console takes simple queries only."""
        if self.kind == "haproxy":
            raise SandboxError("SHOW is PgBouncer's admin console")
        if not what.replace("_", "").isalpha():
            raise SandboxError(f"not a SHOW command: {what!r}")
        admin = self.dsn.replace(f"dbname={DATABASE}", "dbname=pgbouncer")
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            result = conn.pgconn.exec_(f"SHOW {what}".encode())
            if result.status != psycopg.pq.ExecStatus.TUPLES_OK:
                raise SandboxError(f"SHOW {what}: {result.error_message.decode().strip()}")
            names = [(result.fname(i) or b"").decode() for i in range(result.nfields)]
            return [{name: (result.get_value(row, i) or b"").decode()
                     for i, name in enumerate(names)} for row in range(result.ntuples)]

    def log_tail(self, size: int = 3000) -> str:
        """The end of the program's log."""
        try:
            return self.log_file.read_bytes()[-size:].decode("utf-8", "replace")
        except OSError:
            return f"(no log at {self.log_file})"

    # -- configuration -----------------------------------------------------------------

    def _write_config(self) -> None:
        if not self.targets:
            raise SandboxError(f"{self.name}: a front needs at least one target")
        if self.kind == "haproxy":
            self._write(self.folder / "haproxy.cfg", self._haproxy_cfg())
        else:
            self._write(self.folder / "userlist.txt", f'"{SUPERUSER}" ""\n')
            self._write(self.folder / "pgbouncer.ini", self._pgbouncer_ini())

    def _write(self, path: Path, text: str) -> None:
        path.write_text(text)
        self.account.own(path, 0o644)

    def _pgbouncer_entry(self) -> str:
        if len(self.targets) == 1:
            target = self.targets[0]
            return f"host=127.0.0.1 port={target.port}"
        # One port for the whole host list: a folder per target, each with a symlink named
        # for that port pointing at the target's real socket.
        port = self.targets[0].port
        folders = []
        for index, target in enumerate(self.targets):
            socket_dir = target.socket_dir
            if socket_dir is None:
                raise SandboxError(f"{target.name} has no Unix socket for a host list")
            folder = self.folder / f"host{index}"
            self.account.make_dir(folder, 0o755)
            link = folder / f".s.PGSQL.{port}"
            link.unlink(missing_ok=True)
            link.symlink_to(socket_dir / f".s.PGSQL.{target.port}")
            folders.append(str(folder))
        return f"host={','.join(folders)} port={port}"

    def _pgbouncer_ini(self) -> str:
        return "\n".join([
            "[databases]",
            f"{DATABASE} = {self._pgbouncer_entry()} dbname={DATABASE} user={SUPERUSER}",
            "",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {self.folder / 'userlist.txt'}",
            f"admin_users = {SUPERUSER}",
            f"pool_mode = {self.pool_mode}",
            "max_client_conn = 500",
            "default_pool_size = 8",
            # The default 15 s refusal after a failed server login would outlast the tests.
            "server_login_retry = 1",
            # 1.21+ only (1.18 refuses the key); 1.24's default is 200 as well.
            *([f"max_prepared_statements = {MAX_PREPARED_STATEMENTS}"]
              if self.tracks_prepared else []),
            f"logfile = {self.log_file}",
            f"pidfile = {self._pid_file}",
            "",
        ])

    def _haproxy_cfg(self) -> str:
        servers = [
            f"  server {t.name} 127.0.0.1:{t.port} check inter 200ms fall 1 rise 1"
            for t in self.targets
        ]
        return "\n".join([
            "global",
            "  maxconn 500",
            "defaults",
            "  mode tcp",
            "  timeout connect 2s",
            "  timeout client 1h",
            "  timeout server 1h",
            "listen replicas",
            f"  bind 127.0.0.1:{self.port}",
            "  balance roundrobin",
            *servers,
            "",
        ])


def stop_fronts_in(folder: Path, timeout: float = 10.0) -> list[str]:
    """Stop every front whose pid file lies under ``folder/*/`` (a detached cluster's
    ``fronts`` folder), by pid, checking the process is that program; names stopped."""
    stopped = []
    for pid_file in sorted(folder.glob("*/*.pid")):
        try:
            text = pid_file.read_text().strip()
        except OSError:
            continue
        proc = identify(int(text)) if text.isdigit() else None
        if proc is None or command_name(proc.pid) != pid_file.stem:
            continue  # gone, or the pid now belongs to something else
        signal_process(proc, signal.SIGTERM)
        if not wait_gone(proc, timeout):
            signal_process(proc, signal.SIGKILL)
        stopped.append(pid_file.parent.name)
    return stopped


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def make_front(kind: FrontKind, name: str, targets: Sequence[LocalNode], folder: Path,
               account: ServerAccount) -> Front:
    """An unstarted front of ``kind`` (``pgbouncer-hosts`` and ``haproxy`` need 2+ targets
    to mean anything, but one works)."""
    if kind not in FRONT_KINDS:
        raise SandboxError(f"unknown front {kind!r} (have {', '.join(FRONT_KINDS)})")
    chosen = list(targets) if kind in ("pgbouncer-hosts", "haproxy") else list(targets[:1])
    return Front(name, kind, chosen, folder, account)


def wait_front_serves(front: Front, timeout: float = 30.0) -> None:
    """Wait until a query through ``front`` succeeds (after a restart or a target's restart)."""

    def serves() -> bool:
        try:
            with psycopg.connect(front.dsn, connect_timeout=2, autocommit=True) as conn:
                conn.execute("SELECT 1", prepare=False)
            return True
        except psycopg.Error:
            return False

    wait_for(serves, timeout=timeout, what=f"{front.name} to serve queries")
