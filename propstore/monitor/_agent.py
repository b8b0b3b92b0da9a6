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
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from datetime import UTC, datetime
from pathlib import Path

import structlog

from propstore.config import Topology
from propstore.discovery import Leadership
from propstore.monitor._health import (
    TRACE_MEMORY_ENV,
    AgentStatus,
    LeaderHealth,
    NodeCounter,
    NodeHealth,
    RefusalTally,
    late_after,
    nested,
    rss_bytes,
    traced_bytes,
)
from propstore.monitor._hub import READ_LIMIT, Hub, refresh_after
from propstore.monitor._messages import (
    VERSION,
    Beat,
    Failed,
    HistoryRead,
    Led,
    Polled,
    topology_document,
)
from propstore.monitor._monitor import LagMonitor, MonitorState
from propstore.monitor._place import answer_limit, stale_after
from propstore.monitor._state import Observation, ShardView
from propstore.timeline import TimelineHistory

log = structlog.get_logger("propstore.agent")

#: Seconds the agent keeps polling after its last reader left (a worker that restarts, or a
#: pool of short-lived processes, finds it still there).
IDLE_GRACE = 5.0
#: Nice levels the agent asks to be above the store that started it (where the OS allows:
#: root, or a raised ``RLIMIT_NICE``; elsewhere it stays at its parent's).
PRIORITY_BOOST = 5


def raise_priority(boost: int = PRIORITY_BOOST) -> int:
    """Ask the scheduler for ``boost`` nice levels more; the nice value the agent runs at.

    The agent does the polling of every store on the host: on a host short of CPU it is
    one runnable process among the fleet's, yet each of its polls that comes late makes
    every store's bounds older (replica reads then go to the primary). A higher weight
    keeps it on time; its own cost is bounded (a poll per node per interval)."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, max(-20, current - boost))
    return os.getpriority(os.PRIO_PROCESS, 0)


class PublishingState(MonitorState):
    """The agent's monitor state: every poll it records is also sent to the readers, and
    counted per node (for its status)."""

    def __init__(self, topology: Topology, hub: Hub) -> None:
        super().__init__(topology)
        self.hub = hub
        self.counters = [[NodeCounter() for _ in s.nodes] for s in topology.shards]
        #: The last poll forwarded per node (None after a failure: the next one goes).
        self._forwarded: list[list[Observation | None]] = [
            [None] * len(s.nodes) for s in topology.shards]
        #: Per shard: the HA manager's answers (a miss: no endpoint answered).
        self.answers = [NodeCounter() for _ in topology.shards]
        #: Seconds after which a replica's unchanged poll is forwarded all the same.
        self.refresh = refresh_after(topology.monitor.interval)

    def observe(self, shard_index: int, node_index: int, obs: Observation) -> None:
        """Record a poll and forward it, unless it is a replica's that only repeats the
        last one forwarded, younger than :attr:`refresh` (see :func:`repeats`)."""
        super().observe(shard_index, node_index, obs)
        self.counters[shard_index][node_index].attempt(obs.sent_at, None)
        last = self._forwarded[shard_index][node_index]
        if last is not None and obs.sent_at - last.sent_at < self.refresh and repeats(obs, last):
            return
        self._forwarded[shard_index][node_index] = obs
        self.hub.publish(Polled(shard_index, node_index, obs))

    def fail(self, shard_index: int, node_index: int, error: str, at: float | None = None
             ) -> None:
        """Record a failed poll and forward it with the time it failed."""
        at = self.clock() if at is None else at
        super().fail(shard_index, node_index, error, at)
        self.counters[shard_index][node_index].attempt(at, error)
        self._forwarded[shard_index][node_index] = None
        self.hub.publish(Failed(shard_index, node_index, at, error))

    def record_history(self, shard_index: int, history: TimelineHistory) -> None:
        """Record a timeline history and forward it (before the poll that needed it)."""
        super().record_history(shard_index, history)
        self.hub.publish(HistoryRead(shard_index, history))

    def lead(self, shard_index: int, leadership: Leadership | None) -> list[int]:
        """Record the HA manager's answer (None: none answered) and forward it, every
        answer, changed or not: a store trusts the agent's leader veto only while its
        newest answer is recent (``_place.answer_limit``), and times it by ``asked_at``."""
        wake = super().lead(shard_index, leadership)
        at = leadership.asked_at if leadership is not None else None
        at = self.clock() if at is None else at
        self.answers[shard_index].attempt(at, None if leadership is not None else
                                          "no Patroni endpoint answered")
        self.hub.publish(Led(shard_index, at, leadership))
        return wake


def repeats(obs: Observation, last: Observation) -> bool:
    """Whether a replica's poll ``obs`` says nothing ``last`` did not: same server run,
    replay and receive LSNs, flags and settings. Not forwarding it costs a store only the
    age of that replica's sighting (a connection opened since verifies its read in its own
    round trip instead); its bounds come from the primary's samples, which all go. Soundness
    is untouched: a store applies a subset of the agent's facts, each true."""
    return obs.in_recovery and last.in_recovery and (
        obs.lsn == last.lsn and obs.receive_lsn == last.receive_lsn
        and obs.run == last.run and obs.replay_paused == last.replay_paused
        and obs.receiver_streaming == last.receiver_streaming
        and obs.timeline == last.timeline and obs.system_id == last.system_id
        and obs.hot_standby_settings == last.hot_standby_settings
        and obs.pooler_seen == last.pooler_seen
    )


