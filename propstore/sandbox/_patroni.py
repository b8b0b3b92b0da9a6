"""A Patroni-managed cluster on loopback: etcd plus N Patroni members, run as the server account.

What users run in production (Debian ``patroni`` 3.0 and ``etcd-server`` 3.4): Patroni
bootstraps the first member with initdb, clones the others with pg_basebackup, holds the
leader lock in etcd, promotes a replica when the leader's lock expires (``ttl``) and rewinds
a diverged ex-leader with ``pg_rewind``. The topology file it writes names the first leader
as primary, as a new user's would; propstore then follows every change of leader by
observation. Every process is started and stopped by pid; ports are free ones picked at
run time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
import structlog

from propstore.sandbox._account import ServerAccount
from propstore.sandbox._binaries import find_install
from propstore.sandbox._datadir import DATABASE, SUPERUSER, free_port
from propstore.sandbox._errors import SandboxError
from propstore.sandbox._locations import scratch_root
from propstore.sandbox._processes import (
    ProcessId,
    descendants,
    identify,
    signal_process,
    wait_gone,
)
from propstore.sandbox._topology import render_config
from propstore.sandbox._waiting import wait_for

log = structlog.get_logger(__name__)

#: The one shard the Patroni cluster serves, and its buckets.
SHARD = "shard0"


def patroni_available() -> bool:
    """Whether ``patroni`` and ``etcd`` are installed (``apt-get install patroni etcd-server``)."""
    return shutil.which("patroni") is not None and shutil.which("etcd") is not None


@dataclass
class PatroniMember:
    """One Patroni member: its PostgreSQL server and REST API ports and its process."""

    name: str
    port: int
    rest_port: int
    member_dir: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def dsn(self) -> str:
        """libpq connection string to the ``propstore`` database as ``postgres``."""
        return f"host=127.0.0.1 port={self.port} dbname={DATABASE} user={SUPERUSER}"

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


class PatroniCluster:
    """etcd and ``members`` Patroni members on loopback, one shard (``shard0``).

    ``ttl``, ``loop_wait`` and ``retry_timeout`` (seconds) are Patroni's DCS settings (its
    defaults are 30, 10 and 10; smaller ones keep tests short). ``synchronous_mode`` makes
    Patroni keep one synchronous standby. Use as a context manager or call :meth:`stop`.
    """

    def __init__(self, members: int = 3, *, ttl: int = 10, loop_wait: int = 1,
                 retry_timeout: int = 4, synchronous_mode: bool = False,
                 pg_bin: str | Path | None = None) -> None:
        if not patroni_available():
            raise SandboxError("patroni and etcd are not installed "
                               "(apt-get install patroni etcd-server)")
        self.ttl, self.loop_wait, self.retry_timeout = ttl, loop_wait, retry_timeout
        self.synchronous_mode = synchronous_mode
        self._install = find_install(pg_bin)
        self._account = ServerAccount.for_this_process()
        self._count = members
        self.base_dir: Path | None = None
        self.members: list[PatroniMember] = []
        self._etcd: subprocess.Popen[bytes] | None = None
        self._etcd_port = 0
        self.config_path: Path | None = None

    def __enter__(self) -> PatroniCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------------ start and stop

    def start(self, timeout: float = 180.0) -> PatroniCluster:
        """Start etcd and every member; return once a leader and all replicas stream."""
        base = Path(tempfile.mkdtemp(prefix="propstore-patroni-", dir=scratch_root()))
        self.base_dir = base
        base.chmod(0o755)
        self._account.own(base)
        try:
            self._start_etcd(base)
            for i in range(self._count):
                member = PatroniMember(f"member{i + 1}", free_port(), free_port(),
                                       base / f"member{i + 1}")
                self._account.make_dir(member.member_dir, 0o700)
                self._write_config(member, base)
                self.members.append(member)
            self.start_member(self.members[0])
            leader = _value_of(self.leader, timeout=timeout, what="a Patroni leader")
            self._create_database(self.member(leader))
            for member in self.members[1:]:
                self.start_member(member)
            self.wait_streaming(timeout)
            self.config_path = self.write_config(base / "propstore.toml")
        except BaseException:
            self.stop()
            raise
        log.info("sandbox.patroni_started", base_dir=str(base), members=self._count,
                 leader=self.leader())
        return self

    def stop(self) -> None:
        """Stop every member (Patroni stops its PostgreSQL), then etcd; remove the files."""
        for member in self.members:
            self.stop_member(member)
        if self._etcd is not None:
            _terminate(self._etcd, 10.0)
            self._etcd = None
        if self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None

    def start_member(self, member: PatroniMember) -> None:
        """Start (or restart) a member's Patroni, which starts, clones or rewinds its server."""
        if member.process is not None and member.process.poll() is None:
            return
        log_file = (member.member_dir / "patroni.log").open("ab")
        try:
            member.process = self._spawn(["patroni", str(member.config_file)], log_file,
                                         member.member_dir)
        finally:
            log_file.close()

    def stop_member(self, member: PatroniMember, timeout: float = 30.0) -> None:
        """Stop a member cleanly (SIGTERM to Patroni: it shuts PostgreSQL down)."""
        if member.process is not None:
            _terminate(member.process, timeout)
            member.process = None
        self._kill_postmaster(member)  # left behind only if Patroni itself was killed

    def crash_member(self, member: PatroniMember) -> None:
        """SIGKILL the member's Patroni, its postmaster and every server process (a machine
        dying): the leader lock is not released, so the others wait for ``ttl``."""
        if member.process is not None:
            member.process.kill()
            member.process.wait(10)
            member.process = None
        proc = member.postmaster()
        if proc is not None:
            children = [p for p in map(identify, descendants(proc.pid)) if p is not None]
            for victim in (proc, *children):
                signal_process(victim, signal.SIGKILL)
            for victim in (proc, *children):
                wait_gone(victim, 10.0)
        log.info("sandbox.patroni_member_crashed", member=member.name)

    def hold_replication(self, member: PatroniMember) -> int:
        """SIGSTOP the member's WAL senders: it keeps acknowledging (asynchronous) commits
        that no standby receives, as when the network to the standbys stalls. Returns how
        many were stopped; :meth:`crash_member` ends them."""
        proc = member.postmaster()
        if proc is None:
            raise SandboxError(f"{member.name} is not running")
        stopped = 0
        for pid in descendants(proc.pid):
            if "walsender" in _cmdline(pid):
                child = identify(pid)
                if child is not None and signal_process(child, signal.SIGSTOP):
                    stopped += 1
        return stopped

    def _kill_postmaster(self, member: PatroniMember, signum: int = signal.SIGINT) -> None:
        proc = member.postmaster()
        if proc is not None and signal_process(proc, signum) and not wait_gone(proc, 30.0):
            signal_process(proc, signal.SIGKILL)
            wait_gone(proc, 10.0)

    # ------------------------------------------------------------------ state and control

    def member(self, name: str) -> PatroniMember:
        """The member called ``name``."""
        for member in self.members:
            if member.name == name:
                return member
        raise KeyError(name)

    def cluster_state(self) -> dict[str, Any]:
        """Patroni's ``GET /cluster`` from the first member that answers ({} if none)."""
        for member in self.members:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{member.rest_port}/cluster", timeout=2
                ) as response:
                    return dict(json.load(response))
            except (OSError, ValueError):
                continue
        return {}

    def leader(self) -> str | None:
        """The member holding the leader lock and running, or None."""
        for entry in self.cluster_state().get("members", []):
            if entry.get("role") == "leader" and entry.get("state") == "running":
                return str(entry["name"])
        return None

    def set_dynamic(self, **settings: Any) -> None:
        """Change Patroni's dynamic configuration (``PATCH /config``), e.g.
        ``synchronous_mode=True``."""
        leader = self.leader()
        if leader is None:
            raise SandboxError("no leader to configure")
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.member(leader).rest_port}/config",
            data=json.dumps(settings).encode(), method="PATCH",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10):
            pass

    def history(self) -> list[list[Any]]:
        """Patroni's ``GET /history`` (timeline, switch LSN, reason, time, new leader)."""
        leader = self.leader()
        if leader is None:
            return []
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.member(leader).rest_port}/history", timeout=2
        ) as response:
            return list(json.load(response))

    def switchover(self, candidate: str | None = None, timeout: float = 60.0) -> str:
        """A planned switchover (``POST /switchover``); returns the new leader's name."""
        old = self.leader()
        if old is None:
            raise SandboxError("no leader to switch over from")
        body: dict[str, str] = {"leader": old}
        if candidate is not None:
            body["candidate"] = candidate
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.member(old).rest_port}/switchover",
            data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                pass
        except urllib.error.HTTPError as exc:
            raise SandboxError(f"switchover refused: {exc.read().decode()[:300]}") from None
        def new_leader() -> str | None:
            name = self.leader()
            return name if name != old else None

        return _value_of(new_leader, timeout=timeout, what="the switchover's new leader")

    def wait_streaming(self, timeout: float = 120.0, members: int | None = None) -> None:
        """Wait until the leader streams to ``members - 1`` replicas (default: all)."""
        expected = (members or len(self.members)) - 1

        def streaming() -> bool:
            leader = self.leader()
            if leader is None:
                return False
            try:
                count = self.member(leader).scalar(
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
                )
            except psycopg.Error:
                return False
            return int(count) >= expected

        wait_for(streaming, timeout=timeout, what=f"{expected} replicas streaming")

    def write_config(self, path: Path) -> Path:
        """The topology file: one shard, the current leader as primary, the rest replicas."""
        leader = self.leader() or self.members[0].name
        primary = self.member(leader)
        replicas = [m for m in self.members if m is not primary]
        path.write_text(render_config(
            [_Shard(SHARD, (0, 4095), _Node(primary), [_Node(m) for m in replicas])], 4096
        ))
        return path

    # ------------------------------------------------------------------ internals

    def _spawn(self, argv: list[str], log_file: Any, cwd: Path) -> subprocess.Popen[bytes]:
        account = self._account
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8",
            "LANG": "C.UTF-8", "HOME": str(cwd), "USER": account.name,
        }
        return subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=subprocess.STDOUT, start_new_session=True,
            user=account.uid if account.switch else None,
            group=account.gid if account.switch else None,
            extra_groups=[] if account.switch else None,
        )

    def _start_etcd(self, base: Path) -> None:
        data = self._account.make_dir(base / "etcd", 0o700)
        self._etcd_port, peer = free_port(), free_port()
        client_url, peer_url = f"http://127.0.0.1:{self._etcd_port}", f"http://127.0.0.1:{peer}"
        with (base / "etcd.log").open("ab") as log_file:
            self._etcd = self._spawn([
                "etcd", "--name", "etcd0", "--data-dir", str(data / "data"),
                "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
                "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                "--initial-cluster", f"etcd0={peer_url}", "--initial-cluster-state", "new",
            ], log_file, data)

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"{client_url}/health", timeout=1) as response:
                    return bool(json.load(response).get("health") == "true")
            except (OSError, ValueError):
                return False

        wait_for(healthy, timeout=30, what="etcd to answer")

    def _write_config(self, member: PatroniMember, base: Path) -> None:
        sockets = self._account.make_dir(member.member_dir / "sockets", 0o700)
        config = {
            "scope": "propstore", "name": member.name,
            "log": {"level": "INFO"},
            "restapi": {"listen": f"127.0.0.1:{member.rest_port}",
                        "connect_address": f"127.0.0.1:{member.rest_port}"},
            "etcd3": {"host": f"127.0.0.1:{self._etcd_port}"},
            "bootstrap": {
                "dcs": {
                    "ttl": self.ttl, "loop_wait": self.loop_wait,
                    "retry_timeout": self.retry_timeout,
                    "maximum_lag_on_failover": 1 << 30,
                    "synchronous_mode": self.synchronous_mode,
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
                "listen": f"127.0.0.1:{member.port}",
                "connect_address": f"127.0.0.1:{member.port}",
                "data_dir": str(member.data_dir),
                "bin_dir": str(self._install.bindir),
                "pgpass": str(member.member_dir / "pgpass"),
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
        member.config_file.write_text(json.dumps(config, indent=2))
        self._account.own(member.config_file, 0o600)

    def _create_database(self, leader: PatroniMember) -> None:
        dsn = f"host=127.0.0.1 port={leader.port} dbname=postgres user={SUPERUSER}"

        def created() -> bool:
            try:
                with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
                    if not conn.execute(b"SELECT 1 FROM pg_database WHERE datname = 'propstore'"
                                        ).fetchone():
                        conn.execute(b"CREATE DATABASE propstore")
                return True
            except psycopg.Error:
                return False

        wait_for(created, timeout=60, what="the propstore database on the leader")


@dataclass(frozen=True)
class _Node:
    member: PatroniMember

    @property
    def name(self) -> str:
        return self.member.name

    @property
    def dsn(self) -> str:
        return self.member.dsn


@dataclass(frozen=True)
class _Shard:
    name: str
    buckets: tuple[int, int]
    primary: _Node
    replicas: list[_Node]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            "utf-8", "replace")
    except OSError:
        return ""


def _value_of(get: Any, *, timeout: float, what: str) -> str:
    found: list[str] = []

    def ready() -> bool:
        value = get()
        if value:
            found.append(value)
        return bool(value)

    wait_for(ready, timeout=timeout, what=what)
    return found[-1]


def _terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


__all__ = ["SHARD", "PatroniCluster", "PatroniMember", "patroni_available"]
