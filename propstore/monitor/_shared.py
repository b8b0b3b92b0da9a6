"""Monitoring shared by the processes of a host (``[monitor] sharing = "host"``).

:class:`SharedMonitor` is the :class:`LagMonitor` a store runs by default. It follows the
host's lag agent for its topology (``_agent``; it spawns one when there is none) and applies
the agent's raw polls to its own state with the code its own polls would use, so every
bound and every fact is the one it would have derived itself (``_messages``). When the agent
is gone (its socket closes: a crash) or stuck (nothing, not even a heartbeat, for
:func:`stale_after` seconds), the store polls for itself — costlier, equally sound — and
joins an agent again as soon as one answers (spawning a replacement when none holds the
lock). Soundness never rests on the agent being alive or on time: a late poll is an old
fact, and an old fact only proves a larger bound. It rests on the agent's facts being true:
same poll code, same host clock (checked on every message: a timestamp from the future
means another clock, and ends sharing for this store), same OS user (the socket lives in a
``0700`` directory). For a shard with Patroni endpoints the agent also forwards every
answer of the HA manager (``Led``), applied with ``MonitorState.lead`` as the store's own
discovery would; a store whose newest answer from the agent is older than
:func:`answer_limit` asks Patroni itself (its own monitor), so the leader veto it acts on is
never older than its own discovery's could be.

Where the agent lives and how it is keyed: ``_place``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import select
import signal
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import structlog

from propstore.config import Topology
from propstore.monitor._hub import pace_for, paces
from propstore.monitor._messages import (
    VERSION,
    Beat,
    Counts,
    Hello,
    HistoryRead,
    Join,
    Led,
    Pace,
    Polled,
    decode,
    encode_request,
    timestamp,
)
from propstore.monitor._monitor import LagMonitor, MonitorState
from propstore.monitor._place import (
    AGENT_DIR_ENV,
    AgentPaths,
    AgentUnavailable,
    agent_dir,
    agent_key,
    answer_limit,
    stale_after,
)
from propstore.monitor._spawn import Spawner

log = structlog.get_logger("propstore.monitor")

Tracker = Callable[[tuple[int, int]], None]

#: Seconds after a store starts, or spawns an agent, during which it tries to join every
#: 50 ms (it polls for itself meanwhile, so a first store starts as fast as an unshared one).
JOIN_WAIT = 2.0
#: Seconds a store waits, without polling for itself, while another store of its herd is
#: starting the agent (it holds the spawn lock until its agent answers, and polls for
#: itself meanwhile). An agent spawned at a load of 30-55 took up to 5 s to answer; the
#: herd's own polls would be a connection per store on every server.
START_WAIT = 10.0
#: Mean seconds between attempts to join an agent otherwise, while polling for itself.
REJOIN_EVERY = 1.0
#: Seconds a store waits for an agent's hello when it joins, and how many times it waits
#: again while the hello's bytes are on its socket (``_hello``).
HELLO_WAIT = 1.0
HELLO_RETRIES = 5
#: Seconds between a store's reports of its refusal counters to the agent (when changed).
REPORT_EVERY = 1.0
#: Seconds of reads whose tightest budget decides the pace a store asks of its agent: it
#: asks for a faster one as soon as a read needs it, a slower one after a window without.
PACE_WINDOW = 1.0
#: Why a store stops following an agent whose socket closed (the agent ended).
LOST = "lost the host agent"
#: Why a store stops following an agent that sent nothing for ``stale_after`` seconds.
SILENT = "the host agent went silent"


class RefusalSource(Protocol):
    """What a store counts that the host's agent totals (``store.ReadStats`` has it)."""

    @property
    def refusals(self) -> Mapping[tuple[str, str, str], int]:
        """``StaleReadError`` raised so far, by (shard, profile, reason)."""
        ...


#: How every poll message the agent sends begins (``_messages.encode``: keys in order).
_OBS = b'{"k":"obs","s":'


