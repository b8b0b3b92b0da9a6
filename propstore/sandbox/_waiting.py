"""Condition-based waiting: poll a predicate until it holds or a deadline passes."""

from __future__ import annotations

import time
from collections.abc import Callable

from propstore.sandbox._errors import SandboxError


def wait_for(
    condition: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    interval: float = 0.02,
) -> None:
    """Return once ``condition()`` is true; raise :class:`SandboxError` after ``timeout`` s.

    The interval grows to at most 0.2 s so a slow condition on a busy machine is not hammered.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise SandboxError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.2)
