"""Schema and config changes rolled out shard by shard, gated on replica lag.

alembic is the engine; this package points it at one shard primary at a time and decides
*when* it may run there::

    from propstore.migrate import RollingMigration, shard_status
    report = RollingMigration(topology, "head", max_lag=1.0, canary=1).run()
    print(report)                       # per shard: done / already at target / failed / ...

- :func:`shard_status`, :func:`plan` — where each shard stands, what would run (with SQL).
- :class:`RollingMigration` — pre-flight lag gate, alembic, wait for replicas, next shard.
- :class:`LagGuard`, :func:`backfill` — batch work inside a revision (or anywhere) that
  pauses while a replica is more than ``max_lag`` seconds stale.
- :func:`diff_topologies` — what a topology file change does, and which parts are unsafe.
- :func:`upgrade`, :func:`downgrade`, :func:`current_revision`, :func:`head_revision` —
  plain alembic on one primary.

Lag is always a proven time bound (a replica that replayed the primary's LSN sampled at
``t`` is at most ``now - t`` stale), never a byte count.
"""

from propstore.migrate._alembic import (
    PRIMARY_DSN_ATTRIBUTE,
    REPLICA_DSNS_ATTRIBUTE,
    SHARD_ATTRIBUTE,
    PlannedRevision,
    current_revision,
    downgrade,
    head_revision,
    script_location,
    upgrade,
)
from propstore.migrate._config_safety import diff_topologies
from propstore.migrate._diff import (
    BucketMove,
    ConfigDiff,
    NodeChange,
    SettingChange,
    UnsafeChange,
)
from propstore.migrate._guard import (
    BackfillProgress,
    BackfillReport,
    BatchSizer,
    GuardCheck,
    LagGuard,
    backfill,
)
from propstore.migrate._lag import ReplicaLag, ShardLag, ShardProbe
from propstore.migrate._rolling import (
    MigrationEvent,
    MigrationReport,
    RollingMigration,
    ShardResult,
)
from propstore.migrate._status import ShardMigrationStatus, ShardPlan, plan, shard_status

__all__ = [
    "PRIMARY_DSN_ATTRIBUTE",
    "REPLICA_DSNS_ATTRIBUTE",
    "SHARD_ATTRIBUTE",
    "BackfillProgress",
    "BackfillReport",
    "BatchSizer",
    "BucketMove",
    "ConfigDiff",
    "GuardCheck",
    "LagGuard",
    "MigrationEvent",
    "MigrationReport",
    "NodeChange",
    "PlannedRevision",
    "ReplicaLag",
    "RollingMigration",
    "SettingChange",
    "ShardLag",
    "ShardMigrationStatus",
    "ShardPlan",
    "ShardProbe",
    "ShardResult",
    "UnsafeChange",
    "backfill",
    "current_revision",
    "diff_topologies",
    "downgrade",
    "head_revision",
    "plan",
    "script_location",
    "shard_status",
    "upgrade",
]
