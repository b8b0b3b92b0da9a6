"""Signals that end a command like Ctrl-C: SIGTERM (a service manager's stop) and SIGHUP (the
terminal went away), so the command's clean-up runs (stop the sandbox it started, close the
store) instead of the process dying with its servers left running.

The first of SIGINT, SIGTERM or SIGHUP raises :class:`Interrupted` (a ``KeyboardInterrupt``)
in the main thread; the ones after it are ignored until the block ends, so a second Ctrl-C
or a service manager's repeated SIGTERM cannot cut the clean-up short half-way (SIGKILL
still can, and the next throwaway cluster reaps what that leaves). After SIGHUP, standard
output and error go to ``/dev/null``: the terminal is gone and writing to it would fail.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by the first of SIGINT, SIGTERM or SIGHUP."""

    def __init__(self, signum: int) -> None:
        self.signal_name = signal.Signals(signum).name
        super().__init__(self.signal_name)


def _detach_from_terminal() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            os.dup2(devnull, fd)
    finally:
        os.close(devnull)


@contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGINT, SIGTERM and SIGHUP end it like Ctrl-C (see the module
    docstring). Outside the main thread (a command run by a test's thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    interrupted = False

    def interrupt(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupted
        if signum == signal.SIGHUP:
            _detach_from_terminal()
        if interrupted:
            return  # the clean-up of the first one is running
        interrupted = True
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, interrupt) for signum in _HANDLED}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


__all__ = ["Interrupted", "signals_as_interrupt"]
