"""Which node is a shard's primary *now*: the one place migrate and the config rollout ask.

The file's roles are a starting guess (an HA manager moves them; a shard given as
``members`` has none). Every node is asked ``pg_is_in_recovery()``; with a Patroni source
(``patroni`` endpoints in the file) its leader must be that node too. Exactly one node
answering as a primary (and named by Patroni, if it answers) is the shard's primary; two,
or a disagreement, or none while the file's primary answers as a replica, is refused with
every node's observed role, so nothing is migrated or reconfigured on a node that only the
file calls primary. A file primary that does not answer (and no other primary) is left to
the caller's own wait: it may be restarting.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace

import psycopg

from propstore.config import DiscoverySettings, NodeConfig, ShardConfig, Topology
from propstore.discovery import PatroniSource
from propstore.errors import MigrationError


def observed_shard(shard: ShardConfig, connect_timeout: float = 2.0,
                   discovery: DiscoverySettings | None = None) -> ShardConfig:
    """``shard`` with the node observed as its primary in the primary slot (the others as
    replicas, in file order); unchanged when the file already says so.

    Raises:
        MigrationError: no node, or more than one, answers as a primary, or Patroni names
            another leader; the message lists each node's observed role.
    """
    roles = [(node, _role_of(node, connect_timeout)) for node in shard.nodes]
    primaries = [node for node, role in roles if role == "primary"]
    leadership = PatroniSource(shard, discovery or DiscoverySettings()).leadership_now() if (
        shard.patroni_endpoints) else None
    observed = ", ".join(f"{node.name} ({node.address}) {role}" for node, role in roles)
    if leadership is not None:
        observed += f"; patroni {leadership}"
        primaries = [node for node in primaries if leadership.admits(node.name)]
    if not primaries and roles[0][1].startswith("down") and (
        leadership is None or leadership.leader in (None, shard.primary.name)
    ):
        # The file's primary does not answer and no other node is a primary: it may be
        # restarting. The caller's own wait (the pre-flight) decides, as without a source.
        return shard
    if len(primaries) != 1:
        what = "no node" if not primaries else f"{len(primaries)} nodes"
        raise MigrationError(f"shard {shard.name}: {what} observed as the primary "
                             f"({observed}); nothing done")
    (primary,) = primaries
    if primary is shard.primary:
        return shard
    return replace(
        shard, primary=replace(primary, role="primary"),
        replicas=tuple(replace(node, role="replica") for node in shard.nodes
                       if node is not primary),
    )


def observed_topology(topology: Topology, shards: Collection[str] | None = None) -> Topology:
    """``topology`` with each shard (or each named one) as :func:`observed_shard` sees it."""
    return replace(topology, shards=tuple(
        observed_shard(shard, topology.routing.connect_timeout, topology.discovery)
        if shards is None or shard.name in shards else shard
        for shard in topology.shards
    ))


def _role_of(node: NodeConfig, connect_timeout: float) -> str:
    try:
        with psycopg.connect(node.dsn, autocommit=True,
                             connect_timeout=max(2, round(connect_timeout)),
                             application_name="propstore-migrate") as conn:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()
        return f"down ({type(exc).__name__}: {first[0] if first else ''})"[:200]
    return "replica" if row and row[0] else "primary"


__all__ = ["observed_shard", "observed_topology"]
