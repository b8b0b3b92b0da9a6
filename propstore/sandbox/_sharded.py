"""What every sandbox cluster shape shares: shards of one primary and N streaming standbys,
and the waits and fault undo over them.

:class:`~propstore.sandbox.LocalCluster` (server processes) and
:class:`~propstore.sandbox.ContainerCluster` (containers) differ in how a node is started,
stopped and frozen (:class:`StreamingNode`'s abstract methods), not in how a cluster of
them catches up or is brought back to health; that part lives here once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial
from typing import Generic, TypeVar

from propstore.sandbox._errors import SandboxError
from propstore.sandbox._replication import StreamingNode, wait_caught_up

NodeT = TypeVar("NodeT", bound=StreamingNode)


class StreamingShard(Generic[NodeT]):
    """A shard: ``primary`` and the ``replicas`` streaming from it (set by the subclass)."""

    name: str
    primary: NodeT
    replicas: list[NodeT]

    @property
    def nodes(self) -> list[NodeT]:
        """Primary first, then replicas."""
        return [self.primary, *self.replicas]

    def wait_caught_up(self, timeout: float = 60.0) -> None:
        """Wait until every replica has replayed the primary's current flushed WAL (seconds)."""
        replicas = [node for node in self.replicas if node.role == "replica"]
        wait_caught_up(self.primary, replicas, timeout)


class ShardedCluster(Generic[NodeT]):
    """Node lookup, catching up and undoing faults over ``shards`` (set by the subclass)."""

    shards: Sequence[StreamingShard[NodeT]]

    @property
    def nodes(self) -> list[NodeT]:
        """Every node, shard by shard, primary first."""
        return [node for shard in self.shards for node in shard.nodes]

    def node(self, name: str) -> NodeT:
        """The node called ``name`` (``shard1-replica2``)."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise SandboxError(f"no node named {name!r} (have {[n.name for n in self.nodes]})")

    def wait_caught_up(self, timeout: float = 60.0) -> None:
        """Wait until every replica of every shard has replayed its primary's flushed WAL."""
        for shard in self.shards:
            shard.wait_caught_up(timeout)

    def reset_faults(self, timeout: float = 120.0) -> None:
        """Undo every injected fault (freeze, kill, paused replay, delay, repoint) and catch up.

        A promotion cannot be undone: that raises, and such tests belong on their own cluster.
        """
        promoted = [node.name for shard in self.shards for node in shard.replicas
                    if node.role != "replica"]
        for node in self.nodes:
            node.thaw()
        # Primaries first: a replica can only stream again once its upstream is back.
        run_parallel([partial(shard.primary.reset_faults, timeout) for shard in self.shards])
        run_parallel([partial(node.reset_faults, timeout)
                      for shard in self.shards for node in shard.replicas])
        if promoted:
            raise SandboxError(f"promoted replicas {promoted} cannot be demoted; "
                               "run promotion tests on a cluster of their own")
        self.wait_caught_up(timeout)


def run_parallel(tasks: Sequence[Callable[[], object]]) -> None:
    """Run callables on threads; wait for all, then raise the first failure."""
    if len(tasks) <= 1:
        for task in tasks:
            task()
        return
    with ThreadPoolExecutor(max_workers=len(tasks)) as pool:
        futures = [pool.submit(task) for task in tasks]
        try:
            wait(futures)
        except BaseException:
            # An interrupt (Ctrl-C, SIGTERM, SIGHUP) reaches the main thread only; the tasks
            # run on. Let them finish, so that the caller's clean-up (stop()) finds every
            # server they started rather than racing a server still coming up.
            wait(futures)
            raise
    for future in futures:
        error = future.exception()
        if error is not None:
            raise error


__all__ = ["NodeT", "ShardedCluster", "StreamingShard", "run_parallel"]
