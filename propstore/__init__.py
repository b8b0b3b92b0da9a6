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

from typing import TYPE_CHECKING, Any

# The names below load on first use (PEP 562), so that importing a submodule, e.g. the CLI
# for `propstore --help`, does not pay for psycopg, SQLAlchemy and the store (about 0.7 s).
_EXPORTS = {
    "DiscoverySettings": "propstore.config",
    "MonitorSettings": "propstore.config", "Profile": "propstore.config",
    "RoutingSettings": "propstore.config", "Topology": "propstore.config",
    "Degrade": "propstore.degrade",
    "ConfigError": "propstore.errors", "InvalidInputError": "propstore.errors",
    "InvalidTokenError": "propstore.errors", "MigrationError": "propstore.errors",
    "PropStoreError": "propstore.errors", "ShardUnavailableError": "propstore.errors",
    "StaleReadError": "propstore.errors", "WriteLostError": "propstore.errors",
    "STRONG": "propstore.freshness", "Freshness": "propstore.freshness",
    "Token": "propstore.freshness",
    "LSN": "propstore.lsn",
    "LagMonitor": "propstore.monitor", "NodeView": "propstore.monitor",
    "ShardView": "propstore.monitor",
    "RouteDecision": "propstore.router",
    "AsyncPropertyStore": "propstore.store", "PropertyStore": "propstore.store",
    "ReadResult": "propstore.store",
}

if TYPE_CHECKING:
    from propstore.config import (
        DiscoverySettings,
        MonitorSettings,
        Profile,
        RoutingSettings,
        Topology,
    )
    from propstore.degrade import Degrade
    from propstore.errors import (
        ConfigError,
        InvalidInputError,
        InvalidTokenError,
        MigrationError,
        PropStoreError,
        ShardUnavailableError,
        StaleReadError,
        WriteLostError,
    )
    from propstore.freshness import STRONG, Freshness, Token
    from propstore.lsn import LSN
    from propstore.monitor import LagMonitor, NodeView, ShardView
    from propstore.router import RouteDecision
    from propstore.store import AsyncPropertyStore, PropertyStore, ReadResult


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'propstore' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__version__ = "0.1.0"

__all__ = [
    "LSN",
    "STRONG",
    "AsyncPropertyStore",
    "ConfigError",
    "Degrade",
    "DiscoverySettings",
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
    "WriteLostError",
]
