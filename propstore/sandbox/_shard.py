"""A shard of the local cluster: one primary, its replicas, the buckets it owns."""

from __future__ import annotations

from dataclasses import dataclass, field

from propstore.sandbox._node import LocalNode
from propstore.sandbox._sharded import StreamingShard


@dataclass
class LocalShard(StreamingShard[LocalNode]):
    """One shard: a primary, its replicas and the inclusive bucket range it owns.

    ``primary`` is the node created as primary; after a replica's :meth:`LocalNode.promote`
    it keeps pointing there (the topology file's roles are the expected ones, too).
    """

    name: str
    primary: LocalNode
    replicas: list[LocalNode] = field(default_factory=list)
    buckets: tuple[int, int] = (0, 0)
