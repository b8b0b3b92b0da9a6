"""One PostgreSQL server in a Docker container, and the faults it can be put through.

Every container uses host networking and runs one server on its own ``127.0.0.1`` port, so
client traffic and replication stay on loopback exactly as in the local cluster (no bridge
network, no published ports). The container runs a script of ours as the image's ``postgres``
user rather than the image's entrypoint, so the official ``postgres`` image and one built from
Debian's packages (``tools/docker_env.sh``) behave alike. The data directory lives in the
container's writable layer: it survives ``docker stop``/``start`` (kill and restart) and goes
with the container.
"""

from __future__ import annotations

import shlex
import socket
from typing import Any, NoReturn

import psycopg
import structlog

from propstore.sandbox._datadir import DATABASE, NODE_CONF, SUPERUSER, settings_text
from propstore.sandbox._errors import SandboxError
from propstore.sandbox._node import LocalNode
from propstore.sandbox._replication import Role, StreamingNode
from propstore.sandbox._waiting import wait_for

log = structlog.get_logger(__name__)

#: Label on every container the sandbox creates; ``tools/docker_env.sh stop`` removes them.
LABEL = "propstore.sandbox"
_DATA = "/var/lib/postgresql/propstore"
_HBA = ("local all all trust", "local replication all trust",
        "host all all 127.0.0.1/32 trust", "host replication all 127.0.0.1/32 trust")
# Debian's layout (official image and Debian packages alike), then a /usr/local build.
_FIND_BIN = ("bin=; for d in /usr/lib/postgresql/*/bin /usr/local/bin; do "
             "[ -x \"$d/initdb\" ] && bin=$d; done; "
             "[ -n \"$bin\" ] || { echo 'no PostgreSQL binaries in this image' >&2; exit 1; }")
_INITDB = "-U postgres --auth=trust -E UTF8 --locale=C --no-sync --wal-segsize=1"
_LOG_TAIL_LINES = 40


class CapabilityMissing(SandboxError, AttributeError):
    """A :class:`~propstore.sandbox.LocalCluster` feature the container cluster cannot offer.

    The pytest plugin reports a test that hits one as skipped, with this message as reason.
    """


def missing(owner: str, name: str, why: str) -> NoReturn:
    """Raise :class:`CapabilityMissing` for ``owner.name``."""
    raise CapabilityMissing(f"the container cluster lacks {owner}.{name}: {why}")


def _node_conf(name: str, port: int) -> str:
    # As in the local cluster: shared settings in postgresql.conf (so ALTER SYSTEM, which the
    # config rollout uses, still wins over them), per-node ones in node.conf, included last
    # and rewritten at every start (a clone copies its primary's).
    text = f"port = {port}\ncluster_name = '{name}'\nunix_socket_directories = '/tmp'\n"
    return f"printf '%s' {shlex.quote(text)} > {_DATA}/{NODE_CONF}"


def primary_script(name: str, port: int) -> str:
    """Shell program of a primary: initdb on the first start, then the server."""
    hba = " ".join(shlex.quote(line) for line in _HBA)
    return (
        f"set -e; {_FIND_BIN}; "
        f"if [ ! -s {_DATA}/PG_VERSION ]; then \"$bin/initdb\" -D {_DATA} {_INITDB} >/dev/null; "
        f"printf '%s' {shlex.quote(settings_text())} >> {_DATA}/postgresql.conf; "
        f"printf '%s\\n' {hba} > {_DATA}/pg_hba.conf; fi; "
        f"{_node_conf(name, port)}; exec \"$bin/postgres\" -D {_DATA}"
    )


def replica_script(name: str, port: int, upstream_port: int) -> str:
    """Shell program of a replica: clone the upstream on the first start, then the server.

    ``-C -S`` creates the replica's physical slot on the upstream in the same step.
    """
    source = f"host=127.0.0.1 port={upstream_port} user={SUPERUSER}"
    return (
        f"set -e; {_FIND_BIN}; "
        f"if [ ! -s {_DATA}/PG_VERSION ]; then rm -rf {_DATA}; "
        f"\"$bin/pg_basebackup\" -D {_DATA} -d {shlex.quote(source)} -R -X stream -C "
        f"-S {name.replace('-', '_')} --checkpoint=fast --no-sync --no-manifest; fi; "
        f"{_node_conf(name, port)}; exec \"$bin/postgres\" -D {_DATA}"
    )


