"""A lost terminal or a service manager's stop ends a command like Ctrl-C: the servers a
``propstore demo`` started are stopped and its folder removed. Each test runs the demo in a
real pseudo-terminal (its own session, the pty as controlling terminal), ends it by closing
the terminal (SIGHUP from the kernel) or with SIGTERM, and then looks at the processes and
files themselves. Also: ``sandbox up`` refuses a running sandbox of another shape."""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from propstore.cli import main
from propstore.sandbox import LocalCluster, SandboxError
from propstore.sandbox._locations import scratch_root
from propstore.sandbox._processes import ProcessId, identify, is_alive
from propstore.sandbox._waiting import wait_for

# The child becomes a session leader (start_new_session) and takes the pty as its
# controlling terminal, so closing the pty's master side hangs it up as closing a terminal
# window does; then it becomes the propstore command.
_LAUNCH = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
           "os.execv(sys.executable, [sys.executable, '-m', 'propstore.cli', *sys.argv[1:]])")
STARTUP = 240.0  # seconds for 6 servers on a busy 2-core machine
SHUTDOWN = 120.0


class Terminal:
    """A command running in a pseudo-terminal, its output collected as it comes."""

    def __init__(self, scratch: Path, *args: str) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        env = {k: v for k, v in os.environ.items() if k != "PROPSTORE_CONFIG"}
        # A scratch folder of its own: another process starting a throwaway cluster reaps
        # orphans in the shared one, which would hide a leak from this test.
        env["PROPSTORE_SANDBOX_TMPDIR"] = str(scratch)
        self.process = subprocess.Popen([sys.executable, "-c", _LAUNCH, *args], stdin=slave,
                                        stdout=slave, stderr=slave, start_new_session=True,
                                        env=env)
        os.close(slave)
        self.scratch = scratch
        self.output = bytearray()
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: the other side is gone
                    return
                if not chunk:
                    return
                self.output += chunk

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    def hang_up(self) -> None:
        """Close the terminal: the kernel sends SIGHUP to the command."""
        self._stop.set()
        self._reader.join(timeout=5)
        os.close(self.master)
        self.master = -1

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        if self.master >= 0:
            self.hang_up()


def cluster_of(scratch: Path, pid: int) -> Path | None:
    """The throwaway cluster folder whose state file names ``pid`` as its owner."""
    for folder in scratch.glob("propstore-cluster-*"):
        try:
            owner = json.loads((folder / "sandbox.json").read_text()).get("owner")
        except (OSError, ValueError):
            continue
        if owner and owner[0] == pid:
            return folder
    return None


def postmasters(pids: list[int]) -> list[ProcessId]:
    """The state file's postmaster pids as process identities (when they run)."""
    return [proc for proc in map(identify, pids) if proc is not None]


def servers_of(folder: Path) -> list[int]:
    """Pids of every process whose command line names ``folder`` (a postmaster runs with
    ``-D <folder>/<node>/data``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(folder) in command and "postgres" in command:
            found.append(int(entry.name))
    return found


def node_pids(folder: Path) -> list[int]:
    document = json.loads((folder / "sandbox.json").read_text())
    return [node["pid"] for shard in document["shards"] for node in shard["nodes"]]


@pytest.fixture
def daemon_dir() -> Iterator[Path]:
    """A folder for ``sandbox up`` that the server account can enter."""
    folder = Path(tempfile.mkdtemp(prefix="propstore-test-", dir=scratch_root()))
    folder.chmod(0o755)
    yield folder / "sandbox"
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def terminal(daemon_dir: Path) -> Iterator[list[Terminal]]:
    """Terminals opened by a test; anything left running is killed afterwards."""
    opened: list[Terminal] = []
    yield opened
    for each in opened:
        each.close()


def _demo(opened: list[Terminal], scratch: Path) -> Terminal:
    scratch.mkdir(mode=0o755)
    term = Terminal(scratch, "demo", "--users", "200", "--duration", "600")
    opened.append(term)
    return term


def _await_running(term: Terminal) -> tuple[Path, list[ProcessId]]:
    """Wait until the demo's readers run; its folder and postmasters."""
    folder: list[Path] = []

    def started() -> bool:
        assert term.process.poll() is None, term.text
        found = cluster_of(term.scratch, term.process.pid)
        if found is None or "propstore demo" not in term.text:
            return False
        folder[:] = [found]
        return True

    wait_for(started, timeout=STARTUP, what="the demo's readers to start")
    pids = node_pids(folder[0])
    servers = postmasters(pids)
    assert len(servers) == 6 and all(is_alive(p) for p in servers), pids
    return folder[0], servers


