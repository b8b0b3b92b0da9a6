"""What the monitor knows about every node, and the sound staleness arithmetic. No I/O.

The state is a tuple of immutable :class:`ShardView` values. The poller (one writer, under a
lock) replaces a shard's view after each poll; readers take the current view without
locking, so a read never waits on the monitor and always sees a consistent shard.

Staleness is bounded, not estimated. Each poll of a primary records ``(t_sent, P)``: the
clock *before* the poll was sent and the primary's flushed WAL position it returned. With
``synchronous_commit=on`` every write acknowledged before ``t_sent`` is at or below ``P``,
so a replica that has replayed ``R >= P`` holds all of them, and data read from it at time
``now`` is at most ``now - t_sent`` stale, for the latest such sample. An idle primary keeps
producing samples with the same ``P`` (bound stays small); a replica whose receiver is cut
stops at ``R`` while new samples pass it (the bound grows with the clock, never reads 0).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Literal

from propstore.config import NodeConfig, ShardConfig
from propstore.discovery import Leadership
from propstore.lsn import LSN
from propstore.proof import ServerRun, Sighting, add_sighting
from propstore.timeline import TimelineHistory

NodeRole = Literal["primary", "replica"]
#: Node states shown by ``propstore lag`` and logged on change.
#: ``paused``: replay paused on request (``pg_wal_replay_pause()``); ``paused (settings)``:
#: recovery paused by PostgreSQL itself because a hot-standby parameter is below the
#: primary's (the fix is a restart with a larger value, not a resume).
NodeStateName = Literal[
    "unknown", "up", "down", "paused", "paused (settings)", "receiver disconnected",
    "wrong role", "foreign", "other timeline",
]


@dataclass(frozen=True, slots=True)
class Observation:
    """One successful poll of a node."""

    sent_at: float
    in_recovery: bool
    #: The primary's flushed LSN, or the replica's replay LSN.
    lsn: LSN | None
    receive_lsn: LSN | None
    replay_paused: bool
    receiver_streaming: bool
    system_id: int | None = None
    #: max_connections, max_locks_per_transaction, max_prepared_transactions,
    #: max_wal_senders, max_worker_processes as the node runs with them (None: unknown).
    hot_standby_settings: tuple[int, ...] | None = None
    #: The timeline of the node's WAL (see ``_sql.POLL``); None if the server did not say.
    timeline: int | None = None
    #: The server run that answered the poll (None when it could not be read).
    run: ServerRun | None = None
    #: A pooler sits between the monitor and the server (BackendKeyData pid != backend pid).
    pooler_seen: bool = False


def parse_hot_standby_settings(value: bytes | None) -> tuple[int, ...] | None:
    """The poll's comma-separated hot-standby parameters (None when absent)."""
    if not value:
        return None
    try:
        return tuple(int(part) for part in value.split(b","))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class LagHistory:
    """Recent ``(t_sent, primary LSN)`` samples of one shard's primary, oldest first.

    Bounded (``maxlen``); a sample with the same LSN as the newest replaces it, since a later
    time with the same LSN is a strictly better bound. Both tuples are increasing. Dropping
    any sample keeps every bound sound (only looser), so old samples are thinned.
    """

    times: tuple[float, ...] = ()
    lsns: tuple[LSN, ...] = ()

    def record(self, sent_at: float, lsn: LSN, maxlen: int) -> LagHistory:
        """The history with a new sample appended (oldest dropped past ``maxlen``)."""
        if self.lsns and lsn < self.lsns[-1]:
            # LSNs never go back on one primary; a smaller one means a different server.
            return LagHistory((sent_at,), (lsn,))
        if self.lsns and lsn == self.lsns[-1]:
            return LagHistory((*self.times[:-1], sent_at), self.lsns)
        times, lsns = (*self.times, sent_at), (*self.lsns, lsn)
        if len(lsns) > maxlen:
            # Thin the older half (every other sample) rather than dropping the oldest: the
            # history then spans exponentially long with coarser old samples, so a replica
            # far behind still gets a (looser, still sound) bound instead of none.
            half = len(lsns) // 2
            times, lsns = times[:half:2] + times[half:], lsns[:half:2] + lsns[half:]
        return LagHistory(times, lsns)

    def covered_since(self, replay_lsn: LSN) -> float | None:
        """Latest ``t_sent`` whose sample LSN is <= ``replay_lsn``: every write acknowledged
        before that time is replayed. None when no sample is covered (unprovable)."""
        lsns = self.lsns
        if not lsns:
            return None
        if replay_lsn >= lsns[-1]:
            return self.times[-1]
        i = bisect.bisect_right(lsns, replay_lsn) - 1
        return self.times[i] if i >= 0 else None

    def bound(self, replay_lsn: LSN | None, at: float) -> float:
        """Proven staleness (seconds) of data at ``replay_lsn`` read at time ``at``."""
        if replay_lsn is None:
            return math.inf
        since = self.covered_since(replay_lsn)
        return math.inf if since is None else max(0.0, at - since)


