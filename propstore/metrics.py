"""Prometheus metrics for one store: node lag from its monitor, routing counters, latency.

    from propstore.metrics import StoreMetrics
    metrics = StoreMetrics(store)              # a CollectorRegistry of its own
    server = metrics.serve(9187)               # http://127.0.0.1:9187/metrics
    ...
    server.close()

Node gauges are computed at scrape time from the monitor's current views (through
:func:`~propstore.monitor.lag_report`, the same figures as ``propstore lag``); read counters
and latency histograms are fed by an observer on the store. Nothing is registered in
prometheus_client's global registry, so several stores (and tests) never collide.
The metric names are listed in :data:`METRIC_NAMES` and documented in ``docs/operating.md``.

:class:`AgentMetrics` does the same for the host's lag agent (``propstore agent run
--metrics-port``): the node gauges from the agent's own polls, its counters per node, the
stores it serves and the refusals they reported (:data:`AGENT_METRIC_NAMES`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from propstore._limiter import LimiterState
from propstore.config import Topology
from propstore.monitor import LagMonitor, LagReport, ShardView, lag_report
from propstore.monitor._state import NodeStateName
from propstore.store import ReadObserver, ReadResult, ReadStats

if TYPE_CHECKING:
    from propstore.monitor._agent import Agent

#: Every state a node can be in (the ``state`` label of ``propstore_node_state``).
NODE_STATES: tuple[NodeStateName, ...] = (
    "unknown", "up", "down", "paused", "paused (settings)", "receiver disconnected",
    "wrong role", "foreign",
)

#: Latency buckets (seconds): a replica read is abandoned after tens of milliseconds, a
#: primary read may take up to its deadline.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

#: The metric names exported (samples add ``_total``, ``_bucket``, ``_sum``, ``_count``).
METRIC_NAMES = (
    "propstore_node_up",
    "propstore_node_primary",
    "propstore_node_state",
    "propstore_node_state_seconds",
    "propstore_node_lsn_bytes",
    "propstore_node_bytes_behind",
    "propstore_node_staleness_bound_seconds",
    "propstore_node_receive_replay_gap_bytes",
    "propstore_node_eligible",
    "propstore_shard_primary_lsn_bytes",
    "propstore_reads",
    "propstore_reads_outside_budget",
    "propstore_read_duration_seconds",
    "propstore_writes",
    "propstore_reads_refused",
    "propstore_reads_waited",
    "propstore_primary_fallback_limit",
    "propstore_primary_fallback_in_flight",
    "propstore_primary_fallback_queued",
    "propstore_primary_latency_seconds",
)

#: The host agent's metrics (``AgentMetrics``), beside the node gauges of its own polls.
AGENT_METRIC_NAMES = (
    "propstore_agent_stores",
    "propstore_agent_stores_joined",
    "propstore_agent_stores_dropped",
    "propstore_agent_polls",
    "propstore_agent_poll_failures",
    "propstore_agent_last_poll_age_seconds",
    "propstore_agent_polls_per_second",
    "propstore_agent_rss_bytes",
    "propstore_agent_uptime_seconds",
    "propstore_agent_healthy",
    "propstore_agent_reads_refused",
    "propstore_agent_patroni_answers",
    "propstore_agent_patroni_misses",
    "propstore_agent_patroni_answer_age_seconds",
)


class MetricsSource(Protocol):
    """What :class:`StoreMetrics` needs of a store (``PropertyStore`` has all of it)."""

    topology: Topology
    monitor: LagMonitor

    @property
    def stats(self) -> ReadStats: ...

    def shard_views(self) -> tuple[ShardView, ...]: ...

    def fallback_states(self) -> Mapping[str, LimiterState]: ...

    def add_observer(self, observer: ReadObserver) -> None: ...

    def remove_observer(self, observer: ReadObserver) -> None: ...


class _MonitorCollector(Collector):
    """Node and shard gauges, read from the store's monitor at every scrape."""

    def __init__(self, source: MetricsSource, clock: Callable[[], float]) -> None:
        self._source = source
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        report = lag_report(self._source.shard_views(), self._source.topology.profiles,
                            self._clock())
        yield from _node_metrics(report)
        primary = GaugeMetricFamily(
            "propstore_shard_primary_lsn_bytes",
            "Newest flushed WAL position (bytes) sampled from the shard's primary.",
            labels=["shard"],
        )
        for view in self._source.shard_views():
            if view.primary_lsn is not None:
                primary.add_metric([view.name], float(view.primary_lsn))
        yield primary
        writes = CounterMetricFamily(
            "propstore_writes", "Writes acknowledged, by shard.", labels=["shard"]
        )
        for shard, count in dict(self._source.stats.writes).items():
            writes.add_metric([shard], float(count))
        yield writes
        yield from _degrade_metrics(self._source.stats, self._source.fallback_states())


