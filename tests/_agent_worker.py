"""A client process for the shared-monitoring tests: one store, optionally a workload.

Started with ``multiprocessing`` (spawn) by :class:`Fleet`; each worker opens its own
:class:`PropertyStore` on the topology file, runs a :class:`~tests._workload.Workload` on
users of its own (so every read is checked against the acknowledged writes of that
process), answers status requests, and sends its report when told to stop. The deliberate
breakages of ``PROPSTORE_TEST_BREAK`` apply in the workers too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import time
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from propstore import PropertyStore, Topology


@dataclasses.dataclass(frozen=True)
class Status:
    """What a worker's store says about its monitoring."""

    pid: int
    source: str
    agent_pid: int | None
    fallbacks: int
    joins: int
    reads: int
    replica_reads: int
    #: Every node's state as this worker's store sees it.
    states: tuple[str, ...] = ()
    #: Whether a read of every budget was checked against an acknowledged write.
    every_budget_checked: bool = False
    #: Why its last attempt to join an agent failed, and why it polls for itself.
    join_error: str = ""
    own_reason: str = ""
    #: Times its store woke to its agent's bytes, the pace it asked for (seconds between
    #: two sends), and the CPU seconds its monitor thread used so far (``/proc``).
    wakes: int = 0
    pace: float | None = None
    monitor_cpu: float = 0.0
    #: Join attempts failed since it last followed an agent.
    join_failures: int = 0
    #: The worker's monotonic clock when it answered (join errors are timed by it).
    at: float = 0.0
    #: Seconds its monitor's event loop took to run a callback (None: not within 1 s).
    loop_lag: float | None = None
    #: Polls its monitor state recorded (its own or the agent's).
    polls: int = 0


def _monitor_cpu() -> float:
    """CPU seconds (user + system) of this process's monitor thread, from ``/proc``."""
    import os
    import threading
    from pathlib import Path

    for thread in threading.enumerate():
        if thread.name == "propstore-monitor" and thread.native_id is not None:
            stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def _loop_lag(store: PropertyStore) -> float | None:
    """How long the store's monitor loop takes to run a callback (None: not within 1 s)."""
    import threading

    loop = getattr(store.monitor, "_loop", None)
    if loop is None or loop.is_closed():
        return None
    ran = threading.Event()
    t0 = time.monotonic()
    loop.call_soon_threadsafe(ran.set)
    return time.monotonic() - t0 if ran.wait(1.0) else None


def _status(store: PropertyStore, load: Any) -> Status:
    import os

    monitor = store.monitor
    report = load.report if load is not None else None
    return Status(
        os.getpid(), getattr(monitor, "source", "own"), getattr(monitor, "agent_pid", None),
        getattr(monitor, "fallbacks", 0), getattr(monitor, "joins", 0),
        report.reads if report else 0, report.replica_reads if report else 0,
        tuple(n.state for v in store.shard_views() for n in v.nodes),
        report is not None and all(report.checked[b] for b in load.budgets),
        getattr(monitor, "join_error", ""), getattr(monitor, "own_reason", ""),
        getattr(monitor, "wakes", 0), getattr(monitor, "pace", None), _monitor_cpu(),
        getattr(monitor, "join_failures", 0), time.monotonic(), _loop_lag(store),
        monitor.state.polls,
    )


def _refuse(store: PropertyStore, user: str, count: int) -> int:
    """Make ``count`` budgeted reads the store must refuse (a budget no replica proves, a
    primary whose fallback ceiling admits none); how many raised ``StaleReadError``."""
    from propstore import StaleReadError

    raised = 0
    for _ in range(count):
        try:
            store.read("acme", user, max_staleness=1e-6, degrade="refuse")
        except StaleReadError:
            raised += 1
    return raised


def run(config: str, sharing: str, users: Sequence[str], readers: int,
        routing: dict[str, Any], pipe: Connection) -> None:
    """The worker's body (see the module doc)."""
    import faulthandler
    import signal

    from tests import _breakage
    from tests._workload import Workload

    # Every thread's stack on SIGUSR1 (a worker that does not get where the test waits for
    # it says where it is: Fleet.wait_for asks at its deadline).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    _breakage.apply_from_environment()
    topology = Topology.load(config)
    topology = dataclasses.replace(
        topology, monitor=dataclasses.replace(topology.monitor, sharing=sharing),  # type: ignore[arg-type]
        routing=dataclasses.replace(topology.routing, **routing))
    with PropertyStore(topology) as store:
        load = Workload(store, users, writers=1, readers=readers) if users else None
        with load if load is not None else contextlib.nullcontext():
            while True:
                command = pipe.recv()
                if command == "status":
                    pipe.send(_status(store, load))
                elif isinstance(command, tuple) and command[0] == "refuse":
                    pipe.send(_refuse(store, command[1], command[2]))
                elif command == "stop":
                    break
        if load is not None:
            report = load.stop()
            pipe.send(dataclasses.replace(report, slowest=list(report.slowest)))
        else:
            pipe.send(None)


