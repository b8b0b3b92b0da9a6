"""Signals that end a command like Ctrl-C: SIGTERM (a service manager's stop) and SIGHUP (the
terminal went away), so the command's clean-up runs (stop the sandbox it started, close the
store) instead of the process dying with its servers left running."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C while long-running commands run, so a service manager's
    stop still closes the store and stops a sandbox the command started."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
