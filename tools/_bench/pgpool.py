"""Pgpool-II 4.3 in front of one shard, run as a child process for the benchmark.

Configured as ``/work/shared/notes/pgpool.md`` prescribes, then tightened so the comparison
gives Pgpool its strongest lag protection on 4.3.5 (checked against its own documentation,
Debian's ``/usr/share/doc/pgpool2/runtime-config-load-balancing.html`` and
``runtime-streaming-replication-check.html``):

* ``delay_threshold = 1`` WAL byte, the smallest value that checks at all (0 disables the
  check): any measured lag sends reads to the primary until the next check;
* ``sr_check_period = 1`` second, its shortest (whole seconds only);
* ``disable_load_balance_on_write = 'always'``: after a write, that session's reads go to
  the primary until the session ends. It is the only value that covers autocommit clients:
  per the 4.3 docs, 'transaction' (the default), 'trans_transaction' and 'dml_adaptive' act
  only inside explicit transactions, so for an autocommit read-your-writes client they are
  the same as 'off'.

``delay_threshold_by_time`` is deliberately absent: 4.3.5 accepts it silently and ignores it
(it is 4.4+), which would leave no protection at all.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import psycopg
import psycopg.conninfo

from _bench import affinity

#: WAL bytes of replica lag past which Pgpool sends reads to the primary: the smallest value
#: that enables the check (a byte threshold is a time threshold that depends on the write
#: rate, see the note; 1 byte is as strict as Pgpool goes).
DELAY_THRESHOLD_BYTES = 1
#: After a write, keep the session's reads on the primary (the only value that applies to
#: autocommit clients; see the module docstring).
DISABLE_LOAD_BALANCE_ON_WRITE = "always"
#: Seconds between Pgpool's lag checks (1 is the shortest it accepts).
SR_CHECK_PERIOD = 1


class PgpoolUnavailable(Exception):
    """Pgpool-II is not installed or would not start; the message says which."""


@dataclass(frozen=True)
class Backend:
    """One PostgreSQL server as Pgpool addresses it."""

    host: str
    port: int

    @classmethod
    def from_dsn(cls, dsn: str) -> Backend:
        """The host and port of a libpq connection string."""
        params = psycopg.conninfo.conninfo_to_dict(dsn)
        return cls(str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432))


def find_pgpool() -> str:
    """The ``pgpool`` binary, or :class:`PgpoolUnavailable` naming how to install it."""
    found = shutil.which("pgpool") or (
        "/usr/sbin/pgpool" if Path("/usr/sbin/pgpool").exists() else None
    )
    if found is None:
        raise PgpoolUnavailable(
            "pgpool not found; install Debian's pgpool2 (apt-get install -y pgpool2)"
        )
    return found


def version() -> str | None:
    """``pgpool --version``'s text, or None when Pgpool is not installed."""
    try:
        binary = find_pgpool()
    except PgpoolUnavailable:
        return None
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).strip() or None


def _config_text(primary: Backend, replica: Backend, port: int, pcp_port: int, run: Path,
                 user: str, database: str, extra: dict[str, str | int]) -> str:
    settings: dict[str, str | int] = {
        "backend_clustering_mode": "'streaming_replication'",
        "listen_addresses": "'127.0.0.1'",
        "port": port,
        "socket_dir": f"'{run}'",
        "pcp_listen_addresses": "'127.0.0.1'",
        "pcp_port": pcp_port,
        "pcp_socket_dir": f"'{run}'",
        "wd_ipc_socket_dir": f"'{run}'",
        "pid_file_name": f"'{run / 'pgpool.pid'}'",
        "logdir": f"'{run}'",
        "log_destination": "'stderr'",
        "backend_hostname0": f"'{primary.host}'",
        "backend_port0": primary.port,
        # Weight 0 on the primary sends every read Pgpool may load-balance to the replica,
        # as propstore does; the primary still serves reads Pgpool judges too stale.
        "backend_weight0": 0,
        "backend_flag0": "'DISALLOW_TO_FAILOVER'",
        "backend_application_name0": "'bench_primary'",
        "backend_hostname1": f"'{replica.host}'",
        "backend_port1": replica.port,
        "backend_weight1": 1,
        "backend_flag1": "'DISALLOW_TO_FAILOVER'",
        "backend_application_name1": "'bench_replica'",
        "enable_pool_hba": "off",
        "load_balance_mode": "on",
        "sr_check_period": SR_CHECK_PERIOD,
        "sr_check_user": f"'{user}'",
        "sr_check_password": "''",
        "sr_check_database": f"'{database}'",
        "delay_threshold": DELAY_THRESHOLD_BYTES,
        "disable_load_balance_on_write": f"'{DISABLE_LOAD_BALANCE_ON_WRITE}'",
        "log_standby_delay": "'if_over_threshold'",
        "health_check_user": f"'{user}'",
        "failover_on_backend_error": "off",
        "use_watchdog": "off",
        "memory_cache_enabled": "off",
        # A handful of children is enough for the benchmark's few client connections and
        # keeps Pgpool's share of two cores small.
        "num_init_children": 8,
        "max_pool": 1,
        **extra,
    }
    return "".join(f"{key} = {value}\n" for key, value in settings.items())


