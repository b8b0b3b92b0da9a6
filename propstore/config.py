"""The topology: shards, their nodes, the bucket map, monitor and routing settings, profiles.

Loaded from a TOML file (format in ``docs/config.md``) with a few environment overrides.
Every problem is a :class:`~propstore.errors.ConfigError` that names the key at fault.
Reachability is *not* checked here: a store starts with unreachable nodes marked down.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from propstore import _conninfo
from propstore._connections import ConnectionBudget
from propstore._durations import parse_duration
from propstore._limiter import LimiterSettings
from propstore.degrade import Degrade
from propstore.errors import ConfigError, InvalidInputError
from propstore.freshness import Freshness
from propstore.proof import VIA_CHOICES, Via
from propstore.sharding import DEFAULT_BUCKET_COUNT, BucketMap, BucketRange, bucket_of

OnStale = Literal["error", "serve"]
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,63}$")
_URL_RE = re.compile(r"^https?://[^/\s:]+(:[0-9]{1,5})?/?$")


def redact_dsn(dsn: str) -> str:
    """The DSN with any password removed (safe for logs, errors and output)."""
    try:
        params = _conninfo.parse(dsn)
    except _conninfo.DsnSyntaxError:
        return "<unparsable dsn>"
    params.pop("password", None)
    return _conninfo.make(params)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """One PostgreSQL server: its name, connection string and the role the file expects.

    ``via`` says how the DSN reaches the server (``auto``, ``direct``, ``session_pooler``,
    ``transaction_pooler`` or ``load_balancer``; see docs/deployment.md): it decides which
    proofs a read on this node may reuse. ``pooler_tracks_prepared``: the transaction pooler
    in front tracks protocol-level prepared statements (PgBouncer >= 1.21 with
    ``max_prepared_statements`` > 0), so reads send named statements there (still verified
    per read; docs/deployment.md). ``patroni`` is the member's Patroni REST API
    (``http://host:8008``), when an HA manager says who leads (``propstore.discovery``).
    A shard given as ``members`` has no fixed roles: the first member's ``role`` is only
    the starting guess until the monitor (and the source) observe the roles.
    """

    name: str
    dsn: str = field(repr=False)
    role: Literal["primary", "replica"]
    via: Via = "auto"
    patroni: str | None = None
    pooler_tracks_prepared: bool = False

    @property
    def address(self) -> str:
        """``host:port`` for display."""
        params = _conninfo.parse(self.dsn)
        return f"{params.get('host') or 'localhost'}:{params.get('port') or 5432}"

    @property
    def safe_dsn(self) -> str:
        """The DSN without its password."""
        return redact_dsn(self.dsn)


@dataclass(frozen=True, slots=True)
class ShardConfig:
    """A shard: the buckets it owns, its primary and its replicas (as configured)."""

    name: str
    buckets: tuple[BucketRange, ...]
    primary: NodeConfig
    replicas: tuple[NodeConfig, ...]

    @property
    def nodes(self) -> tuple[NodeConfig, ...]:
        """Primary first, then replicas."""
        return (self.primary, *self.replicas)

    @property
    def bucket_total(self) -> int:
        """How many buckets this shard owns."""
        return sum(len(r) for r in self.buckets)

    @property
    def patroni_endpoints(self) -> tuple[str, ...]:
        """The Patroni REST endpoints of the shard's members (empty: no HA source)."""
        return tuple(node.patroni for node in self.nodes if node.patroni)


@dataclass(frozen=True, slots=True)
class Profile:
    """A named reader profile: its freshness budget and how its reads degrade when neither
    a replica nor the primary can serve them (``degrade``, or the older ``on_stale``)."""

    name: str
    max_staleness: float
    on_stale: OnStale | None = None
    degrade: Degrade | None = None

    @property
    def policy(self) -> Degrade | None:
        """The profile's degrade policy (``on_stale`` mapped onto one), None if unset."""
        if self.degrade is not None:
            return self.degrade
        return None if self.on_stale is None else Degrade.from_on_stale(self.on_stale)

    @property
    def freshness(self) -> Freshness:
        """The profile's budget as a :class:`Freshness`."""
        return Freshness(max_staleness=self.max_staleness, label=self.name)


#: How a store's lag monitoring is shared (``[monitor] sharing``): ``host`` = the stores of
#: every process on this host that use the same topology share one monitor (a per-host agent
#: polls, the others read its observations; see docs/architecture.md, "Fleets"); ``off`` =
#: every store polls every node itself.
Sharing = Literal["host", "off"]
SHARING_CHOICES: tuple[Sharing, ...] = ("host", "off")


@dataclass(frozen=True, slots=True)
class MonitorSettings:
    """How the lag monitor polls (seconds), and whether processes on a host share it."""

    interval: float = 0.1
    poll_timeout: float = 0.25
    history_size: int = 256
    #: A node is marked down after this many failed polls in a row.
    failures_before_down: int = 2
    #: Longest pause between rechecks of a down node (exponential backoff up to this).
    max_backoff: float = 2.0
    #: ``host`` (default): share one monitor among the processes on this host that use the
    #: same topology; ``off``: this store polls every node itself.
    sharing: Sharing = "host"

    def __post_init__(self) -> None:
        _sharing(self.sharing, "monitor.sharing")


def _sharing(value: object, key: str) -> Sharing:
    """``value`` as a :data:`Sharing` choice; a clear :class:`ConfigError` otherwise."""
    if value not in SHARING_CHOICES:
        raise ConfigError(
            f"{key} = {value!r} is not one of {', '.join(repr(c) for c in SHARING_CHOICES)} "
            '("host": the processes on this host that use this topology share one lag '
            'monitor; "off": each store polls every node itself)'
        )
    return value


@dataclass(frozen=True, slots=True)
class DiscoverySettings:
    """How an HA manager source (Patroni's REST API) is asked who leads (seconds)."""

    #: Between two answers while the leader is stable.
    interval: float = 1.0
    #: Between two asks while no running leader is known or it changed (a failover).
    fast_interval: float = 0.2
    #: Longest wait for one endpoint's answer (then the next endpoint is asked).
    timeout: float = 1.0


@dataclass(frozen=True, slots=True)
class RoutingSettings:
    """How reads and writes are routed (seconds unless stated)."""

    replica_deadline: float = 0.05
    primary_deadline: float = 2.0
    #: A fixed ceiling on fallback reads per second per shard primary; 0 means none (the
    #: adaptive limit below protects the primary by its measured latency instead).
    primary_fallback_rate: float = 0.0
    #: Adapt the fallback limit to the primary's measured latency (see ``_limiter``).
    primary_fallback_adaptive: bool = True
    #: A fixed ceiling on fallback reads in flight per shard primary; 0 means none.
    primary_fallback_max_concurrency: int = 0
    #: Latency above this multiple of the primary's normal latency counts as overload.
    primary_latency_tolerance: float = 5.0
    on_stale: OnStale = "error"
    #: The default degrade policy (overrides ``on_stale`` when set).
    degrade: Degrade | None = None
    connect_timeout: float = 2.0
    pool_min_size: int = 1
    pool_max_size: int = 8
    #: The most connections one store holds to all servers together, monitor included
    #: (0: the default, 64 or 2 per node if more); see ``Topology.connections``.
    connection_budget: int = 0
    #: Total time a write may spend retrying while a shard's primary is unreachable.
    write_retry_time: float = 3.0
    #: Total time a write may keep waiting while the monitor observes *no* primary (a
    #: failover under way): it is tried on the new primary as soon as one is observed.
    #: Below ``write_retry_time`` (the default 0), failovers get ``write_retry_time``.
    write_failover_time: float = 0.0

    @property
    def policy(self) -> Degrade:
        """The default degrade policy: ``degrade``, else ``on_stale`` mapped onto one."""
        return self.degrade if self.degrade is not None else Degrade.from_on_stale(self.on_stale)

    @property
    def limiter(self) -> LimiterSettings:
        """The settings of each shard primary's fallback limiter."""
        return LimiterSettings(
            adaptive=self.primary_fallback_adaptive,
            max_concurrency=self.primary_fallback_max_concurrency,
            tolerance=self.primary_latency_tolerance,
            # Up to a pool's worth of reads in flight, none waits for a connection: slow
            # answers then are the primary's (or the machine's) business, and shedding this
            # process's few reads would not relieve it. Two pools' worth queued is a backlog
            # (tools/ surge on a CPU-starved client shed at one pool's worth: see RESULTS).
            min_queue=2 * self.pool_max_size,
            # More reads in flight than connections: some waited for one, so their latency
            # holds our own queue, not the primary's normal latency.
            baseline_in_flight=self.pool_max_size,
        )


_TOP_KEYS = {
    "bucket_count", "default_profile", "monitor", "routing", "profiles", "shards", "discovery",
}
_SHARD_KEYS = {"name", "buckets", "primary", "replicas", "members"}
_NODE_KEYS = {"name", "dsn", "via", "patroni", "pooler_tracks_prepared"}
#: The ``via`` values a ``pooler_tracks_prepared`` node may declare (a transaction pooler,
#: declared or detected: elsewhere statements are prepared by name on the server anyway).
_TRACKING_VIAS = ("transaction_pooler", "auto")
_DISCOVERY_DURATIONS = {"interval", "fast_interval", "timeout"}
_PROFILE_KEYS = {"max_staleness", "on_stale", "degrade"}
_MONITOR_DURATIONS = {"interval", "poll_timeout", "max_backoff"}
_MONITOR_INTS = {"history_size", "failures_before_down"}
_ROUTING_DURATIONS = {
    "replica_deadline", "primary_deadline", "connect_timeout", "write_retry_time",
    "write_failover_time",
}
_ROUTING_INTS = {"pool_min_size", "pool_max_size", "primary_fallback_max_concurrency",
                 "connection_budget"}


@dataclass(frozen=True)
class Topology:
    """The whole configuration. Build with :meth:`load`, :meth:`from_toml` or :meth:`from_dict`."""

    shards: tuple[ShardConfig, ...]
    bucket_count: int = DEFAULT_BUCKET_COUNT
    profiles: Mapping[str, Profile] = field(default_factory=dict)
    default_profile: str | None = None
    monitor: MonitorSettings = MonitorSettings()
    routing: RoutingSettings = RoutingSettings()
    discovery: DiscoverySettings = DiscoverySettings()
    source: str = field(default="<memory>", compare=False)

    def __post_init__(self) -> None:
        if not self.shards:
            raise ConfigError(f"{self.source}: no shards configured")
        names = [s.name for s in self.shards]
        if len(set(names)) != len(names):
            raise ConfigError(f"{self.source}: duplicate shard names in {names}")
        seen: dict[str, str] = {}
        for shard in self.shards:
            for node in shard.nodes:
                for key in (f"name {node.name}", f"address {node.address}"):
                    if key in seen:
                        raise ConfigError(
                            f"{self.source}: node {key} appears twice "
                            f"({seen[key]} and shard {shard.name})"
                        )
                    seen[key] = f"shard {shard.name}"
        if self.default_profile is not None and self.default_profile not in self.profiles:
            raise ConfigError(
                f"{self.source}: default_profile {self.default_profile!r} is not a profile "
                f"(have {sorted(self.profiles)})"
            )
        try:
            self.bucket_map  # noqa: B018 - validates the ranges now, not at first read
            self.connections  # noqa: B018 - and the connection budget
        except ValueError as exc:
            raise ConfigError(f"{self.source}: {exc}") from None

    @cached_property
    def bucket_map(self) -> BucketMap:
        """Bucket to shard index."""
        return BucketMap(self.bucket_count, [s.buckets for s in self.shards])

    @cached_property
    def connections(self) -> ConnectionBudget:
        """How a store on this topology plans its connections: the per-process budget
        (``routing.connection_budget``) split into one monitor connection and one pool per
        node (see ``propstore._connections``)."""
        routing = self.routing
        return ConnectionBudget.plan(sum(len(s.nodes) for s in self.shards),
                                     routing.connection_budget, routing.pool_min_size,
                                     routing.pool_max_size)

    def shard(self, name: str) -> ShardConfig:
        """The shard called ``name``; raises ``KeyError``."""
        for shard in self.shards:
            if shard.name == name:
                return shard
        raise KeyError(name)

    def bucket_of(self, tenant: str, user_id: str) -> int:
        """The user's virtual bucket."""
        return bucket_of(tenant, user_id, self.bucket_count)

    def shard_index_of(self, tenant: str, user_id: str) -> int:
        """Index in :attr:`shards` of the shard holding the user."""
        return self.bucket_map.shard_index(bucket_of(tenant, user_id, self.bucket_count))

    def shard_of(self, tenant: str, user_id: str) -> ShardConfig:
        """The shard holding the user."""
        return self.shards[self.shard_index_of(tenant, user_id)]

    # ---------------------------------------------------------------- loading

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
             ) -> Topology:
        """Read a TOML topology file, then apply environment overrides."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
        return cls.from_toml(text, source=str(path), environ=environ)

    @classmethod
    def from_toml(cls, text: str, *, source: str = "<string>",
                  environ: Mapping[str, str] | None = None) -> Topology:
        """Parse TOML text (see :meth:`from_dict`)."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        return cls.from_dict(data, source=source, environ=environ)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>",
                  environ: Mapping[str, str] | None = None) -> Topology:
        """Validate a parsed document; ``environ`` defaults to ``os.environ``."""
        env = os.environ if environ is None else environ
        _no_unknown(data, _TOP_KEYS, source, "")
        bucket_count = data.get("bucket_count", DEFAULT_BUCKET_COUNT)
        if isinstance(bucket_count, bool) or not isinstance(bucket_count, int) or not (
            1 <= bucket_count <= 1 << 20
        ):
            raise ConfigError(f"{source}: bucket_count must be an integer in 1..1048576")
        password = env.get("PROPSTORE_PASSWORD")
        raw_shards = data.get("shards")
        if not isinstance(raw_shards, list) or not raw_shards:
            raise ConfigError(f"{source}: [[shards]] must list at least one shard")
        shards = tuple(
            _shard(raw, i, source, password) for i, raw in enumerate(raw_shards)
        )
        profiles = _profiles(data.get("profiles", {}), source)
        monitor = _settings(
            MonitorSettings(), data.get("monitor", {}), "monitor",
            _MONITOR_DURATIONS, _MONITOR_INTS, source,
        )
        routing = _settings(
            RoutingSettings(), data.get("routing", {}), "routing",
            _ROUTING_DURATIONS, _ROUTING_INTS, source,
        )
        discovery = _settings(
            DiscoverySettings(), data.get("discovery", {}), "discovery",
            _DISCOVERY_DURATIONS, set(), source,
        )
        if min(discovery.interval, discovery.fast_interval, discovery.timeout) <= 0:
            raise ConfigError(f"{source}: [discovery] intervals and timeout must be > 0")
        if "PROPSTORE_MONITOR_INTERVAL" in env:
            monitor = replace(monitor, interval=_duration(
                env["PROPSTORE_MONITOR_INTERVAL"], "PROPSTORE_MONITOR_INTERVAL", source))
        if "PROPSTORE_MONITOR_SHARING" in env:
            monitor = replace(monitor, sharing=_sharing(
                env["PROPSTORE_MONITOR_SHARING"], f"{source}: PROPSTORE_MONITOR_SHARING"))
        if "PROPSTORE_REPLICA_DEADLINE" in env:
            routing = replace(routing, replica_deadline=_duration(
                env["PROPSTORE_REPLICA_DEADLINE"], "PROPSTORE_REPLICA_DEADLINE", source))
        if monitor.interval <= 0 or monitor.poll_timeout <= 0 or routing.replica_deadline <= 0:
            raise ConfigError(f"{source}: intervals, timeouts and deadlines must be > 0")
        if monitor.history_size < 2 or routing.pool_max_size < 1 or (
            routing.pool_min_size > routing.pool_max_size
        ):
            raise ConfigError(
                f"{source}: need history_size >= 2 and 1 <= pool_max_size >= pool_min_size"
            )
        default_profile = env.get("PROPSTORE_DEFAULT_PROFILE", data.get("default_profile"))
        if default_profile is not None and not isinstance(default_profile, str):
            raise ConfigError(f"{source}: default_profile must be a profile name")
        return cls(
            shards=shards, bucket_count=bucket_count, profiles=profiles,
            default_profile=default_profile, monitor=monitor, routing=routing,
            discovery=discovery, source=source,
        )


