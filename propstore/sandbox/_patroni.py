"""A Patroni-managed cluster on loopback: etcd plus N Patroni members, run as the server account.

What users run in production (Debian ``patroni`` 3.0 and ``etcd-server`` 3.4): Patroni
bootstraps the first member with initdb, clones the others with pg_basebackup, holds the
leader lock in etcd, promotes a replica when the leader's lock expires (``ttl``) and rewinds
a diverged ex-leader with ``pg_rewind``. The topology file it writes names the first leader
as primary, as a new user's would (or, with ``discovery=True``, the members and their
Patroni REST endpoints); propstore then follows every change of leader. Every process is
started and stopped by pid (``_daemons``, ``_patroni_member``); ports are free ones picked
at run time. This module is the cluster and its control through Patroni's REST API.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
import structlog

from propstore.sandbox._account import ServerAccount
from propstore.sandbox._binaries import find_install
from propstore.sandbox._daemons import Etcd
from propstore.sandbox._datadir import SUPERUSER, free_port
from propstore.sandbox._errors import SandboxError
from propstore.sandbox._locations import scratch_root
from propstore.sandbox._patroni_member import DcsSettings, PatroniMember
from propstore.sandbox._topology import render_config
from propstore.sandbox._waiting import wait_for

log = structlog.get_logger(__name__)

#: The one shard the Patroni cluster serves, and its buckets.
SHARD = "shard0"
_BUCKETS = 4096


def patroni_available() -> bool:
    """Whether ``patroni`` and ``etcd`` are installed (``apt-get install patroni etcd-server``)."""
    return shutil.which("patroni") is not None and shutil.which("etcd") is not None


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
        self.dcs = DcsSettings(ttl, loop_wait, retry_timeout, synchronous_mode)
        self._install = find_install(pg_bin)
        self._account = ServerAccount.for_this_process()
        self._count = members
        self.base_dir: Path | None = None
        self.members: list[PatroniMember] = []
        self._etcd: Etcd | None = None
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
            self._etcd = Etcd(self._account, base).start()
            for i in range(self._count):
                member = PatroniMember(f"member{i + 1}", free_port(), free_port(),
                                       base / f"member{i + 1}")
                self._account.make_dir(member.member_dir, 0o700)
                member.write_config(self._account, self._etcd.port, self._install.bindir,
                                    self.dcs)
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
            member.stop()
        if self._etcd is not None:
            self._etcd.stop()
            self._etcd = None
        if self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None

    def start_member(self, member: PatroniMember) -> None:
        """Start (or restart) a member's Patroni, which starts, clones or rewinds its server."""
        member.start(self._account)

    def stop_member(self, member: PatroniMember, timeout: float = 30.0) -> None:
        """Stop a member cleanly (SIGTERM to Patroni: it shuts PostgreSQL down)."""
        member.stop(timeout)

    def crash_member(self, member: PatroniMember) -> None:
        """SIGKILL the member's Patroni and server processes (see :meth:`PatroniMember.crash`)."""
        member.crash()

    def hold_replication(self, member: PatroniMember) -> int:
        """SIGSTOP the member's WAL senders (see :meth:`PatroniMember.hold_replication`)."""
        return member.hold_replication()

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
                return dict(_rest(member, "/cluster", timeout=2))
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
        _rest(self._leader_member("configure"), "/config", settings, method="PATCH",
              timeout=10)

    def history(self) -> list[list[Any]]:
        """Patroni's ``GET /history`` (timeline, switch LSN, reason, time, new leader)."""
        leader = self.leader()
        return [] if leader is None else list(_rest(self.member(leader), "/history", timeout=2))

    def switchover(self, candidate: str | None = None, timeout: float = 60.0) -> str:
        """A planned switchover (``POST /switchover``); returns the new leader's name."""
        old = self._leader_member("switch over from")
        body: dict[str, str] = {"leader": old.name}
        if candidate is not None:
            body["candidate"] = candidate
        try:
            _rest(old, "/switchover", body, method="POST", timeout=timeout)
        except urllib.error.HTTPError as exc:
            raise SandboxError(f"switchover refused: {exc.read().decode()[:300]}") from None

        def new_leader() -> str | None:
            name = self.leader()
            return name if name != old.name else None

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

    def write_config(self, path: Path, *, discovery: bool = False) -> Path:
        """The topology file: one shard, the current leader as primary and the rest
        replicas; with ``discovery``, the members and their Patroni REST endpoints instead
        (no roles: the source and the monitor observe them)."""
        leader = self.member(self.leader() or self.members[0].name)
        others = [m for m in self.members if m is not leader]
        text = render_config([_Shard(SHARD, (0, _BUCKETS - 1), leader, others)], _BUCKETS)
        if discovery:
            head = text[:text.index("primary = ")]
            entries = "".join(
                f"  {{ name = {json.dumps(m.name)}, dsn = {json.dumps(m.dsn)}, "
                f"patroni = {json.dumps(m.rest_url)} }},\n" for m in self.members)
            text = f"{head}members = [\n{entries}]\n"
        path.write_text(text)
        return path

    # ------------------------------------------------------------------ internals

    def _leader_member(self, purpose: str) -> PatroniMember:
        leader = self.leader()
        if leader is None:
            raise SandboxError(f"no leader to {purpose}")
        return self.member(leader)

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


class _Shard:
    """What ``render_config`` needs of the shard (members stand in for nodes: name, dsn)."""

    def __init__(self, name: str, buckets: tuple[int, int], primary: PatroniMember,
                 replicas: list[PatroniMember]) -> None:
        self.name, self.buckets, self.primary, self.replicas = name, buckets, primary, replicas


def _rest(member: PatroniMember, path: str, body: object = None, *, method: str = "GET",
          timeout: float) -> Any:
    """One call to a member's REST API; the decoded JSON answer (None when empty)."""
    request = urllib.request.Request(
        member.rest_url + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        raw = response.read()
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None if method != "GET" else json.loads(raw)


def _value_of(get: Callable[[], str | None], *, timeout: float, what: str) -> str:
    found: list[str] = []

    def ready() -> bool:
        value = get()
        if value:
            found.append(value)
        return bool(value)

    wait_for(ready, timeout=timeout, what=what)
    return found[-1]


__all__ = ["SHARD", "PatroniCluster", "PatroniMember", "patroni_available"]
