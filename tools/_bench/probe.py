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
out = []
with psycopg.connect(dsn, autocommit=True) as conn:
    conn.execute(query, (tenant, users[0]), prepare=True)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    start = time.monotonic()
    i = 0
    while (now := time.monotonic()) < start + seconds:
        time.sleep(max(0.0, start + i / rate - now))
        began = time.monotonic()
        conn.execute(query, (tenant, users[i % len(users)]), prepare=True).fetchall()
        out.append(time.monotonic() - began)
        i += 1
sys.stdout.write(json.dumps(out) + "\n")
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
        self.latencies = json.loads(out.strip().splitlines()[-1])