def _no_unknown(table: Any, allowed: set[str], source: str, where: str) -> None:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{source}: {where or 'document'} must be a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        place = f"[{where}]" if where else "top level"
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(unknown)} in {place} "
            f"(allowed: {', '.join(sorted(allowed))})"
        )


def _duration(value: object, key: str, source: str) -> float:
    try:
        return parse_duration(value, key)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _node(raw: Any, default_name: str, role: Literal["primary", "replica"], where: str,
          source: str, password: str | None) -> NodeConfig:
    via: Any = "auto"
    patroni: Any = None
    tracks: Any = False
    if isinstance(raw, str):
        name, dsn = default_name, raw
    else:
        _no_unknown(raw, _NODE_KEYS, source, where)
        name, dsn = raw.get("name", default_name), raw.get("dsn")
        via, patroni = raw.get("via", "auto"), raw.get("patroni")
        tracks = raw.get("pooler_tracks_prepared", False)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"{source}: {where}: node name {name!r} must match {_NAME_RE.pattern}")
    if not isinstance(dsn, str) or not dsn.strip():
        raise ConfigError(f"{source}: {where}: node {name} needs a dsn")
    try:
        params = _conninfo.parse(dsn)
    except _conninfo.DsnSyntaxError:
        raise ConfigError(f"{source}: {where}: node {name} has an unparsable dsn") from None
    if via not in VIA_CHOICES:
        raise ConfigError(
            f"{source}: {where}: node {name}: via = {via!r} is not one of "
            f"{', '.join(repr(v) for v in VIA_CHOICES)} (how the dsn reaches the server; "
            "see docs/deployment.md)"
        )
    if not isinstance(tracks, bool):
        raise ConfigError(f"{source}: {where}: node {name}: pooler_tracks_prepared = "
                          f"{tracks!r} must be true or false")
    if tracks and via not in _TRACKING_VIAS:
        raise ConfigError(
            f"{source}: {where}: node {name}: pooler_tracks_prepared applies to a "
            f'transaction pooler (via = "transaction_pooler" or "auto"), not via = {via!r}: '
            "there statements are prepared on the server itself (see docs/config.md)"
        )
    if patroni is not None and not (isinstance(patroni, str) and _URL_RE.match(patroni)):
        raise ConfigError(
            f"{source}: {where}: node {name}: patroni = {patroni!r} must be the member's "
            "Patroni REST API as http(s)://host:port (see docs/config.md)"
        )
    if password and "password" not in params:
        dsn = _conninfo.make({**params, "password": password})
    return NodeConfig(name=name, dsn=dsn, role=role, via=via,
                      patroni=patroni.rstrip("/") if patroni else None,
                      pooler_tracks_prepared=tracks)