@dataclass(frozen=True, slots=True)
class NodeView:
    """The monitor's latest knowledge of one node."""

    config: NodeConfig
    state: NodeStateName = "unknown"
    state_since: float = 0.0
    role: NodeRole | None = None
    lsn: LSN | None = None
    #: When the poll that observed :attr:`lsn` was sent (the observation holds for any
    #: connection opened before this time that is still alive: a restart ends them all).
    observed_at: float | None = None
    receive_lsn: LSN | None = None
    replay_paused: bool = False
    receiver_streaming: bool = False
    system_id: int | None = None
    hot_standby_settings: tuple[int, ...] | None = None
    timeline: int | None = None
    #: Seen as a primary, then in recovery: its WAL may hold writes no new primary has.
    demoted: bool = False
    #: Facts of recent polls, one per server run, newest first: a read reuses one only
    #: when ``proof.covers`` shows it runs on that run (several behind a load balancer).
    sightings: tuple[Sighting, ...] = ()
    #: The server run the latest poll reached, and whether a pooler stood in between.
    run: ServerRun | None = None
    pooler_seen: bool = False
    #: Failed polls (or reads) in a row: errors, and a poll that stayed silent too long.
    failures: int = 0
    last_error: str | None = None
    last_poll_at: float | None = None
    #: When the poll still unanswered past ``poll_timeout`` was sent (None: the last poll
    #: answered in time). Such a node brings no new proof, but is not down: its last
    #: observation keeps proving its growing bound, and a read can prove its own.
    unanswered_since: float | None = None

    @property
    def name(self) -> str:
        """The node's configured name."""
        return self.config.name

    @property
    def up(self) -> bool:
        """Reachable at the last poll and not marked down since."""
        return self.state not in ("unknown", "down")

    @property
    def serves_replica_reads(self) -> bool:
        """An up replica of this shard's primary (paused or disconnected ones still count:
        their bound grows and the budget decides); not one of another cluster or timeline."""
        return self.up and self.role == "replica" and self.state not in (
            "foreign", "other timeline"
        )


@dataclass(frozen=True, slots=True)
class ShardView:
    """One shard as the monitor sees it: nodes, the observed primary, its LSN history."""

    index: int
    config: ShardConfig
    nodes: tuple[NodeView, ...]
    history: LagHistory = LagHistory()
    #: Index into :attr:`nodes` of the observed primary, or None.
    primary_index: int | None = None
    #: The history of the observed primary's timeline (None before one was observed).
    timelines: TimelineHistory | None = None
    #: The HA manager's latest answer (None: no source, or it did not answer): a node it
    #: does not name as the running leader is never the primary.
    leadership: Leadership | None = None
    #: ``(system identifier, timeline)``: the newest timeline a node last seen as a primary
    #: writes on. A primary on an older one of the same cluster is an ex-leader still
    #: accepting writes after another was promoted (its HA agent hung): not the primary
    #: while the newer one may still be one (until it is seen in recovery).
    newest_primary: tuple[int | None, int] | None = None

    @property
    def name(self) -> str:
        """The shard's name."""
        return self.config.name

    @property
    def primary(self) -> NodeView | None:
        """The observed, reachable primary (None when there is none)."""
        if self.primary_index is None:
            return None
        node = self.nodes[self.primary_index]
        return node if node.up and self.admits(node) else None

    def admits(self, node: NodeView) -> bool:
        """Whether ``node`` may be the primary: its last poll said so and the HA manager
        (if one answers) names it as the running leader."""
        return node.role == "primary" and (
            self.leadership is None or self.leadership.admits(node.name)
        ) and not self._superseded(node)

    def _superseded(self, node: NodeView) -> bool:
        newest = self.newest_primary
        return newest is not None and node.timeline is not None and (
            node.system_id == newest[0] and node.timeline < newest[1]
        )

    def ruled_out(self, node: NodeView) -> bool:
        """Whether ``node`` is known not to be the primary (observed in recovery, or the HA
        manager says another member leads, or none does): nothing is sent to it as one."""
        return node.role == "replica" or (
            self.leadership is not None and not self.leadership.admits(node.name)
        ) or self._superseded(node)

    @property
    def primary_lsn(self) -> LSN | None:
        """The primary's newest sampled LSN."""
        return self.history.lsns[-1] if self.history.lsns else None

    def staleness_bound(self, node: NodeView, at: float) -> float:
        """Proven staleness of ``node``'s last observed data at time ``at`` (0 for the
        primary, ``inf`` when nothing can be proven)."""
        if node.role == "primary" and self.primary is node:
            return 0.0
        if not node.serves_replica_reads:
            return math.inf
        return self.history.bound(node.lsn, at)

    def on_history(self, timeline: int | None, lsn: LSN | None) -> bool:
        """Whether a replica's WAL up to ``lsn`` on ``timeline`` is provably a prefix of the
        observed primary's history (so its LSNs compare with the primary's samples)."""
        if self.timelines is None or timeline is None or lsn is None:
            return False
        return self.timelines.holds(timeline, lsn) is True

    def bytes_behind(self, node: NodeView) -> int | None:
        """Primary's newest sampled LSN minus the node's replay LSN (None if unknown)."""
        primary_lsn = self.primary_lsn
        if primary_lsn is None or node.lsn is None:
            return None
        return max(0, primary_lsn - node.lsn)


