"""The budget options of a read (``--max-staleness``, ``--after``, ``--profile``,
``--strong``), shared by every command that takes them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from propstore.cli._context import DURATION

F = TypeVar("F", bound=Callable[..., Any])


def budget_options(function: F) -> F:
    """``--max-staleness``, ``--after``, ``--profile``, ``--strong``: a read's budget."""
    options = [
        click.option("--max-staleness", type=DURATION, default=None,
                     help="Serve from a replica only if proven at most this stale "
                          "(e.g. 500ms, 2s)."),
        click.option("--after", "after", metavar="TOKEN", default=None,
                     help="Read-your-writes: include the writes that returned TOKEN."),
        click.option("--profile", default=None,
                     help="Use a reader profile's budget from the topology file."),
        click.option("--strong", is_flag=True, help="Read from the primary."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def budget_of(max_staleness: float | None, after: str | None, profile: str | None,
              strong: bool) -> dict[str, Any]:
    """The keyword arguments for ``PropertyStore.read``/``route``; empty: default profile."""
    budget: dict[str, Any] = {}
    if max_staleness is not None:
        budget["max_staleness"] = max_staleness
    if after is not None:
        budget["after"] = after
    if profile is not None:
        budget["profile"] = profile
    if strong:
        budget["consistency"] = "strong"
    return budget
