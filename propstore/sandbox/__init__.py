"""A local replicated PostgreSQL cluster for tests, benchmarks and the CLI sandbox.

``LocalCluster`` runs, per shard, one primary and N hot standbys fed by real streaming
replication on loopback ports, writes the topology file for them, and injects faults into
single servers: paused replay, apply delay, frozen processes, crashes, promotion, a cut WAL
receiver; ``LocalNodeController`` restarts its servers for a configuration rollout.
``up`` / ``status`` / ``down`` are the daemonised variant behind ``propstore sandbox``.
``ContainerCluster`` offers the same shape on Docker (testcontainers).
"""

from propstore.sandbox._cluster import LocalCluster
from propstore.sandbox._commands import down, status, up
from propstore.sandbox._containers import ContainerCluster, docker_available
from propstore.sandbox._controller import LocalNodeController
from propstore.sandbox._errors import SandboxError
from propstore.sandbox._locations import default_base_dir
from propstore.sandbox._node import LocalNode
from propstore.sandbox._shard import LocalShard

__all__ = [
    "ContainerCluster",
    "LocalCluster",
    "LocalNode",
    "LocalNodeController",
    "LocalShard",
    "SandboxError",
    "default_base_dir",
    "docker_available",
    "down",
    "status",
    "up",
]
