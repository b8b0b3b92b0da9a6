"""Writing the topology TOML (docs/config.md) for a sandbox cluster.

The file is built by hand: it is small and regular, and reading TOML (tomllib) is in the
standard library while writing it is not. ``[monitor]`` and ``[routing]`` are left out so the
library defaults apply.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Protocol

PROFILES: dict[str, str] = {"personalisation": "5s", "workflow": "500ms"}
DEFAULT_PROFILE = "personalisation"


class NodeView(Protocol):
    """What the writer needs of a node."""

    @property
    def name(self) -> str: ...

    @property
    def dsn(self) -> str: ...


class ShardView(Protocol):
    """What the writer needs of a shard."""

    @property
    def name(self) -> str: ...

    @property
    def buckets(self) -> tuple[int, int]: ...

    @property
    def primary(self) -> NodeView: ...

    @property
    def replicas(self) -> Sequence[NodeView]: ...


def bucket_ranges(bucket_count: int, shards: int) -> list[tuple[int, int]]:
    """Split ``0..bucket_count-1`` into ``shards`` contiguous inclusive ranges, sizes within 1."""
    if shards < 1 or bucket_count < shards:
        raise ValueError(f"cannot split {bucket_count} buckets over {shards} shards")
    size, extra = divmod(bucket_count, shards)
    ranges: list[tuple[int, int]] = []
    first = 0
    for index in range(shards):
        last = first + size + (1 if index < extra else 0) - 1
        ranges.append((first, last))
        first = last + 1
    return ranges


def _quote(text: str) -> str:
    # A JSON string literal is a valid TOML basic string (same escapes, \uXXXX for the rest).
    return json.dumps(text)


def _node_table(node: NodeView) -> str:
    via = getattr(node, "via", None)  # fronts say how they reach their servers
    extra = f", via = {_quote(via)}" if isinstance(via, str) else ""
    if getattr(node, "tracks_prepared", False) is True:
        extra += ", pooler_tracks_prepared = true"
    return f"{{ name = {_quote(node.name)}, dsn = {_quote(node.dsn)}{extra} }}"


def render_config(shards: Sequence[ShardView], bucket_count: int,
                  replicas: Mapping[str, Sequence[NodeView]] | None = None) -> str:
    """The topology file's text for these shards; ``replicas`` replaces a shard's replica
    entries by name (e.g. a pooler in front of them)."""
    lines = [
        "# Written by propstore.sandbox for a local cluster; see docs/config.md.",
        f"bucket_count = {bucket_count}",
        f"default_profile = {_quote(DEFAULT_PROFILE)}",
        "",
    ]
    for profile, staleness in PROFILES.items():
        lines += [f"[profiles.{profile}]", f"max_staleness = {_quote(staleness)}", ""]
    for shard in shards:
        first, last = shard.buckets
        lines += [
            "[[shards]]",
            f"name = {_quote(shard.name)}",
            f"buckets = [{_quote(f'{first}-{last}')}]",
            f"primary = {_node_table(shard.primary)}",
            "replicas = [",
            *(f"  {_node_table(replica)}," for replica in (
                (replicas or {}).get(shard.name, shard.replicas))),
            "]",
            "",
        ]
    return "\n".join(lines)
