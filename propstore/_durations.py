"""Human units: durations such as ``"500ms"`` (parsed to seconds) and byte counts (shown)."""

from __future__ import annotations

import math
import re
from datetime import timedelta

_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(us|µs|ms|s|min|m|h)?\s*$")


def parse_duration(value: object, what: str = "duration") -> float:
    """Return ``value`` in seconds; accepts numbers, ``timedelta`` and ``"250ms"``-style text.

    Raises ``ValueError`` (naming ``what``) for negative, non-finite or unparsable values.
    """
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a duration, got {value!r}")
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match is None:
            raise ValueError(f"{what}: cannot parse {value!r} (use e.g. '500ms', '5s', '2m')")
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    else:
        raise ValueError(f"{what}: expected a duration, got {type(value).__name__}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{what}: must be a finite, non-negative duration, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """Render seconds for people: ``850µs``, ``12.3ms``, ``4.20s``, ``3m05s``, ``∞``."""
    if math.isinf(seconds):
        return "∞"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f}ms"
    if seconds < 60.0:
        return f"{seconds:.2f}s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{rest:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_bound(seconds: float) -> str:
    """A proven staleness bound for people: :func:`format_duration`, or ``unproven`` when
    nothing is proven (``inf``). Every view of a bound (``lag``, ``route``, ``get``) spells
    it this way."""
    return "unproven" if math.isinf(seconds) else format_duration(seconds)


def format_bytes(count: int | None) -> str:
    """``0 B``, ``840 B``, ``12.3 kB``, ``4.1 MB``, ``2.0 GB`` (SI units); ``-`` when unknown."""
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")