def _shard(raw: Any, index: int, source: str, password: str | None) -> ShardConfig:
    where = f"shards[{index}]"
    _no_unknown(raw, _SHARD_KEYS, source, where)
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"{source}: {where}: name {name!r} must match {_NAME_RE.pattern}")
    where = f"shard {name}"
    buckets = raw.get("buckets")
    if isinstance(buckets, str):
        buckets = [buckets]
    if not isinstance(buckets, list) or not buckets:
        raise ConfigError(f"{source}: {where}: buckets must list ranges such as '0-2047'")
    try:
        ranges = tuple(BucketRange.parse(str(b)) for b in buckets)
    except ValueError as exc:
        raise ConfigError(f"{source}: {where}: {exc}") from None
    if "members" in raw:
        return _members_shard(raw, name, ranges, where, source, password)
    if "primary" not in raw:
        raise ConfigError(f"{source}: {where}: no primary (or members)")
    primary = _node(raw["primary"], f"{name}-primary", "primary", where, source, password)
    raw_replicas = raw.get("replicas", [])
    if not isinstance(raw_replicas, list):
        raise ConfigError(f"{source}: {where}: replicas must be a list")
    replicas = tuple(
        _node(r, f"{name}-replica{i + 1}", "replica", where, source, password)
        for i, r in enumerate(raw_replicas)
    )
    return ShardConfig(name=name, buckets=ranges, primary=primary, replicas=replicas)


