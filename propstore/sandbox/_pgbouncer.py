"""Which PgBouncer the sandbox runs: Debian's, or a newer one that tracks prepared statements.

Debian 12's PgBouncer (1.18) tracks no protocol-level prepared statements; 1.21 and later do
(``max_prepared_statements``). ``tools/build_pgbouncer.py`` builds Debian's newer source
package into :func:`pgbouncer_home`; :func:`tracking_pgbouncer` finds that build, or the
binary ``$PROPSTORE_PGBOUNCER`` names, for the ``pgbouncer-prepared`` front.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
from pathlib import Path

#: The first PgBouncer that tracks protocol-level named prepared statements.
TRACKING_PGBOUNCER = (1, 21)
#: Its per-server-connection statement cache in the ``pgbouncer-prepared`` front (1.24's
#: default; propstore prepares about a dozen).
MAX_PREPARED_STATEMENTS = 200


#: Where root builds it (readable by every account, e.g. a CI run's unprivileged user).
SYSTEM_PGBOUNCER_HOME = Path("/var/cache/propstore/pgbouncer")


def pgbouncer_home() -> Path:
    """Where ``tools/build_pgbouncer.py`` builds a newer PgBouncer (``bin/pgbouncer`` in it):
    ``$PROPSTORE_PGBOUNCER_HOME``, else ``/var/cache/propstore/pgbouncer`` for root (a path
    the sandbox's server account can reach), else ``$XDG_CACHE_HOME/propstore/pgbouncer``."""
    given = os.environ.get("PROPSTORE_PGBOUNCER_HOME")
    if given:
        return Path(given)
    if os.geteuid() == 0:
        return SYSTEM_PGBOUNCER_HOME
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "propstore" / "pgbouncer"


@functools.lru_cache(maxsize=8)
def pgbouncer_version(program: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a PgBouncer binary (``--version``), None if it does not run."""
    try:
        out = subprocess.run([program, "--version"], capture_output=True, text=True,
                             timeout=10, check=False).stdout
    except OSError:
        return None
    found = re.search(r"PgBouncer (\d+)\.(\d+)", out)
    return (int(found[1]), int(found[2])) if found else None


def tracking_pgbouncer() -> str | None:
    """A PgBouncer >= 1.21: ``$PROPSTORE_PGBOUNCER``, else the one built in
    :func:`pgbouncer_home` (or root's); None when none is there (or it is older)."""
    for candidate in (os.environ.get("PROPSTORE_PGBOUNCER"),
                      str(pgbouncer_home() / "bin" / "pgbouncer"),
                      str(SYSTEM_PGBOUNCER_HOME / "bin" / "pgbouncer")):
        if candidate and Path(candidate).is_file():
            version = pgbouncer_version(candidate)
            if version is not None and version >= TRACKING_PGBOUNCER:
                return candidate
    return None
