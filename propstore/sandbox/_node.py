"""One local PostgreSQL server: its lifecycle (pg_ctl) and the faults it can be put through."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import structlog

from propstore.sandbox._account import ServerAccount
from propstore.sandbox._binaries import PgInstall
from propstore.sandbox._datadir import DATABASE, SUPERUSER, copy_template, write_node_conf
from propstore.sandbox._errors import SandboxError
from propstore.sandbox._processes import (
    ProcessId,
    command_name,
    descendants,
    freeze_tree,
    identify,
    is_alive,
    signal_process,
    thaw,
    wait_gone,
)
from propstore.sandbox._replication import Role, StreamingNode
from propstore.sandbox._waiting import wait_for

log = structlog.get_logger(__name__)

_LOG_TAIL_BYTES = 3000


def postmaster_pid(data_dir: Path) -> int | None:
    """The pid on the first line of ``postmaster.pid``, or None without that file."""
    try:
        first_line = (data_dir / "postmaster.pid").read_text().split("\n", 1)[0].strip()
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    return int(first_line) if first_line.isdigit() else None


def running_postmaster(data_dir: Path) -> ProcessId | None:
    """The live postmaster of ``data_dir`` (a stale ``postmaster.pid`` after a crash: None)."""
    pid = postmaster_pid(data_dir)
    proc = None if pid is None else identify(pid)
    if proc is None or not is_alive(proc):
        return None
    # After a reboot a stale pid file may name an unrelated process.
    return proc if command_name(proc.pid) == "postgres" else None


class LocalNode(StreamingNode):
    """A server of a :class:`~propstore.sandbox.LocalCluster`, living in ``<base_dir>/<name>``.

    Attributes:
        name: node name, e.g. ``shard0-replica1``.
        role: ``"primary"`` or ``"replica"`` (updated by :meth:`promote`).
        port: loopback TCP port.
        node_dir: the node's folder; ``data_dir`` and ``log_file`` live in it.
        upstream: for a replica, the node its WAL receiver streams from.
    """

    def __init__(
        self,
        name: str,
        role: Role,
        port: int,
        node_dir: Path,
        *,
        install: PgInstall,
        account: ServerAccount,
        socket_dir: Path | None,
        upstream: LocalNode | None = None,
    ) -> None:
        self.name = name
        self.role = role
        self.port = port
        self.node_dir = node_dir
        self.upstream = upstream
        self._original_upstream = upstream
        self._install = install
        self._account = account
        self._socket_dir = socket_dir
        self._frozen: list[ProcessId] = []

    @property
    def dsn(self) -> str:
        """``host=127.0.0.1 port=N dbname=propstore user=postgres``."""
        return f"host=127.0.0.1 port={self.port} dbname={DATABASE} user={SUPERUSER}"

    @property
    def socket_dir(self) -> Path | None:
        """Folder of the server's Unix socket (``.s.PGSQL.<port>``), if it has one."""
        return self._socket_dir

    @property
    def data_dir(self) -> Path:
        """The PostgreSQL data directory (PGDATA)."""
        return self.node_dir / "data"

    @property
    def log_file(self) -> Path:
        """The server's log (stderr of the postmaster and every child)."""
        return self.node_dir / "server.log"


    @property
    def pid(self) -> int | None:
        """The postmaster's pid from ``postmaster.pid`` if the file is there, else None."""
        return postmaster_pid(self.data_dir)

    def process(self) -> ProcessId | None:
        """The running postmaster's identity, or None when the server is down."""
        return running_postmaster(self.data_dir)

    def is_running(self) -> bool:
        """Whether the postmaster process exists (it may be frozen)."""
        return self.process() is not None

    @property
    def frozen(self) -> bool:
        """Whether :meth:`freeze` is in effect."""
        return bool(self._frozen)

    # -- creation -------------------------------------------------------------------------

    def init_from_template(self, template: Path) -> None:
        """Create this primary's data directory from the cached template."""
        self._account.make_dir(self.node_dir, 0o700)
        copy_template(template, self.data_dir, self._account)
        self._write_node_conf()

    def init_from_backup(self, timeout: float = 120.0) -> None:
        """Clone this replica from its upstream with ``pg_basebackup -R -X stream``.

        ``-C -S`` creates a physical slot on the upstream in the same step, so the upstream
        keeps every WAL segment this replica has not received, even across restarts.
        """
        if self.upstream is None:
            raise SandboxError(f"{self.name}: a replica needs an upstream to clone")
        self._account.make_dir(self.node_dir, 0o700)
        source = f"host=127.0.0.1 port={self.upstream.port} user={SUPERUSER}"
        self._account.run(
            [self._install.tool("pg_basebackup"), "-D", self.data_dir, "-d", source,
             "-R", "-X", "stream", "-C", "-S", self.slot_name,
             # No manifest or checksum pass: nothing verifies this throwaway copy later.
             "--checkpoint=fast", "--no-sync", "--no-manifest", "--no-verify-checksums"],
            cwd=self.node_dir,
            timeout=timeout,
        )
        self._write_node_conf()

    def _write_node_conf(self) -> None:
        write_node_conf(self.data_dir, name=self.name, port=self.port, socket_dir=self._socket_dir)

    def change_port(self, port: int) -> None:
        """Move a stopped node to another port (used when the chosen port was taken)."""
        self.port = port
        self._write_node_conf()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> None:
        """Start the server and wait until it accepts connections (``pg_ctl start -w``)."""
        if self.is_running():
            return
        result = self._pg_ctl(["-l", self.log_file, "-w", "-t", str(round(timeout)), "start"],
                              timeout=timeout + 30, check=False)
        if result.returncode != 0:
            raise SandboxError(f"{self.name}: pg_ctl start failed\n{self.log_tail()}")
        log.info("sandbox.node_started", node=self.name, port=self.port, pid=self.pid)

    def stop(self, timeout: float = 30.0) -> None:
        """Shut down cleanly; escalate to immediate mode, then to SIGKILL by pid."""
        proc = self.process()
        self.thaw()
        if proc is None:
            return
        for mode in ("fast", "immediate"):
            self._pg_ctl(["-m", mode, "-w", "-t", str(round(timeout)), "stop"],
                         timeout=timeout + 30, check=False)
            if wait_gone(proc, 2.0):
                log.info("sandbox.node_stopped", node=self.name, mode=mode)
                return
        self._kill_by_pid(proc)

    def kill(self) -> None:
        """Crash the server (``pg_ctl stop -m immediate``: no shutdown checkpoint)."""
        proc = self.process()
        self.thaw()
        if proc is None:
            return
        self._pg_ctl(["-m", "immediate", "-w", "-t", "30", "stop"], timeout=60, check=False)
        if not wait_gone(proc, 10.0):
            self._kill_by_pid(proc)
        log.info("sandbox.node_killed", node=self.name)

    def restart(self, timeout: float = 120.0) -> None:
        """Stop cleanly, then start again."""
        self.stop()
        self.start(timeout)

    def _kill_by_pid(self, proc: ProcessId) -> None:
        # Last resort: the postmaster ignored pg_ctl. Children die once their parent is gone.
        victims = [p for p in (identify(pid) for pid in descendants(proc.pid)) if p is not None]
        for victim in (proc, *victims):
            signal_process(victim, signal.SIGKILL)
        wait_gone(proc, 10.0)
        log.warning("sandbox.node_sigkilled", node=self.name, pid=proc.pid)

    def _pg_ctl(
        self, args: list[str | Path], *, timeout: float, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self._account.run(
            [self._install.tool("pg_ctl"), "-D", self.data_dir, *args],
            cwd=self.node_dir,
            timeout=timeout,
            check=check,
        )

    def log_tail(self) -> str:
        """The end of the server log, for error messages."""
        try:
            with self.log_file.open("rb") as handle:
                handle.seek(0, 2)
                handle.seek(max(0, handle.tell() - _LOG_TAIL_BYTES))
                return handle.read().decode("utf-8", "replace")
        except OSError:
            return f"(no log at {self.log_file})"

    # -- faults ---------------------------------------------------------------------------

    def freeze(self) -> None:
        """SIGSTOP the postmaster and all its children: the server hangs, connections stall."""
        if self._frozen:
            return
        proc = self.process()
        if proc is None:
            raise SandboxError(f"{self.name} is not running; nothing to freeze")
        self._frozen = freeze_tree(proc)
        log.info("sandbox.node_frozen", node=self.name, processes=len(self._frozen))

    def thaw(self) -> None:
        """SIGCONT everything :meth:`freeze` stopped (no-op when not frozen)."""
        if not self._frozen:
            return
        thaw(self._frozen)
        self._frozen = []
        log.info("sandbox.node_thawed", node=self.name)

    def promote(self, timeout: float = 60.0) -> None:
        """Turn this replica into a primary and wait until it leaves recovery."""
        self._pg_ctl(["-w", "-t", str(round(timeout)), "promote"], timeout=timeout + 30)
        wait_for(lambda: not self.is_in_recovery(), timeout=timeout,
                 what=f"{self.name} to leave recovery")
        self.role = "primary"
        log.info("sandbox.node_promoted", node=self.name)
