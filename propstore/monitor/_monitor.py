"""The lag monitor: polls every node on a short interval and keeps the shard views current.

One coroutine per node, all on one event loop: in the caller's loop for
:class:`~propstore.AsyncPropertyStore`, or in a background thread for the sync store, so both
share this code. Each poll is one unnamed statement (so it runs behind any pooler) with a
hard deadline (``_wire``), and reports the server run that answered it (``proof``); an
unreachable node is reconnected by tenacity with jittered exponential backoff.
"""

from __future__ import annotations

import asyncio
import random
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import cast

import psycopg
import structlog
from psycopg import pq
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from propstore import _sql
from propstore._jitter import wait_jittered
from propstore._wire import DeadlineExceeded, Statement, execute_async
from propstore.config import Profile, Topology
from propstore.discovery import Leadership, PatroniSource
from propstore.lsn import LSN
from propstore.monitor._state import (
    Demand,
    NodeView,
    Observation,
    ShardView,
    apply_failure,
    apply_leadership,
    apply_observation,
    apply_repeat,
    apply_unanswered,
    initial_views,
    parse_hot_standby_settings,
    with_timelines,
)
from propstore.proof import ServerRun
from propstore.timeline import TimelineHistory, history_file_name

log = structlog.get_logger("propstore.monitor")

Clock = Callable[[], float]


