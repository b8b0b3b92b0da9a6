"""``propstore shards``: the topology as configured (no database is contacted)."""

from __future__ import annotations

import json
from typing import Any

import click
from rich import box
from rich.table import Table

from propstore._durations import format_duration
from propstore.cli._context import CliState, emit, output_console, pass_state
from propstore.config import Topology


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


def topology_table(topology: Topology) -> Table:
    """One row per node, a section per shard."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for heading in ("shard", "buckets", "count", "share", "node", "role", "address"):
        table.add_column(heading, no_wrap=True,
                         justify="right" if heading in ("count", "share") else "left")
    for shard in topology.shards:
        ranges = ", ".join(str(r) for r in shard.buckets)
        share = f"{100 * shard.bucket_total / topology.bucket_count:.1f}%"
        for i, node in enumerate(shard.nodes):
            first = i == 0
            table.add_row(
                shard.name if first else "", ranges if first else "",
                str(shard.bucket_total) if first else "", share if first else "",
                node.name, f"{node.role} (configured)", node.address,
                end_section=i == len(shard.nodes) - 1,
            )
    return table


@click.command("shards")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@pass_state
def shards_command(state: CliState, as_json: bool) -> None:
    """Show the topology: shards, the buckets each owns, their nodes and the profiles.

    Roles are the configured ones; `propstore lag` shows the observed roles.
    """
    topology = state.topology()
    if as_json:
        click.echo(json.dumps(topology_document(topology), indent=2))
        return
    console = output_console()
    console.print(f"{topology.source}: {len(topology.shards)} shards, "
                  f"{topology.bucket_count} buckets")
    emit(console, topology_table(topology))
    profiles = ", ".join(
        f"{name} ({format_duration(p.max_staleness)})" + (
            " default" if name == topology.default_profile else "")
        for name, p in topology.profiles.items()
    )
    console.print(f"profiles: {profiles or 'none'}")