def _assert_nothing_left(term: Terminal, folder: Path, servers: list[ProcessId]) -> None:
    term.process.wait(timeout=SHUTDOWN)
    wait_for(lambda: not any(is_alive(p) for p in servers), timeout=SHUTDOWN,
             what="the demo's postmasters to exit")
    assert servers_of(folder) == []
    assert not folder.exists()


def test_closing_the_terminal_of_a_running_demo_stops_every_server(
    terminal: list[Terminal], daemon_dir: Path
) -> None:
    term = _demo(terminal, daemon_dir)
    folder, servers = _await_running(term)
    term.hang_up()
    _assert_nothing_left(term, folder, servers)
    assert term.process.returncode != 0


def test_sigterm_to_a_running_demo_stops_every_server_and_says_so(
    terminal: list[Terminal], daemon_dir: Path
) -> None:
    term = _demo(terminal, daemon_dir)
    folder, servers = _await_running(term)
    term.process.send_signal(signal.SIGTERM)
    _assert_nothing_left(term, folder, servers)
    assert term.process.returncode == 130
    wait_for(lambda: "interrupted (SIGTERM)" in term.text, timeout=10, what="the message")
    assert "Sandbox stopped." in term.text


def test_closing_the_terminal_while_the_demo_starts_its_servers_leaves_none(
    terminal: list[Terminal], daemon_dir: Path
) -> None:
    term = _demo(terminal, daemon_dir)
    folder: list[Path] = []

    def first_server_up() -> bool:
        assert term.process.poll() is None, term.text
        found = cluster_of(term.scratch, term.process.pid)
        if found is not None and servers_of(found):
            folder[:] = [found]
            return True
        return False

    wait_for(first_server_up, timeout=STARTUP, what="the demo's first server")
    assert "propstore demo" not in term.text  # still starting
    term.hang_up()
    term.process.wait(timeout=SHUTDOWN)
    wait_for(lambda: servers_of(folder[0]) == [], timeout=SHUTDOWN,
             what="every server of the folder to exit")
    assert not folder[0].exists()


def test_sandbox_up_refuses_a_running_sandbox_of_another_shape(daemon_dir: Path) -> None:
    runner = CliRunner()
    try:
        started = runner.invoke(main, ["sandbox", "up", "--shards", "1", "--replicas", "1",
                                       "--dir", str(daemon_dir)])
        assert started.exit_code == 0, started.output
        before = [node.process() for node in LocalCluster.attach(daemon_dir).nodes]

        refused = runner.invoke(main, ["sandbox", "up", "--dir", str(daemon_dir)])
        assert refused.exit_code == 2, refused.output
        assert "1 shard x 1 replica (4096 buckets) is already running" in refused.stderr
        assert f"propstore sandbox down --dir {daemon_dir}" in refused.stderr
        assert "--replace" in refused.stderr
        assert [node.process() for node in LocalCluster.attach(daemon_dir).nodes] == before

        same = runner.invoke(main, ["sandbox", "up", "--shards", "1", "--replicas", "1",
                                    "--dir", str(daemon_dir)])
        assert same.exit_code == 0, same.output  # the same shape is reused as it is

        replaced = runner.invoke(main, ["sandbox", "up", "--shards", "1", "--replicas", "0",
                                        "--no-migrate", "--replace", "--dir", str(daemon_dir)])
        assert replaced.exit_code == 0, replaced.output
        assert not any(proc is not None and is_alive(proc) for proc in before)
        now = LocalCluster.attach(daemon_dir)
        assert [node.name for node in now.nodes] == ["shard0-primary"]
        assert now.nodes[0].is_running()
    finally:
        runner.invoke(main, ["sandbox", "down", "--dir", str(daemon_dir)])
    with pytest.raises(SandboxError):
        LocalCluster.attach(daemon_dir)
