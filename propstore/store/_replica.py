"""A read on a shard's replicas: per candidate, the plan that proves the budget on the
connection it gets (a fact that covers it, else the LSN check in the same round trip), and
what a verified read leaves behind for later reads (``proof.RunFacts``).

The rule deciding whether a fact covers a connection is ``proof``'s; this module only
applies it to the connection the driver checked out, and reports the bound it proved.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from typing import Any

import psycopg
import psycopg.errors
import structlog
from psycopg_pool import PoolTimeout

from propstore import _sql
from propstore._wire import DeadlineExceeded, Statement
from propstore.config import RoutingSettings
from propstore.lsn import LSN, from_column
from propstore.monitor import MonitorState, NodeView, ShardView
from propstore.proof import Proof, RunFacts, known_lsn, remember
from propstore.router import FallbackReason, RouteDecision
from propstore.store._pool import Rejected
from propstore.store._program import ConnState, Exec, Failure, ReadResult, Response
from propstore.store._statements import REPLAY_LSN, VERIFIED_DATA_COLUMN, one_statement

log = structlog.get_logger("propstore.store")
#: Seconds a node without the verifying function is read with the pipeline before the
#: function is tried again.
FUNCTION_RECHECK = 60.0
#: Data statements verified by the pipeline rather than migration 0002's function on a
#: connection whose statements are prepared by name: there both forms are Bind/Execute
#: only, and the function costs the server more (its PL/pgSQL statements, each with its own
#: executor start and snapshot). Measured on a replica on loopback, four forms interleaved
#: in one run, 1,200-3,000 reads each, four runs at load 4-7: server backend CPU per read
#: (``/proc/<pid>/schedstat``) 74-148 us for ``propstore_read`` against 61-117 us for
#: ``REPLAY_LSN`` + ``GET`` pipelined (plain ``GET``: 37-81); medians 0.128-0.195 ms
#: against 0.109-0.168 ms, the gap widest right after a write (the token read's case).
#: Unnamed statements (behind a transaction pooler) keep the function: the pipeline's LSN
#: statement is parsed and planned there on every read (docs/architecture.md).
PIPELINED_WHEN_NAMED = frozenset({_sql.GET})


class ReplicaReads:
    """Reads served by replicas: the monitor's views, the store's verified facts per server
    run, and the replica deadline."""

    def __init__(self, state: MonitorState, runs: RunFacts, routing: RoutingSettings) -> None:
        self.state = state
        self.runs = runs
        self.routing = routing
        #: Nodes whose server lacks migration 0002's functions -> ``time.monotonic()``
        #: until which their reads are verified with the pipeline instead.
        self.pipeline_until: dict[str, float] = {}
        self._told: set[str | tuple[str, str]] = set()

    def read(
        self,
        shard_index: int,
        decision: RouteDecision,
        data: Statement,
        decode: Callable[..., Any],
        failures: list[Failure],
        started: float,
        deadline: float | None = None,
    ) -> Generator[Exec, Response, tuple[Any, ReadResult] | FallbackReason]:
        """Try the decision's replicas in turn; (rows, result) from the first that proves
        the budget, else why none did (failures are appended to ``failures``).

        ``deadline`` (``time.monotonic()``) ends the attempts; default: the replica deadline
        from now."""
        reason = decision.fallback_reason
        candidates = decision.candidates or decision.tentative
        if not candidates:
            assert reason is not None
            return reason
        freshness = decision.freshness
        shard = decision.shard.name
        verified_form = one_statement(data)
        history = decision.shard.history
        runs = self.runs
        if deadline is None:
            deadline = time.monotonic() + self.routing.replica_deadline
        for cand in candidates:
            if time.monotonic() >= deadline:
                reason = "replica_timeout"
                break
            # What the plan chose, for the connection it got: the fact that proves the read,
            # or the time the verifying round trip was sent. The last entry counts (the
            # driver re-plans when a pooler lost the connection's statements).
            chosen: list[tuple[LSN, Proof, float] | float] = []

            def plan(conn: ConnState, node: NodeView = cand.node,
                     chosen: list[tuple[LSN, Proof, float] | float] = chosen
                     ) -> tuple[Sequence[Statement], bool]:
                known = known_lsn(node.sightings, conn, runs)
                if known is not None:
                    bound = history.bound(known[0], started)
                    if freshness.admits(shard, known[0], bound):
                        chosen.append((*known, bound))
                        return (data,), False
                # The LSN is read first, so the data query's snapshot is at least as new
                # as the LSN it reports: by migration 0002's VOLATILE function, whose data
                # query takes a snapshot of its own after reading the LSN (one statement),
                # else by the LSN statement pipelined before the data query (a single
                # plain statement would not be sound). Taken just before the send: the LSN
                # is read after it (docs/architecture.md, "One statement, still sound").
                sent = time.monotonic()
                chosen.append(sent)
                if conn.propstore_one_statement and verified_form is not None and not (
                    conn.propstore_named and data.name in PIPELINED_WHEN_NAMED) and (
                    not self.pipeline_until or self.pipeline_until.get(node.name, 0.0) <= sent
                ):
                    return (verified_form,), False
                return (REPLAY_LSN, data), False

            try:
                conn, results = yield from self._exec(cand.node, deadline, plan)
            except PoolTimeout:
                # No free connection in time (busy, or reconnecting to a frozen server), and
                # a deadline missed: no answer yet, which on a starved machine a healthy
                # node gives too. Not a failure (docs/architecture.md, "Slow is not down").
                reason = "replica_timeout"
                failures.append((cand.index, "no connection before the read deadline", True))
                continue
            except DeadlineExceeded:
                reason = "replica_timeout"
                failures.append((cand.index, "read deadline exceeded", True))
                continue
            except Rejected as exc:  # the server refuses our connections: an error, by name
                reason = "replica_down"
                failures.append((cand.index, str(exc), False))
                continue
            except psycopg.errors.InvalidTransactionState:
                # The function refused: not READ COMMITTED, so its data could predate its LSN.
                # Nothing is wrong with the replica itself; the read is unproven there.
                self.not_read_committed(cand.node.name)
                reason = "replica_stale"
                continue
            except psycopg.Error as exc:
                reason = "replica_down"
                failures.append((cand.index, f"read failed: {type(exc).__name__}", False))
                continue
            mark = chosen[-1]
            column = 0
            view = self.state.view(shard_index)
            if isinstance(mark, tuple):
                lsn, proof, bound = mark
                rows = results[0]
                if view.history is not history:  # a poll since: its samples are facts too
                    bound = min(bound, view.history.bound(lsn, started))
            else:
                lsn_value = results[0].get_value(0, 0)
                if lsn_value is None:  # not in recovery any more (promoted): prove nothing
                    reason = "replica_stale"
                    continue
                lsn, proof = from_column(lsn_value), "pipeline"
                if len(results) == 1:  # one statement: LSN, timeline, then the data
                    rows, column = results[0], VERIFIED_DATA_COLUMN
                else:
                    rows = results[1]
                    if results[0].get_value(0, 2) != _READ_COMMITTED:
                        self.not_read_committed(cand.node.name)  # one snapshot for both
                        reason = "replica_stale"
                        continue
                if not _on_history(view, results[0], lsn):
                    reason = "replica_stale"  # switched timeline since the poll: unproven
                    continue
                self.verified(conn, mark, lsn)
                bound = view.history.bound(lsn, started)
                if not freshness.admits(shard, lsn, bound):
                    reason = "replica_stale"
                    continue
                # Both views' samples are sound facts; the proof may have used the older
                # one (a new primary's history starts empty).
                if view.history is not history:
                    bound = min(bound, history.bound(lsn, started))
            return decode(rows, column), ReadResult(
                None, None, shard, cand.node.name, True, lsn, bound, None, proof
            )
        assert reason is not None
        return reason

    def _exec(self, node: NodeView, deadline: float,
              plan: Callable[[ConnState], tuple[Sequence[Statement], bool]]
              ) -> Generator[Exec, Response, Response]:
        """Run ``plan`` on ``node``; where its server has no verifying function (not
        migrated to 0002, or the migration not replayed there yet), once more with the
        pipeline, which needs nothing of the schema but the table."""
        try:
            return (yield Exec(node.config, deadline, plan))
        except psycopg.errors.UndefinedFunction as exc:
            self.no_function(node.name, exc)
            return (yield Exec(node.config, deadline, plan))

    def no_function(self, node: str, error: BaseException) -> None:
        """``node``'s server lacks the verifying function: pipeline its reads for
        ``FUNCTION_RECHECK`` seconds (then try again: a migration may have reached it), and
        say so once per node."""
        self.pipeline_until[node] = time.monotonic() + FUNCTION_RECHECK
        if node not in self._told:
            self._told.add(node)
            log.warning("node_verified_read_pipelined", node=node,
                        error=str(error).strip()[:200],
                        mode="verified reads pipelined (two statements)",
                        fix="run `propstore migrate up` (revision 0002 adds the function "
                        "that verifies a read in one statement)")

    def not_read_committed(self, node: str) -> None:
        """Reads on ``node`` run under another isolation level than READ COMMITTED (a role's
        or database's ``default_transaction_isolation``, or one a transaction pooler's other
        clients left on the server connection): no read verified there proves anything (its
        data statement shares a snapshot taken before the LSN was read), so none is served;
        say so once per node."""
        if ("isolation", node) not in self._told:
            self._told.add(("isolation", node))
            log.warning("node_not_read_committed", node=node,
                        mode="verified reads refused: not READ COMMITTED",
                        fix="reset default_transaction_isolation for propstore's role and "
                        "database (ALTER ROLE ... RESET default_transaction_isolation); "
                        "behind a transaction pooler, no client may SET it for the session")

    def verified(self, conn: ConnState, sent_at: float, lsn: LSN) -> None:
        """A read on ``conn`` verified replay LSN ``lsn`` in a round trip sent at
        ``sent_at``: keep it for the connection's later reads and, where the connection
        keeps its server, as a fact about its server run for every connection to that run
        (``proof.RunFacts``; sound as a poll sent at ``sent_at`` is)."""
        remember(conn, lsn)
        run = conn.propstore_run
        if conn.propstore_keeps_server and run is not None:
            self.runs.observe(run, sent_at, lsn)


_READ_COMMITTED = b"read committed"


def _on_history(view: ShardView, result: Any, lsn: LSN) -> bool:
    """Whether a pipelined ``REPLAY_LSN`` row places the replica on the primary's history
    (its timeline is read in the same statement: a standby switches timelines without
    ending connections, so the poll's timeline does not carry over)."""
    raw = result.get_value(0, 1)
    return raw is not None and view.on_history(int(raw), lsn)
