"""propstore: a sharded user-property store on PostgreSQL with lag-aware replica reads.

Every read states how fresh it must be; a replica serves it only when that replica is
*proven* within the budget (its replay LSN checked in the same round trip, or by an
observation that provably still holds), otherwise the primary serves it at once.

    from propstore import PropertyStore
    with PropertyStore.from_config("propstore.toml") as store:
        token = store.set("acme", "user-1", {"plan": "pro"})
        store.get("acme", "user-1", after=token)          # read-your-writes
        store.get("acme", "user-1", max_staleness=0.5)    # bounded staleness (seconds)
"""

from propstore.config import MonitorSettings, Profile, RoutingSettings, Topology
from propstore.errors import (
    ConfigError,
    InvalidInputError,
    InvalidTokenError,
    MigrationError,
    PropStoreError,
    ShardUnavailableError,
    StaleReadError,
)
from propstore.freshness import STRONG, Freshness, Token
from propstore.lsn import LSN
from propstore.monitor import LagMonitor, NodeView, ShardView
from propstore.router import RouteDecision
from propstore.store import AsyncPropertyStore, PropertyStore, ReadResult

__version__ = "0.1.0"

__all__ = [
    "LSN",
    "STRONG",
    "AsyncPropertyStore",
    "ConfigError",
    "Freshness",
    "InvalidInputError",
    "InvalidTokenError",
    "LagMonitor",
    "MigrationError",
    "MonitorSettings",
    "NodeView",
    "Profile",
    "PropStoreError",
    "PropertyStore",
    "ReadResult",
    "RouteDecision",
    "RoutingSettings",
    "ShardUnavailableError",
    "ShardView",
    "StaleReadError",
    "Token",
    "Topology",
]
