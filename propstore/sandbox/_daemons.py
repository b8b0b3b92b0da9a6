"""Long-running helper daemons of the sandbox, run as the server account: etcd, Patroni.

A daemon is spawned in its own session (so a signal to the test's process group never
reaches it), with a minimal environment and its output appended to a log file; it is
stopped by its :class:`subprocess.Popen` handle, never by name.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

from propstore.sandbox._account import ServerAccount
from propstore.sandbox._datadir import free_port
from propstore.sandbox._waiting import wait_for


def spawn(account: ServerAccount, argv: list[str], log_path: Path, cwd: Path
          ) -> subprocess.Popen[bytes]:
    """Start ``argv`` as ``account`` in ``cwd``, its output appended to ``log_path``."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8",
        "LANG": "C.UTF-8", "HOME": str(cwd), "USER": account.name,
    }
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
            stderr=subprocess.STDOUT, start_new_session=True,
            user=account.uid if account.switch else None,
            group=account.gid if account.switch else None,
            extra_groups=[] if account.switch else None,
        )


def terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; returns once it has exited."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


class Etcd:
    """A one-member etcd (the DCS Patroni keeps its leader lock in) on free loopback ports."""

    def __init__(self, account: ServerAccount, base: Path) -> None:
        self._account = account
        self._base = base
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> Etcd:
        """Start etcd and wait until it reports healthy."""
        data = self._account.make_dir(self._base / "etcd", 0o700)
        self.port, peer = free_port(), free_port()
        client_url, peer_url = self.client_url, f"http://127.0.0.1:{peer}"
        self._process = spawn(self._account, [
            "etcd", "--name", "etcd0", "--data-dir", str(data / "data"),
            "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"etcd0={peer_url}", "--initial-cluster-state", "new",
        ], self._base / "etcd.log", data)
        wait_for(self.healthy, timeout=timeout, what="etcd to answer")
        return self

    def healthy(self) -> bool:
        """Whether etcd answers ``/health`` with ``true``."""
        try:
            with urllib.request.urlopen(f"{self.client_url}/health", timeout=1) as response:
                return bool(json.load(response).get("health") == "true")
        except (OSError, ValueError):
            return False

    def stop(self) -> None:
        """Stop etcd (by its process handle)."""
        if self._process is not None:
            terminate(self._process, 10.0)
            self._process = None


__all__ = ["Etcd", "spawn", "terminate"]
