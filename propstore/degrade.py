"""Degrade policies: what a budgeted read does when no replica is within its budget and the
primary cannot take it either (its limiter sheds the read because it is overloaded).

A policy is a small immutable value, composed with ``|`` into steps tried in order::

    Degrade.serve_stale()                  # the freshest replica, with its true bound
    Degrade.wait(0.2)                      # up to 200 ms for a replica (or the primary)
    Degrade.wait("200ms") | Degrade.serve_stale()
    Degrade.refuse()                       # StaleReadError at once (the default)

When every step has been tried the read raises :class:`~propstore.StaleReadError`; so
``refuse()`` is the empty policy and ``p | refuse()`` is ``p``. The text form (for TOML
profiles, ``degrade = "wait(200ms) | serve_stale"``) is what ``str()`` prints and
:meth:`Degrade.parse` reads. ``on_stale="error"`` is ``refuse()`` and ``on_stale="serve"``
is ``serve_stale()``.

Strong and token reads never reach a policy: only the primary can serve them, so the
limiter never sheds them (see ``docs/degrade.md``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

from propstore._durations import format_duration, parse_duration
from propstore.errors import InvalidInputError

_STEP_RE = re.compile(r"^\s*([a-z_]+)\s*(?:\(\s*([^()]*?)\s*\))?\s*$")
#: The longest total wait a policy may ask for (seconds): a wait holds a reader, never a
#: connection, but a reader held for longer than this has been let down anyway.
MAX_WAIT = 60.0


@dataclass(frozen=True, slots=True)
class WaitStep:
    """Wait up to ``max_wait`` seconds for a replica to come within the budget, or for the
    primary to have room again; woken by the monitor's observations, never by polling."""

    max_wait: float

    def __str__(self) -> str:
        return f"wait({format_duration(self.max_wait)})"


@dataclass(frozen=True, slots=True)
class ServeStaleStep:
    """Serve the freshest up replica, marked ``within_budget=False``, with the staleness
    bound proven for it (``inf`` when nothing can be proven)."""

    def __str__(self) -> str:
        return "serve_stale()"


DegradeStep = WaitStep | ServeStaleStep


@dataclass(frozen=True, slots=True)
class Degrade:
    """A degrade policy: steps tried in order, then :class:`~propstore.StaleReadError`."""

    steps: tuple[DegradeStep, ...] = ()

    @classmethod
    def refuse(cls) -> Degrade:
        """Raise :class:`~propstore.StaleReadError` at once."""
        return cls(())

    @classmethod
    def serve_stale(cls) -> Degrade:
        """Serve the freshest replica with its true bound (``within_budget=False``)."""
        return cls((ServeStaleStep(),))

    @classmethod
    def wait(cls, max_wait: float | timedelta | str) -> Degrade:
        """Wait up to ``max_wait`` (seconds, ``timedelta`` or ``"200ms"``) for a replica
        within the budget or room on the primary."""
        try:
            seconds = parse_duration(max_wait, "max_wait")
        except ValueError as exc:
            raise InvalidInputError("degrade", str(exc)) from None
        if seconds > MAX_WAIT:
            raise InvalidInputError("degrade", f"max_wait above {MAX_WAIT:g}s")
        return cls((WaitStep(seconds),))

    def __or__(self, other: Degrade) -> Degrade:
        if not isinstance(other, Degrade):
            return NotImplemented
        combined = Degrade(self.steps + other.steps)
        if combined.max_wait > MAX_WAIT:
            raise InvalidInputError("degrade", f"waits add up to more than {MAX_WAIT:g}s")
        return combined

    @property
    def max_wait(self) -> float:
        """The longest the policy may hold a read (seconds), all its waits together."""
        return sum(s.max_wait for s in self.steps if isinstance(s, WaitStep))

    def __str__(self) -> str:
        return " | ".join(map(str, self.steps)) or "refuse()"

    def __repr__(self) -> str:
        return f"Degrade({self})"

    @classmethod
    def parse(cls, text: str) -> Degrade:
        """Read the form ``str()`` prints: ``"wait(200ms) | serve_stale"``, ``"refuse"``
        (parentheses optional without an argument)."""
        if not isinstance(text, str) or not text.strip():
            raise InvalidInputError("degrade", f"expected a policy such as "
                                    f"'wait(200ms) | serve_stale', got {text!r}")
        policy = cls.refuse()
        for part in text.split("|"):
            match = _STEP_RE.match(part)
            name, arg = (match.group(1), match.group(2)) if match else ("", None)
            if name == "wait" and arg:
                policy = policy | cls.wait(arg)
            elif name in ("serve_stale", "refuse") and not arg:
                policy = policy | getattr(cls, name)()
            else:
                raise InvalidInputError(
                    "degrade", f"unknown step {part.strip()!r} in {text!r} (steps: "
                    "wait(<duration>), serve_stale, refuse)"
                )
        return policy

    @classmethod
    def coerce(cls, value: Degrade | str) -> Degrade:
        """A :class:`Degrade`, from itself or its text form."""
        if isinstance(value, Degrade):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        raise InvalidInputError("degrade", f"expected a Degrade or its text, got "
                                f"{type(value).__name__}")

    @classmethod
    def from_on_stale(cls, on_stale: str) -> Degrade:
        """The policy an ``on_stale`` value stands for: ``error`` -> :meth:`refuse`,
        ``serve`` -> :meth:`serve_stale`."""
        if on_stale == "error":
            return cls.refuse()
        if on_stale == "serve":
            return cls.serve_stale()
        raise InvalidInputError("on_stale", "must be 'error' or 'serve'")


__all__ = ["MAX_WAIT", "Degrade", "DegradeStep", "ServeStaleStep", "WaitStep"]
