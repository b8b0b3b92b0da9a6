"""The scenarios, by name, in the order a full run takes them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from _bench.env import BenchEnv
from _bench.options import Options
from _bench.results import ScenarioResult
from _bench.scenarios.faults import frozen_replica, lagging_replica
from _bench.scenarios.fleet import fleet
from _bench.scenarios.latency import read_batch, read_fresh, write
from _bench.scenarios.monitor import monitor_cost
from _bench.scenarios.restart import primary_restart
from _bench.scenarios.soak import soak
from _bench.scenarios.startup import cli_startup
from _bench.scenarios.surge import surge
from _bench.scenarios.topologies import topologies


@dataclass(frozen=True)
class Scenario:
    """A named scenario; ``optional`` ones run only when asked for (by name, or all of them
    with ``--soak``)."""

    name: str
    run: Callable[[BenchEnv, Options], ScenarioResult]
    optional: bool = False


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("read-fresh", read_fresh),
    Scenario("read-batch", read_batch),
    Scenario("write", write),
    Scenario("lagging-replica", lagging_replica),
    Scenario("frozen-replica", frozen_replica),
    Scenario("monitor-cost", monitor_cost),
    Scenario("cli-startup", cli_startup),
    Scenario("surge", surge),
    Scenario("topologies", topologies),
    Scenario("fleet", fleet),
    Scenario("soak", soak, optional=True),
    # Restarts every server (and changes max_connections meanwhile): only when asked for.
    Scenario("primary-restart", primary_restart, optional=True),
)}

__all__ = ["SCENARIOS", "Scenario"]
