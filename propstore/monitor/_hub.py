"""The host agent's side of its socket: the stores connected to it, what a new one is told
first, sending them the agent's polls (one send per tick, a group of stores at a time), the
refusal counters they report, and status requests (``docs/architecture.md``, "Fleets").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable

import structlog

from propstore.monitor._health import AgentStatus, RefusalTally, encode_status
from propstore.monitor._messages import (
    VERSION,
    Ask,
    Beat,
    Counts,
    Failed,
    Hello,
    HistoryRead,
    Join,
    Led,
    Message,
    Pace,
    Polled,
    decode_request,
    encode,
)
from propstore.monitor._place import stale_after

log = structlog.get_logger("propstore.agent")

#: Polls (and failures) kept per node for a reader that joins: it starts from the same
#: recent facts as one that was there all along (bounded: memory stays flat).
RECENT_PER_NODE = 64
#: A reader whose unsent backlog passes this many bytes is not reading (stopped, or its
#: process is stuck): it is dropped, and polls for itself until it joins again.
MAX_BACKLOG = 1 << 20
#: Groups of stores of one pace the agent sends to in turn, each once per tick at its own
#: phase of it, so that a fleet's processes do not all wake at the same instant.
SEND_GROUPS = 8
#: Share of a store's tightest budget that its facts may wait on their way (``pace_for``):
#: a read with a 1 s budget meets facts at most 0.2 s older than they would be.
PACE_SHARE = 0.2


def send_tick(interval: float) -> float:
    """The fastest pace, seconds between the agent's sends to a store: half a poll interval
    (at most 50 ms), so a store wakes a few times per interval whatever the number of
    nodes, and a fact waits at most that long on its way (its bound is that much larger)."""
    return min(0.05, interval / 2)


def refresh_after(interval: float) -> float:
    """Seconds after which a replica's poll that repeats the last one forwarded is
    forwarded all the same (``_agent.repeats``), at the fastest pace; a store at a slower
    pace gets one every :data:`REFRESH_TICKS` ticks of it at most. What a store misses is
    only the age of that replica's sighting: a connection opened since verifies its read
    in its own round trip."""
    return max(0.5, 5 * interval)


#: Ticks of its pace after which a store is sent an unchanged replica's poll again.
REFRESH_TICKS = 5


def paces(interval: float) -> tuple[float, ...]:
    """The paces the agent sends at (seconds between two sends to a store), fastest first:
    :func:`send_tick` doubled up to the slowest, a quarter of ``stale_after`` (a store that
    hears nothing for ``stale_after`` takes its agent for stuck: the slowest pace leaves
    it four sends of margin)."""
    fast = send_tick(interval)
    slow = max(fast, stale_after(interval) / 4)
    found = []
    tick = fast
    while tick < slow:
        found.append(tick)
        tick *= 2
    return (*found, slow)


def pace_for(budget: float, interval: float) -> float:
    """The pace a store asks for when the tightest budget of its recent reads was
    ``budget`` seconds (``math.inf``: it did not read; 0: a token read, the fastest): the
    slowest pace within :data:`PACE_SHARE` of it."""
    known = paces(interval)
    fitting = [p for p in known if p <= budget * PACE_SHARE]
    return fitting[-1] if fitting else known[0]


class _Group:
    """Stores sent to at one pace and phase: the lines not yet sent to them, and per node
    where its latest pending poll is (so that a repeat replaces it rather than queue)."""

    __slots__ = ("latest", "members", "pending", "phase", "refresh", "sent", "tick", "timer")

    def __init__(self, tick: float, phase: float, refresh: float) -> None:
        self.tick, self.phase = tick, phase
        self.refresh = max(refresh, REFRESH_TICKS * tick)
        #: (shard, node) -> the bytes after the time of the replica's last poll queued
        #: here, and its time (an unchanged replica is sent again after :attr:`refresh`).
        self.sent: dict[tuple[int, int], tuple[bytes, float]] = {}
        self.members: set[asyncio.StreamWriter] = set()
        self.pending: list[bytes] = []
        #: (shard, node) -> (index in :attr:`pending`, the poll's bytes after its time
        #: without its LSNs: see :func:`_shape`).
        self.latest: dict[tuple[int, int], tuple[int, bytes]] = {}
        self.timer: asyncio.TimerHandle | None = None

    def add(self, line: bytes, message: Message, tail: bytes | None, shape: bytes | None
            ) -> None:
        """Queue ``line`` (``tail``: a poll's bytes after its time; ``shape``: those bytes
        without its LSNs)."""
        if isinstance(message, Beat):
            if not self.pending:  # any byte tells the store the agent lives
                self.pending.append(line)
            return
        if isinstance(message, Polled):
            key = (message.shard, message.node)
            at = message.observation.sent_at
            if message.observation.in_recovery and tail is not None:
                last = self.sent.get(key)
                if last is not None and last[0] == tail and at - last[1] < self.refresh:
                    return  # only a later sighting of a replica these stores know as is
                self.sent[key] = (tail, at)
            prior = self.latest.get(key)
            if prior is not None and shape is not None and prior[1] == shape:
                # A newer poll of the node on the same run, in the same role, flags and
                # settings, LSNs aside: only the newest of a send travels. Dropping a fact
                # is sound (a store applies a subset of true facts, as if some polls had
                # failed); what the store loses is at most a tick's precision (a primary
                # sample between two sends, a lagging replica covered by the one before).
                # Only this node's own poll is replaced, in place: what other nodes' polls
                # were queued between is unordered with it anyway (a store's own polls
                # answer in any order).
                self.pending[prior[0]] = line
                return
            if shape is not None:
                self.latest[key] = (len(self.pending), shape)
        elif isinstance(message, Failed):
            self.latest.pop((message.shard, message.node), None)
            self.sent.pop((message.shard, message.node), None)
        elif isinstance(message, HistoryRead | Led):
            # A history goes before the polls that need it, an HA manager's answer before
            # the polls that came after it: none queued before either moves past it.
            for key in [k for k in self.latest if k[0] == message.shard]:
                del self.latest[key]
        self.pending.append(line)

    def take(self) -> bytes:
        """The pending bytes (emptied)."""
        data = b"".join(self.pending)
        self.pending.clear()
        self.latest.clear()
        return data


def _tail(line: bytes) -> bytes | None:
    """A poll line's bytes after its time (``_messages.encode``: ``at`` then ``rec``)."""
    cut = line.find(b',"rec":')
    return line[cut:] if cut > 0 else None