def _degrade_metrics(stats: ReadStats, states: Mapping[str, LimiterState]) -> Iterator[Metric]:
    refused = CounterMetricFamily(
        "propstore_reads_refused",
        "StaleReadError raised, by shard, profile (token/max_staleness for reads without "
        "one) and why the primary declined (primary_overloaded, fallback_ceiling).",
        labels=["shard", "profile", "reason"],
    )
    for (shard, profile, reason), count in dict(stats.refusals).items():
        refused.add_metric([shard, profile, reason], float(count))
    waited = CounterMetricFamily(
        "propstore_reads_waited", "Reads answered after waiting under Degrade.wait.",
        labels=["shard", "profile"],
    )
    for (shard, profile), count in dict(stats.waits).items():
        waited.add_metric([shard, profile], float(count))
    limit = GaugeMetricFamily(
        "propstore_primary_fallback_limit",
        "Fallback reads allowed in flight on the shard's primary now (+Inf: no limit).",
        labels=["shard"],
    )
    in_flight = GaugeMetricFamily(
        "propstore_primary_fallback_in_flight", "Fallback reads on the shard's primary now.",
        labels=["shard"],
    )
    queued = GaugeMetricFamily(
        "propstore_primary_fallback_queued",
        "Budgeted fallback reads queued for their turn on the shard's primary now.",
        labels=["shard"],
    )
    latency = GaugeMetricFamily(
        "propstore_primary_latency_seconds",
        "The primary's smoothed fallback read latency: recent, and normal (the baseline).",
        labels=["shard", "figure"],
    )
    for shard, state in states.items():
        limit.add_metric([shard], state.limit)
        in_flight.add_metric([shard], float(state.in_flight))
        queued.add_metric([shard], float(state.queued))
        if state.recent is not None and state.baseline is not None:
            latency.add_metric([shard, "recent"], state.recent)
            latency.add_metric([shard, "normal"], state.baseline)
    yield from (refused, waited, limit, in_flight, queued, latency)