class ContainerNode(StreamingNode):
    """A server of a :class:`~propstore.sandbox.ContainerCluster`, one container each.

    Freeze and thaw are ``docker pause`` / ``unpause`` (the cgroup freezer: every process of
    the server stops at once); kill is an immediate shutdown (SIGQUIT to the postmaster, the
    container's first process), start is ``docker start``, which replays the WAL as after a
    crash. Attributes as on :class:`~propstore.sandbox.LocalNode`: ``name``, ``role``,
    ``port`` (on 127.0.0.1) and ``upstream``.
    """

    def __init__(self, name: str, role: Role, port: int, *, image: str,
                 labels: dict[str, str], upstream: ContainerNode | None = None) -> None:
        self.name = name
        self.role = role
        self.port = port
        self.image = image
        self.upstream = upstream
        self._original_upstream = upstream
        self._labels = labels
        self._container: Any = None  # testcontainers' DockerContainer once created

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes this class lacks: a LocalNode feature is reported as a
        # missing capability (the plugin skips the test), anything else as usual.
        if not name.startswith("__") and hasattr(LocalNode, name) and not hasattr(
                type(self), name):
            missing("node", name, "its servers are not processes of this machine "
                    "(no pid, data folder or log file on the host)")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def dsn(self) -> str:
        """``host=127.0.0.1 port=N dbname=propstore user=postgres``."""
        return f"host=127.0.0.1 port={self.port} dbname={DATABASE} user={SUPERUSER}"

    @property
    def container_id(self) -> str | None:
        """The Docker container's id once created."""
        return None if self._container is None else str(self._wrapped().id)

    # -- lifecycle ------------------------------------------------------------------------

    def create(self, timeout: float = 120.0) -> None:
        """Create and start the container, then wait until the server accepts connections."""
        from testcontainers.core.container import DockerContainer

        if self.role == "primary" or self.upstream is None:
            script = primary_script(self.name, self.port)
        else:
            script = replica_script(self.name, self.port, self.upstream.port)
        self._container = DockerContainer(
            self.image, entrypoint=["bash", "-c", script], user=SUPERUSER, network_mode="host",
            labels={**self._labels, f"{LABEL}.node": self.name},
            # SIGINT is PostgreSQL's fast shutdown; docker's SIGTERM would wait for clients.
            stop_signal="SIGINT", name=None,
        )
        self._container.start()
        self._await_connectable(timeout)
        log.info("sandbox.node_started", node=self.name, port=self.port,
                 container=self.container_id)

    def remove(self) -> None:
        """Remove the container and its volumes, whatever its state."""
        if self._container is None:
            return
        try:
            self._wrapped().remove(force=True, v=True)
        except Exception as exc:  # docker.errors.NotFound when already gone, API errors
            if "404" not in str(exc) and "No such container" not in str(exc):
                raise
        finally:
            self._container.get_docker_client().client.close()
        self._container = None

    def status(self) -> str:
        """Docker's state of the container: ``running``, ``paused``, ``exited`` ..."""
        if self._container is None:
            return "absent"
        wrapped = self._wrapped()
        wrapped.reload()
        return str(wrapped.status)

    def is_running(self) -> bool:
        """Whether the server's container runs (it may be paused)."""
        return self.status() in ("running", "paused")

    @property
    def frozen(self) -> bool:
        """Whether :meth:`freeze` is in effect."""
        return self.status() == "paused"

    def start(self, timeout: float = 120.0) -> None:
        """Start a stopped or killed server again and wait until it accepts connections."""
        if self._container is None:
            self.create(timeout)
            return
        if self.is_running():
            return
        self._wrapped().start()
        self._await_connectable(timeout)
        log.info("sandbox.node_started", node=self.name, port=self.port)

    def stop(self, timeout: float = 30.0) -> None:
        """Shut down cleanly (fast mode); docker escalates to SIGKILL after ``timeout``."""
        if not self.is_running():
            return
        self.thaw()
        self._wrapped().stop(timeout=round(timeout))
        log.info("sandbox.node_stopped", node=self.name)

    def kill(self, timeout: float = 30.0) -> None:
        """Crash the server: immediate shutdown, no shutdown checkpoint."""
        if not self.is_running():
            return
        self.thaw()
        self._wrapped().kill(signal="SIGQUIT")
        try:
            wait_for(lambda: not self.is_running(), timeout=timeout,
                     what=f"{self.name} to exit")
        except SandboxError:
            self._wrapped().kill(signal="SIGKILL")
            wait_for(lambda: not self.is_running(), timeout=timeout,
                     what=f"{self.name} to exit after SIGKILL")
        log.info("sandbox.node_killed", node=self.name)

    def restart(self, timeout: float = 120.0) -> None:
        """Stop cleanly, then start again."""
        self.stop()
        self.start(timeout)

    def log_tail(self) -> str:
        """The end of the server's log (the container's output), for error messages."""
        if self._container is None:
            return "(no container)"
        raw: bytes = self._wrapped().logs(tail=_LOG_TAIL_LINES)
        return raw.decode("utf-8", "replace")

    def _wrapped(self) -> Any:
        if self._container is None:
            raise SandboxError(f"{self.name} has no container; start the cluster first")
        return self._container.get_wrapped_container()

    def _await_connectable(self, timeout: float) -> None:
        def answers() -> bool:
            if self.status() not in ("running", "created"):
                raise SandboxError(f"{self.name}'s container exited; its log:\n"
                                   f"{self.log_tail()}")
            try:
                self.execute("SELECT 1", dbname="postgres")
            except psycopg.Error:
                return False
            return True

        try:
            wait_for(answers, timeout=timeout, what=f"{self.name} to accept connections")
        except SandboxError as exc:
            if "log:" in str(exc):
                raise
            raise SandboxError(f"{exc}; its log:\n{self.log_tail()}") from exc

    # -- faults ---------------------------------------------------------------------------

    def freeze(self) -> None:
        """``docker pause``: every process of the server stops; connections stall."""
        if self.status() == "running":
            self._wrapped().pause()
            log.info("sandbox.node_frozen", node=self.name)

    def thaw(self) -> None:
        """``docker unpause`` (no-op when not frozen)."""
        if self.status() == "paused":
            self._wrapped().unpause()
            log.info("sandbox.node_thawed", node=self.name)

    def promote(self, timeout: float = 60.0) -> None:
        """Turn this replica into a primary and wait until it leaves recovery."""
        self.execute("SELECT pg_promote(true, %s)", (max(1, round(timeout)),))
        wait_for(lambda: not self.is_in_recovery(), timeout=timeout,
                 what=f"{self.name} to leave recovery")
        self.role = "primary"
        log.info("sandbox.node_promoted", node=self.name)


def owner_labels(pid: int, start_time: int) -> dict[str, str]:
    """Labels naming the process whose exit must remove the container (for the reaper)."""
    return {LABEL: "1", f"{LABEL}.host": socket.gethostname(),
            f"{LABEL}.owner_pid": str(pid), f"{LABEL}.owner_start": str(start_time)}
