"""The public API is what ``propstore.__all__`` says; changing it is a deliberate act."""

from __future__ import annotations

import propstore

EXPECTED = {
    "LSN", "STRONG", "AsyncPropertyStore", "ConfigError", "Degrade", "DiscoverySettings",
    "Freshness",
    "InvalidInputError",
    "InvalidTokenError", "LagMonitor", "MigrationError", "MonitorSettings", "NodeView",
    "Profile", "PropStoreError", "PropertyStore", "ReadResult", "RouteDecision",
    "RoutingSettings", "ShardUnavailableError", "ShardView", "StaleReadError", "Token",
    "Topology", "WriteLostError",
}


def test_public_api_is_pinned() -> None:
    assert set(propstore.__all__) == EXPECTED


def test_every_public_name_is_documented() -> None:
    for name in propstore.__all__:
        member = getattr(propstore, name)
        if callable(member) and not isinstance(member, propstore.Freshness):
            assert member.__doc__, f"{name} has no docstring"


def test_every_error_derives_from_propstore_error() -> None:
    for name in propstore.__all__:
        member = getattr(propstore, name)
        if isinstance(member, type) and issubclass(member, Exception):
            assert issubclass(member, propstore.PropStoreError), name
