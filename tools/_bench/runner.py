"""Running a list of scenarios on one cluster: what ``tools/bench.py`` calls."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from _bench import affinity
from _bench.env import Skip, bench_env
from _bench.options import Options
from _bench.report import machine_info
from _bench.results import ScenarioResult
from _bench.scenarios import SCENARIOS

log = structlog.get_logger("bench")


@dataclass(frozen=True)
class ClusterShape:
    """The cluster to start (ignored when ``config`` names one to reuse)."""

    config: Path | None = None
    shards: int = 2
    replicas: int = 1
    users: int = 20_000


def default_scenarios(soak: bool) -> list[str]:
    """Every scenario, with ``soak`` only when asked for."""
    return [name for name, s in SCENARIOS.items() if not s.optional or soak]


def run(names: Sequence[str], options: Options, shape: ClusterShape
        ) -> tuple[list[ScenarioResult], dict[str, Any]]:
    """Run ``names`` in order on one cluster; the results and the machine they ran on.

    A scenario that cannot run here (no sandbox for fault injection, too few users) is
    reported as skipped with the reason; faults are undone after every scenario.
    """
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; have {list(SCENARIOS)}")
    results: list[ScenarioResult] = []
    pin = options.pin and affinity.available()
    if pin:
        affinity.pin_client()  # before any thread starts, so every thread inherits it
    servers = affinity.database_cpus(options.pgpool_cpu) if pin else None
    with bench_env(shape.config, shards=shape.shards, replicas=shape.replicas,
                   users=shape.users, pin=pin, cpus=servers) as env:
        machine = machine_info(env.primary_dsn(0))
        pgpool_cpus = sorted(affinity.pgpool_cpus(options.pgpool_cpu)) if pin else None
        machine["cpu placement"] = (
            f"client on CPU {affinity.CLIENT_CPU}, servers on CPUs {sorted(servers or ())}, "
            f"Pgpool on CPUs {pgpool_cpus}" if pin and shape.config is None
            else f"client on CPU {affinity.CLIENT_CPU}, servers not pinned (reused cluster), "
            f"Pgpool on CPUs {pgpool_cpus}" if pin else "not pinned")
        machine["cluster"] = (f"{len(env.topology.shards)} shards x "
                              f"{len(env.topology.shards[0].replicas)} replicas, "
                              f"{len(env.users):,} users")
        for name in names:
            log.warning("bench.scenario", name=name)
            try:
                result = SCENARIOS[name].run(env, options)
            except Skip as exc:
                result = ScenarioResult(name, "", skipped=str(exc))
            results.append(result)
            env.reset()
    return results, machine
