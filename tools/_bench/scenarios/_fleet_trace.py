"""Where a fleet's read latency goes (``PROPSTORE_FLEET_TRACE=DIR``, off by default).

Each client process writes one JSON file of its reads: start time (host monotonic), wall
latency, the reading thread's CPU and run-queue wait during the read (``schedstat``), the
process's other threads' CPU meanwhile, and whether the store's monitor woke to its agent
during the read; plus the times of its monitor's wake-ups. The scenario writes the times of
its own probes and the host's CPU by part (readers' threads, agent, servers, the rest) over
the reading window. Nothing of this runs unless the variable is set; the figures are read
with ``tools/_bench/fleet_trace_report.py``.
"""

from __future__ import annotations

import gc
import json
import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TRACE_ENV = "PROPSTORE_FLEET_TRACE"


def trace_dir(mode: str, count: int) -> Path | None:
    """Where one phase's traces go (None: not tracing)."""
    value = os.environ.get(TRACE_ENV)
    if not value:
        return None
    folder = Path(value) / f"{mode}-{count}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _schedstat(tid: int) -> tuple[int, int]:
    """(ns on CPU, ns waiting on a run queue) of one thread so far."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat", "rb") as f:
            on, wait, _ = f.read().split()
        return int(on), int(wait)
    except (OSError, ValueError):
        return 0, 0


class ReadTracer:
    """One client process's per-read records (see the module doc)."""

    def __init__(self, store: Any) -> None:
        self.me = threading.get_native_id()
        self.monitor = getattr(store, "monitor", None)
        thread = getattr(self.monitor, "_thread", None)
        self.monitor_tid = getattr(thread, "native_id", None)
        self.reads: list[tuple[float, ...]] = []
        self.wakes: list[float] = []
        if self.monitor is not None and hasattr(self.monitor, "_ask_pace"):
            original = self.monitor._ask_pace
            wakes = self.wakes

            def ask_pace(link: Any, now: float) -> None:
                if len(wakes) < 100_000:
                    wakes.append(now)
                original(link, now)

            self.monitor._ask_pace = ask_pace
        self._before: tuple[int, ...] = ()
        #: Garbage collections: (start, seconds, generation, collected, on the reading thread).
        self.collections: list[tuple[float, float, int, int, bool]] = []
        started: list[float] = [0.0]

        def collected(phase: str, info: dict[str, int]) -> None:
            if phase == "start":
                started[0] = time.perf_counter()
                return
            if len(self.collections) < 100_000:
                took = time.perf_counter() - started[0]
                self.collections.append((time.monotonic() - took, took, info["generation"],
                                         info["collected"],
                                         threading.get_native_id() == self.me))

        gc.callbacks.append(collected)

    def _sample(self) -> tuple[int, ...]:
        on, wait = _schedstat(self.me)
        mon_on, mon_wait = _schedstat(self.monitor_tid) if self.monitor_tid else (0, 0)
        wakes = getattr(self.monitor, "wakes", 0)
        return on, wait, mon_on, mon_wait, wakes

    def before(self) -> None:
        """Just before a read's clock starts."""
        self._before = self._sample()

    def after(self, started_mono: float, latency: float) -> None:
        """Just after a read's clock stopped."""
        b, a = self._before, self._sample()
        self.reads.append((started_mono, latency, (a[0] - b[0]) / 1e9, (a[1] - b[1]) / 1e9,
                           (a[2] - b[2]) / 1e9, (a[3] - b[3]) / 1e9, a[4] - b[4]))

    def write(self, folder: Path, index: int) -> None:
        """The process's records, as ``client-<index>.json``."""
        names = {str(t.native_id): t.name for t in threading.enumerate()}
        data = {"pid": os.getpid(), "reads": self.reads, "wakes": self.wakes, "threads": names,
                "gc": self.collections,
                "fields": ["t0", "lat", "cpu", "runq", "mon_cpu", "mon_runq", "wakes"]}
        (folder / f"client-{index}.json").write_text(json.dumps(data))


def _stat(pid: int, tid: int | None = None) -> tuple[int, str, float, float] | None:
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    sched = f"/proc/{pid}/schedstat" if tid is None else f"/proc/{pid}/task/{tid}/schedstat"
    try:
        text = Path(path).read_text()
        on, wait, _ = Path(sched).read_text().split()
    except (OSError, ValueError):
        return None
    head, rest = text.rsplit(")", 1)
    fields = rest.split()
    return int(fields[1]), head.split("(", 1)[1], int(on) / 1e9, int(wait) / 1e9


def host_snapshot(clients: Iterable[int], servers: Iterable[int], agents: Iterable[int]
                  ) -> dict[str, Any]:
    """Per part of the host: CPU seconds and run-queue wait seconds so far (client
    processes per thread name), and ``/proc/stat``'s busy and total jiffies."""
    clients, servers, agents = set(clients), set(servers), set(agents)
    parts: dict[str, list[float]] = {}
    threads: dict[str, list[float]] = {}

    def add(part: str, on: float, wait: float) -> None:
        slot = parts.setdefault(part, [0.0, 0.0])
        slot[0] += on
        slot[1] += wait

    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        got = _stat(pid)
        if got is None:
            continue
        ppid, name, on, wait = got
        if pid in clients:
            for task in (entry / "task").iterdir():
                one = _stat(pid, int(task.name))
                if one is not None:
                    threads[task.name] = [one[2], one[3]]
        elif pid in agents or ppid in agents:
            add("agent", on, wait)
        elif pid in servers or ppid in servers:
            add("servers", on, wait)
        else:
            add(f"other:{name}", on, wait)
    cpu = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    values = [int(v) for v in cpu]
    idle = values[3] + values[4]
    return {"mono": time.monotonic(), "parts": parts, "threads": threads,
            "busy": sum(values) - idle, "total": sum(values)}


def write_host(folder: Path, name: str, data: dict[str, Any]) -> None:
    """The scenario's records (probe times, host snapshots)."""
    (folder / f"{name}.json").write_text(json.dumps(data))
