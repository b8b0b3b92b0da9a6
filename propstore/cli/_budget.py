"""A read's budget options (``--max-staleness``, ``--after``, ``--profile``, ``--strong``):
declared once, checked once, for every command that takes them (``get``, ``route``, and
``lag``'s check).

The library decides what a budget means: :func:`read_budget` hands the options to the
store's own argument check (``StoreCore.budget``, what ``PropertyStore.get`` runs), so an
unknown profile or a bad token is refused here exactly as a program would see it, before
any connection is opened. The CLI adds one rule of its own: ``--strong`` reads the primary,
so giving it with a budget is a mistake to point out, not an option to drop in silence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import click

from propstore.cli._context import DURATION

if TYPE_CHECKING:
    from propstore.config import Topology
    from propstore.freshness import Freshness

F = TypeVar("F", bound=Callable[..., Any])

#: The combination rules, shown under every command that takes budget options.
BUDGET_RULES = (
    "Budget options combine as in the library: --profile, --max-staleness and --after "
    "given together must all hold (the tighter staleness bound, and the token). --strong "
    "reads the primary and stands alone. Without any, the topology's default profile "
    "applies. Durations are >= 0 (500ms, 2s, 1.5)."
)

# Quoted as click quotes the options it names itself (a bad duration), so every budget
# error reads alike.
_OPTION_OF_FIELD = {"max_staleness": "'--max-staleness'", "profile": "'--profile'",
                    "token": "'--after'", "consistency": "'--strong'"}


def staleness_option(help_text: str) -> Callable[[F], F]:
    """``--max-staleness``, a duration >= 0."""
    return click.option("--max-staleness", type=DURATION, default=None, help=help_text)


def profile_option(help_text: str) -> Callable[[F], F]:
    """``--profile NAME`` (a reader profile of the topology file)."""
    return click.option("--profile", metavar="NAME", default=None, help=help_text)


def budget_options(function: F) -> F:
    """``--max-staleness``, ``--after``, ``--profile``, ``--strong``: a read's budget."""
    options = [
        staleness_option("Serve from a replica only if proven at most this stale."),
        click.option("--after", "after", metavar="TOKEN", default=None,
                     help="Read-your-writes: include the writes that returned TOKEN."),
        profile_option("Use a reader profile's budget from the topology file."),
        click.option("--strong", is_flag=True, help="Read from the primary (given alone)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@dataclass(frozen=True, slots=True)
class ReadBudget:
    """A checked budget: the keyword arguments for ``PropertyStore.read``/``route``
    (empty: the default profile) and the :class:`~propstore.Freshness` they resolve to."""

    options: dict[str, Any]
    freshness: Freshness


def read_budget(topology: Topology, *, max_staleness: float | None = None,
                after: str | None = None, profile: str | None = None,
                strong: bool = False) -> ReadBudget:
    """Check the budget options against ``topology`` with the library's own rules; a
    refused option is a usage error naming it (exit status 2)."""
    from propstore.errors import InvalidInputError
    from propstore.store._core import StoreCore

    if strong and (max_staleness is not None or after is not None or profile is not None):
        raise click.UsageError("--strong reads the primary: give it without --max-staleness, "
                               "--after or --profile")
    options: dict[str, Any] = {}
    if max_staleness is not None:
        options["max_staleness"] = max_staleness
    if after is not None:
        options["after"] = after
    if profile is not None:
        options["profile"] = profile
    if strong:
        options["consistency"] = "strong"
    try:
        # The store's own check (pure: StoreCore opens no connection).
        freshness, _policy = StoreCore(topology).budget(options)
    except InvalidInputError as exc:
        message = str(exc).removeprefix(f"invalid {exc.field}: ")
        raise click.BadParameter(message, param_hint=_OPTION_OF_FIELD.get(exc.field)) from None
    return ReadBudget(options, freshness)


__all__ = ["BUDGET_RULES", "ReadBudget", "budget_options", "profile_option", "read_budget",
           "staleness_option"]
