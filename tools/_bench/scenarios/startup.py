"""How long the ``propstore`` command takes to start, for commands that need no database.

Each contender is a fresh process (``sys.executable -m propstore.cli ...``), run in turns
with the others (A B C, B C A, ...) so that the machine's load falls on all of them alike;
the floor is ``python -c pass``, and ``config diff --no-check`` (which loads the library
stack: psycopg, SQLAlchemy, alembic, structlog, without connecting) shows what the lazy imports
save. ``lag --help`` and ``config apply --help`` stand for every subcommand's help. Wall time
is what an operator waits; the CPU time (user + system, from ``wait4``) is the steadier figure
on a shared machine. The bar is issue 15's: 0.3 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from _bench.env import BenchEnv
from _bench.options import Options
from _bench.results import Bar, ScenarioResult
from _bench.stats import Series

#: Issue 15: ``--help``, ``--version``, ``shards`` and a command's help start within this
#: (seconds).
BAR_SECONDS = 0.3
_MIN_RUNS = 15


def _commands(config: str) -> dict[str, list[str]]:
    cli = [sys.executable, "-m", "propstore.cli"]
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "propstore --help": [*cli, "--help"],
        "propstore --version": [*cli, "--version"],
        "propstore shards": [*cli, "--config", config, "shards"],
        "propstore lag --help": [*cli, "lag", "--help"],
        "propstore config apply --help": [*cli, "config", "apply", "--help"],
        "propstore config diff --no-check": [*cli, "config", "diff", "--no-check", config,
                                             config],
    }


def _run_once(argv: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run (stdout discarded)."""
    began = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - began
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.stderr is not None
    error = process.stderr.read()
    process.stderr.close()
    if process.returncode != 0:
        raise RuntimeError(f"{argv} exited {process.returncode}: {error.decode()[-300:]}")
    return wall, usage.ru_utime + usage.ru_stime


def cli_startup(env: BenchEnv, options: Options) -> ScenarioResult:
    """Start-up wall and CPU time of ``propstore --help``/``--version``/``shards`` and of two
    commands' help."""
    result = ScenarioResult("cli-startup", "propstore CLI start-up: fresh processes, in turns")
    commands = _commands(str(env.config_path))
    wall = {name: Series(name) for name in commands}
    cpu = {name: Series(f"{name} (CPU)") for name in commands}
    names = list(commands)
    for name in names:  # warm the page cache and the .pyc files
        _run_once(commands[name])
    began = time.monotonic()
    seconds = options.seconds(10.0)
    runs = 0
    while runs < _MIN_RUNS or time.monotonic() - began < seconds:
        block = int((time.monotonic() - began) / max(options.block_seconds, 1.0))
        shift = runs % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed, used = _run_once(commands[name])
            wall[name].add(elapsed, block, time.monotonic() - began)
            cpu[name].add(used, block, time.monotonic() - began)
        runs += 1
    result.duration = time.monotonic() - began
    result.add_series(*wall.values())
    for name in names[1:]:
        result.ratio(name, names[0])
    for name in ("propstore --help", "propstore --version", "propstore shards",
                 "propstore lag --help", "propstore config apply --help"):
        wall_median = wall[name].summary().median
        cpu_median = cpu[name].summary().median
        result.bars.append(Bar(
            f"{name} start-up (median wall)", wall_median * 1000, BAR_SECONDS * 1000,
            unit="ms", detail=f"CPU {cpu_median * 1000:.0f} ms",
        ))
    result.facts["runs per command"] = runs
    result.facts["median CPU ms"] = {
        name: round(series.summary().median * 1000, 1) for name, series in cpu.items()}
    result.notes.append("each run is a new interpreter; `python -c pass` is the floor")
    return result


__all__ = ["BAR_SECONDS", "cli_startup"]