def _members_shard(raw: Any, name: str, ranges: tuple[BucketRange, ...], where: str,
                   source: str, password: str | None) -> ShardConfig:
    """A shard given as ``members`` (an HA manager moves the roles): the first member is
    only the starting guess for the primary, until the roles are observed."""
    if "primary" in raw or "replicas" in raw:
        raise ConfigError(f"{source}: {where}: give members, or primary and replicas, not both")
    members = raw["members"]
    if not isinstance(members, list) or not members:
        raise ConfigError(f"{source}: {where}: members must list the shard's servers")
    nodes = [
        _node(m, f"{name}-member{i + 1}", "primary" if i == 0 else "replica", where, source,
              password)
        for i, m in enumerate(members)
    ]
    return ShardConfig(name=name, buckets=ranges, primary=nodes[0], replicas=tuple(nodes[1:]))


def _profiles(raw: Any, source: str) -> dict[str, Profile]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: [profiles] must be a table of tables")
    profiles: dict[str, Profile] = {}
    for name, table in raw.items():
        where = f"profiles.{name}"
        _no_unknown(table, _PROFILE_KEYS, source, where)
        if "max_staleness" not in table:
            raise ConfigError(f"{source}: [{where}] needs max_staleness")
        on_stale = table.get("on_stale")
        if on_stale not in (None, "error", "serve"):
            raise ConfigError(f"{source}: [{where}] on_stale must be 'error' or 'serve'")
        if on_stale is not None and "degrade" in table:
            raise ConfigError(f"{source}: [{where}] give degrade or on_stale, not both")
        profiles[name] = Profile(
            name=name,
            max_staleness=_duration(table["max_staleness"], f"{where}.max_staleness", source),
            on_stale=on_stale,
            degrade=_degrade(table, where, source),
        )
    return profiles