class Fleet:
    """Worker processes on one topology file; ``with Fleet(...) as fleet``."""

    def __init__(self, config: Path, count: int, *, sharing: str = "host",
                 users: Callable[[int], Sequence[str]] | None = None,
                 readers: int = 1, routing: dict[str, Any] | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pipes: list[Connection] = []
        self.processes = []
        for i in range(count):
            mine, theirs = ctx.Pipe()
            process = ctx.Process(
                target=run, name=f"agent-worker-{i}", daemon=True,
                args=(str(config), sharing, list(users(i)) if users else [], readers,
                      routing or {}, theirs))
            self._pipes.append(mine)
            self.processes.append(process)

    def __enter__(self) -> Fleet:
        for process in self.processes:
            process.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()
            process.join(10)

    def statuses(self, timeout: float | None = None) -> list[Status]:
        """Every worker's status (raises if a worker died or does not answer within
        ``timeout``, default 60 s or 4 s per worker: dozens of interpreters starting on
        two shared cores take that long)."""
        if timeout is None:
            timeout = max(60.0, 4.0 * len(self.processes))
        for pipe in self._pipes:
            pipe.send("status")
        return [self._recv(pipe, i, timeout) for i, pipe in enumerate(self._pipes)]

    def refuse(self, worker: int, user: str, count: int) -> int:
        """Have one worker make ``count`` reads its store refuses (see :func:`_refuse`;
        start the fleet with ``routing={"primary_fallback_rate": 1e-6}``); how many it
        refused."""
        self._pipes[worker].send(("refuse", user, count))
        return int(self._recv(self._pipes[worker], worker, 60.0))

    def wait_for(self, condition: Callable[[list[Status]], bool], timeout: float,
                 what: str) -> list[Status]:
        """Poll the statuses until ``condition`` holds (AssertionError at the deadline)."""
        deadline = time.monotonic() + timeout
        while True:
            statuses = self.statuses()
            if condition(statuses):
                return statuses
            if time.monotonic() > deadline:
                self._dump_stacks(statuses)
                raise AssertionError(f"{what} within {timeout} s:\n{describe(statuses)}")
            time.sleep(0.1)

    def _dump_stacks(self, statuses: Sequence[Status]) -> None:
        """Have the workers off the most common (source, agent) (or, all alike, the first
        two) print their threads' stacks on their stderr (``faulthandler``), and wait until
        they are written."""
        import os
        import signal
        from collections import Counter

        groups = Counter((s.source, s.agent_pid) for s in statuses)
        (common, _), = groups.most_common(1)
        for i, s in enumerate(statuses):
            # All alike: the first two speak for them.
            if (s.source, s.agent_pid) != common or (len(groups) == 1 and i < 2):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(s.pid, signal.SIGUSR1)
        self.statuses()  # answered after the dump: the stacks are written

    def stop(self, timeout: float = 60.0) -> list[Any]:
        """Stop the workers; their workload reports (None for workers without one)."""
        for pipe in self._pipes:
            pipe.send("stop")
        reports = [self._recv(pipe, i, timeout) for i, pipe in enumerate(self._pipes)]
        for process in self.processes:
            process.join(30)
        return reports

    def _recv(self, pipe: Connection, index: int, timeout: float) -> Any:
        if not pipe.poll(timeout):
            raise AssertionError(f"worker {index} did not answer within {timeout} s "
                                 f"(alive: {self.processes[index].is_alive()})")
        try:
            return pipe.recv()
        except EOFError:
            raise AssertionError(
                f"worker {index} died (exit code {self.processes[index].exitcode})"
            ) from None


def describe(statuses: Sequence[Status]) -> str:
    """The workers' statuses, one line each, those off the most common (source, agent)
    first: which workers do not follow the fleet's agent, and why (their last join error
    and the reason they poll for themselves)."""
    from collections import Counter

    groups = Counter((s.source, s.agent_pid) for s in statuses)
    (common, _), = groups.most_common(1) or [((None, None), 0)]
    lines = [f"{len(statuses)} workers by (source, agent pid): {dict(groups)}"]
    order = sorted(range(len(statuses)),
                   key=lambda i: ((statuses[i].source, statuses[i].agent_pid) == common, i))
    for i in order:
        s = statuses[i]
        lines.append(
            f"  worker {i} pid {s.pid}: {s.source} agent={s.agent_pid} joins={s.joins} "
            f"fallbacks={s.fallbacks} at={s.at:.3f} loop_lag={s.loop_lag} "
            f"polls={s.polls} reads={s.reads} replica={s.replica_reads} "
            f"states={','.join(s.states)} budgets_checked={s.every_budget_checked} "
            f"failed_joins={s.join_failures} join_error={s.join_error!r} "
            f"own_reason={s.own_reason!r}")
    return "\n".join(lines)


@contextlib.contextmanager
def agent_dir(path: Path) -> Iterator[Path]:
    """Point this process (and the workers it starts) at a private agent folder."""
    import os

    from propstore.monitor._shared import AGENT_DIR_ENV

    old = os.environ.get(AGENT_DIR_ENV)
    os.environ[AGENT_DIR_ENV] = str(path)
    try:
        yield path
    finally:
        if old is None:
            del os.environ[AGENT_DIR_ENV]
        else:
            os.environ[AGENT_DIR_ENV] = old
