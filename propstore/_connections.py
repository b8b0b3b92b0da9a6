"""The per-process connection budget: how many connections one store may hold, in total.

A fleet multiplies whatever one process holds by the number of processes, so the number a
server sees is ``processes x connections per process to it``. ``routing.connection_budget``
caps one store's connections to *all* servers: one monitor connection per node is always
reserved (a store that shares a host's monitor still falls back to polling itself when it
loses it, and must not then exceed its budget), and what is left is split evenly into the
node pools, each at most ``routing.pool_max_size``. The split is static rather than a pool
of pools: the ceiling per server, which is what a fleet's capacity plan needs, is then a
number the configuration states, not one traffic decides.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The budget when the configuration gives none: enough for the default pools of a small
#: topology, and never less than the least a big one needs (2 per node).
DEFAULT_BUDGET = 64
#: Connections every node needs from a store beyond its pool: the lag monitor's.
MONITOR_PER_NODE = 1


@dataclass(frozen=True, slots=True)
class ConnectionBudget:
    """How one store's connections are planned (``Topology.connections``).

    ``total``: the most connections the store holds at once, to every server together;
    ``nodes``: servers in the topology; ``pool_min_size``/``pool_max_size``: each node
    pool's bounds after the split; ``stated``: whether the configuration gave the budget.
    """

    total: int
    nodes: int
    pool_min_size: int
    pool_max_size: int
    stated: bool

    @property
    def monitor(self) -> int:
        """Connections reserved for the lag monitor (one per node)."""
        return self.nodes * MONITOR_PER_NODE

    @property
    def ceiling(self) -> int:
        """The most the plan can ever open: every pool full plus the monitor (<= total)."""
        return self.nodes * self.pool_max_size + self.monitor

    def __str__(self) -> str:
        return (f"{self.total} connections ({'stated' if self.stated else 'default'}): "
                f"{self.monitor} monitor + {self.nodes} pools of "
                f"{self.pool_min_size}..{self.pool_max_size}")

    @classmethod
    def plan(cls, nodes: int, budget: int, pool_min_size: int, pool_max_size: int
             ) -> ConnectionBudget:
        """Split ``budget`` (0: the default) over ``nodes``; ``ValueError`` naming the
        least this topology needs when the budget cannot hold it."""
        stated = budget > 0
        total = budget if stated else max(DEFAULT_BUDGET, nodes * (1 + MONITOR_PER_NODE))
        floor = max(1, pool_min_size)
        need = nodes * (floor + MONITOR_PER_NODE)
        if total < need:
            raise ValueError(
                f"routing.connection_budget = {total} cannot hold this topology: its {nodes} "
                f"nodes need at least {need} connections (per node {MONITOR_PER_NODE} for the "
                f"lag monitor and {floor} pooled, routing.pool_min_size = {pool_min_size}); "
                f"raise the budget to {need} or more"
                + (" or lower routing.pool_min_size" if pool_min_size > 1 else "")
            )
        per_node = min(pool_max_size, (total - nodes * MONITOR_PER_NODE) // nodes)
        return cls(total=total, nodes=nodes, pool_min_size=pool_min_size,
                   pool_max_size=per_node, stated=stated)
