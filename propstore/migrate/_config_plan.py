"""Planning a server configuration change: validate it on every node, order the steps.

:func:`plan_config_change` reads ``pg_settings`` on every node of every shard the change
touches (the untouched ones too: the hot-standby rule compares a standby with its primary),
refuses a bad setting or value before anything is written, and lays out the steps: per
shard, its replicas one at a time and then its primary — or the primary first when that is
the only order in which no standby ever runs with a hot-standby parameter below its
primary's (lowering ``max_connections``); a change that no order makes safe is refused.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg.rows import dict_row

from propstore.config import NodeConfig, ShardConfig, Topology
from propstore.errors import ConfigError, MigrationError
from propstore.migrate._primary import observed_topology
from propstore.migrate._settings import (
    HOT_STANDBY_PARAMETERS,
    Effect,
    SettingInfo,
    SettingValueError,
    info_from_row,
    normalise,
    same_value,
)

TargetRole = Literal["all", "primaries", "replicas"]

_SETTINGS_SQL = (
    "SELECT name, setting, unit, vartype, context, min_val, max_val, enumvals,"
    " pending_restart, coalesce(sourcefile LIKE '%%postgresql.auto.conf', false)"
    " AS in_auto_conf FROM pg_settings WHERE name = ANY(%s)"
)


@dataclass(frozen=True, slots=True)
class ConfigChange:
    """Settings to give some nodes: ``ConfigChange({"max_connections": "200"})``.

    Attributes:
        settings: setting name -> value as you would write it in ``postgresql.conf``
            (``"200"``, ``"5s"``, ``"128MB"``, ``"on"``).
        role: ``all`` nodes, only ``primaries`` or only ``replicas``.
        shards: only these shards (empty: every shard).
        nodes: only these nodes, by configured name (empty: every node of the role).
    """

    settings: Mapping[str, str]
    role: TargetRole = "all"
    shards: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.settings:
            raise ConfigError("a configuration change needs at least one setting")
        if self.role not in ("all", "primaries", "replicas"):
            raise ConfigError(f"role must be all, primaries or replicas, not {self.role!r}")
        for name in self.settings:
            if not name or not all(c.isalnum() or c in "_." for c in name):
                raise ConfigError(f"{name!r} is not a setting name")

    @classmethod
    def parse(cls, assignments: Iterable[str], **target: Any) -> ConfigChange:
        """From ``name=value`` strings (the CLI's arguments); ``target`` as the fields."""
        settings: dict[str, str] = {}
        for text in assignments:
            name, sep, value = text.partition("=")
            if not sep or not name.strip():
                raise ConfigError(f"{text!r}: expected NAME=VALUE")
            settings[name.strip().lower()] = value.strip()
        return cls(settings, **target)

    def targets(self, topology: Topology) -> tuple[tuple[ShardConfig, NodeConfig], ...]:
        """The nodes this change applies to, in topology order; unknown names refused."""
        shard_names = [s.name for s in topology.shards]
        for name in self.shards:
            if name not in shard_names:
                raise ConfigError(f"no shard named {name!r} (have {', '.join(shard_names)})")
        node_names = [n.name for s in topology.shards for n in s.nodes]
        for name in self.nodes:
            if name not in node_names:
                raise ConfigError(f"no node named {name!r} (have {', '.join(node_names)})")
        chosen = []
        for shard in topology.shards:
            if self.shards and shard.name not in self.shards:
                continue
            for node in shard.nodes:
                if self.nodes and node.name not in self.nodes:
                    continue
                if self.role == "primaries" and node.role != "primary":
                    continue
                if self.role == "replicas" and node.role != "replica":
                    continue
                chosen.append((shard, node))
        if not chosen:
            raise ConfigError(f"the change targets no node ({self.describe_target()})")
        return tuple(chosen)

    def describe_target(self) -> str:
        """``replicas of shard0``-style text."""
        what = {"all": "all nodes", "primaries": "primaries", "replicas": "replicas"}[self.role]
        if self.nodes:
            what = ", ".join(self.nodes) if self.role == "all" else (
                f"{what} among {', '.join(self.nodes)}")
        if self.shards:
            what = f"{what} of {', '.join(self.shards)}"
        return what

    def key(self, topology: Topology) -> str:
        """A short stable identity of this change on this topology (names the journal)."""
        document = {
            "settings": dict(sorted(self.settings.items())),
            "targets": [f"{n.name}@{n.address}" for _, n in self.targets(topology)],
        }
        return hashlib.blake2b(json.dumps(document, sort_keys=True).encode(),
                               digest_size=8).hexdigest()

    def __str__(self) -> str:
        settings = " ".join(f"{k}={v}" for k, v in self.settings.items())
        return f"{settings} on {self.describe_target()}"


@dataclass(frozen=True, slots=True)
class NodeSetting:
    """One setting on one node: what it is, what it becomes.

    Attributes:
        name: the setting.
        before: its value before the rollout (``pg_settings.setting``; from the journal
            when the rollout was interrupted and this node already changed).
        after: the normalised new value (what ``pg_settings.setting`` must show).
        before_in_auto_conf: ``before`` came from ``postgresql.auto.conf``; a revert then
            sets it back there, otherwise it removes the line (``ALTER SYSTEM RESET``).
        info: the node's ``pg_settings`` description.
    """

    name: str
    before: str
    after: str
    before_in_auto_conf: bool
    info: SettingInfo = field(repr=False)

    @property
    def changes(self) -> bool:
        """The value differs from before."""
        return not same_value(self.info, self.before, self.after)

    def __str__(self) -> str:
        if not self.changes:
            return f"{self.name} {self.info.shown(self.after)} (unchanged)"
        return f"{self.name} {self.info.shown(self.before)} -> {self.info.shown(self.after)}"


@dataclass(frozen=True, slots=True)
class ConfigStep:
    """One node's part of the rollout.

    Attributes:
        number: 1-based position in the plan.
        shard: the shard.
        node: the node.
        settings: each setting's before/after on this node.
        effect: ``restart`` when any changed setting needs one, else ``reload``.
        applied: the node already runs with every new value (an interrupted run got here).
    """

    number: int
    shard: ShardConfig = field(repr=False)
    node: NodeConfig
    settings: tuple[NodeSetting, ...]
    effect: Effect
    applied: bool = False

    @property
    def role(self) -> str:
        """The node's configured role."""
        return self.node.role

    def __str__(self) -> str:
        state = " [already applied]" if self.applied else ""
        changes = ", ".join(str(s) for s in self.settings)
        return (f"{self.number:>2}. {self.shard.name:<8} {self.node.name:<18} {self.role:<8} "
                f"{self.effect:<8} {changes}{state}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``propstore config plan --json``)."""
        return {
            "step": self.number, "shard": self.shard.name, "node": self.node.name,
            "role": self.role, "effect": self.effect, "applied": self.applied,
            "settings": [{"name": s.name, "before": s.before, "after": s.after,
                          "unit": s.info.unit, "context": s.info.context}
                         for s in self.settings],
        }


@dataclass(frozen=True, slots=True)
class ConfigPlan:
    """A validated change, laid out node by node (:func:`plan_config_change`).

    Attributes:
        change: what was asked.
        steps: in rollout order.
        notes: why the order is what it is (hot-standby parameters, reordering).
        key: the change's identity (names its journal).
    """

    change: ConfigChange
    steps: tuple[ConfigStep, ...]
    notes: tuple[str, ...]
    key: str

    @property
    def needs_restart(self) -> bool:
        """Some step restarts a node."""
        return any(s.effect == "restart" for s in self.steps)

    @property
    def pending(self) -> tuple[ConfigStep, ...]:
        """Steps not applied yet."""
        return tuple(s for s in self.steps if not s.applied)

    def __str__(self) -> str:
        head = f"Change {self.change} ({len(self.steps)} step(s), {len(self.pending)} to do)"
        lines = [head, *(f"  {step}" for step in self.steps)]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"change": dict(self.change.settings), "target": self.change.describe_target(),
                "key": self.key, "steps": [s.to_dict() for s in self.steps],
                "notes": list(self.notes)}


def read_settings(node: NodeConfig, names: Sequence[str], connect_timeout: float = 2.0
                  ) -> dict[str, SettingInfo]:
    """``pg_settings`` rows of ``names`` on ``node`` (a missing name: not a setting there)."""
    try:
        with psycopg.connect(node.dsn, autocommit=True, row_factory=dict_row,
                             connect_timeout=max(2, round(connect_timeout)),
                             application_name="propstore-config") as conn:
            rows = conn.execute(_SETTINGS_SQL, (list(names),)).fetchall()
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()
        raise MigrationError(f"cannot read settings of {node.name} ({node.address}): "
                             f"{first[0] if first else type(exc).__name__}") from exc
    return {row["name"]: info_from_row(row) for row in rows}


def plan_config_change(
    topology: Topology, change: ConfigChange, *, can_restart: bool = False,
    originals: Mapping[str, Mapping[str, tuple[str, bool]]] | None = None,
) -> ConfigPlan:
    """Validate ``change`` on every node it touches and order its steps.

    Args:
        topology: the shards.
        change: the settings and the target.
        can_restart: a node controller is available; without one a change needing a
            restart is refused here, before anything is touched.
        originals: node -> setting -> (value, in auto.conf) recorded by an interrupted
            run (its journal): those are the values a revert restores.

    Raises:
        ConfigError: an unknown shard/node, or :class:`SettingValueError` (an unknown
            setting, wrong type, out of range, not an allowed value) naming the node.
        MigrationError: a node could not be read, a restart is needed and
            ``can_restart`` is false, or no order keeps every standby running.
    """
    key = change.key(topology)  # names the journal: the file's nodes, whoever leads now
    # Roles as observed now (an HA manager moves them): "primaries", and the primary-last
    # order, mean the node that is the primary, not the one the file calls so.
    topology = observed_topology(topology, change.shards or None)
    targets = change.targets(topology)
    names = sorted(set(change.settings) | set(HOT_STANDBY_PARAMETERS))
    shards = list(dict.fromkeys(shard.name for shard, _ in targets))
    by_shard = {s.name: s for s in topology.shards}
    infos: dict[str, dict[str, SettingInfo]] = {}
    for shard_name in shards:
        for node in by_shard[shard_name].nodes:
            infos[node.name] = read_settings(node, names, topology.routing.connect_timeout)
    targeted = {node.name for _, node in targets}
    originals = originals or {}
    planned: dict[str, tuple[NodeSetting, ...]] = {}
    for _shard, node in targets:
        planned[node.name] = tuple(
            _node_setting(node, name, value, infos[node.name], originals.get(node.name, {}))
            for name, value in change.settings.items())
    restart_needed = sorted({s.name for settings in planned.values() for s in settings
                             if s.changes and s.info.effect == "restart"})
    if restart_needed and not can_restart:
        raise MigrationError(
            f"{', '.join(restart_needed)} take(s) effect only after a server restart "
            "(context postmaster), and no node controller was given: pass one "
            "(--restart-command 'ssh {host} sudo systemctl restart postgresql@15-main', "
            "or --sandbox for the local sandbox), or change only reload-context settings")
    steps: list[ConfigStep] = []
    notes: list[str] = []
    for shard_name in shards:
        shard = by_shard[shard_name]
        order, note = _order(shard, targeted, planned, infos)
        if note:
            notes.append(note)
        for node in order:
            settings = planned[node.name]
            effect: Effect = "restart" if any(
                s.changes and s.info.effect == "restart" for s in settings) else "reload"
            live = infos[node.name]
            applied = all(same_value(s.info, live[s.name].setting, s.after)
                          and not live[s.name].pending_restart for s in settings)
            steps.append(ConfigStep(len(steps) + 1, shard, node, settings, effect, applied))
    return ConfigPlan(change, tuple(steps), tuple(notes), key)


def _node_setting(node: NodeConfig, name: str, value: str, infos: Mapping[str, SettingInfo],
                  original: Mapping[str, tuple[str, bool]]) -> NodeSetting:
    info = infos.get(name)
    if info is None:
        known = dict.fromkeys([*infos, *HOT_STANDBY_PARAMETERS])
        close = difflib.get_close_matches(name, list(known), 3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise SettingValueError(name, node.name, f"unknown setting{hint}")
    after = normalise(info, value, node.name)
    before, in_auto = original.get(name, (info.setting, info.in_auto_conf))
    return NodeSetting(name, before, after, in_auto, info)


def _order(shard: ShardConfig, targeted: set[str], planned: Mapping[str, tuple[NodeSetting, ...]],
           infos: Mapping[str, Mapping[str, SettingInfo]]) -> tuple[list[NodeConfig], str]:
    """Replicas first, then the primary, unless only the reverse keeps every standby's
    hot-standby parameters at least its primary's at every moment; refuse if neither."""
    replicas = [n for n in shard.replicas if n.name in targeted]
    primary = [shard.primary] if shard.primary.name in targeted else []
    candidates = [replicas + primary, primary + replicas]
    failures: list[str] = []
    for i, order in enumerate(candidates):
        problem = _first_pause(shard, order, planned, infos)
        if problem is None:
            if i == 0 or not primary or not replicas:
                return order, ""
            return order, (f"{shard.name}: reordered, primary first (replicas first, "
                           f"{failures[0]})")
        failures.append(problem)
        if not primary or not replicas:
            break
    raise MigrationError(f"{shard.name}: refused, a standby would pause its recovery: "
                         f"{failures[0]} (change the replicas too, or raise them first)")


def _first_pause(shard: ShardConfig, order: Sequence[NodeConfig],
                 planned: Mapping[str, tuple[NodeSetting, ...]],
                 infos: Mapping[str, Mapping[str, SettingInfo]]) -> str | None:
    """Walk the steps; the first moment a standby's hot-standby parameter falls below its
    primary's (PostgreSQL 14+ pauses its recovery; at start-up it refuses to start). A
    standby already below before the change (already paused) is not counted against it:
    the change may be its repair, one replica at a time."""
    touched = {s.name for settings in planned.values() for s in settings
               if s.name in HOT_STANDBY_PARAMETERS}
    values = {node.name: {p: int(infos[node.name][p].setting)
                          for p in touched if p in infos[node.name]}
              for node in shard.nodes}

    def below() -> dict[tuple[str, str], tuple[int, int]]:
        top = values[shard.primary.name]
        return {(replica.name, name): (values[replica.name].get(name, needed), needed)
                for replica in shard.replicas for name, needed in top.items()
                if values[replica.name].get(name, needed) < needed}

    already = set(below())
    for node in order:
        for setting in planned[node.name]:
            if setting.name in touched:
                values[node.name][setting.name] = int(setting.after)
        for (replica, name), (have, needed) in below().items():
            if (replica, name) not in already:
                return (f"{replica} would have {name} {have} below the primary's "
                        f"{needed} after {node.name} changes")
    return None


def journal_path(folder: Path, plan_key: str) -> Path:
    """Where the journal of a change lives inside ``folder``."""
    return folder / f"config-{plan_key}.json"


__all__ = [
    "ConfigChange",
    "ConfigPlan",
    "ConfigStep",
    "NodeSetting",
    "TargetRole",
    "journal_path",
    "plan_config_change",
    "read_settings",
]