@dataclass(slots=True)
class _Link:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    hello: Hello
    #: Bytes read but not yet a whole line.
    rest: bytes = b""
    #: The refusal counters last sent, and when the next report is due.
    reported: tuple[tuple[str, str, str, int], ...] = ()
    report_at: float = 0.0
    #: The pace asked of the agent (it starts every store at its fastest), and when the
    #: window of reads that decides the next one ends.
    pace: float = 0.0
    pace_at: float = 0.0
    #: A pidfd of the agent (:func:`_pin`), to end it if it gets stuck; None: not pinned.
    pidfd: int | None = None

    def unpin(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class SharedMonitor(LagMonitor):
    """A :class:`LagMonitor` whose polls come from the host's agent while one answers, and
    its own otherwise (see the module doc)."""

    def __init__(self, topology: Topology, state: MonitorState | None = None,
                 counts: RefusalSource | None = None) -> None:
        super().__init__(topology, state)
        #: The store's counters reported to the agent (its host totals: ``agent status``).
        self._counts = counts
        #: Where this store's figures come from now: ``agent`` (the host's agent, pid
        #: :attr:`agent_pid`), ``own`` (this process polls) or ``starting``.
        self.source = "starting"
        self.agent_pid: int | None = None
        #: Why this store polls for itself while :attr:`source` is ``own``.
        self.own_reason = "no host agent answered yet"
        #: How often this store fell back to its own polls, and joined an agent.
        self.fallbacks = 0
        self.joins = 0
        #: Why the last attempt to join an agent failed ("" when it joined), and how many
        #: attempts failed since this store last followed one.
        self.join_error = ""
        self.join_failures = 0
        #: Times this store woke to the agent's bytes, and the pace it asked for last
        #: (seconds between two sends; None before it followed an agent).
        self.wakes = 0
        self.pace: float | None = None
        #: Per shard and node: the newest poll time applied (replays older than it are
        #: skipped), and the node's key for the first-round tracker (made once: nothing is
        #: allocated per message but the message).
        self._floor = [[-1.0] * len(s.nodes) for s in topology.shards]
        self._keys = [[(i, n) for n in range(len(s.nodes))]
                      for i, s in enumerate(topology.shards)]
        #: Per node: the bytes after the time of the last poll applied (a poll with the
        #: same bytes repeats it, and takes ``MonitorState.observe_again``).
        self._last: list[list[bytes | None]] = [[None] * len(s.nodes) for s in topology.shards]
        #: Per shard: the ask time of the newest HA manager answer applied (an older one,
        #: replayed, is skipped), the newest the agent forwarded (or when we joined), and
        #: how old that may get before the agent's veto is no longer trusted
        #: (:func:`answer_limit`; infinite for a shard without Patroni endpoints).
        self._led_floor = [-math.inf] * len(topology.shards)
        self._answered = [-math.inf] * len(topology.shards)
        self._answer_limit = [answer_limit(topology, i) for i in range(len(topology.shards))]
        self._answer_due = math.inf
        self._spawner = Spawner(topology)
        self._fast_until = 0.0
        #: What the last failed join found on its way: an agent another store is starting,
        #: or one holding its lock without answering (None: neither; this store polls).
        self._on_way: Literal["starting", "running"] | None = None

    async def run(self) -> None:
        """Follow the host's agent (own polls while there is none) until cancelled."""
        self._first_round = asyncio.Event()
        polled = self._round_tracker()
        try:
            if self.state.clock is not time.monotonic:
                raise AgentUnavailable("the store's clock is not time.monotonic")
            paths = AgentPaths.of(self.topology)
        except (AgentUnavailable, OSError) as exc:
            log.warning("monitor_sharing_unavailable", error=str(exc))
            self.source, self.own_reason = "own", f"sharing unavailable: {exc}"
            await self._poll_all(polled)
            return
        link = await self._join_herd(paths)
        try:
            while True:
                if link is not None:
                    followed = link
                    try:
                        why = await self._follow(followed, polled)
                        self.fallbacks += 1
                        if why == SILENT:
                            # A stuck agent holds its lock, so no replacement can start and
                            # its herd would each poll every server. Unless it answers a
                            # new join (our link alone was wedged), end it: then it is lost.
                            link = await self._join(paths)
                            if link is not None:
                                continue
                            if _end_stuck(followed):
                                why = LOST
                    except AgentUnavailable as exc:
                        log.error("monitor_sharing_stopped", error=str(exc))
                        self.source, self.own_reason = "own", f"sharing stopped: {exc}"
                        await self._poll_all(polled)
                        return
                    finally:
                        followed.unpin()
                    if why == LOST:
                        # It ended, and its lock with it: one store of the herd starts the
                        # replacement at once. The rest wait for that one rather than each
                        # open a connection to every server (a host's 200 workers would be
                        # 200 more on each, past a default max_connections of 100).
                        self.source, self.agent_pid = "starting", None
                        self.own_reason = f"{why}; waits for the replacement"
                        link = await self._join_herd(paths)
                        if link is not None:
                            continue
                    # An agent not ended (not pinned, or its Patroni answers came late)
                    # holds its lock: no replacement can start, so waiting would only add
                    # to the silence already waited out.
                    self.own_reason = f"{why}; polls itself until an agent answers"
                link = await self._own_until_joined(paths, polled)
        finally:
            self._spawner.release()

    async def _join_herd(self, paths: AgentPaths) -> _Link | None:
        """A link to the agent, waiting while another store of the herd starts one (a
        fleet's processes start at once, or lost their agent at once): up to
        :data:`START_WAIT` while that store is starting it, :data:`JOIN_WAIT` while an agent
        holds its lock without answering. None at once when this store starts it, or none
        is on its way (it polls for itself)."""
        began = time.monotonic()
        self._fast_until = began + JOIN_WAIT
        link = await self._join(paths)
        while link is None and self._on_way is not None and time.monotonic() < began + (
            START_WAIT if self._on_way == "starting" else JOIN_WAIT
        ):
            # Rather than poll every node as well (64 stores x 12 nodes were 768 connects
            # in the first second); the store that spawned it polls meanwhile.
            await asyncio.sleep(0.05)
            link = await self._join(paths)
        return link

    async def _own_until_joined(self, paths: AgentPaths, polled: Tracker) -> _Link:
        """Poll for ourselves until an agent answers; returns its link."""
        self.source, self.agent_pid = "own", None
        own = asyncio.create_task(self._poll_all(polled), name="propstore-own-monitor")
        jitter = random.Random()  # spreads the herd that lost one agent; not for security
        try:
            while True:
                fast = time.monotonic() < self._fast_until
                await asyncio.sleep(0.05 if fast else REJOIN_EVERY * jitter.uniform(0.5, 1.5))
                if own.done():
                    own.result()  # our own poller died: let it be seen
                link = await self._join(paths)
                if link is not None:
                    return link
        finally:
            own.cancel()
            await asyncio.gather(own, return_exceptions=True)
            # Replayed polls (and HA manager answers) older than what our own polls (and
            # our own discovery) saw are not applied.
            for s, view in enumerate(self.state.views):
                for n, node in enumerate(view.nodes):
                    if node.last_poll_at is not None:
                        self._floor[s][n] = max(self._floor[s][n], node.last_poll_at)
                led = view.leadership
                if led is not None and led.asked_at is not None:
                    self._led_floor[s] = max(self._led_floor[s], led.asked_at)

    # ------------------------------------------------------------ joining

    async def _join(self, paths: AgentPaths) -> _Link | None:
        """A link to the agent if one answers now; else spawn one (when none holds the
        lock and no other store is starting one) and return None."""
        link = await self._dial(paths)
        if link is None:
            self.join_failures += 1
            spawned = self._spawner.spawn(paths)
            if spawned == "spawned":
                self._fast_until = time.monotonic() + JOIN_WAIT
            self._on_way = ("starting" if spawned == "starting"
                            else "running" if spawned == "running" else None)
            return None
        self.joins += 1
        self.join_failures = 0
        self._spawner.joined()
        self.source, self.agent_pid = "agent", link.hello.pid
        log.info("monitor_sharing_joined", agent_pid=link.hello.pid, socket=str(paths.socket))
        return link

    async def _dial(self, paths: AgentPaths) -> _Link | None:
        sent = self.state.clock()
        try:
            async with asyncio.timeout(HELLO_WAIT):
                reader, writer = await asyncio.open_unix_connection(str(paths.socket))
            try:
                writer.write(encode_request(Join()))
                line = await _hello(reader, writer)
            except BaseException:
                writer.close()
                raise
        except (OSError, TimeoutError) as exc:
            self.join_error = f"{type(exc).__name__}: {exc} ({paths.socket}, attempt at {sent:.3f})"
            return None
        self.join_error = ""
        try:
            hello = decode(line)
        except ValueError:
            hello = None
        if not isinstance(hello, Hello) or hello.version != VERSION or not (
            hello.now <= self.state.clock()
        ):
            writer.close()
            self.join_error = "bad hello"
            log.warning("monitor_agent_refused", reason="bad hello", sent_at=sent)
            return None
        return _Link(reader, writer, hello, pidfd=_pin(writer, hello.pid))

    # ------------------------------------------------------------ following

    async def _follow(self, link: _Link, polled: Tracker) -> str:
        """Apply the agent's messages until it is gone, stuck or its HA manager answers
        come late; returns which."""
        for row in self._last:  # our own polls (or another agent's) came in between
            row[:] = [None] * len(row)
        limit = stale_after(self.topology.monitor.interval)
        clock = self.state.clock
        joined = clock()
        for s, bound in enumerate(self._answer_limit):
            if bound < math.inf:
                # The limit runs from the newest answer we hold (our own discovery's, or an
                # earlier agent's): joining never makes an answer live longer. Holding none
                # (no veto), the agent has the limit from now for its first.
                floor = self._led_floor[s]
                self._answered[s] = floor if floor > -math.inf else joined
        self._answer_due = self._next_answer_due()
        try:
            while True:
                try:
                    data = await _next_bytes(
                        link, min(limit, max(0.0, self._answer_due - clock())))
                except OSError as exc:
                    log.warning("monitor_agent_gone", agent_pid=link.hello.pid, error=str(exc))
                    return LOST
                if data is None and clock() < self._answer_due:
                    log.warning("monitor_agent_stuck", agent_pid=link.hello.pid,
                                silent_seconds=limit)
                    return SILENT
                if data == b"":
                    log.warning("monitor_agent_gone", agent_pid=link.hello.pid)
                    return LOST
                now = clock()
                if data:
                    self.wakes += 1
                    *lines, link.rest = (link.rest + data).split(b"\n")
                    for line in lines:
                        self._apply(line, now, polled)
                    self._ask_pace(link, now)
                if now > self._answer_due:
                    # The agent's leader veto is older than our own discovery's could
                    # ever be: ask Patroni ourselves (docs/architecture.md, "Fleets").
                    late = [self.topology.shards[s].name for s, (a, b) in enumerate(
                        zip(self._answered, self._answer_limit, strict=True))
                        if b < math.inf and now > a + b]
                    log.warning("monitor_agent_discovery_late", agent_pid=link.hello.pid,
                                shards=late)
                    return "the host agent's Patroni answers came late"
                if now >= link.report_at:
                    self._report(link, now)
        finally:
            # The last counts too (a store closing, a worker ending): a small write the
            # kernel takes at once, before the close.
            with contextlib.suppress(Exception):
                self._report(link, clock())
            link.writer.close()

    def _ask_pace(self, link: _Link, now: float) -> None:
        """Ask the agent for the pace the store's reads need: faster at once when a read's
        budget needs it, slower once a window's reads (or none) allow it."""
        demand = self.state.demand
        interval = self.topology.monitor.interval
        if not link.pace:
            link.pace, link.pace_at = paces(interval)[0], now + PACE_WINDOW
            self.pace = link.pace
        if now >= link.pace_at:
            want = pace_for(demand.take(), interval)
            link.pace_at = now + PACE_WINDOW
        else:
            want = pace_for(demand.tightest, interval)
            if want >= link.pace:
                return
        if want != link.pace and not link.writer.is_closing():
            link.writer.write(encode_request(Pace(want)))
            link.pace = self.pace = want

    def _report(self, link: _Link, now: float) -> None:
        """Send the store's refusal counters to the agent when they changed."""
        link.report_at = now + REPORT_EVERY
        if self._counts is None or link.writer.is_closing():
            return
        counts = tuple(sorted((s, p, r, n) for (s, p, r), n in
                              dict(self._counts.refusals).items()))
        if counts != link.reported:
            link.writer.write(encode_request(Counts(counts)))
            link.reported = counts

    def _repeat(self, line: bytes, now: float, polled: Tracker) -> bool:
        """Apply a poll that repeats the last one applied for its node (the same bytes
        after its time) through the cheap path; False when it is not one (or the path
        does not apply: ``MonitorState.observe_again``)."""
        if not line.startswith(_OBS):
            return False
        at_pos = line.find(b',"at":')
        cut = line.find(b',"rec":', at_pos)
        if at_pos < 0 or cut < 0:
            return False
        try:
            shard_text, node_text = line[len(_OBS):at_pos].split(b',"n":')
            shard, node, at = int(shard_text), int(node_text), float(line[at_pos + 6:cut])
            last = self._last[shard][node]
        except (ValueError, IndexError):
            return False
        if last is None or line[cut:] != last:
            return False
        if at > now:
            return False  # the full path refuses it
        floor = self._floor[shard]
        if at <= floor[node]:
            return True  # already known (a replay after joining again)
        if not self.state.observe_again(shard, node, at):
            return False
        floor[node] = at
        polled(self._keys[shard][node])
        return True

    def _apply(self, line: bytes, now: float, polled: Tracker) -> None:
        if self._repeat(line, now, polled):
            return
        try:
            message = decode(line)
        except ValueError as exc:
            log.warning("monitor_agent_message_bad", error=str(exc))
            return
        at = timestamp(message)
        if at is not None and at > now:
            raise AgentUnavailable(
                f"the agent's clock is ahead of this process's ({at:.6f} > {now:.6f}): "
                "not one host clock, so its facts cannot be timed here"
            )
        if isinstance(message, (Beat, Hello)):  # a constant tuple: no object per call
            return
        if isinstance(message, HistoryRead):
            self.state.record_history(message.shard, message.history)
            return
        if isinstance(message, Led):
            self._lead(message)
            return
        assert at is not None
        floor = self._floor[message.shard]
        if at <= floor[message.node]:
            return  # already known (a replay after joining again)
        floor[message.node] = at
        if isinstance(message, Polled):
            self.state.observe(message.shard, message.node, message.observation)
            # What a repeat of this poll looks like after its time (``_repeat``).
            cut = line.find(b',"rec":')
            self._last[message.shard][message.node] = line[cut:] if cut > 0 else None
        else:
            self.state.fail(message.shard, message.node, message.error, message.at)
            self._last[message.shard][message.node] = None
        polled(self._keys[message.shard][message.node])


    def _lead(self, message: Led) -> None:
        """Apply an HA manager answer the agent forwarded, as our own discovery would
        (``MonitorState.lead``), unless ours was asked later; it restarts the shard's
        :func:`answer_limit`."""
        s = message.shard
        if message.at > self._led_floor[s]:
            self._led_floor[s] = message.at
            self.state.lead(s, message.leadership)  # the agent polls whom it names
        if message.at > self._answered[s]:
            self._answered[s] = message.at
            self._answer_due = self._next_answer_due()

    def _next_answer_due(self) -> float:
        """When the first shard's agent answer becomes too old (inf: no Patroni shard;
        never NaN, which would make every wait zero)."""
        return min((a + b for a, b in zip(self._answered, self._answer_limit, strict=True)
                    if b < math.inf), default=math.inf)


async def _hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """The agent's first line, waited for :data:`HELLO_WAIT` seconds (TimeoutError after)
    — unless its bytes wait for us when the time is up: a store starved past the wait
    (32 processes at a load of 50) wakes to the agent's hello and its own expired timer at
    once, and it is the store that ran late. Taking that for no agent, it polled for
    itself and tried again, each time as late: it never joined."""
    for _ in range(HELLO_RETRIES):
        try:
            async with asyncio.timeout(HELLO_WAIT):
                return await reader.readline()
        except TimeoutError:
            if not _readable(writer):
                break
    # A line already buffered is returned without waiting, before this timer can fire.
    async with asyncio.timeout(0):
        return await reader.readline()


async def _next_bytes(link: _Link, limit: float) -> bytes | None:
    """What the agent sent next (b"" at its end), or None after ``limit`` seconds of its
    silence. A process itself starved past the limit wakes to the agent's bytes and its
    own expired timer at once (the bytes then sit in the reader's buffer, or on the
    socket): that is this process running late, not the agent being stuck. Taken for
    stuck, a loaded host's whole fleet polled for itself, adding the load that starved it."""
    reader = link.reader
    while True:
        try:
            async with asyncio.timeout(limit):
                return await reader.read(1 << 16)
        except TimeoutError:
            if not _readable(link.writer):
                break
    try:
        # Buffered bytes are returned without waiting, before this timer can fire.
        async with asyncio.timeout(0):
            return await reader.read(1 << 16)
    except TimeoutError:
        return None


def _pin(writer: asyncio.StreamWriter, pid: int) -> int | None:
    """A pidfd of the agent that sent ``pid`` in its hello, if the socket's peer is that
    process (its credentials, taken by the kernel at connect); None where there is no
    pidfd (not Linux 5.3+) or the peer is another process. A pidfd names one process for
    good: a pid can be reused once its process is gone, so a pid alone could end another."""
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        peer = struct.unpack("3i", creds)[0]
        return os.pidfd_open(pid) if peer == pid else None
    except (OSError, AttributeError, ValueError):
        return None


def _end_stuck(link: _Link) -> bool:
    """End the stuck agent of ``link`` (SIGKILL through its pidfd: a stopped process dies
    too); whether it is ended (or was gone already). The kernel then drops its lock and one
    store of the herd starts a replacement. One that cannot die at once (in an
    uninterruptible wait) keeps its lock a while longer; its stores poll for themselves."""
    if link.pidfd is None:
        return False
    try:
        signal.pidfd_send_signal(link.pidfd, signal.SIGKILL)
    except ProcessLookupError:  # it ended already: its lock is free, or about to be
        return True
    except OSError as exc:  # e.g. EPERM: an agent of another user, not ours to end
        log.warning("monitor_agent_end_failed", agent_pid=link.hello.pid, error=str(exc))
        return False
    log.warning("monitor_agent_ended_stuck", agent_pid=link.hello.pid)
    return True


def _readable(writer: asyncio.StreamWriter) -> bool:
    """Whether the link's socket has bytes waiting (without reading them)."""
    sock = writer.get_extra_info("socket")
    try:
        ready, _, _ = select.select([sock.fileno()], [], [], 0)
    except (OSError, ValueError, AttributeError):
        return False
    return bool(ready)


def monitor_for(topology: Topology, state: MonitorState | None = None,
                counts: RefusalSource | None = None) -> LagMonitor:
    """The monitor a store runs: shared with the host's processes (``sharing = "host"``,
    the default; the store's refusal ``counts`` are reported to the host's agent) or its
    own polls (``"off"``)."""
    if topology.monitor.sharing == "off":
        return LagMonitor(topology, state)
    return SharedMonitor(topology, state, counts)


__all__ = ["AGENT_DIR_ENV", "AgentPaths", "AgentUnavailable", "RefusalSource", "SharedMonitor",
           "agent_dir", "agent_key", "answer_limit", "monitor_for", "stale_after"]
