"""The host's lag agent: one process per host, topology and OS user that polls every node
once and streams its polls to every local store of that topology (``docs/architecture.md``,
"Fleets").

Nobody starts it by hand: the first store that finds none spawns it
(``_shared.SharedMonitor``), with the topology on its stdin; it ends by itself
:data:`IDLE_GRACE` seconds after its last reader left. It holds an exclusive ``flock`` on its
lock file for its whole life, so at most one agent per key runs, and a crashed one (the
kernel drops its lock and its socket's connections) is replaced by the next store that
looks. Readers trust nothing about its liveness: each poll it forwards is a fact with its
own server run and send time, and a reader whose agent goes quiet polls for itself.

    python -m propstore.monitor._agent SOCKET LOCK LOG  < topology.json
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import logging.handlers
import os
import signal
import sys
import time
from collections import deque
from pathlib import Path

import structlog

from propstore.config import Topology
from propstore.monitor._messages import (
    VERSION,
    Beat,
    Failed,
    Hello,
    HistoryRead,
    Message,
    Polled,
    encode,
)
from propstore.monitor._monitor import LagMonitor, MonitorState
from propstore.monitor._state import Observation
from propstore.timeline import TimelineHistory

log = structlog.get_logger("propstore.agent")

#: Seconds the agent keeps polling after its last reader left (a worker that restarts, or a
#: pool of short-lived processes, finds it still there).
IDLE_GRACE = 5.0
#: Polls (and failures) kept per node for a reader that joins: it starts from the same
#: recent facts as one that was there all along (bounded: memory stays flat).
RECENT_PER_NODE = 64
#: A reader whose unsent backlog passes this many bytes is not reading (stopped, or its
#: process is stuck): it is dropped, and polls for itself until it joins again.
MAX_BACKLOG = 1 << 20


class Hub:
    """The readers connected to this agent, and what a new one is told first."""

    def __init__(self, nodes: int) -> None:
        self._recent: deque[bytes] = deque(maxlen=RECENT_PER_NODE * max(1, nodes))
        self._histories: dict[tuple[int, int], bytes] = {}
        self._readers: set[asyncio.StreamWriter] = set()
        self._pending: list[bytes] = []
        self._flush_scheduled = False
        #: When the last reader left (monotonic), None while some reader is connected.
        self.idle_since: float | None = time.monotonic()
        self.readers_total = 0
        self.dropped = 0

    @property
    def readers(self) -> int:
        """Readers connected now."""
        return len(self._readers)

    def publish(self, message: Message) -> None:
        """Send ``message`` to every reader (batched per event-loop turn)."""
        line = encode(message)
        if isinstance(message, Polled | Failed):
            self._recent.append(line)
        elif isinstance(message, HistoryRead):
            key = (message.shard, message.history.timeline)
            self._histories[key] = line
            mine = sorted(k for k in self._histories if k[0] == message.shard)
            for old in mine[:-16]:  # bounded, like MonitorState's: the newest matter
                del self._histories[old]
        if not self._readers:
            return
        self._pending.append(line)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = b"".join(self._pending)
        self._pending.clear()
        for writer in list(self._readers):
            if writer.transport.get_write_buffer_size() > MAX_BACKLOG:
                self.dropped += 1
                log.warning("agent_reader_dropped", backlog=writer.transport
                            .get_write_buffer_size())
                self._leave(writer)
                writer.close()
            else:
                writer.write(data)

    def _leave(self, writer: asyncio.StreamWriter) -> None:
        self._readers.discard(writer)
        if not self._readers:
            self.idle_since = time.monotonic()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One reader's connection: the hello, what it missed, then every new poll."""
        first = [encode(Hello(os.getpid(), time.monotonic(), VERSION)),
                 *self._histories.values(), *self._recent]
        writer.write(b"".join(first))
        self._readers.add(writer)
        self.readers_total += 1
        self.idle_since = None
        try:
            while await reader.read(4096):  # readers send nothing; EOF when they leave
                pass
        except OSError:
            pass
        finally:
            self._leave(writer)
            writer.close()


class PublishingState(MonitorState):
    """The agent's monitor state: every poll it records is also sent to the readers."""

    def __init__(self, topology: Topology, hub: Hub) -> None:
        super().__init__(topology)
        self.hub = hub

    def observe(self, shard_index: int, node_index: int, obs: Observation) -> None:
        """Record a poll and forward it."""
        super().observe(shard_index, node_index, obs)
        self.hub.publish(Polled(shard_index, node_index, obs))

    def fail(self, shard_index: int, node_index: int, error: str, at: float | None = None
             ) -> None:
        """Record a failed poll and forward it with the time it failed."""
        at = self.clock() if at is None else at
        super().fail(shard_index, node_index, error, at)
        self.hub.publish(Failed(shard_index, node_index, at, error))

    def record_history(self, shard_index: int, history: TimelineHistory) -> None:
        """Record a timeline history and forward it (before the poll that needed it)."""
        super().record_history(shard_index, history)
        self.hub.publish(HistoryRead(shard_index, history))


class AgentMonitor(LagMonitor):
    """The agent's poller: connections named ``propstore-agent`` in ``pg_stat_activity``."""

    application_name = "propstore-agent"


async def serve(topology: Topology, socket_path: Path) -> None:
    """Poll, serve readers on ``socket_path``, and return once idle past the grace."""
    nodes = sum(len(s.nodes) for s in topology.shards)
    hub = Hub(nodes)
    monitor = AgentMonitor(topology, PublishingState(topology, hub))
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()  # a dead agent's (we hold the lock: no live one owns it)
    server = await asyncio.start_unix_server(hub.serve, path=str(socket_path))
    os.chmod(socket_path, 0o600)
    polling = asyncio.create_task(monitor.run(), name="propstore-agent-poll")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("agent_started", pid=os.getpid(), nodes=nodes, socket=str(socket_path))
    interval = topology.monitor.interval
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await stop.wait()
            if polling.done():
                polling.result()  # the poller died: exit loudly, readers replace us
            hub.publish(Beat(time.monotonic()))
            idle = hub.idle_since
            if idle is not None and time.monotonic() - idle > IDLE_GRACE:
                log.info("agent_idle_exit", readers_total=hub.readers_total)
                break
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        polling.cancel()
        await asyncio.gather(polling, return_exceptions=True)
        log.info("agent_stopped", readers_total=hub.readers_total, dropped=hub.dropped,
                 polls=monitor.state.polls)


def _configure_logging(path: Path) -> None:
    # Bounded on disk: an agent may run for months.
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=1 << 20, backupCount=1)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    structlog.configure(
        processors=[structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso"),
                    structlog.processors.JSONRenderer()],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    )


def main(argv: list[str]) -> int:
    """Run an agent: ``SOCKET LOCK LOG`` paths, topology document on stdin."""
    socket_path, lock_path, log_path = (Path(a) for a in argv)
    document = json.loads(sys.stdin.buffer.read())
    lock = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another agent of this key runs: it serves the readers
    _configure_logging(log_path)
    topology = Topology.from_dict(document, source="agent", environ={})
    try:
        asyncio.run(serve(topology, socket_path))
    finally:
        os.close(lock)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