def _shape(tail: bytes | None) -> bytes | None:
    """A poll's bytes after its time without its LSNs (``lsn`` and ``rcv``, then
    ``pause``): equal for two polls of one run in one role, flags and settings."""
    if tail is None:
        return None
    start = tail.find(b',"lsn":')
    end = tail.find(b',"pause":', start)
    return tail[:start] + tail[end:] if 0 < start < end else None
#: Seconds a client has to say what it wants, and a status request to be sent.
HANDSHAKE = 5.0
#: Longest line a client may send (a store's counters: bounded by ``MAX_COUNTS``).
READ_LIMIT = 1 << 16


class Hub:
    """The stores connected to this agent, what a new one is told first, and the status
    requests it answers. Each store is sent to at the pace it asks for (:class:`Pace`;
    the fastest until it asks): one send per tick of its pace, with the facts published
    since the last one (of each node's polls that differ only in time and LSNs, the
    newest), and a heartbeat when there is nothing else."""

    def __init__(self, nodes: int, tally: RefusalTally,
                 status: Callable[[], AgentStatus] | None = None,
                 interval: float = 0.1) -> None:
        self._recent: deque[bytes] = deque(maxlen=RECENT_PER_NODE * max(1, nodes))
        self._histories: dict[tuple[int, int], bytes] = {}
        #: Per shard, the HA manager's latest answer (a joiner gets it before the polls).
        self._leads: dict[int, bytes] = {}
        #: Connected stores and their pids (``SO_PEERCRED``: the kernel's word, 0 if unknown).
        self._readers: dict[asyncio.StreamWriter, int] = {}
        #: The paces stores may ask for, and per pace its send groups (one per phase).
        self.paces = paces(interval)
        refresh = refresh_after(interval)
        self._groups = [[_Group(tick, tick * g / SEND_GROUPS, refresh)
                         for g in range(SEND_GROUPS)] for tick in self.paces]
        self._group_of: dict[asyncio.StreamWriter, _Group] = {}
        #: The groups with members (each has its send scheduled).
        self._live: list[_Group] = []
        #: When the last send to any store went (monotonic).
        self.sent_at = time.monotonic()
        self.tally = tally
        self.status = status
        #: When the last reader left (monotonic), None while some reader is connected.
        self.idle_since: float | None = time.monotonic()
        self.readers_total = 0
        self.dropped = 0

    @property
    def readers(self) -> int:
        """Readers connected now."""
        return len(self._readers)

    @property
    def pids(self) -> tuple[int, ...]:
        """The connected stores' pids."""
        return tuple(sorted(self._readers.values()))

    def pace_of(self, writer: asyncio.StreamWriter) -> float | None:
        """Seconds between two sends to this store (None: not a reader)."""
        group = self._group_of.get(writer)
        return None if group is None else group.tick

    def publish(self, message: Message) -> None:
        """Queue ``message`` for every reader (sent at each one's next tick)."""
        line = encode(message)
        tail = shape = None
        if isinstance(message, Polled | Failed):
            self._recent.append(line)
            if isinstance(message, Polled):
                tail = _tail(line)
                shape = _shape(tail)
        elif isinstance(message, HistoryRead):
            key = (message.shard, message.history.timeline)
            self._histories[key] = line
            mine = sorted(k for k in self._histories if k[0] == message.shard)
            for old in mine[:-16]:  # bounded, like MonitorState's: the newest matter
                del self._histories[old]
        elif isinstance(message, Led):
            self._leads[message.shard] = line
        for group in self._live:
            group.add(line, message, tail, shape)
            if isinstance(message, Led) and group.tick > self.paces[0]:
                # A leader veto must not age on its way past what the store allows it
                # (``_place.answer_limit``): it goes at the fastest pace's next tick.
                self._hurry(group)

    def _hurry(self, group: _Group) -> None:
        loop = asyncio.get_running_loop()
        soon = loop.time() + self.paces[0]
        if group.timer is not None and group.timer.when() > soon:
            group.timer.cancel()
            group.timer = loop.call_at(soon, self._flush, group)

    def _schedule(self, group: _Group) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        tick = group.tick
        group.timer = loop.call_at(now + tick - (now - group.phase) % tick, self._flush, group)

    def _flush(self, group: _Group) -> None:
        group.timer = None
        if not group.members:
            return
        self.sent_at = time.monotonic()
        # Nothing new: a heartbeat, so that a store at the slowest pace hears from its agent
        # every tick of it (a quarter of the silence it would take for stuck).
        data = group.take() or encode(Beat(self.sent_at))
        for writer in list(group.members):
            self._send(writer, data)
        if group.members:
            self._schedule(group)

    def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if writer.transport.get_write_buffer_size() > MAX_BACKLOG:
            self.dropped += 1
            log.warning("agent_reader_dropped", pid=self._readers.get(writer),
                        backlog=writer.transport.get_write_buffer_size())
            self._leave(writer)
            writer.close()
        else:
            writer.write(data)

    def _enter(self, writer: asyncio.StreamWriter, pace: int) -> None:
        """Put ``writer`` in the least-filled group of pace ``pace`` (an index)."""
        group = min(self._groups[pace], key=lambda g: len(g.members))
        group.members.add(writer)
        self._group_of[writer] = group
        if group.timer is None:
            self._live.append(group)
            self._schedule(group)

    def _exit(self, writer: asyncio.StreamWriter) -> _Group | None:
        group = self._group_of.pop(writer, None)
        if group is not None:
            group.members.discard(writer)
            if not group.members:
                group.take()
                group.sent.clear()  # a store that joins it has the replay
                self._live.remove(group)
                if group.timer is not None:
                    group.timer.cancel()
                    group.timer = None
        return group

    def repace(self, writer: asyncio.StreamWriter, seconds: float) -> None:
        """Send to ``writer`` at the slowest pace not slower than ``seconds`` asks."""
        if writer not in self._readers:
            return
        pace = max([0, *(i for i, p in enumerate(self.paces) if p <= seconds * (1 + 1e-9))])
        group = self._group_of.get(writer)
        if group is not None and group.tick == self.paces[pace]:
            return
        if group is not None and group.pending:
            # What it would have got at its old group's next tick goes now: a store that
            # changes pace misses nothing (a line it gets twice it skips: already known).
            writer.write(b"".join(group.pending))
        self._exit(writer)
        self._enter(writer, pace)

    def _join(self, writer: asyncio.StreamWriter) -> None:
        self._readers[writer] = _peer_pid(writer)
        self._enter(writer, 0)

    def _leave(self, writer: asyncio.StreamWriter) -> None:
        self._readers.pop(writer, None)
        self._exit(writer)
        self.tally.leave(writer)
        if not self._readers and self.idle_since is None:
            self.idle_since = time.monotonic()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client: a status request (answered, closed), or a store (the hello, what it
        missed, then every new poll; it sends its refusal counters)."""
        try:
            async with asyncio.timeout(HANDSHAKE):
                request = decode_request(await reader.readline())
        except (TimeoutError, ValueError, OSError):
            writer.close()
            return
        if isinstance(request, Ask):
            await self._answer(writer)
            return
        if not isinstance(request, Join):
            writer.close()
            return
        first = [encode(Hello(os.getpid(), time.monotonic(), VERSION)),
                 *self._histories.values(), *self._leads.values(), *self._recent]
        writer.write(b"".join(first))
        self._join(writer)
        self.readers_total += 1
        self.idle_since = None
        try:
            while line := await reader.readline():  # EOF when the store leaves
                with contextlib.suppress(ValueError):
                    request = decode_request(line)
                    if isinstance(request, Counts) and writer in self._readers:
                        self.tally.report(writer, request.refusals)
                    elif isinstance(request, Pace):
                        self.repace(writer, request.seconds)
        except (OSError, ValueError):  # ValueError: a line past the reader's limit
            pass
        finally:
            self._leave(writer)
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter) -> None:
        try:
            if self.status is not None:
                writer.write(encode_status(self.status()))
                async with asyncio.timeout(HANDSHAKE):
                    await writer.drain()
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()


def _peer_pid(writer: asyncio.StreamWriter) -> int:
    """The connected process's pid, as the kernel reports it (0 when it cannot)."""
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return int(struct.unpack("3i", creds)[0])
    except (OSError, AttributeError):
        return 0


__all__ = ["HANDSHAKE", "MAX_BACKLOG", "PACE_SHARE", "READ_LIMIT", "RECENT_PER_NODE",
           "REFRESH_TICKS", "SEND_GROUPS", "Hub", "pace_for", "paces", "refresh_after",
           "send_tick"]