def describe(process: PgpoolProcess) -> str:
    """The settings that decide Pgpool's lag protection and placement, for the report."""
    extra = "".join(f", {k}={v}" for k, v in process.extra.items())
    cpus = "not pinned" if process.cpus is None else f"CPUs {sorted(process.cpus)}"
    return (f"delay_threshold={DELAY_THRESHOLD_BYTES} B, sr_check_period={SR_CHECK_PERIOD} s, "
            f"disable_load_balance_on_write='{DISABLE_LOAD_BALANCE_ON_WRITE}'{extra}; {cpus}")


class PgpoolProcess:
    """``pgpool -n -f <conf>`` on a free loopback port; stopped by its own pid.

    Args:
        primary, replica: the shard's two servers.
        user, database: the account Pgpool's lag checks log in as (trust auth on loopback).
        extra: more settings (for experiments).
        cpus: CPUs to pin Pgpool and its children to (None: leave them be).
    """

    def __init__(self, primary: Backend, replica: Backend, *, user: str = "postgres",
                 database: str = "propstore", extra: dict[str, str | int] | None = None,
                 cpus: set[int] | None = None) -> None:
        self.primary, self.replica = primary, replica
        self.extra = dict(extra or {})
        self.cpus = cpus
        self.user, self.database = user, database
        self.port: int | None = None
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def log_file(self) -> Path | None:
        """Pgpool's stderr, kept while it runs (for error messages)."""
        return None if self._dir is None else self._dir / "pgpool.log"

    def dsn(self, dbname: str | None = None) -> str:
        """Connection string for a client of this Pgpool."""
        if self.port is None:
            raise PgpoolUnavailable("pgpool is not running")
        return (f"host=127.0.0.1 port={self.port} dbname={dbname or self.database} "
                f"user={self.user}")

    def start(self, timeout: float = 20.0) -> PgpoolProcess:
        """Write the configuration, start Pgpool and wait until it serves a query."""
        from propstore.sandbox._datadir import free_port  # the sandbox's own port picker

        binary = find_pgpool()
        self._dir = Path(tempfile.mkdtemp(prefix="propstore-pgpool-"))
        self.port, pcp_port = free_port(), free_port()
        conf = self._dir / "pgpool.conf"
        conf.write_text(_config_text(self.primary, self.replica, self.port, pcp_port,
                                     self._dir, self.user, self.database, self.extra))
        # An empty pcp.conf: the benchmark never uses PCP, but Pgpool insists on the file.
        (self._dir / "pcp.conf").write_text("")
        assert self.log_file is not None
        with self.log_file.open("wb") as log:
            self._proc = subprocess.Popen(
                [binary, "-n", "-f", str(conf), "-F", str(self._dir / "pcp.conf")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        try:
            self._wait_ready(timeout)
            if self.cpus is not None and self._proc is not None:
                # Once it answers, its children exist: pin the whole tree (later forks
                # inherit from the main process).
                affinity.pin_servers([self._proc.pid], self.cpus)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise PgpoolUnavailable(f"pgpool exited at start-up:\n{self.log_tail()}")
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.Error as exc:
                last = exc
                time.sleep(0.2)
        raise PgpoolUnavailable(f"pgpool did not answer in {timeout:g}s ({last}):\n"
                                f"{self.log_tail()}")

    def log_tail(self, size: int = 2000) -> str:
        """The end of Pgpool's log."""
        if self.log_file is None or not self.log_file.exists():
            return "(no log)"
        return self.log_file.read_bytes()[-size:].decode("utf-8", "replace")

    def stop(self) -> None:
        """SIGTERM (smart shutdown would wait for clients), then SIGKILL, by our child's pid."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            # SIGINT is Pgpool's "fast" shutdown: it ends its children and client sessions.
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> PgpoolProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        with contextlib.suppress(Exception):
            self.stop()