class Demand:
    """The tightest budget (seconds) the store's reads asked for since the monitor last
    took it (``Freshness.monitor_budget``, lowered by each read in ``read_program``):
    ``math.inf`` when none read, 0 for a read with a token (the replicas' newest LSNs
    decide it). A store that follows its host's agent asks it for facts only as often
    as this needs (``_hub.pace_for``). Written by the reading threads, taken by the
    monitor's; a note lost to a race slows one window's pace, and only liveness depends
    on the pace: a fact delivered later is an older fact, whose bound is larger."""

    __slots__ = ("tightest",)

    def __init__(self) -> None:
        self.tightest = math.inf

    def take(self) -> float:
        """The tightest budget since the last take (and start over)."""
        tightest, self.tightest = self.tightest, math.inf
        return tightest


def initial_views(shards: tuple[ShardConfig, ...], now: float) -> tuple[ShardView, ...]:
    """Views before the first poll: every node unknown, configured primary assumed."""
    return tuple(
        ShardView(
            index=i,
            config=shard,
            nodes=tuple(NodeView(config=node, state_since=now) for node in shard.nodes),
            primary_index=0,
        )
        for i, shard in enumerate(shards)
    )


def apply_observation(
    view: ShardView, node_index: int, obs: Observation, history_size: int,
    histories: Mapping[int, TimelineHistory] | None = None,
) -> ShardView:
    """The shard after a successful poll of one node (``histories``: the timeline histories
    read so far, by timeline)."""
    old = view.nodes[node_index]
    role: NodeRole = "replica" if obs.in_recovery else "primary"
    node = replace(
        old,
        role=role,
        lsn=obs.lsn,
        observed_at=obs.sent_at,
        receive_lsn=obs.receive_lsn,
        replay_paused=obs.replay_paused,
        receiver_streaming=obs.receiver_streaming,
        system_id=obs.system_id,
        hot_standby_settings=obs.hot_standby_settings,
        timeline=_timeline(old, role, obs.timeline),
        demoted=old.demoted or (old.role == "primary" and role == "replica"),
        sightings=old.sightings if obs.run is None else add_sighting(
            old.sightings, Sighting(obs.run, obs.sent_at, obs.in_recovery, obs.lsn)),
        run=obs.run,
        pooler_seen=obs.pooler_seen,
        failures=0,
        last_error=None,
        last_poll_at=obs.sent_at,
        unanswered_since=None,
    )
    nodes = list(view.nodes)
    nodes[node_index] = node
    view = replace(view, newest_primary=_newest_primary(nodes))
    primary_index = _choose_primary(view, nodes, node_index)
    return _with_primary(view, nodes, primary_index, node_index, obs, history_size, histories)


def apply_repeat(view: ShardView, node_index: int, at: float, history_size: int
                 ) -> ShardView | None:
    """The shard after a poll that repeated the node's last poll (same run, LSNs, flags,
    settings) at a later time ``at``: exactly what :func:`apply_observation` gives for that
    poll, without recomputing what equal values cannot change (the primary, the states,
    the timelines). For the shard's up primary: a later sample of the same LSN and a later
    sighting; for a replica while the shard has its up primary: a later sighting. None
    otherwise (use :func:`apply_observation`): a node with failures or an unanswered poll
    (the observation clears them), no primary (the poll may choose one)."""
    node = view.nodes[node_index]
    if node.lsn is None or node.observed_at is None or at <= node.observed_at or (
        node.failures or node.unanswered_since is not None
    ):
        return None
    primary = view.primary
    if node.role == "primary":
        if view.primary_index != node_index or primary is not node:
            return None
        history = view.history.record(at, node.lsn, history_size)
    elif node.role != "replica" or primary is None:
        return None
    else:
        # The primary stays (sticky while up), and the replica's state is a function of
        # values that did not change: nothing but the times moves.
        history = view.history
    sightings = node.sightings if node.run is None else add_sighting(
        node.sightings, Sighting(node.run, at, node.role == "replica", node.lsn))
    nodes = list(view.nodes)
    nodes[node_index] = replace(node, observed_at=at, last_poll_at=at, sightings=sightings)
    return replace(view, nodes=tuple(nodes), history=history)


