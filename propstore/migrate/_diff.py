"""Topology file changes: what changes from one file to another (no database needed).

A new file that the loader would reject (a bucket without a shard, one with two) is reported
as unsafe rather than raised, so the diff still shows everything else. The checks that need
the databases live in :mod:`._config_safety`.
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from propstore._durations import format_duration
from propstore.config import NodeConfig, Topology
from propstore.errors import ConfigError
from propstore.sharding import BucketRange, ranges_of

#: ``None`` is "no shard"; a tuple of several names is "claimed by each of them".
Owner = str | None


class _Unchecked(Topology):
    """A Topology built without its whole-file validation, so a diff can show a file the
    loader would reject. Only ever compared; never handed to a store."""

    def __post_init__(self) -> None:
        pass


def _load(source: Topology | str | os.PathLike[str]) -> Topology:
    if isinstance(source, Topology):
        return source
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    return _Unchecked.from_toml(text, source=str(path))


def _validation_error(topology: Topology) -> str | None:
    try:
        Topology.__post_init__(topology)
    except ConfigError as exc:
        return str(exc)
    return None


@dataclass(frozen=True, slots=True)
class NodeChange:
    """A node added, removed or changed (``detail`` says what changed)."""

    shard: str
    node: str
    role: str
    address: str
    detail: str = ""

    def __str__(self) -> str:
        text = f"{self.node} ({self.role} of {self.shard}, {self.address})"
        return f"{text}: {self.detail}" if self.detail else text


@dataclass(frozen=True, slots=True)
class BucketMove:
    """Buckets whose owner changes. ``target`` None: left without a shard.

    ``users`` is how many rows of these buckets the source primary holds (None: not
    checked, or the source could not be asked).
    """

    source: Owner
    target: Owner
    ranges: tuple[BucketRange, ...]
    users: int | None = None

    @property
    def count(self) -> int:
        """Number of buckets moved."""
        return sum(len(r) for r in self.ranges)

    @property
    def buckets(self) -> list[int]:
        """Every bucket moved."""
        return [b for r in self.ranges for b in range(r.first, r.last + 1)]

    def __str__(self) -> str:
        ranges = ", ".join(str(r) for r in self.ranges[:8])
        if len(self.ranges) > 8:
            ranges += f", ... ({len(self.ranges)} ranges)"
        users = "" if self.users is None else f", {self.users} user(s) on the source"
        return (f"{self.count} bucket(s) {ranges}: {self.source or 'no shard'} -> "
                f"{self.target or 'no shard'}{users}")


@dataclass(frozen=True, slots=True)
class SettingChange:
    """A setting, profile or budget whose value changes (None: absent on that side)."""

    key: str
    old: str | None
    new: str | None

    def __str__(self) -> str:
        if self.old is None:
            return f"{self.key}: added ({self.new})"
        if self.new is None:
            return f"{self.key}: removed (was {self.old})"
        return f"{self.key}: {self.old} -> {self.new}"


@dataclass(frozen=True, slots=True)
class UnsafeChange:
    """A change refused, and why."""

    subject: str
    reason: str

    def __str__(self) -> str:
        return f"{self.subject}: {self.reason}"


@dataclass(frozen=True, slots=True)
class ConfigDiff:
    """What changes from one topology file to another, and what is unsafe about it."""

    old: str
    new: str
    shards_added: tuple[str, ...] = ()
    shards_removed: tuple[str, ...] = ()
    nodes_added: tuple[NodeChange, ...] = ()
    nodes_removed: tuple[NodeChange, ...] = ()
    nodes_changed: tuple[NodeChange, ...] = ()
    buckets_moved: tuple[BucketMove, ...] = ()
    profiles_changed: tuple[SettingChange, ...] = ()
    settings_changed: tuple[SettingChange, ...] = ()
    unsafe: tuple[UnsafeChange, ...] = ()
    checked: bool = True

    @property
    def safe(self) -> bool:
        """No unsafe change."""
        return not self.unsafe

    @property
    def empty(self) -> bool:
        """Nothing changes."""
        return not any(getattr(self, f.name) for f in dataclasses.fields(self)
                       if f.name not in ("old", "new", "checked", "unsafe")) and self.safe

    def _sections(self) -> Iterator[tuple[str, tuple[object, ...]]]:
        yield "shards added", self.shards_added
        yield "shards removed", self.shards_removed
        yield "nodes added", self.nodes_added
        yield "nodes removed", self.nodes_removed
        yield "nodes changed", self.nodes_changed
        yield "buckets moved", self.buckets_moved
        yield "profiles and budgets changed", self.profiles_changed
        yield "settings changed", self.settings_changed

    def __str__(self) -> str:
        lines = [f"{self.old} -> {self.new}"]
        if self.empty:
            lines.append("no changes")
        for title, items in self._sections():
            if items:
                lines.append(f"{title}:")
                lines += [f"  {item}" for item in items]
        if self.unsafe:
            lines.append("UNSAFE (refused):")
            lines += [f"  {item}" for item in self.unsafe]
        elif not self.empty:
            lines.append("safe to apply" + ("" if self.checked else " (not checked against "
                                                                   "the databases)"))
        return "\n".join(lines)


# -- structure -------------------------------------------------------------------------


def _nodes(topology: Topology) -> dict[str, tuple[str, NodeConfig]]:
    return {node.name: (shard.name, node) for shard in topology.shards for node in shard.nodes}


def _node_changes(old: Topology, new: Topology) -> tuple[list[NodeChange], ...]:
    before, after = _nodes(old), _nodes(new)
    added = [NodeChange(s, n.name, n.role, n.address) for name, (s, n) in after.items()
             if name not in before]
    removed = [NodeChange(s, n.name, n.role, n.address) for name, (s, n) in before.items()
               if name not in after]
    changed = []
    for name, (shard, node) in after.items():
        if name not in before:
            continue
        old_shard, old_node = before[name]
        details = [f"{what} {a} -> {b}" for what, a, b in (
            ("shard", old_shard, shard), ("role", old_node.role, node.role),
            ("address", old_node.address, node.address),
            ("dsn", old_node.safe_dsn, node.safe_dsn),
        ) if a != b and not (what == "dsn" and old_node.address != node.address)]
        if details:
            changed.append(NodeChange(shard, name, node.role, node.address, "; ".join(details)))
    return added, removed, changed


def _owners(topology: Topology) -> list[Owner | tuple[str, ...]]:
    claims: list[list[str]] = [[] for _ in range(topology.bucket_count)]
    for shard in topology.shards:
        for rng in shard.buckets:
            for bucket in range(rng.first, min(rng.last, topology.bucket_count - 1) + 1):
                claims[bucket].append(shard.name)
    return [None if not c else c[0] if len(c) == 1 else tuple(c) for c in claims]


def _moves(old: Topology, new: Topology) -> tuple[list[BucketMove], list[UnsafeChange]]:
    unsafe: list[UnsafeChange] = []
    before, after = _owners(old), _owners(new)
    groups: dict[tuple[Owner, Owner], list[int]] = defaultdict(list)
    doubled: dict[tuple[str, ...], list[int]] = defaultdict(list)
    for bucket, (was, now) in enumerate(zip(before, after, strict=True)):
        if isinstance(now, tuple):
            doubled[now].append(bucket)
        elif was != now and not isinstance(was, tuple):
            groups[(was, now)].append(bucket)
    moves = [BucketMove(src, dst, tuple(ranges_of(buckets)))
             for (src, dst), buckets in groups.items()]
    for move in moves:
        if move.target is None:
            unsafe.append(UnsafeChange(
                f"buckets {', '.join(map(str, move.ranges[:8]))}",
                f"{move.count} bucket(s) left without a shard (the new file would be "
                f"rejected: every bucket 0..{new.bucket_count - 1} needs exactly one shard)",
            ))
    for shard in new.shards:
        outside = [r for r in shard.buckets if r.last >= new.bucket_count]
        if outside:
            unsafe.append(UnsafeChange(
                f"shard {shard.name}", f"bucket range(s) {', '.join(map(str, outside))} "
                f"exceed bucket_count {new.bucket_count}"))
    for names, buckets in doubled.items():
        unsafe.append(UnsafeChange(
            f"buckets {', '.join(str(r) for r in ranges_of(buckets)[:8])}",
            f"{len(buckets)} bucket(s) assigned to several shards ({', '.join(names)})",
        ))
    return moves, unsafe


def _flat(prefix: str, value: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for f in dataclasses.fields(value):
        item = getattr(value, f.name)
        if f.name == "name" or item is None:  # None: not set, the default applies
            continue
        text = format_duration(item) if isinstance(item, float) and f.name not in (
            "primary_fallback_rate", "primary_latency_tolerance") else str(item)
        out[f"{prefix}.{f.name}"] = text
    return out


def _value_changes(old: dict[str, str], new: dict[str, str]) -> list[SettingChange]:
    return [SettingChange(key, old.get(key), new.get(key))
            for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]


def _profile_changes(old: Topology, new: Topology) -> list[SettingChange]:
    def flat(topology: Topology) -> dict[str, str]:
        out = {"default_profile": str(topology.default_profile)}
        for name, profile in topology.profiles.items():
            out |= _flat(f"profiles.{name}", profile)
        return out
    return _value_changes(flat(old), flat(new))


def _setting_changes(old: Topology, new: Topology) -> list[SettingChange]:
    def flat(topology: Topology) -> dict[str, str]:
        return {"bucket_count": str(topology.bucket_count),
                **_flat("monitor", topology.monitor), **_flat("routing", topology.routing)}
    return _value_changes(flat(old), flat(new))


def load_for_diff(source: Topology | str | os.PathLike[str]) -> Topology:
    """A Topology as is, or a topology file read without the whole-file validation (so a
    file the loader would reject can still be compared). Malformed TOML or values raise
    :class:`ConfigError`."""
    return _load(source)


def structural_diff(old: Topology, new: Topology) -> ConfigDiff:
    """Everything :func:`~propstore.migrate.diff_topologies` reports that needs no database:
    the changes, and the unsafe entries the files alone prove (a bucket without a shard,
    or with two; anything else the loader would reject)."""
    unsafe: list[UnsafeChange] = []
    for label, topology in (("old file", old), ("new file", new)):
        problem = _validation_error(topology)
        # Bucket map problems are reported below, one entry per problem, not just the first.
        if problem is not None and "bucket" not in problem:
            unsafe.append(UnsafeChange(label, f"would be rejected: {problem}"))
    added, removed, changed = _node_changes(old, new)
    moves: list[BucketMove] = []
    if old.bucket_count == new.bucket_count:
        moves, bucket_problems = _moves(old, new)
        unsafe += bucket_problems
    old_names = {s.name for s in old.shards}
    new_names = {s.name for s in new.shards}
    return ConfigDiff(
        old=old.source, new=new.source,
        shards_added=tuple(s.name for s in new.shards if s.name not in old_names),
        shards_removed=tuple(s.name for s in old.shards if s.name not in new_names),
        nodes_added=tuple(added), nodes_removed=tuple(removed), nodes_changed=tuple(changed),
        buckets_moved=tuple(moves), profiles_changed=tuple(_profile_changes(old, new)),
        settings_changed=tuple(_setting_changes(old, new)), unsafe=tuple(unsafe),
        checked=False,
    )
