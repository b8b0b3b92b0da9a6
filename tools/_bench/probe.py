"""The primary's own latency, measured from outside the client under test.

A read timed inside a benchmark's client includes that client's queue (threads waiting for
one of its pooled connections, and for its interpreter lock on a busy machine), which no
fallback policy of the primary's changes. :class:`LatencyProbe` runs a separate process
(its own interpreter, its own connection) that sends propstore's own primary-key read to the
primary at a low paced rate and times each one: what any reader of that primary sees of
its health.

It runs where a reader on another host would not compete with the client under test: on
the servers' CPUs (the client is pinned to its own, ``_bench.affinity``), and at a raised
scheduling priority. Started from the pinned client it would inherit that CPU, and its
every read would wait behind the client's threads for it (64 reader threads in the surge):
the client's CPU queue, not the primary's latency. The raised priority (``nice`` 10 below
the benchmark's, as root) keeps the servers' own processes from queueing it the same way:
it sends about 50 small reads a second, a negligible share of that CPU, so it takes
nothing from what it measures beyond its own reads' work on the primary.

Where the scheduler counts it (Linux ``/proc/PID/schedstat``, the server on this host), each
read also says where its time went: how long the primary's backend serving it waited for
the primary's CPU, and how long the probe itself waited for its own. A p99 dominated by the
latter is the probe's host, not the primary.
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import TracebackType

_PROBE = r"""
import json, os, sys, time
dsn, tenant, users, rate, seconds, cpus, nice = (
    sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4]),
    float(sys.argv[5]), json.loads(sys.argv[6]), int(sys.argv[7]))
if cpus:
    os.sched_setaffinity(0, cpus)
try:
    os.nice(nice)
except OSError:  # not root: the inherited priority
    pass
import psycopg
query = "SELECT props, version FROM user_properties WHERE tenant_id = %s AND user_id = %s"

def waited(path):
    # ns this task has spent runnable but not running (the scheduler's run_delay)
    try:
        with open(path) as f:
            return int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None

out, primary_waits, own_waits, times = [], [], [], []
with psycopg.connect(dsn, autocommit=True) as conn:
    conn.execute(query, (tenant, users[0]), prepare=True)
    backend = f"/proc/{conn.info.backend_pid}/schedstat"
    own = "/proc/thread-self/schedstat"
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    start = time.monotonic()
    i = 0
    while (now := time.monotonic()) < start + seconds:
        time.sleep(max(0.0, start + i / rate - now))
        theirs0, ours0 = waited(backend), waited(own)
        began = time.monotonic()
        conn.execute(query, (tenant, users[i % len(users)]), prepare=True).fetchall()
        out.append(time.monotonic() - began)
        times.append(began - start)
        theirs1, ours1 = waited(backend), waited(own)
        if None not in (theirs0, theirs1, ours0, ours1):
            primary_waits.append((theirs1 - theirs0) / 1e9)
            own_waits.append((ours1 - ours0) / 1e9)
        i += 1
sys.stdout.write(json.dumps([out, primary_waits, own_waits, times]) + "\n")
"""


class LatencyProbe:
    """``with LatencyProbe(dsn, tenant, users, seconds) as probe:`` ... ``probe.latencies``
    (seconds each, once the block ended and the probe finished its ``seconds``)."""

    def __init__(self, dsn: str, tenant: str, users: list[str], seconds: float,
                 rate: float = 50.0, cpus: set[int] | None = None, nice: int = -10) -> None:
        """``cpus``: where the probe runs (the servers'; None: where this process may);
        ``nice``: its priority relative to this process's (negative needs root; ignored
        without)."""
        self.latencies: list[float] = []
        #: Per read, in the order of :attr:`latencies` (both empty where the scheduler's
        #: counts cannot be read): how long its backend waited for the primary's CPU, and
        #: how long the probe waited for its own.
        self.primary_waits: list[float] = []
        self.own_waits: list[float] = []
        #: When each read began, seconds after the probe's first.
        self.times: list[float] = []
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _PROBE, dsn, tenant, json.dumps(users[:64]), str(rate),
             str(seconds), json.dumps(sorted(cpus or ())), str(nice)],
            stdout=subprocess.PIPE, text=True)

    def __enter__(self) -> LatencyProbe:
        assert self._proc.stdout is not None
        if self._proc.stdout.readline().strip() != "ready":
            self._proc.wait()
            raise RuntimeError("the latency probe did not start")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self._proc.kill()
            self._proc.wait()
            return
        out, _ = self._proc.communicate(timeout=120)
        self.latencies, self.primary_waits, self.own_waits, self.times = json.loads(
            out.strip().splitlines()[-1])

    def tail(self, q: float = 0.99) -> str:
        """Where the time of the reads at or above the ``q`` quantile went, on average."""
        return tail(self.latencies, self.primary_waits, self.own_waits, q, self.times)

    def after(self, seconds: float) -> list[float]:
        """The latencies of the reads that began ``seconds`` or more into the probe's run."""
        return [lat for lat, at in zip(self.latencies, self.times, strict=True)
                if at >= seconds]


def tail(latencies: list[float], primary_waits: list[float], own_waits: list[float],
         q: float = 0.99, times: list[float] | None = None) -> str:
    """The reads at or above the ``q`` quantile of ``latencies``: how many, their mean, and
    of it, how long their backends waited for the primary's CPU and the probe for its own
    (``primary_waits``/``own_waits``, in the order of ``latencies``; empty: not counted),
    and when they began (``times``: seconds into the run, in the same order)."""
    if not latencies:
        return "no reads"
    cut = sorted(latencies)[min(len(latencies) - 1, int(q * len(latencies)))]
    slow = [i for i, lat in enumerate(latencies) if lat >= cut]
    text = f"{len(slow)} reads of >= {cut * 1000:.1f} ms"
    if times and len(times) == len(latencies):
        text += " at " + ", ".join(f"{times[i]:.1f}" for i in slow[:12]) + " s into the run"
    if not len(primary_waits) == len(own_waits) == len(latencies):
        return text + " (where their time went: not counted here)"

    def mean(values: list[float]) -> float:
        return sum(values[i] for i in slow) / len(slow) * 1000

    return (f"{text}, {mean(latencies):.1f} ms on average, of which "
            f"{mean(primary_waits):.1f} ms their backend waited for the primary's CPU and "
            f"{mean(own_waits):.1f} ms the probe waited for its own")