class MonitorState:
    """The current :class:`ShardView` of every shard; written by the monitor (and by reads
    that time out), read lock-free by the router."""

    def __init__(self, topology: Topology, clock: Clock = time.monotonic) -> None:
        self.topology = topology
        self.clock = clock
        self._views = initial_views(topology.shards, clock())
        self._lock = threading.Lock()
        self._eligible: set[tuple[str, str]] = set()
        #: Timeline histories read per shard, by timeline (immutable files: read once).
        self._histories: list[dict[int, TimelineHistory]] = [{} for _ in topology.shards]
        self.polls = 0
        #: Called with the shard index after each change of a shard's view (under the
        #: state's lock: keep them short and never take this state's lock in them).
        self.listeners: list[Callable[[int], None]] = []
        #: What the store's reads ask of the monitor (how fresh its facts must arrive).
        self.demand = Demand()

    @property
    def views(self) -> tuple[ShardView, ...]:
        """Every shard's current view (an immutable snapshot)."""
        return self._views

    def view(self, shard_index: int) -> ShardView:
        """One shard's current view."""
        return self._views[shard_index]

    def observe(self, shard_index: int, node_index: int, obs: Observation) -> None:
        """Record a successful poll."""
        with self._lock:
            self.polls += 1
            old = self._views[shard_index]
            new = apply_observation(old, node_index, obs, self.topology.monitor.history_size,
                                    self._histories[shard_index])
            self._publish(old, new)

    def observe_again(self, shard_index: int, node_index: int, sent_at: float) -> bool:
        """Record a poll that repeated the node's last one (same values, sent at
        ``sent_at``): the same state as :meth:`observe` would give, cheaper (the host
        agent's stores get such polls of every primary at each of its sends, and of each
        replica now and then). False, and nothing recorded, when the cheap path does not
        apply (``_state.apply_repeat``)."""
        with self._lock:
            old = self._views[shard_index]
            new = apply_repeat(old, node_index, sent_at, self.topology.monitor.history_size)
            if new is None:
                return False
            self.polls += 1
            self._publish(old, new)
        return True

    def history_missing(self, shard_index: int, timeline: int | None) -> bool:
        """Whether a primary on ``timeline`` needs its history read (once per timeline)."""
        return timeline is not None and timeline > 1 and (
            timeline not in self._histories[shard_index]
        )

    def record_history(self, shard_index: int, history: TimelineHistory) -> None:
        """Record a timeline history read from a node (an unreadable one is recorded as
        unknown, so it is not asked for on every poll)."""
        with self._lock:
            known = self._histories[shard_index]
            known[history.timeline] = history
            while len(known) > 16:  # bounded: only the newest timelines matter
                del known[min(known)]
            old = self._views[shard_index]
            self._publish(old, with_timelines(old, history, self.clock()))

    def lead(self, shard_index: int, leadership: Leadership | None) -> list[int]:
        """Record the HA manager's answer (None: it did not answer). Returns the nodes to
        poll now: the named leader not yet observed as the primary, and a primary it no
        longer names (to see it stop or demote)."""
        with self._lock:
            old = self._views[shard_index]
            new = apply_leadership(old, leadership, self.clock(), self._histories[shard_index])
            if new is old:
                return []
            self._publish(old, new)
        if leadership is None or leadership.leader is None:
            return []
        return [i for i, node in enumerate(new.nodes)
                if (node.name == leadership.leader and new.primary is not node)
                or (node.role == "primary" and node.name != leadership.leader)]

    def history_wanted(self, shard_index: int, timeline: int | None) -> bool:
        """Whether a history of ``timeline`` would decide more than the one recorded (none
        yet, or one whose ancestry could not be read)."""
        if timeline is None or timeline <= 1:
            return False
        known = self._histories[shard_index].get(timeline)
        return known is None or not known.complete

    @property
    def silence_limit(self) -> float:
        """Seconds a node may leave a poll unanswered before it counts as down: as long as
        a connection attempt may take (``routing.connect_timeout``), and never less than
        ``failures_before_down`` poll timeouts. A shorter silence is *no new proof*, not a
        failure: on a starved machine an answering node is merely late (docs/architecture.md,
        "Slow is not down")."""
        settings = self.topology.monitor
        return max(settings.poll_timeout * settings.failures_before_down,
                   self.topology.routing.connect_timeout)

    def fail(self, shard_index: int, node_index: int, error: str, at: float | None = None
             ) -> None:
        """Record a failed poll or read of a node: an error, or a poll silent for
        :attr:`silence_limit` (at ``at``, default now: the host agent's failures carry the
        time its poll failed). A deadline merely missed is :meth:`unanswered`."""
        with self._lock:
            old = self._views[shard_index]
            threshold = self.topology.monitor.failures_before_down
            new = apply_failure(old, node_index, self.clock() if at is None else at, error,
                                threshold, self.silence_limit)
            self._publish(old, new)

    def unanswered(self, shard_index: int, node_index: int, error: str,
                   since: float | None = None) -> None:
        """Record that a node has not answered a poll sent at ``since`` (or a read) by its
        deadline: no new proof, not a failure (:func:`apply_unanswered`)."""
        with self._lock:
            old = self._views[shard_index]
            new = apply_unanswered(old, node_index, self.clock() if since is None else since,
                                   error)
            if new is not old:
                self._publish(old, new)

    def _publish(self, old: ShardView, new: ShardView) -> None:
        views = list(self._views)
        views[new.index] = new
        self._views = tuple(views)
        self._log_transitions(old, new)
        for listener in self.listeners:
            listener(new.index)

    def _log_transitions(self, old: ShardView, new: ShardView) -> None:
        if old.primary_index != new.primary_index:
            log.warning(
                "primary_changed", shard=new.name,
                old=old.nodes[old.primary_index].name if old.primary_index is not None else None,
                new=new.nodes[new.primary_index].name if new.primary_index is not None else None,
            )
        now = self.clock()
        for before, after in zip(old.nodes, new.nodes, strict=True):
            if before.state != after.state:
                event = log.warning if after.state in ("down", "wrong role", "foreign") else (
                    log.info
                )
                event(
                    "node_state_changed", shard=new.name, node=after.name,
                    address=after.config.address, old=before.state, new=after.state,
                    role=after.role, error=after.last_error,
                )
            self._log_eligibility(new, after, now)

    def _log_eligibility(self, view: ShardView, node: NodeView, now: float) -> None:
        if node.config.role != "replica" and node.role != "replica":
            return
        bound = view.staleness_bound(node, now)
        for profile in self.topology.profiles.values():
            key = (node.name, profile.name)
            eligible = bound <= profile.max_staleness
            if eligible != (key in self._eligible):
                (self._eligible.add if eligible else self._eligible.discard)(key)
                log.info(
                    "replica_eligibility_changed", shard=view.name, node=node.name,
                    profile=profile.name, eligible=eligible,
                    staleness_bound=None if bound == float("inf") else round(bound, 4),
                    max_staleness=profile.max_staleness,
                )

    def eligible_for(self, profile: Profile, shard_index: int) -> list[NodeView]:
        """Replicas of a shard whose proven bound is within the profile's budget now."""
        view = self._views[shard_index]
        now = self.clock()
        return [
            n for n in view.nodes
            if n.serves_replica_reads and view.staleness_bound(n, now) <= profile.max_staleness
        ]


