"""The operating-system account that runs the sandbox's PostgreSQL servers.

PostgreSQL refuses to run as root. When this process is root, every server command runs as
the unprivileged ``postgres`` account (created as ``propstore-pg`` if the system has no
``postgres``), and every folder a server touches is owned by that account and reachable by it.
Otherwise servers run as the current user and nothing is switched.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from propstore.sandbox._errors import SandboxError

log = structlog.get_logger(__name__)

_PREFERRED_ACCOUNT = "postgres"
_FALLBACK_ACCOUNT = "propstore-pg"


@dataclass(frozen=True)
class ServerAccount:
    """Who runs the servers; ``switch`` is true when commands must drop root privileges."""

    name: str
    uid: int
    gid: int
    home: Path
    switch: bool

    @classmethod
    def for_this_process(cls) -> ServerAccount:
        """The current user, or (as root) an unprivileged account, created if missing."""
        if os.geteuid() != 0:
            entry = pwd.getpwuid(os.geteuid())
            return cls(entry.pw_name, entry.pw_uid, os.getegid(), Path(entry.pw_dir), False)
        entry = _lookup(_PREFERRED_ACCOUNT) or _lookup(_FALLBACK_ACCOUNT) or _create_fallback()
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir), True)

    def run(
        self,
        argv: Sequence[str | Path],
        *,
        cwd: Path,
        timeout: float,
        env: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command as this account and return its captured output.

        ``cwd`` must be a folder the account can enter: a process that drops root privileges
        while sitting in ``/root`` would fail in surprising ways later.
        """
        command = [str(part) for part in argv]
        try:
            result = subprocess.run(
                command,
                cwd=cwd,
                env=self._environment(env),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                user=self.uid if self.switch else None,
                group=self.gid if self.switch else None,
                # Without this the child would keep root's supplementary groups.
                extra_groups=[] if self.switch else None,
            )
        except subprocess.TimeoutExpired as exc:
            raise SandboxError(f"{command[0]} did not finish within {timeout:g}s") from exc
        if check and result.returncode != 0:
            raise SandboxError(
                f"{' '.join(command)} failed (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )
        return result

    def _environment(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        # A clean environment: root's PG* variables or a PGDATA must not leak into the servers.
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LC_ALL": "C",
            "LANG": "C",
            "HOME": str(self.home) if self.can_reach(self.home) else "/",
            "USER": self.name,
        }
        if extra:
            env.update(extra)
        return env

    def own(self, path: Path, mode: int | None = None) -> None:
        """Give ``path`` (one entry, not its contents) to this account, optionally chmod it."""
        if self.switch:
            os.chown(path, self.uid, self.gid, follow_symlinks=False)
        if mode is not None:
            path.chmod(mode)

    def own_tree(self, root: Path) -> None:
        """Give a whole tree to this account (after root copied it)."""
        if not self.switch:
            return
        os.chown(root, self.uid, self.gid)
        for folder, dirs, files in os.walk(root):
            for name in (*dirs, *files):
                os.chown(os.path.join(folder, name), self.uid, self.gid, follow_symlinks=False)

    def make_dir(self, path: Path, mode: int = 0o700) -> Path:
        """Create (if needed) a folder owned by this account with ``mode``."""
        path.mkdir(parents=True, exist_ok=True)
        self.own(path, mode)
        return path

    def can_reach(self, path: Path) -> bool:
        """Whether this account can traverse every existing folder on the way to ``path``."""
        if not self.switch:
            return True
        current = Path(path).absolute()
        while not current.exists() and current != current.parent:
            current = current.parent
        for folder in (current, *current.parents):
            try:
                info = folder.stat()
            except OSError:
                return False
            if not self._may_search(info):
                return False
        return True

    def _may_search(self, info: os.stat_result) -> bool:
        if info.st_uid == self.uid:
            return bool(info.st_mode & stat.S_IXUSR)
        if info.st_gid == self.gid:
            return bool(info.st_mode & stat.S_IXGRP)
        return bool(info.st_mode & stat.S_IXOTH)

    def require_reachable(self, path: Path) -> None:
        """Raise a clear error when the account cannot get to ``path``."""
        if not self.can_reach(path):
            raise SandboxError(
                f"{path} is not reachable by the server account {self.name!r}: every parent "
                "folder must be searchable (o+x) by it; choose a base_dir under /tmp or /srv"
            )


def _lookup(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _create_fallback() -> pwd.struct_passwd:
    useradd = shutil.which("useradd")
    if useradd is None:
        raise SandboxError(
            "running as root, there is no 'postgres' account, and useradd is missing: "
            f"create an unprivileged account named {_FALLBACK_ACCOUNT!r} or run as a normal user"
        )
    subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
         _FALLBACK_ACCOUNT],
        check=True,
        capture_output=True,
    )
    log.info("sandbox.account_created", account=_FALLBACK_ACCOUNT)
    entry = _lookup(_FALLBACK_ACCOUNT)
    if entry is None:
        raise SandboxError(f"useradd did not create {_FALLBACK_ACCOUNT!r}")
    return entry