def _node_metrics(report: LagReport) -> Iterator[Metric]:
    labels = ["shard", "node"]
    up = GaugeMetricFamily("propstore_node_up", "1 if the node answered its last poll.",
                           labels=labels)
    primary = GaugeMetricFamily(
        "propstore_node_primary", "1 if the node is the shard's observed primary.",
        labels=labels,
    )
    state = GaugeMetricFamily(
        "propstore_node_state", "1 for the node's current state, 0 for the others.",
        labels=[*labels, "state"],
    )
    state_seconds = GaugeMetricFamily(
        "propstore_node_state_seconds", "Seconds the node has been in its current state.",
        labels=labels,
    )
    lsn = GaugeMetricFamily(
        "propstore_node_lsn_bytes",
        "Replay LSN of a replica, flushed LSN of the primary, as a byte position.",
        labels=labels,
    )
    behind = GaugeMetricFamily(
        "propstore_node_bytes_behind",
        "Bytes between the primary's newest sampled LSN and the node's replay LSN.",
        labels=labels,
    )
    bound = GaugeMetricFamily(
        "propstore_node_staleness_bound_seconds",
        "Proven upper bound on how stale the node's data is (+Inf when unprovable).",
        labels=labels,
    )
    gap = GaugeMetricFamily(
        "propstore_node_receive_replay_gap_bytes",
        "WAL a replica has received but not replayed yet.",
        labels=labels,
    )
    eligible = GaugeMetricFamily(
        "propstore_node_eligible",
        "1 if the replica may serve the profile's reads now (bound within its budget).",
        labels=[*labels, "profile"],
    )
    for row in report.rows:
        key = [row.shard, row.node]
        up.add_metric(key, 1.0 if row.state not in ("unknown", "down") else 0.0)
        primary.add_metric(key, 1.0 if row.is_primary else 0.0)
        for name in NODE_STATES:
            state.add_metric([*key, name], 1.0 if row.state == name else 0.0)
        state_seconds.add_metric(key, row.state_seconds)
        if row.lsn is not None:
            lsn.add_metric(key, float(row.lsn))
        if row.bytes_behind is not None:
            behind.add_metric(key, float(row.bytes_behind))
        if row.role is not None:
            bound.add_metric(key, row.staleness_bound)
        if row.receive_replay_gap is not None:
            gap.add_metric(key, float(row.receive_replay_gap))
        for profile, ok in row.eligible.items():
            eligible.add_metric([*key, profile], 1.0 if ok else 0.0)
    yield from (up, primary, state, state_seconds, lsn, behind, bound, gap, eligible)