def _lsn(value: bytes | None) -> LSN | None:
    return LSN.parse(value) if value else None


class LagMonitor:
    """Polls every node of a topology; start with :meth:`run` (async) or :meth:`start`."""

    #: What the servers see in ``pg_stat_activity.application_name`` for the polls.
    application_name = "propstore-monitor"

    def __init__(self, topology: Topology, state: MonitorState | None = None) -> None:
        self.topology = topology
        self.state = state or MonitorState(topology)
        self._thread: threading.Thread | None = None
        #: Set to cut a node's pause between polls short (the HA manager named a change).
        self._wake: dict[tuple[int, int], asyncio.Event] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._first_round: asyncio.Event | None = None

    # ------------------------------------------------------------------ async

    async def run(self) -> None:
        """Poll until cancelled."""
        self._first_round = asyncio.Event()
        await self._poll_all(self._round_tracker())

    def _round_tracker(self) -> Callable[[tuple[int, int]], None]:
        """A callback to call with ``(shard, node)`` after each poll (or failure) of a node;
        sets the first-round event once every node had one."""
        pending = {
            (s, n) for s, shard in enumerate(self.topology.shards)
            for n in range(len(shard.nodes))
        }

        def polled(key: tuple[int, int]) -> None:
            pending.discard(key)
            if not pending and self._first_round is not None:
                self._first_round.set()

        return polled

    async def _poll_all(self, polled: Callable[[tuple[int, int]], None]) -> None:
        """Poll every node until cancelled (this process's own monitoring)."""
        settings = self.topology.monitor
        keys = [(s, n) for s, shard in enumerate(self.topology.shards)
                for n in range(len(shard.nodes))]
        self._wake = {key: asyncio.Event() for key in keys}
        tasks = [
            asyncio.create_task(self._watch(s, n, polled), name=f"propstore-poll-{s}-{n}")
            for s, n in keys
        ] + [
            asyncio.create_task(self._discover(s, PatroniSource(shard, self.topology.discovery)),
                                name=f"propstore-discovery-{s}")
            for s, shard in enumerate(self.topology.shards) if shard.patroni_endpoints
        ]
        log.debug("monitor_started", nodes=len(tasks), interval=settings.interval)
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_first_round(self, timeout: float) -> bool:
        """Wait (bounded) until every node was polled or failed once."""
        deadline = time.monotonic() + timeout
        while self._first_round is None:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await self._first_round.wait()
            return True
        except TimeoutError:
            return False

    async def _connect(self, shard_index: int, node_index: int) -> psycopg.AsyncConnection[object]:
        node = self.topology.shards[shard_index].nodes[node_index]
        try:
            return await psycopg.AsyncConnection.connect(
                node.dsn, autocommit=True,
                connect_timeout=max(2, round(self.topology.routing.connect_timeout)),
                application_name=self.application_name,
            )
        except asyncio.CancelledError as exc:
            # Cancelled half-way (a store that joins its host's agent stops its own polls),
            # the half-open connection lives on in psycopg's frames, which this traceback
            # keeps in a cycle with tenacity's retry state: a backend idle on the server
            # until a full garbage collection (6 per server in the 64-process fleet run).
            # Dropped without it, the connection is closed now.
            raise exc.with_traceback(None) from None

    async def _watch(
        self, shard_index: int, node_index: int, polled: Callable[[tuple[int, int]], None]
    ) -> None:
        settings = self.topology.monitor
        clock = self.state.clock
        key = (shard_index, node_index)

        def failed_attempt(retry_state: RetryCallState) -> None:
            exc = retry_state.outcome.exception() if retry_state.outcome else None
            self.state.fail(shard_index, node_index, _describe(exc))
            polled(key)

        reconnect = AsyncRetrying(
            retry=retry_if_exception_type((psycopg.Error, OSError)),
            # Jitter of one interval spreads the reconnects (tenacity's default is 1 s, which
            # kept a restarted node unobserved for up to a second after it answered).
            wait=wait_jittered(multiplier=settings.interval, max=settings.max_backoff,
                               jitter=settings.interval),
            before_sleep=failed_attempt,
            reraise=True,
        )
        conn: psycopg.AsyncConnection[object] | None = None
        poll = [Statement(_sql.POLL)]
        jitter = random.Random()  # spreads polls; not for security
        try:
            while True:
                if conn is None or conn.closed:
                    conn = cast(
                        psycopg.AsyncConnection[object],
                        await reconnect(self._connect, shard_index, node_index),
                    )
                active = conn
                sent_at = clock()
                try:
                    result = await self._answer(active, poll, shard_index, node_index, sent_at,
                                                lambda: polled(key))
                except (DeadlineExceeded, psycopg.Error) as exc:
                    self.state.fail(shard_index, node_index, _describe(exc))
                    await active.close()
                    conn = None
                else:
                    row = [result.get_value(0, c) for c in range(13)]
                    timeline = int(row[7]) if row[7] else None
                    if row[0] != b"t" and self.state.history_missing(shard_index, timeline):
                        # Before the observation: a new primary's history decides which old
                        # samples and replicas still hold (read once per timeline).
                        assert timeline is not None
                        await self._read_history(active, shard_index, timeline)
                        if active.closed:
                            conn = None
                            continue
                    self.state.observe(shard_index, node_index, Observation(
                        sent_at=sent_at,
                        in_recovery=row[0] == b"t",
                        lsn=_lsn(row[1]),
                        receive_lsn=_lsn(row[2]),
                        replay_paused=row[3] == b"t",
                        receiver_streaming=row[4] == b"t",
                        system_id=int(row[5]) if row[5] else None,
                        hot_standby_settings=parse_hot_standby_settings(row[6]),
                        timeline=timeline,
                        run=ServerRun.from_row(tuple(row[8:12])),
                        pooler_seen=bool(row[12]) and int(row[12] or 0) != (
                            active.pgconn.backend_pid),
                    ))
                polled(key)
                # Jitter so that many processes do not poll a node in step.
                await self._pause(key, settings.interval * jitter.uniform(0.9, 1.1))
        finally:
            if conn is not None:
                await conn.close()

    async def _answer(
        self, conn: psycopg.AsyncConnection[object], poll: list[Statement], shard_index: int,
        node_index: int, sent_at: float, late: Callable[[], None],
    ) -> pq.abc.PGresult:
        """The poll's answer, however late within the silence limit.

        Past ``poll_timeout`` the node is recorded as unanswered (no new proof; ``late`` is
        called) and the poll is kept waiting rather than abandoned: a late answer is a true
        observation (its ``sent_at`` precedes it), on a starved machine it is the usual
        case, and abandoning it would only add a new backend's start to the load. Past
        :attr:`MonitorState.silence_limit` the poll fails (:class:`Silent`), unless the
        socket has something to read: then it is this process that ran late, not the node.
        """
        settings = self.topology.monitor
        started = time.monotonic()
        silence = self.state.silence_limit
        # execute_async's own deadline is only a backstop: the waits below decide.
        exchange = asyncio.ensure_future(
            execute_async(conn, poll, started + 2 * silence, named=False))
        try:
            done, _ = await asyncio.wait((exchange,), timeout=settings.poll_timeout)
            if not done:
                self.state.unanswered(
                    shard_index, node_index,
                    f"poll unanswered after {settings.poll_timeout * 1000:.0f} ms "
                    "(no new proof)", sent_at)
                late()
                remaining = started + silence - time.monotonic()
                if remaining > 0:
                    await asyncio.wait((exchange,), timeout=remaining)
                if not exchange.done() and _readable(conn):
                    await asyncio.wait((exchange,), timeout=settings.poll_timeout)
                if not exchange.done():
                    raise Silent(f"no answer for {time.monotonic() - started:.1f} s")
            (result,) = exchange.result()
            return result
        finally:
            if not exchange.done():
                exchange.cancel()  # the caller closes the connection it was using

    async def _pause(self, key: tuple[int, int], delay: float) -> None:
        wake = self._wake.get(key)
        if wake is None:
            await asyncio.sleep(delay)
            return
        # The timer sets the same event: no cancellation, no exception per poll.
        timer = asyncio.get_running_loop().call_later(delay, wake.set)
        try:
            await wake.wait()
        finally:
            timer.cancel()
            wake.clear()

    async def _discover(self, shard_index: int, source: PatroniSource) -> None:
        """Ask the shard's HA manager who leads: every ``discovery.interval`` while the
        leader it names is the observed primary, every ``fast_interval`` otherwise."""
        settings = self.topology.discovery
        while True:
            leadership: Leadership | None = None
            try:
                leadership = await source.leadership()
                for node_index in self.state.lead(shard_index, leadership):
                    self._wake[(shard_index, node_index)].set()
                if leadership is not None and self.state.history_wanted(
                    shard_index, leadership.timeline
                ):
                    history = await source.history(leadership)
                    if history is not None:
                        self.state.record_history(shard_index, history)
            except Exception:  # a source must never stop the polls: they alone decide then
                log.exception("discovery_failed", shard=self.topology.shards[shard_index].name)
                self.state.lead(shard_index, None)
            primary = self.state.view(shard_index).primary
            settled = leadership is not None and primary is not None and (
                primary.name == leadership.leader
            )
            await asyncio.sleep(settings.interval if settled else settings.fast_interval)

    async def _read_history(self, conn: psycopg.AsyncConnection[object], shard_index: int,
                            timeline: int) -> None:
        """Read ``pg_wal/<TLI>.history`` from the primary (once per timeline).

        ``pg_read_file`` needs superuser, ``pg_read_server_files`` or an EXECUTE grant
        (``docs/security.md``). Without it the history stays unknown: replicas still on an
        older timeline and tokens from one cannot be placed, and are refused rather than
        trusted (``WriteLostError`` needs the switch point to be proven).
        """
        shard = self.topology.shards[shard_index].name
        history = TimelineHistory.unknown(timeline)
        try:
            async with asyncio.timeout(self.topology.monitor.poll_timeout * 4):
                cur = await conn.execute(
                    "SELECT pg_read_file(%s, 0, 1048576, true)", (history_file_name(timeline),)
                )
                row = cast("tuple[object, ...] | None", await cur.fetchone())
            if row is not None and row[0] is not None:
                history = TimelineHistory.parse(timeline, str(row[0]))
            log.info("timeline_history_read", shard=shard, history=str(history))
        except (psycopg.Error, ValueError, TimeoutError) as exc:
            log.warning("timeline_history_unreadable", shard=shard, timeline=timeline,
                        error=_describe(exc))
            if isinstance(exc, TimeoutError):
                await conn.close()  # the exchange was interrupted: never reuse it
                return  # a timeout is not a refusal: ask again on the next poll
        self.state.record_history(shard_index, history)

    # ------------------------------------------------------------------ sync

    def start(self, wait_first_round: float = 2.0) -> None:
        """Run the monitor in a daemon thread (for sync callers); returns once every node was
        polled once or ``wait_first_round`` seconds passed."""
        if self._thread is not None:
            return
        ready: Future[None] = Future()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._task = loop.create_task(self.run())
            ready.set_result(None)
            try:
                loop.run_until_complete(self._task)
            except asyncio.CancelledError:
                pass
            finally:
                loop.close()

        self._thread = threading.Thread(target=main, name="propstore-monitor", daemon=True)
        self._thread.start()
        ready.result()
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(
            self.wait_first_round(wait_first_round), self._loop
        ).result()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the monitor thread started by :meth:`start` (its connections are closed)."""
        if self._thread is None or self._loop is None or self._task is None:
            return
        self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(timeout)
        self._thread = None


class Silent(DeadlineExceeded):
    """A node left a poll unanswered for the whole silence limit."""


def _readable(conn: psycopg.AsyncConnection[object]) -> bool:
    """Whether the connection's socket has bytes waiting (without reading them)."""
    try:
        ready, _, _ = select.select([conn.pgconn.socket], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return False
    return bool(ready)


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, Silent):
        return str(exc)
    if isinstance(exc, DeadlineExceeded):
        return "poll timed out"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
