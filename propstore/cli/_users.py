"""Support commands on one user: ``route``, ``get``, ``set``, ``unset``, ``delete``."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import click

from propstore._durations import format_bound
from propstore.cli._budget import BUDGET_RULES, budget_options, read_budget
from propstore.cli._context import CliState, pass_state

if TYPE_CHECKING:
    from propstore.freshness import Token
    from propstore.store import ReadResult


@click.command("route", epilog=BUDGET_RULES)
@click.argument("tenant")
@click.argument("user_id", metavar="USER")
@budget_options
@pass_state
def route_command(state: CliState, tenant: str, user_id: str, max_staleness: float | None,
                  after: str | None, profile: str | None, strong: bool) -> None:
    """Explain where a read of USER would be served now, and why.

    Prints the user's bucket and shard, every replica with its replay LSN and proven
    staleness bound (candidate or rejected, with the reason), and the choice. Without a
    budget option the topology's default profile applies.
    """
    topology = state.topology()
    budget = read_budget(topology, max_staleness=max_staleness, after=after, profile=profile,
                         strong=strong)
    from propstore.cli._lag import provenance, refusal_text

    with state.open_store(topology) as store:
        decision = store.route(tenant, user_id, **budget.options)
        bucket = store.topology.bucket_of(tenant, user_id)
        refused = store.stats.refused(decision.shard.name)
        where = provenance(store)
    click.echo(f"{tenant}/{user_id}: bucket {bucket} of {store.topology.bucket_count}, "
               f"shard {decision.shard.name}")
    click.echo(decision.explain())
    click.echo(f"  reads refused by this process: {refusal_text(refused)}")
    if where.scope == "host":
        host = where.refusals.get(decision.shard.name, {})
        click.echo(f"  {where.cover}: {refusal_text(host)}")
    click.echo(f"  {where.source.describe()}")


def result_document(tenant: str, user_id: str, result: ReadResult) -> dict[str, Any]:
    """``get --json``: the read's answer and how it was served (docs/operating.md)."""
    bound = result.staleness_bound
    return {
        "tenant": tenant,
        "user_id": user_id,
        "props": result.props,
        "version": result.version,
        "shard": result.shard,
        "node": result.node,
        "from_replica": result.from_replica,
        "replay_lsn": None if result.replay_lsn is None else str(result.replay_lsn),
        "staleness_bound_seconds": None if math.isinf(bound) else bound,
        "fallback_reason": result.fallback_reason,
        "proof": result.proof,
        "within_budget": result.within_budget,
    }


@click.command("get", epilog=BUDGET_RULES)
@click.argument("tenant")
@click.argument("user_id", metavar="USER")
@budget_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON document.")
@pass_state
def get_command(state: CliState, tenant: str, user_id: str, max_staleness: float | None,
                after: str | None, profile: str | None, strong: bool, as_json: bool) -> None:
    """Read USER's properties and say who served them and how fresh they are proven.

    Exit status 0 whether or not the user has properties (the output says which).
    """
    topology = state.topology()
    budget = read_budget(topology, max_staleness=max_staleness, after=after, profile=profile,
                         strong=strong)
    with state.open_store(topology) as store:
        result = store.read(tenant, user_id, **budget.options)
    if as_json:
        click.echo(json.dumps(result_document(tenant, user_id, result), indent=2))
        return
    if result.props is None:
        click.echo(f"{tenant}/{user_id} has no properties")
    else:
        click.echo(json.dumps(result.props, indent=2, ensure_ascii=False))
    served = "replica" if result.from_replica else "primary"
    line = f"served by {result.node} ({served}, shard {result.shard}), proof {result.proof}"
    if result.from_replica:
        line += f", replay LSN {result.replay_lsn}, staleness bound " + format_bound(
            result.staleness_bound)
    if result.fallback_reason:
        line += f", fallback reason {result.fallback_reason}"
    if result.version is not None:
        line += f", version {result.version}"
    if not result.within_budget:
        line += " (OUTSIDE the budget: on_stale='serve')"
    click.echo(line)


def parse_assignments(assignments: tuple[str, ...]) -> dict[str, Any]:
    """``key=text`` (a string) and ``key:=json`` (any JSON value), as in HTTPie."""
    props: dict[str, Any] = {}
    for item in assignments:
        json_key, sep_json, json_value = item.partition(":=")
        text_key, sep_text, text_value = item.partition("=")
        if sep_json and len(json_key) < len(text_key):
            try:
                props[json_key] = json.loads(json_value)
            except json.JSONDecodeError as exc:
                raise click.BadParameter(f"{item!r}: not JSON after ':=' ({exc.msg})") from None
        elif sep_text and text_key:
            props[text_key] = text_value
        else:
            raise click.BadParameter(f"{item!r}: expected key=value or key:=json")
    return props


@click.command("set")
@click.argument("tenant")
@click.argument("user_id", metavar="USER")
@click.argument("assignments", metavar="KEY=VALUE|KEY:=JSON...", nargs=-1)
@click.option("--json", "document", metavar="OBJECT", default=None,
              help="The properties as one JSON object instead of assignments.")
@click.option("--replace", "replace_all", is_flag=True,
              help="Replace the whole document instead of merging into it.")
@pass_state
def set_command(state: CliState, tenant: str, user_id: str, assignments: tuple[str, ...],
                document: str | None, replace_all: bool) -> None:
    """Merge properties into USER's document; prints the token to read the write back.

    KEY=VALUE sets a string; KEY:=JSON sets any JSON value (KEY:=42, KEY:=true,
    KEY:='["a","b"]'). Example:

    \b
        propstore set acme user-1 plan=pro seats:=5
        propstore get acme user-1 --after <printed token>
    """
    if document is not None and assignments:
        raise click.UsageError("give KEY=VALUE assignments or --json, not both")
    if document is not None:
        try:
            props = json.loads(document)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not JSON: {exc.msg}", param_hint="'--json'") from None
        if not isinstance(props, dict):
            raise click.BadParameter("must be a JSON object", param_hint="'--json'")
    elif assignments:
        props = parse_assignments(assignments)
    else:
        raise click.UsageError("nothing to set: give KEY=VALUE assignments or --json")
    with state.open_store(settle=False) as store:
        write = store.replace if replace_all else store.set
        token = write(tenant, user_id, props)
    click.echo(str(token))


@click.command("unset")
@click.argument("tenant")
@click.argument("user_id", metavar="USER")
@click.argument("keys", metavar="KEY...", nargs=-1, required=True)
@pass_state
def unset_command(state: CliState, tenant: str, user_id: str, keys: tuple[str, ...]) -> None:
    """Remove KEYs from USER's properties (absent keys are ignored); prints the token."""
    with state.open_store(settle=False) as store:
        token: Token = store.unset(tenant, user_id, list(keys))
    click.echo(str(token))


@click.command("delete")
@click.argument("tenant")
@click.argument("user_id", metavar="USER")
@pass_state
def delete_command(state: CliState, tenant: str, user_id: str) -> None:
    """Delete all of USER's properties; prints the token."""
    with state.open_store(settle=False) as store:
        token = store.delete(tenant, user_id)
    click.echo(str(token))
