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
- :class:`ConfigChange`, :func:`plan_config_change`, :class:`ConfigRollout` — PostgreSQL
  server settings rolled out node by node: validated against ``pg_settings``, ordered for
  the hot-standby rule, each step gated on lag, verified, baked, reverted on a regression
  (docs/config-changes.md). :class:`NodeController` / :class:`CommandController` restart
  a node for ``postmaster``-context settings.
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
from propstore.migrate._config_journal import ConfigJournal
from propstore.migrate._config_plan import (
    ConfigChange,
    ConfigPlan,
    ConfigStep,
    NodeSetting,
    plan_config_change,
)
from propstore.migrate._config_report import ConfigEvent, ConfigReport, Regression, StepResult
from propstore.migrate._config_rollout import ConfigRollout
from propstore.migrate._config_safety import diff_topologies
from propstore.migrate._controller import CommandController, NodeController
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
from propstore.migrate._settings import SettingValueError
from propstore.migrate._status import ShardMigrationStatus, ShardPlan, plan, shard_status

__all__ = [
    "PRIMARY_DSN_ATTRIBUTE",
    "REPLICA_DSNS_ATTRIBUTE",
    "SHARD_ATTRIBUTE",
    "BackfillProgress",
    "BackfillReport",
    "BatchSizer",
    "BucketMove",
    "CommandController",
    "ConfigChange",
    "ConfigDiff",
    "ConfigEvent",
    "ConfigJournal",
    "ConfigPlan",
    "ConfigReport",
    "ConfigRollout",
    "ConfigStep",
    "GuardCheck",
    "LagGuard",
    "MigrationEvent",
    "MigrationReport",
    "NodeChange",
    "NodeController",
    "NodeSetting",
    "PlannedRevision",
    "Regression",
    "ReplicaLag",
    "RollingMigration",
    "SettingChange",
    "SettingValueError",
    "ShardLag",
    "ShardMigrationStatus",
    "ShardPlan",
    "ShardProbe",
    "ShardResult",
    "StepResult",
    "UnsafeChange",
    "backfill",
    "current_revision",
    "diff_topologies",
    "downgrade",
    "head_revision",
    "plan",
    "plan_config_change",
    "script_location",
    "shard_status",
    "upgrade",
]