def apply_leadership(view: ShardView, leadership: Leadership | None, at: float,
                     histories: Mapping[int, TimelineHistory] | None = None) -> ShardView:
    """The shard after the HA manager answered (or failed to: ``None``). A primary it does
    not name is dropped at once; the node it names becomes the primary only once its own
    poll says it is one (already said, or the next poll)."""
    if leadership == view.leadership:
        return view
    new = replace(view, leadership=leadership)
    nodes = list(new.nodes)
    current = new.primary_index
    if current is None or not new.admits(nodes[current]):
        for i, node in enumerate(nodes):
            if node.up and new.admits(node):
                current = i
                break
    if current != new.primary_index and current is not None:
        return restate(_with_primary(new, nodes, current, None, None, 0, histories), at)
    return restate(new, at)


def _with_primary(view: ShardView, nodes: list[NodeView], primary_index: int | None,
                  node_index: int | None, obs: Observation | None, history_size: int,
                  histories: Mapping[int, TimelineHistory] | None) -> ShardView:
    """The shard with ``primary_index`` chosen: its timeline history and samples carried
    over, and ``obs`` (the poll of ``node_index``) recorded as a sample if it is the
    primary's."""
    history = view.history
    primary = nodes[primary_index] if primary_index is not None else None
    timelines = view.timelines
    if primary is not None and primary.timeline is not None and (
        timelines is None or timelines.timeline != primary.timeline
    ):
        new_timelines = (histories or {}).get(primary.timeline) or TimelineHistory.unknown(
            primary.timeline
        )
        history = _carried(history, timelines, new_timelines)
        timelines = new_timelines
    elif primary is not None and primary_index != view.primary_index:
        history = LagHistory()  # another server's LSNs: old samples prove nothing here
    # With no primary observed the samples are kept: every write a later primary accepts
    # is acknowledged after the last sample was sent, so the growing bounds stay sound.
    if obs is not None and primary_index == node_index and obs.lsn is not None:
        history = history.record(obs.sent_at, obs.lsn, history_size)
    new = replace(view, nodes=tuple(nodes), history=history, primary_index=primary_index,
                  timelines=timelines)
    return new if obs is None else restate(new, obs.sent_at)


def with_timelines(view: ShardView, timelines: TimelineHistory, at: float) -> ShardView:
    """The shard once the history of its primary's timeline was read."""
    if view.timelines is None or view.timelines.timeline != timelines.timeline:
        return view
    return restate(replace(view, timelines=timelines), at)


def restate(view: ShardView, at: float) -> ShardView:
    """Every node's state recomputed against the shard's primary and timeline."""
    primary = view.nodes[view.primary_index] if view.primary_index is not None else None
    nodes = list(view.nodes)
    for i, candidate in enumerate(nodes):
        state = _state_of(candidate, primary, view)
        if state != candidate.state:
            nodes[i] = replace(candidate, state=state, state_since=at)
    return replace(view, nodes=tuple(nodes))


def apply_unanswered(view: ShardView, node_index: int, since: float, error: str
                     ) -> ShardView:
    """The shard while a poll of one node sent at ``since`` (or a read) is unanswered past
    its deadline: no new proof, and nothing else changes. The node's last observation still
    proves what it proved (its bound grows with the clock), a read on it still proves its
    own bound in its round trip, and the answer, if it comes, is an observation like any
    other. Only silence for longer (:func:`apply_failure`) or errors mark it down."""
    old = view.nodes[node_index]
    if old.unanswered_since is not None and old.last_error == error:
        return view
    since = since if old.unanswered_since is None else min(since, old.unanswered_since)
    nodes = list(view.nodes)
    nodes[node_index] = replace(old, unanswered_since=since, last_error=error)
    return replace(view, nodes=tuple(nodes))


