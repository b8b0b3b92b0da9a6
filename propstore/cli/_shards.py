"""``propstore shards``: the topology as configured (no database is contacted)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from propstore._durations import format_duration
from propstore.cli._context import WIDE_HELP, CliState, emit, output_console, pass_state
from propstore.cli._table import Column, FittedTable
from propstore.config import NodeConfig, ShardConfig, Topology


def topology_document(topology: Topology) -> dict[str, Any]:
    """``shards --json``: shards with their buckets and nodes (DSNs without passwords)."""
    return {
        "source": topology.source,
        "bucket_count": topology.bucket_count,
        "default_profile": topology.default_profile,
        "profiles": {name: {"max_staleness_seconds": p.max_staleness}
                     for name, p in topology.profiles.items()},
        "shards": [
            {
                "name": shard.name,
                "buckets": [str(r) for r in shard.buckets],
                "bucket_count": shard.bucket_total,
                "nodes": [
                    {"name": node.name, "role": node.role, "address": node.address,
                     "dsn": node.safe_dsn}
                    for node in shard.nodes
                ],
            }
            for shard in topology.shards
        ],
    }


@dataclass(frozen=True, slots=True)
class _NodeLine:
    shard: ShardConfig
    node: NodeConfig
    first: bool
    bucket_count: int


def _of_first(text: Callable[[_NodeLine], str]) -> Callable[[_NodeLine], str]:
    return lambda line: text(line) if line.first else ""


#: One row per node; the shard's figures on its first row. At 80 terminal columns: shard,
#: buckets, node, configured role; then address, count and share as the width allows.
TOPOLOGY_COLUMNS: tuple[Column[_NodeLine], ...] = (
    Column("shard", _of_first(lambda line: line.shard.name)),
    Column("buckets", _of_first(lambda line: ", ".join(str(r) for r in line.shard.buckets)),
           shrink="wrap"),
    Column("count", _of_first(lambda line: str(line.shard.bucket_total)), priority=2,
           justify="right"),
    Column("share", _of_first(
        lambda line: f"{100 * line.shard.bucket_total / line.bucket_count:.1f}%"),
        priority=3, justify="right"),
    Column("node", lambda line: line.node.name),
    Column("configured role", lambda line: line.node.role, shrink="wrap"),
    Column("address", lambda line: line.node.address, priority=1),
)


def topology_table(topology: Topology, *, wide: bool = False) -> FittedTable[_NodeLine]:
    """One row per node, a section per shard."""
    sections = [[_NodeLine(shard, node, i == 0, topology.bucket_count)
                 for i, node in enumerate(shard.nodes)] for shard in topology.shards]
    return FittedTable(TOPOLOGY_COLUMNS, sections, wide=wide)


@click.command("shards")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--wide", is_flag=True, help=WIDE_HELP)
@pass_state
def shards_command(state: CliState, as_json: bool, wide: bool) -> None:
    """Show the topology: shards, the buckets each owns, their nodes and the profiles.

    Roles are the configured ones; `propstore lag` shows the observed roles.
    """
    topology = state.topology()
    if as_json:
        click.echo(json.dumps(topology_document(topology), indent=2))
        return
    console = output_console(wide)
    console.print(f"{topology.source}: {len(topology.shards)} shards, "
                  f"{topology.bucket_count} buckets")
    emit(console, topology_table(topology, wide=wide))
    profiles = ", ".join(
        f"{name} ({format_duration(p.max_staleness)})" + (
            " default" if name == topology.default_profile else "")
        for name, p in topology.profiles.items()
    )
    console.print(f"profiles: {profiles or 'none'}")
