"""propstore: a sharded user-property store on PostgreSQL with lag-aware replica reads."""

from propstore.config import Topology
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

__all__ = [
    "LSN",
    "STRONG",
    "ConfigError",
    "Freshness",
    "InvalidInputError",
    "InvalidTokenError",
    "MigrationError",
    "PropStoreError",
    "ShardUnavailableError",
    "StaleReadError",
    "Token",
    "Topology",
]
