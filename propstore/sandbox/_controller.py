"""The sandbox's node controller: restarts a local server by name (pg_ctl stop, start)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from propstore.config import NodeConfig

if TYPE_CHECKING:
    from propstore.sandbox._cluster import LocalCluster


class LocalNodeController:
    """A :class:`~propstore.migrate.NodeController` for a :class:`LocalCluster`: finds the
    node by its configured name and restarts it (fast shutdown, then start)."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        #: Names of the nodes restarted, in order (tests check what was restarted).
        self.restarted: list[str] = []

    def restart(self, node: NodeConfig, timeout: float) -> None:
        """Restart ``node`` (``pg_ctl stop -m fast`` then ``start -w``)."""
        self.cluster.node(node.name).restart(timeout)
        self.restarted.append(node.name)
