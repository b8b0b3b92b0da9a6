"""Where the sandbox keeps things: a cache (templates, copied binaries) and the daemon folder.

Both must be reachable by the server account. As root, the per-user locations live under
``/root``, which the unprivileged account cannot enter, so they fall back to folders in the
system temporary directory that carry the uid in their name.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from propstore.sandbox._account import ServerAccount
from propstore.sandbox._errors import SandboxError


def cache_dir(account: ServerAccount) -> Path:
    """The cache folder (``$PROPSTORE_CACHE_DIR``, else ``$XDG_CACHE_HOME/propstore``)."""
    explicit = os.environ.get("PROPSTORE_CACHE_DIR")
    if explicit:
        path = Path(explicit)
        path.mkdir(parents=True, exist_ok=True)
        account.require_reachable(path)
        return path
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return _reachable_or_tmp(Path(xdg) / "propstore", account, "propstore-cache")


def default_base_dir() -> Path:
    """Where ``sandbox up`` keeps its cluster when no folder is given.

    ``$XDG_STATE_HOME/propstore/sandbox`` (default ``~/.local/state/propstore/sandbox``); as
    root, ``/tmp/propstore-sandbox-0`` when the home folder is closed to the server account.
    """
    account = ServerAccount.for_this_process()
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return _reachable_or_tmp(Path(xdg) / "propstore" / "sandbox", account, "propstore-sandbox")


_RAM_DIR = Path("/dev/shm")
_RAM_MIN_FREE = 1 << 30


def scratch_root() -> Path:
    """Parent folder for throwaway clusters: ``$PROPSTORE_SANDBOX_TMPDIR``, else RAM.

    Creating files is the slow part of starting servers on small VMs (about 0.6 ms per file
    on ext4, and a data directory has ~1300 files), so a throwaway cluster goes to
    ``/dev/shm`` when it is a writable folder with at least 1 GiB free; otherwise to the
    system temporary folder.
    """
    explicit = os.environ.get("PROPSTORE_SANDBOX_TMPDIR")
    if explicit:
        return Path(explicit)
    try:
        usage = os.statvfs(_RAM_DIR)
    except OSError:
        return Path(tempfile.gettempdir())
    if os.access(_RAM_DIR, os.W_OK | os.X_OK) and usage.f_bavail * usage.f_frsize >= _RAM_MIN_FREE:
        return _RAM_DIR
    return Path(tempfile.gettempdir())


def _reachable_or_tmp(preferred: Path, account: ServerAccount, prefix: str) -> Path:
    if account.can_reach(preferred):
        preferred.mkdir(parents=True, exist_ok=True)
        return preferred
    fallback = Path(tempfile.gettempdir()) / f"{prefix}-{os.geteuid()}"
    fallback.mkdir(mode=0o755, exist_ok=True)
    _require_private(fallback)
    fallback.chmod(0o755)
    return fallback


def _require_private(path: Path) -> None:
    # A predictable name in a world-writable folder could have been planted by someone else.
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.geteuid():
        raise SandboxError(f"{path} exists but is not a folder owned by uid {os.geteuid()}")
