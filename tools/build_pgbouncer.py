#!/usr/bin/env python3
"""Build a PgBouncer that tracks protocol-level prepared statements (1.21+), for the sandbox.

Debian 12 ships PgBouncer 1.18, which tracks none; Debian 13 (trixie) has 1.24. This fetches
trixie's *source* package through apt (the only network a CI machine may have is the package
archives), builds it and installs it into a cache folder, where the sandbox's
``pgbouncer-prepared`` front finds it (``propstore.sandbox._poolers.pgbouncer_home``:
``$PROPSTORE_PGBOUNCER_HOME``, else ``/var/cache/propstore/pgbouncer`` as root, else
``$XDG_CACHE_HOME/propstore/pgbouncer``)::

    python tools/build_pgbouncer.py          # prints the binary's path (quick when built)
    python tools/build_pgbouncer.py --check  # only says whether one is built (exit 1: no)

Idempotent: a binary already there that reports 1.21 or newer is reused at once. apt runs
with a sources list, package lists and cache of its own under the build folder, so the
system's apt configuration and lists are left alone; only the build dependencies
(``libevent-dev``, ``libssl-dev``, ``pkg-config``) are installed system-wide, as root, when
missing. Built without c-ares and systemd (neither is needed on loopback): ~20 s of CPU.
Everything goes to stderr but the path; on failure the exit status is 1 and the last line
says why (CI prints it and skips the named-statement tests).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from propstore.sandbox._pgbouncer import (
    TRACKING_PGBOUNCER,
    pgbouncer_home,
    pgbouncer_version,
)

SUITE = "trixie"
SOURCES = (
    "Types: deb-src\n"
    "URIs: http://deb.debian.org/debian\n"
    f"Suites: {SUITE}\n"
    "Components: main\n"
    "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
)
BUILD_PACKAGES = ("libevent-dev", "libssl-dev", "pkg-config")


class BuildError(Exception):
    """A step failed; the message says which and why."""


def _run(argv: list[str], cwd: Path, what: str) -> None:
    print(f"build_pgbouncer: {what}: {' '.join(argv)}", file=sys.stderr)
    done = subprocess.run(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join(done.stdout.splitlines()[-15:])
        raise BuildError(f"{what} failed (exit {done.returncode}):\n{tail}")


def _apt_options(work: Path) -> list[str]:
    """apt with a sources list, lists and cache of its own (the system's stay untouched)."""
    lists, cache = work / "apt-lists", work / "apt-cache"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    (cache / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (work / "src.sources").write_text(SOURCES)
    return ["-o", f"Dir::Etc::sourcelist={work / 'src.sources'}",
            "-o", "Dir::Etc::sourceparts=-", "-o", f"Dir::State::Lists={lists}",
            "-o", f"Dir::Cache={cache}"]


def _fetch(work: Path) -> Path:
    """Download trixie's pgbouncer source package; the unpacked upstream folder."""
    options = _apt_options(work)
    _run(["apt-get", *options, "-q", "update"], work, f"apt-get update ({SUITE} sources)")
    download = work / "download"
    shutil.rmtree(download, ignore_errors=True)
    download.mkdir()
    _run(["apt-get", *options, "-q", "source", "--download-only", "pgbouncer"], download,
         "apt-get source pgbouncer")
    (tarball,) = download.glob("pgbouncer_*.orig.tar.gz")
    with tarfile.open(tarball) as archive:
        archive.extractall(download, filter="data")
    (folder,) = (p for p in download.iterdir() if p.is_dir())
    return folder


def _build_dependencies(work: Path) -> None:
    have = shutil.which("pkg-config") and subprocess.run(
        ["pkg-config", "--exists", "libevent", "openssl"], check=False).returncode == 0
    if have and shutil.which("make") and shutil.which("cc"):
        return
    if os.geteuid() != 0:
        raise BuildError("build dependencies missing: as root, apt-get install -y "
                         + " ".join(BUILD_PACKAGES) + " gcc make")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"build_pgbouncer: installing {' '.join(BUILD_PACKAGES)}", file=sys.stderr)
    for argv in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", *BUILD_PACKAGES, "gcc", "make"]):
        if subprocess.run(argv, cwd=work, env=env, stdout=subprocess.DEVNULL,
                          check=False).returncode != 0:
            raise BuildError(f"{' '.join(argv)} failed")


def _usable(binary: Path) -> bool:
    version = pgbouncer_version(str(binary)) if binary.is_file() else None
    return version is not None and version >= TRACKING_PGBOUNCER


def build(home: Path) -> Path:
    """The path of a PgBouncer >= 1.21 under ``home``, built there first if needed."""
    binary = home / "bin" / "pgbouncer"
    if _usable(binary):
        return binary
    work = home / "build"
    work.mkdir(parents=True, exist_ok=True)
    _build_dependencies(work)
    source = _fetch(work)
    _run(["./configure", f"--prefix={home}", "--without-cares", "--with-systemd=no"],
         source, "configure")
    _run(["make", f"-j{os.cpu_count() or 1}"], source, "make")
    _run(["make", "install"], source, "make install")
    pgbouncer_version.cache_clear()
    if not _usable(binary):
        raise BuildError(f"{binary} was built but does not report PgBouncer >= 1.21")
    # Readable and runnable by the sandbox's server account (it runs PgBouncer).
    for folder in (home, home / "bin"):
        folder.chmod(0o755)
    shutil.rmtree(work, ignore_errors=True)
    return binary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only report whether a usable binary is built (exit 1: no)")
    args = parser.parse_args()
    home = pgbouncer_home()
    try:
        if args.check:
            binary = home / "bin" / "pgbouncer"
            if not _usable(binary):
                raise BuildError(f"no PgBouncer >= 1.21 in {home}")
        else:
            binary = build(home)
    except (BuildError, OSError, ValueError) as exc:
        print(f"build_pgbouncer: {exc}", file=sys.stderr)
        return 1
    print(binary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