class AgentMonitor(LagMonitor):
    """The agent's poller: connections named ``propstore-agent`` in ``pg_stat_activity``."""

    application_name = "propstore-agent"


class Agent:
    """One agent: its poller, its readers, what it counts (see the module doc).

    Args:
        topology: what to poll; a store's topology is first reduced to what the agent
            needs (:func:`agent_topology`), as a spawned agent reads it from its stdin.
        socket_path: where stores find it.
        foreground: run by ``propstore agent run`` (it does not end when idle).
    """

    def __init__(self, topology: Topology, socket_path: Path, *, foreground: bool = False
                 ) -> None:
        self.topology = topology
        self.socket_path = socket_path
        self.foreground = foreground
        nodes = sum(len(s.nodes) for s in topology.shards)
        self.hub = Hub(nodes, RefusalTally(s.name for s in topology.shards), self.status,
                       interval=topology.monitor.interval)
        self.state = PublishingState(topology, self.hub)
        self.monitor = AgentMonitor(topology, self.state)
        self.started = time.monotonic()
        self.started_at = datetime.now(UTC).isoformat(timespec="seconds")
        m = topology.monitor
        self.late_after = late_after(m.interval, m.max_backoff, m.poll_timeout)
        self._loop: asyncio.AbstractEventLoop | None = None

    def status(self) -> AgentStatus:
        """How the agent is now."""
        now = time.monotonic()
        nodes = []
        for s, shard in enumerate(self.topology.shards):
            view = self.state.view(s)
            for n, node in enumerate(shard.nodes):
                count = self.state.counters[s][n]
                nodes.append(NodeHealth(
                    shard.name, node.name, view.nodes[n].state, count.polls, count.failures,
                    round(count.rate(now), 3),
                    None if count.last_at is None else round(max(0.0, now - count.last_at), 4),
                    count.last_error))
        return AgentStatus(
            pid=os.getpid(), version=VERSION, key=self.socket_path.stem,
            socket=str(self.socket_path),
            started_at=self.started_at,
            uptime_seconds=round(now - self.started, 3),
            interval_seconds=self.topology.monitor.interval,
            late_after_seconds=self.late_after, stores=self.hub.pids,
            stores_total=self.hub.readers_total, stores_dropped=self.hub.dropped,
            rss_bytes=rss_bytes(), nodes=tuple(nodes), leaders=self._leaders(now),
            refusals=nested(self.hub.tally.totals().items()),
            refusal_reporters=self.hub.tally.reporters, foreground=self.foreground,
            traced_bytes=traced_bytes())

    def _leaders(self, now: float) -> tuple[LeaderHealth, ...]:
        out = []
        for s, shard in enumerate(self.topology.shards):
            if not shard.patroni_endpoints:
                continue
            count, led = self.state.answers[s], self.state.view(s).leadership
            out.append(LeaderHealth(
                shard.name, None if led is None else led.leader,
                None if led is None else led.endpoint, count.polls, count.failures,
                None if count.last_at is None else round(max(0.0, now - count.last_at), 4),
                answer_limit(self.topology, s)))
        return tuple(out)

    def snapshot(self, timeout: float = 5.0
                 ) -> tuple[AgentStatus, tuple[ShardView, ...], float]:
        """The status, the shard views and the clock, read on the agent's own loop (for a
        caller in another thread: the metrics endpoint)."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the agent is not running")
        done: Future[tuple[AgentStatus, tuple[ShardView, ...], float]] = Future()

        def read() -> None:
            with contextlib.suppress(InvalidStateError):
                done.set_result((self.status(), self.state.views, self.state.clock()))

        loop.call_soon_threadsafe(read)
        return done.result(timeout)

    async def serve(self, idle_grace: float | None = IDLE_GRACE,
                    started: Callable[[Agent], None] | None = None) -> None:
        """Poll, serve stores on the socket, and return once idle past ``idle_grace``
        seconds (None: only on SIGTERM/SIGINT)."""
        socket_path, hub, monitor = self.socket_path, self.hub, self.monitor
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()  # a dead agent's (we hold the lock: no live one owns it)
        server = await asyncio.start_unix_server(hub.serve, path=str(socket_path),
                                                 limit=READ_LIMIT)
        os.chmod(socket_path, 0o600)
        polling = asyncio.create_task(monitor.run(), name="propstore-agent-poll")
        stop = asyncio.Event()
        loop = self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("agent_started", pid=os.getpid(), nodes=sum(len(s.nodes) for s in
                 self.topology.shards), socket=str(socket_path), foreground=self.foreground)
        if started is not None:
            started(self)
        interval = self.topology.monitor.interval
        beat_every = stale_after(interval) / 4
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await stop.wait()
                if polling.done():
                    polling.result()  # the poller died: exit loudly, readers replace us
                now = time.monotonic()
                if now - hub.sent_at >= beat_every:  # only when nothing else was sent
                    hub.publish(Beat(now))
                idle = hub.idle_since
                if idle_grace is not None and idle is not None and (
                    time.monotonic() - idle > idle_grace
                ):
                    log.info("agent_idle_exit", readers_total=hub.readers_total)
                    break
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            server.close()
            with contextlib.suppress(FileNotFoundError):
                socket_path.unlink()
            polling.cancel()
            await asyncio.gather(polling, return_exceptions=True)
            log.info("agent_stopped", readers_total=hub.readers_total, dropped=hub.dropped,
                     polls=monitor.state.polls)


def agent_topology(topology: Topology) -> Topology:
    """What an agent polls for stores of ``topology``: exactly what a spawned agent reads
    from its stdin (so ``agent run`` polls as a spawned agent would)."""
    return Topology.from_dict(topology_document(topology), source="agent", environ={})


class AgentRunning(Exception):
    """Another agent holds this topology's lock (``agent run`` refuses to start twice)."""


