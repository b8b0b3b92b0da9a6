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
    Counts,
    Failed,
    Hello,
    HistoryRead,
    Join,
    Led,
    Message,
    Polled,
    decode_request,
    encode,
)

log = structlog.get_logger("propstore.agent")

#: Polls (and failures) kept per node for a reader that joins: it starts from the same
#: recent facts as one that was there all along (bounded: memory stays flat).
RECENT_PER_NODE = 64
#: A reader whose unsent backlog passes this many bytes is not reading (stopped, or its
#: process is stuck): it is dropped, and polls for itself until it joins again.
MAX_BACKLOG = 1 << 20
#: Groups of stores the agent sends to in turn, each once per tick at its own phase of it,
#: so that a fleet's processes do not all wake at the same instant.
SEND_GROUPS = 8


def send_tick(interval: float) -> float:
    """Seconds between the agent's sends to each store: half a poll interval (at most
    50 ms), so a store wakes a few times per interval whatever the number of nodes, and a
    fact waits at most that long on its way (its bound is that much larger)."""
    return min(0.05, interval / 2)


#: Seconds a client has to say what it wants, and a status request to be sent.
HANDSHAKE = 5.0
#: Longest line a client may send (a store's counters: bounded by ``MAX_COUNTS``).
READ_LIMIT = 1 << 16


class Hub:
    """The stores connected to this agent, what a new one is told first, and the status
    requests it answers."""

    def __init__(self, nodes: int, tally: RefusalTally,
                 status: Callable[[], AgentStatus] | None = None, tick: float = 0.0) -> None:
        self._recent: deque[bytes] = deque(maxlen=RECENT_PER_NODE * max(1, nodes))
        self._histories: dict[tuple[int, int], bytes] = {}
        #: Per shard, the HA manager's latest answer (a joiner gets it before the polls).
        self._leads: dict[int, bytes] = {}
        #: Connected stores and their pids (``SO_PEERCRED``: the kernel's word, 0 if unknown).
        self._readers: dict[asyncio.StreamWriter, int] = {}
        #: Each reader's send group, and per group its members, the lines not yet sent to
        #: it and whether its send is scheduled.
        self._group_of: dict[asyncio.StreamWriter, int] = {}
        self._groups: list[set[asyncio.StreamWriter]] = [set() for _ in range(SEND_GROUPS)]
        self._pending: list[list[bytes]] = [[] for _ in range(SEND_GROUPS)]
        self._scheduled = [False] * SEND_GROUPS
        #: Seconds between two sends to a store (0: every event-loop turn), and when the
        #: last send to any store went (monotonic).
        self.tick = tick
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
        elif isinstance(message, Led):
            self._leads[message.shard] = line
        if not self._readers:
            return
        loop: asyncio.AbstractEventLoop | None = None
        for group, members in enumerate(self._groups):
            if not members:
                continue
            self._pending[group].append(line)
            if self._scheduled[group]:
                continue
            self._scheduled[group] = True
            loop = loop or asyncio.get_running_loop()
            if self.tick <= 0:
                loop.call_soon(self._flush, group)
                continue
            # One send per tick and group, each group at its own phase of the tick: a store
            # wakes once for what a tick's polls found, not once per poll, and the fleet's
            # stores wake a group at a time, not all at once (a fact sent late is an old
            # fact: its bound only grows, by a tick at most).
            phase = self.tick * group / SEND_GROUPS
            now = loop.time()
            loop.call_at(now + self.tick - (now - phase) % self.tick, self._flush, group)

    def _flush(self, group: int) -> None:
        self._scheduled[group] = False
        self.sent_at = time.monotonic()
        data = b"".join(self._pending[group])
        self._pending[group].clear()
        for writer in list(self._groups[group]):
            if writer.transport.get_write_buffer_size() > MAX_BACKLOG:
                self.dropped += 1
                log.warning("agent_reader_dropped", pid=self._readers.get(writer),
                            backlog=writer.transport.get_write_buffer_size())
                self._leave(writer)
                writer.close()
            else:
                writer.write(data)

    def _join(self, writer: asyncio.StreamWriter) -> None:
        group = min(range(SEND_GROUPS), key=lambda g: len(self._groups[g]))
        self._groups[group].add(writer)
        self._group_of[writer] = group
        self._readers[writer] = _peer_pid(writer)

    def _leave(self, writer: asyncio.StreamWriter) -> None:
        self._readers.pop(writer, None)
        group = self._group_of.pop(writer, None)
        if group is not None:
            self._groups[group].discard(writer)
            if not self._groups[group]:
                self._pending[group].clear()
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


__all__ = ["HANDSHAKE", "MAX_BACKLOG", "READ_LIMIT", "RECENT_PER_NODE", "SEND_GROUPS", "Hub",
           "send_tick"]