@dataclass
class MetricsServer:
    """A running ``/metrics`` HTTP endpoint (a daemon thread); :meth:`close` stops it."""

    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    @property
    def url(self) -> str:
        """Where the metrics are served."""
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class StoreMetrics:
    """Prometheus metrics of one store, in a registry of their own.

    Args:
        store: a :class:`~propstore.PropertyStore` (anything with ``topology``, ``stats``,
            ``shard_views()`` and ``add_observer()``).
        registry: where to register; a new :class:`CollectorRegistry` when None.
        clock: the monitor's clock (seconds); default the store's ``monitor.state.clock``.

    Reads are counted from the moment this object is created (by an observer on the store);
    writes come from the store's own counters.
    """

    def __init__(self, store: MetricsSource, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        if clock is None:
            clock = store.monitor.state.clock
        self.reads = Counter(
            "propstore_reads", "Reads served, by shard, who served them (replica or "
            "primary) and why the primary did (fresh when a replica served in budget).",
            ["shard", "served_by", "reason"], registry=self.registry,
        )
        self.outside_budget = Counter(
            "propstore_reads_outside_budget",
            "Reads a stale replica served (Degrade.serve_stale) when the primary shed them.",
            ["shard"], registry=self.registry,
        )
        self.latency = Histogram(
            "propstore_read_duration_seconds", "Read latency as the caller saw it (seconds).",
            ["shard", "served_by"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.registry.register(_MonitorCollector(store, clock))
        self._store = store
        store.add_observer(self._observe)

    def _observe(self, result: ReadResult, seconds: float) -> None:
        served = "replica" if result.from_replica else "primary"
        self.reads.labels(result.shard, served, result.fallback_reason or "fresh").inc()
        self.latency.labels(result.shard, served).observe(seconds)
        if not result.within_budget:
            self.outside_budget.labels(result.shard).inc()

    def serve(self, port: int = 9187, host: str = "127.0.0.1") -> MetricsServer:
        """Serve ``/metrics`` over HTTP from a daemon thread (``port=0``: any free port)."""
        server, thread = start_http_server(port, host, registry=self.registry)
        return MetricsServer(host, server.server_port, server, thread)

    def close(self) -> None:
        """Stop counting reads."""
        self._store.remove_observer(self._observe)


class _AgentCollector(Collector):
    """The agent's figures, read on its own event loop at every scrape (its state belongs
    to that loop's thread)."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def collect(self) -> Iterator[Metric]:
        agent = self._agent
        status, views, now = agent.snapshot()
        yield from _node_metrics(lag_report(views, agent.topology.profiles, now))
        labels = ["shard", "node"]
        polls = CounterMetricFamily("propstore_agent_polls",
                                    "Successful polls of the node by the host agent.",
                                    labels=labels)
        failures = CounterMetricFamily("propstore_agent_poll_failures",
                                       "Failed polls of the node by the host agent.",
                                       labels=labels)
        age = GaugeMetricFamily("propstore_agent_last_poll_age_seconds",
                                "Seconds since the agent's latest poll of the node (+Inf: "
                                "never).", labels=labels)
        rate = GaugeMetricFamily("propstore_agent_polls_per_second",
                                 "The agent's recent poll rate of the node.", labels=labels)
        for node in status.nodes:
            key = [node.shard, node.node]
            polls.add_metric(key, float(node.polls))
            failures.add_metric(key, float(node.failures))
            age.add_metric(key, float("inf") if node.last_poll_age_seconds is None
                           else node.last_poll_age_seconds)
            rate.add_metric(key, node.polls_per_second)
        yield from (polls, failures, age, rate)
        yield GaugeMetricFamily("propstore_agent_stores", "Stores connected to the agent now.",
                                value=len(status.stores))
        yield CounterMetricFamily("propstore_agent_stores_joined",
                                  "Stores that joined the agent since it started.",
                                  value=status.stores_total)
        yield CounterMetricFamily("propstore_agent_stores_dropped",
                                  "Stores dropped for not reading (1 MiB backlog).",
                                  value=status.stores_dropped)
        yield GaugeMetricFamily("propstore_agent_rss_bytes", "The agent's resident memory.",
                                value=status.rss_bytes)
        yield GaugeMetricFamily("propstore_agent_uptime_seconds",
                                "Seconds since the agent started.", value=status.uptime_seconds)
        yield GaugeMetricFamily("propstore_agent_healthy",
                                "1 while the agent polls every node on time.",
                                value=1.0 if status.healthy else 0.0)
        refused = CounterMetricFamily(
            "propstore_agent_reads_refused",
            "StaleReadError raised by the host's stores of this topology (their reports, "
            "stores that left included), by shard, profile and reason.",
            labels=["shard", "profile", "reason"])
        for shard, profiles in status.refusals.items():
            for profile, reasons in profiles.items():
                for reason, count in reasons.items():
                    refused.add_metric([shard, profile, reason], float(count))
        yield refused
        answers = CounterMetricFamily(
            "propstore_agent_patroni_answers",
            "Patroni GET /cluster answers the agent forwarded to its stores, by shard.",
            labels=["shard"])
        misses = CounterMetricFamily(
            "propstore_agent_patroni_misses",
            "The agent's asks of a shard's Patroni that no endpoint answered.",
            labels=["shard"])
        asked = GaugeMetricFamily(
            "propstore_agent_patroni_answer_age_seconds",
            "Seconds since the agent's latest ask of the shard's Patroni was sent (+Inf: "
            "never); past its limit the stores ask Patroni themselves.", labels=["shard"])
        for lead in status.leaders:
            answers.add_metric([lead.shard], float(lead.answers))
            misses.add_metric([lead.shard], float(lead.misses))
            asked.add_metric([lead.shard], float("inf") if lead.last_answer_age_seconds is None
                             else lead.last_answer_age_seconds)
        yield from (answers, misses, asked)


class AgentMetrics:
    """Prometheus metrics of a host agent run in this process (``propstore agent run
    --metrics-port``), in a registry of their own."""

    def __init__(self, agent: Agent, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.registry.register(_AgentCollector(agent))

    def serve(self, port: int = 9188, host: str = "127.0.0.1") -> MetricsServer:
        """Serve ``/metrics`` over HTTP from a daemon thread (``port=0``: any free port)."""
        server, thread = start_http_server(port, host, registry=self.registry)
        return MetricsServer(host, server.server_port, server, thread)


__all__ = ["AGENT_METRIC_NAMES", "LATENCY_BUCKETS", "METRIC_NAMES", "NODE_STATES",
           "AgentMetrics", "MetricsServer", "StoreMetrics"]