def apply_failure(
    view: ShardView, node_index: int, at: float, error: str, failures_before_down: int,
    silence_limit: float = math.inf,
) -> ShardView:
    """The shard after a failed poll of one node: an error (refused, lost, a server error),
    or a poll unanswered for ``silence_limit``. Down after ``failures_before_down`` of them
    in a row, or at once when the node has answered nothing since ``silence_limit`` before
    ``at`` (its last observation's send time; every process that applies the same facts
    reaches the same verdict, the host agent's readers included)."""
    old = view.nodes[node_index]
    failures = old.failures + 1
    node = replace(old, failures=failures, last_error=error, last_poll_at=at)
    silent = old.observed_at is not None and at - old.observed_at >= silence_limit
    if (failures >= failures_before_down or silent) and old.state != "down":
        node = replace(node, state="down", state_since=at)
    nodes = list(view.nodes)
    nodes[node_index] = node
    return replace(view, nodes=tuple(nodes))


def _newest_primary(nodes: list[NodeView]) -> tuple[int | None, int] | None:
    """The newest timeline among nodes last seen as primaries (down ones included: they
    may come back as primaries), with its cluster's system identifier."""
    newest: tuple[int | None, int] | None = None
    for node in nodes:
        if node.role == "primary" and node.timeline is not None and (
            newest is None or node.timeline > newest[1]
        ):
            newest = (node.system_id, node.timeline)
    return newest


def _choose_primary(view: ShardView, nodes: list[NodeView], polled: int) -> int | None:
    """The shard's primary: sticky while it stays a reachable primary (that the HA manager,
    if it answers, names), else the first reachable node that says it is one."""
    current = view.primary_index
    polled_node = nodes[polled]
    if current is not None and current != polled and view.admits(nodes[current]) and (
        nodes[current].state != "down"
    ):
        return current
    if view.admits(polled_node):
        return polled
    if current == polled or (current is not None and not view.admits(nodes[current])):
        # The primary we knew is in recovery now (demoted or re-cloned), or the HA manager
        # says another member leads.
        for i, node in enumerate(nodes):
            if view.admits(node) and node.up:
                return i
        return current if current != polled or polled_node.role == "primary" else None
    return current


def _timeline(old: NodeView, role: NodeRole, observed: int | None) -> int | None:
    """A standby's timeline: the newest seen since its last failed poll. Its receiver's
    timeline is gone while the receiver is down, and the fallback (restartpoint) may be
    older; a standby never moves back to an older timeline within one server run, and any
    restart fails a poll in between (the poll connection ends)."""
    if observed is None or old.timeline is None or role != "replica" or old.role != role or (
        old.failures
    ):
        return observed
    return max(observed, old.timeline)


def _carried(history: LagHistory, old: TimelineHistory | None, new: TimelineHistory
             ) -> LagHistory:
    """The samples of the old primary's timeline that lie on the new primary's history (a
    switchover keeps them all; a lossy failover drops those past the switch point)."""
    if old is None or not history.lsns:
        return LagHistory()
    keep = [i for i, lsn in enumerate(history.lsns) if new.holds(old.timeline, lsn) is True]
    return LagHistory(tuple(history.times[i] for i in keep), tuple(history.lsns[i] for i in keep))


def _state_of(node: NodeView, primary: NodeView | None, view: ShardView) -> NodeStateName:
    if (node.state == "down" and node.failures > 0) or node.role is None:
        return node.state
    if node.role == "primary":
        return "up" if primary is node and view.admits(node) else "wrong role"
    if primary is not None and None not in (primary.system_id, node.system_id) and (
        primary.system_id != node.system_id
    ):
        return "foreign"  # a replica of some other cluster: its LSNs mean nothing here
    if (view.timelines is not None and not view.on_history(node.timeline, node.lsn)) or (
        node.demoted and (primary is None or primary.role != "primary")
    ):
        # A diverged ex-leader, or a replica not (yet) on the primary's timeline: its WAL is
        # not proven a prefix of the primary's, so equal LSNs may hold different data. An
        # ex-primary stays out until a new primary's history can place it.
        return "other timeline"
    if node.replay_paused:
        return "paused (settings)" if _below_primary(node, primary) else "paused"
    if not node.receiver_streaming:
        return "receiver disconnected"
    return "up"


def _below_primary(node: NodeView, primary: NodeView | None) -> bool:
    """A hot-standby parameter of ``node`` is below the primary's: what PostgreSQL 14+
    pauses recovery for (the primary's current value is what its WAL requires once it
    restarted with it; pg_control holds the exact figure but SQL does not expose it)."""
    mine = node.hot_standby_settings
    theirs = primary.hot_standby_settings if primary is not None else None
    if mine is None or theirs is None or len(mine) != len(theirs):
        return False
    return any(have < needed for have, needed in zip(mine, theirs, strict=True))
