"""Data directories: the server settings, a cached template, and per-node copies.

``initdb`` costs a second or more per server on a small machine, so it runs once per binary
version (and settings revision) into a cache; every primary starts from a copy of that
template, which already contains the ``propstore`` database. Replicas are made from their
primary with ``pg_basebackup``, so they share the primary's settings file; what differs per
node (port, name, socket folder) lives in ``node.conf``, included last and rewritten per node.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import uuid
from pathlib import Path

import psycopg
import structlog
from psycopg import sql

from propstore.sandbox._account import ServerAccount
from propstore.sandbox._binaries import PgInstall

log = structlog.get_logger(__name__)

DATABASE = "propstore"
SUPERUSER = "postgres"
NODE_CONF = "node.conf"

# synchronous_commit stays on: with no synchronous standby it only means the commit waits for
# the local WAL flush, and propstore's read-your-writes proofs assume a commit is durable on the
# primary before its LSN is handed out. fsync/full_page_writes are off because a throwaway
# sandbox never survives an OS crash; a killed server still recovers from the page cache.
SERVER_SETTINGS: dict[str, str] = {
    "listen_addresses": "'127.0.0.1'",
    "wal_level": "replica",
    "hot_standby": "on",
    "hot_standby_feedback": "on",
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "on",
    "wal_receiver_status_interval": "'1s'",
    # A replica whose primary restarted retries after this; the default 5s slows fault tests.
    "wal_retrieve_retry_interval": "'500ms'",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "wal_keep_size": "'256MB'",
    "shared_buffers": "'16MB'",
    "max_connections": "100",
    "huge_pages": "off",
    "logging_collector": "off",
    "log_line_prefix": "'%m [%p] %q%a '",
    "log_checkpoints": "off",
    "timezone": "'UTC'",
}

PG_HBA = """\
# propstore sandbox: trust, loopback and local socket only
local   all          all                 trust
local   replication  all                 trust
host    all          all   127.0.0.1/32  trust
host    replication  all   127.0.0.1/32  trust
"""


def settings_text() -> str:
    """The lines appended to ``postgresql.conf`` (node.conf is included last, so it wins)."""
    lines = [f"{key} = {value}" for key, value in SERVER_SETTINGS.items()]
    return "\n# propstore sandbox\n" + "\n".join(lines) + f"\ninclude_if_exists = '{NODE_CONF}'\n"


def write_node_conf(data_dir: Path, *, name: str, port: int, socket_dir: Path | None) -> None:
    """Per-node settings; ``cluster_name`` also names the WAL receiver on the primary side."""
    sockets = "" if socket_dir is None else str(socket_dir)
    text = f"port = {port}\ncluster_name = '{name}'\nunix_socket_directories = '{sockets}'\n"
    (data_dir / NODE_CONF).write_text(text)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (a race remains; callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# 1 MB WAL segments instead of 16 MB: every primary copy and every pg_basebackup writes whole
# segment files, and on a small VM copying bytes is most of the start-up time.
INITDB_ARGS = ("-U", SUPERUSER, "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync",
               "--wal-segsize=1")


def template_dir(install: PgInstall, account: ServerAccount, cache: Path) -> Path:
    """A cleanly shut down data directory with our settings and the propstore database."""
    recipe = f"{install.fingerprint}|{INITDB_ARGS}|{settings_text()}|{PG_HBA}"
    key = hashlib.sha1(recipe.encode()).hexdigest()
    target = cache / "templates" / f"pg{install.major}-{key[:12]}"
    if target.is_dir():
        return target
    account.make_dir(target.parent, 0o755)
    staging = account.make_dir(target.parent / f".staging-{uuid.uuid4().hex[:8]}", 0o700)
    try:
        _build_template(install, account, staging)
        try:
            (staging / "data").rename(target)
        except OSError:
            log.debug("sandbox.template_race_lost", target=str(target))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("sandbox.template_built", target=str(target), pg_version=install.version)
    return target


def _build_template(install: PgInstall, account: ServerAccount, staging: Path) -> None:
    data = staging / "data"
    account.run(
        [install.tool("initdb"), "-D", data, *INITDB_ARGS],
        cwd=staging,
        timeout=300,
    )
    with (data / "postgresql.conf").open("a") as conf:
        conf.write(settings_text())
    (data / "pg_hba.conf").write_text(PG_HBA)
    port = free_port()
    write_node_conf(data, name="propstore-template", port=port, socket_dir=None)
    pg_ctl = install.tool("pg_ctl")
    account.run([pg_ctl, "-D", data, "-l", staging / "log", "-w", "-t", "120", "start"],
                cwd=staging, timeout=150)
    try:
        dsn = f"host=127.0.0.1 port={port} dbname=postgres user={SUPERUSER} connect_timeout=30"
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
    finally:
        account.run([pg_ctl, "-D", data, "-m", "fast", "-w", "-t", "120", "stop"],
                    cwd=staging, timeout=150)
    for leftover in (NODE_CONF, "postmaster.opts"):
        (data / leftover).unlink(missing_ok=True)


def copy_template(template: Path, data_dir: Path, account: ServerAccount) -> None:
    """Copy the template into a new node's data directory owned by the server account.

    ``cp -a`` run as the server account is several times faster than ``shutil.copytree``
    plus a chown of every file, and threads copying in parallel do not contend for the GIL.
    """
    account.run(["cp", "-a", template, data_dir], cwd=data_dir.parent, timeout=300)
    data_dir.chmod(0o700)