@contextlib.contextmanager
def agent_lock(path: Path) -> Iterator[bool]:
    """Hold the agent lock at ``path`` for the block (yields False: another agent has it)."""
    lock = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(lock)


def run_foreground(topology: Topology, *, idle_grace: float | None = None,
                   started: Callable[[Agent], None] | None = None) -> None:
    """Run the host agent of ``topology`` in this process until SIGTERM/SIGINT (or idle
    past ``idle_grace`` seconds): ``propstore agent run``. Stores find it exactly as they
    find one they spawned (same socket, lock and key); raises :class:`AgentRunning` when
    an agent already runs for it."""
    from propstore.monitor._place import AgentPaths

    paths = AgentPaths.of(topology)
    with agent_lock(paths.lock) as mine:
        if not mine:
            raise AgentRunning(f"an agent already runs for this topology (lock {paths.lock} "
                               f"held; `propstore agent status` shows it)")
        agent = Agent(agent_topology(topology), paths.socket, foreground=True)
        asyncio.run(agent.serve(idle_grace, started))


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
    with agent_lock(lock_path) as mine:
        if not mine:
            return 0  # another agent of this key runs: it serves the readers
        _configure_logging(log_path)
        log.info("agent_priority", nice=raise_priority())
        if os.environ.get(TRACE_MEMORY_ENV):
            import tracemalloc

            tracemalloc.start()
        topology = Topology.from_dict(document, source="agent", environ={})
        asyncio.run(Agent(topology, socket_path).serve())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