def _settings(defaults: Any, raw: Any, where: str, durations: set[str], ints: set[str],
              source: str) -> Any:
    floats = {"primary_fallback_rate", "primary_latency_tolerance"} if where == "routing" else (
        set()
    )
    others = {"on_stale", "degrade", "primary_fallback_adaptive"} if where == "routing" else (
        {"sharing"}
    )
    allowed = durations | ints | floats | others
    _no_unknown(raw, allowed, source, where)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in durations:
            values[key] = _duration(value, f"{where}.{key}", source)
        elif key in ints:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{source}: {where}.{key} must be a non-negative integer")
            values[key] = value
        elif key in floats:
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"{source}: {where}.{key} must be a non-negative number")
            values[key] = float(value)
        elif key == "on_stale":
            if value not in ("error", "serve"):
                raise ConfigError(f"{source}: {where}.on_stale must be 'error' or 'serve'")
            values[key] = value
        elif key == "degrade":
            values[key] = _degrade(raw, where, source)
        elif key == "sharing":
            values[key] = _sharing(value, f"{source}: {where}.sharing")
        elif key == "primary_fallback_adaptive":
            if not isinstance(value, bool):
                raise ConfigError(f"{source}: {where}.{key} must be true or false")
            values[key] = value
    if "on_stale" in values and "degrade" in values:
        raise ConfigError(f"{source}: {where}: give degrade or on_stale, not both")
    if values.get("primary_latency_tolerance", 5.0) < 1.0:
        raise ConfigError(f"{source}: {where}.primary_latency_tolerance must be >= 1")
    return replace(defaults, **values)


def _degrade(table: Mapping[str, Any], where: str, source: str) -> Degrade | None:
    if "degrade" not in table:
        return None
    value = table["degrade"]
    if not isinstance(value, str):
        raise ConfigError(f"{source}: {where}.degrade must be a string such as "
                          "'wait(200ms) | serve_stale'")
    try:
        return Degrade.parse(value)
    except InvalidInputError as exc:
        raise ConfigError(f"{source}: {where}.degrade: {exc}") from None


__all__ = [
    "SHARING_CHOICES",
    "DiscoverySettings",
    "MonitorSettings",
    "NodeConfig",
    "OnStale",
    "Profile",
    "RoutingSettings",
    "ShardConfig",
    "Sharing",
    "Topology",
    "redact_dsn",
]
