"""What the sync and async stores share: argument checks, and each operation as a program.

A *program* is a generator that yields :class:`Exec` requests ("run these statements on
that node before this deadline") and receives ``(connection, results)`` or has the error
thrown into it. All routing, proof and fallback logic lives in the programs; the sync and
async stores only drive them (check a connection out, run ``_wire``, hand results back), so
the two can never disagree about what makes a read fresh enough.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import psycopg
import structlog
from psycopg_pool import PoolTimeout
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    wait_exponential_jitter,
)

from propstore import _sql
from propstore._limiter import PrimaryLimiter
from propstore._validation import (
    MAX_DOCUMENT_BYTES,
    check_id,
    check_keys,
    check_tenant,
    check_user_ids,
    encode_props,
)
from propstore._wire import DeadlineExceeded, Statement
from propstore.config import Topology
from propstore.degrade import Degrade
from propstore.errors import (
    InvalidInputError,
    PropStoreError,
    ShardUnavailableError,
    StaleReadError,
    WriteLostError,
)
from propstore.freshness import STRONG, Freshness, Token, coerce_token
from propstore.lsn import LSN
from propstore.monitor import MonitorState, NodeView, ShardView
from propstore.proof import Proof, RunFacts, known_lsn, primary_proven, remember
from propstore.router import (
    DecisionCache,
    FallbackLimiter,
    FallbackReason,
    RouteDecision,
    route,
)
from propstore.store import _degrade

# Re-exported (``X as X``): the drivers and the package import these from here.
from propstore.store._program import ConnState, Request, Response, Wait, fixed
from propstore.store._program import Exec as Exec
from propstore.store._program import Program as Program
from propstore.store._program import Props as Props
from propstore.store._program import ReadObserver as ReadObserver
from propstore.store._program import ReadResult as ReadResult
from propstore.timeline import WriteMark, timeline_of_wal_file

log = structlog.get_logger("propstore.store")

_REPLAY_LSN = Statement(_sql.REPLAY_LSN)
_JSON = json.JSONDecoder()
_set_field = object.__setattr__


class PrimaryGone(DeadlineExceeded):
    """A write attempt stopped waiting: the monitor no longer observes its node as the
    shard's primary (or observes none), so it is retried where the monitor points."""


@dataclass(slots=True)
class WriteWindow:
    """How long one write may keep trying (``time.monotonic()`` times) and what it saw.

    Retries stop at ``retry_until`` (``write_retry_time``) unless no primary is observed
    then: a failover is under way and the write waits for the new primary, trying it as soon
    as the monitor observes it, until ``failover_until`` (``write_failover_time``).
    """

    started: float
    retry_until: float
    failover_until: float
    attempts: int = 0
    #: The node of the latest attempt that reached one (None: none had a target).
    last_node: str | None = None

    @property
    def last_deadline(self) -> float:
        """No attempt runs past this."""
        return max(self.retry_until, self.failover_until)


RetryingT = TypeVar("RetryingT", Retrying, AsyncRetrying)

_BUDGET_ORDER = ("max_staleness", "after", "profile", "consistency", "on_stale", "degrade")
_BUDGET_KEYS = frozenset(_BUDGET_ORDER)
#: Entries of the budget and tenant memos (cleared when full: a service uses a few).
_MEMO_SIZE = 256


class ReadStats:
    """Routing counters kept by a store: reads by (shard, served by, reason), refusals and
    waits by (shard, profile[, reason]). Bounded: the key spaces are shards x {replica,
    primary} x reasons and shards x profiles x reasons, whatever the traffic."""

    def __init__(self) -> None:
        self.reads: Counter[tuple[str, str, str]] = Counter()
        self.writes: Counter[str] = Counter()
        #: ``StaleReadError`` raised, by (shard, profile, reason the primary declined).
        self.refusals: Counter[tuple[str, str, str]] = Counter()
        #: Reads served after a ``Degrade.wait``, by (shard, profile).
        self.waits: Counter[tuple[str, str]] = Counter()
        # ``counter[key] += 1`` is a read then a write: concurrent threads could lose counts.
        self._lock = threading.Lock()

    def record(self, result: ReadResult) -> None:
        """Count one read."""
        key = (result.shard, "replica" if result.from_replica else "primary",
               result.fallback_reason or "fresh")
        with self._lock:
            self.reads[key] += 1

    def record_write(self, shard: str) -> None:
        """Count one write."""
        with self._lock:
            self.writes[shard] += 1

    def record_refusal(self, shard: str, profile: str, reason: str) -> None:
        """Count one ``StaleReadError``."""
        with self._lock:
            self.refusals[(shard, profile, reason)] += 1

    def refused(self, shard: str) -> dict[str, dict[str, int]]:
        """This store's ``StaleReadError`` on ``shard`` so far: ``{profile: {reason: n}}``."""
        with self._lock:
            items = sorted((k, n) for k, n in self.refusals.items() if k[0] == shard)
        by_profile: dict[str, dict[str, int]] = {}
        for (_shard, profile, reason), count in items:
            by_profile.setdefault(profile, {})[reason] = count
        return by_profile

    def record_wait(self, shard: str, profile: str) -> None:
        """Count one read served after waiting under its degrade policy."""
        with self._lock:
            self.waits[(shard, profile)] += 1


class StoreCore:
    """State shared by a store's operations: topology, monitor state, limiters, counters."""

    def __init__(self, topology: Topology, clock: Callable[[], float] = time.monotonic) -> None:
        self.topology = topology
        self.clock = clock
        self.state = MonitorState(topology, clock)
        self.routing = topology.routing
        now = clock()
        #: Per shard primary: the fixed rate ceiling (``primary_fallback_rate``, 0: none)...
        self.limiters = [
            FallbackLimiter(topology.routing.primary_fallback_rate, now) for _ in topology.shards
        ]
        #: ... and the adaptive concurrency limit driven by its measured latency.
        # Sized by the pools the connection budget actually gives (not pool_max_size).
        pools = topology.connections.pool_max_size
        limiter = dataclasses.replace(topology.routing, pool_max_size=pools).limiter
        self.primary_limiters = [PrimaryLimiter(limiter, clock) for _ in topology.shards]
        #: Wakes reads waiting under a ``Degrade.wait`` policy (monitor news, primary room).
        self.changes = _degrade.Changes(len(topology.shards))
        self.state.listeners.append(self.changes.notify)
        self.shard_names = tuple(s.name for s in topology.shards)
        self.stats = ReadStats()
        self._rotation = itertools.count()
        #: Route decisions reused while provably unchanged (the read path's first step).
        self.decisions = DecisionCache(len(topology.shards))
        #: Replay LSNs verified by reads, per server run (``proof.RunFacts``): a read on
        #: another connection to that run may reuse one instead of checking in-line.
        self.runs = RunFacts()
        self.observers: list[ReadObserver] = []
        #: keyword given (None: none) -> type of its value -> value -> budget.
        self._budgets: dict[str | None, dict[type, dict[Any, tuple[Freshness, Degrade]]]] = {}
        self._combined_budgets: dict[Any, tuple[Freshness, Degrade]] = {}
        self._tenants: dict[object, str] = {}

    # ------------------------------------------------------------ arguments

    def freshness(
        self,
        max_staleness: float | timedelta | str | None,
        after: Token | str | None,
        profile: str | None,
        consistency: str | None,
        on_stale: str | None,
        degrade: Degrade | str | None = None,
    ) -> tuple[Freshness, Degrade]:
        """The budget and degrade policy a read asked for (see ``PropertyStore.get``)."""
        if consistency not in (None, "bounded", "strong"):
            raise InvalidInputError("consistency", "must be 'strong' or 'bounded'")
        if on_stale not in (None, "error", "serve"):
            raise InvalidInputError("on_stale", "must be 'error' or 'serve'")
        if on_stale is not None and degrade is not None:
            raise InvalidInputError("degrade", "give degrade or on_stale, not both")
        asked = Degrade.coerce(degrade) if degrade is not None else (
            Degrade.from_on_stale(on_stale) if on_stale is not None else None
        )
        policy = asked or self.routing.policy
        if consistency == "strong":
            return STRONG, policy
        parts: list[Freshness] = []
        if profile is not None:
            found = self.topology.profiles.get(profile)
            if found is None:
                known = sorted(self.topology.profiles)
                raise InvalidInputError("profile", f"unknown profile {profile!r} (have {known})")
            parts.append(found.freshness)
            policy = asked or found.policy or policy
        if max_staleness is not None:
            parts.append(Freshness.bounded(max_staleness))
        token = coerce_token(after, self.shard_names)
        if token is not None:
            parts.append(Freshness.after_token(token))
        if not parts:
            default = self.topology.default_profile
            if default is None:
                return STRONG, policy  # no budget anywhere: the only safe reading is strong
            found = self.topology.profiles[default]
            parts.append(found.freshness)
            policy = asked or found.policy or policy
        budget = parts[0]
        for part in parts[1:]:
            budget = budget & part
        return budget, policy

    def budget(self, options: dict[str, Any]) -> tuple[Freshness, Degrade]:
        """:meth:`freshness` from the keyword arguments of a read; refuses unknown ones.

        Budgets without a token repeat (a service uses a few), so they are resolved once and
        kept in small bounded memos; token budgets differ per write and are not kept. A read
        giving one keyword (or none) finds its budget without allocating: the memo is keyed
        by the keyword, the value's type (1 == 1.0 == True, but True is refused) and value.
        """
        name: str | None = None
        value: Any = None
        several = False
        for key, given in options.items():
            if given is not None:
                if name is not None:
                    several = True
                    break
                name, value = key, given
        if not several:
            by_type = self._budgets.get(name)
            if by_type is not None:
                by_value = by_type.get(type(value))
                if by_value is not None:
                    try:
                        found = by_value.get(value)
                    except TypeError:  # unhashable: freshness() refuses it below
                        found = None
                    if found is not None:
                        return found
        if not _BUDGET_KEYS.issuperset(options):
            unknown = sorted(set(options) - _BUDGET_KEYS)
            raise InvalidInputError("budget", f"unknown keyword(s) {unknown}")
        args = tuple(options.get(key) for key in _BUDGET_ORDER)
        if args[1] is not None:
            return self.freshness(*args)
        if several:
            try:
                key_all = (args, tuple(map(type, args)))
                found = self._combined_budgets.get(key_all)
            except TypeError:
                return self.freshness(*args)
            if found is None:
                found = self.freshness(*args)
                _bounded_put(self._combined_budgets, key_all, found)
            return found
        resolved = self.freshness(*args)
        try:
            hash(value)
        except TypeError:
            return resolved
        by_value = self._budgets.setdefault(name, {}).setdefault(type(value), {})
        _bounded_put(by_value, value, resolved)
        return resolved

    def locate(self, tenant: object, user_id: object) -> tuple[str, str, int, int]:
        """Check the ids; return them with the user's bucket and shard index."""
        # Tenants are few: each is checked once (the memo is bounded); user ids every time.
        tenant_s = self._tenants.get(tenant) if type(tenant) is str else None
        if tenant_s is None:
            tenant_s = check_tenant(tenant)
            _bounded_put(self._tenants, tenant_s, tenant_s)
        user_s = check_id("user_id", user_id)
        bucket = self.topology.bucket_of(tenant_s, user_s)
        return tenant_s, user_s, bucket, self.topology.bucket_map.shard_index(bucket)

    def group(self, tenant: object, user_ids: object) -> tuple[str, dict[int, list[str]]]:
        """Check a batch; group user ids by shard index."""
        tenant_s = check_tenant(tenant)
        groups: dict[int, list[str]] = {}
        for user_id in check_user_ids(user_ids):
            groups.setdefault(self.topology.shard_index_of(tenant_s, user_id), []).append(user_id)
        return tenant_s, groups

    def decide(self, shard_index: int, freshness: Freshness) -> RouteDecision:
        """The router's decision for a shard now."""
        return route(self.state.view(shard_index), freshness, self.clock(), next(self._rotation))

    def record(self, result: ReadResult, started: float) -> ReadResult:
        """Count a read and tell observers (metrics)."""
        self.stats.record(result)
        if result.fallback_reason is not None and result.fallback_reason != "strong":
            log.debug("read_fallback", shard=result.shard, node=result.node,
                      reason=result.fallback_reason)
        if self.observers:
            elapsed = time.monotonic() - started
            for observer in self.observers:
                try:
                    observer(result, elapsed)
                except Exception:  # a metrics bug must not fail a read that succeeded
                    log.exception("read_observer_failed", observer=repr(observer))
        return result

    # ------------------------------------------------------------ operations

    def single_read(self, tenant: object, user_id: object, options: dict[str, Any]
                    ) -> Generator[Request, Response, ReadResult]:
        """The whole of ``read``: checks, routing, proof, fallback, counters."""
        started = time.monotonic()
        tenant_s, user_s, _bucket, shard = self.locate(tenant, user_id)
        freshness, policy = self.budget(options)
        data = Statement(_sql.GET, (tenant_s.encode(), user_s.encode()))
        (props, version), result = yield from self.read_program(
            shard, freshness, policy, data, decode_one
        )
        # The program built this result for this read alone and nothing else holds it yet:
        # filling in the two fields costs a tenth of building another (frozen, 10 fields).
        _set_field(result, "props", props)
        _set_field(result, "version", version)
        return self.record(result, started)

    def batch_reads(self, tenant: object, user_ids: object, options: dict[str, Any]
                    ) -> tuple[dict[str, Props | None], list[Program]]:
        """``get_many``: the result skeleton (every id -> None) and one program per shard,
        each returning ``{user_id: props}`` for the users it found."""
        tenant_s, groups = self.group(tenant, user_ids)
        freshness, policy = self.budget(options)

        def shard_read(shard: int, ids: list[str]) -> Program:
            started = time.monotonic()
            data = Statement(_sql.GET_MANY, (tenant_s.encode(), _sql.text_array(ids)))
            found, result = yield from self.read_program(
                shard, freshness, policy, data, decode_many
            )
            self.record(result, started)
            return found

        skeleton: dict[str, Props | None] = {}
        for ids in groups.values():
            skeleton.update(dict.fromkeys(ids))
        return skeleton, [shard_read(shard, ids) for shard, ids in groups.items()]

    def write_request(self, kind: str, tenant: object, user_id: object, argument: object
                      ) -> tuple[int, Statement]:
        """Check a write and build its statement: (shard index, statement)."""
        tenant_s, user_s, bucket, shard = self.locate(tenant, user_id)
        if kind in ("set", "replace"):
            statement = self.merge_statement(tenant_s, user_s, bucket, argument,
                                             kind == "replace")
        elif kind == "unset":
            statement = self.unset_statement(tenant_s, user_s, argument)
        else:
            statement = self.delete_statement(tenant_s, user_s)
        return shard, statement

    def write_done(self, shard: int, statement: Statement,
                   outcome: tuple[int | None, WriteMark]) -> Token:
        """The token of a completed write (refusing a merge the size limit stopped)."""
        version, lsn = outcome
        if version is None and statement.name in (_sql.MERGE, _sql.REPLACE):
            # The upsert's WHERE refused the update: nothing was written.
            raise InvalidInputError("props", "the merged document would exceed the size limit")
        self.stats.record_write(self.shard_names[shard])
        return self.token(shard, lsn)

    def route_for(self, tenant: object, user_id: object, options: dict[str, Any]
                  ) -> RouteDecision:
        """The decision a read with these options would take now."""
        _t, _u, _b, shard = self.locate(tenant, user_id)
        freshness, policy = self.budget(options)
        return dataclasses.replace(self.decide(shard, freshness), degrade=policy,
                                   primary_fallback=self.primary_limiters[shard].state())

    # ------------------------------------------------------------ programs

    def read_program(
        self,
        shard_index: int,
        freshness: Freshness,
        policy: Degrade,
        data: Statement,
        decode: Callable[[Any], Any],
    ) -> Generator[Request, Response, tuple[Any, ReadResult]]:
        """Serve one query on one shard within ``freshness``; returns (decoded rows, result).

        The common case is one straight line: a cached route decision (``DecisionCache``),
        one connection whose facts prove the budget (``proof.known_lsn``), one statement,
        one round trip. Replica failures are reported to the monitor (and logged) only once
        the read is answered: that bookkeeping must not add to the latency of the read that
        hit them.
        """
        if freshness.after is not None:
            if self._token_unplaced(shard_index, freshness):
                # Just started: a token's timeline can be placed once the monitor has seen
                # the primary (its first round may outlast start-up on a busy host). Wait
                # for that, bounded, rather than refuse a read the healthy primary serves.
                until = time.monotonic() + self.routing.primary_deadline
                while self._token_unplaced(shard_index, freshness) and (
                    time.monotonic() < until
                ):
                    yield Wait(shard_index, until)
            self.check_token(shard_index, freshness)
        started = self.clock()
        decision = self.decisions.decide(self.state.view(shard_index), freshness, started,
                                         next(self._rotation))
        failures: list[tuple[int, str]] = []
        try:
            served = yield from self.replica_read(shard_index, decision, data, decode,
                                                  failures, started)
            if isinstance(served, tuple):
                return served
            return (yield from _degrade.fallback(self, shard_index, decision, served, policy,
                                                 data, decode, started, failures))
        finally:
            if failures:
                self._report_failures(shard_index, failures)

    def _report_failures(self, shard_index: int, failures: list[tuple[int, str]]) -> None:
        shard = self.shard_names[shard_index]
        for index, error in failures:
            self.state.fail(shard_index, index, error)
            log.info("replica_read_failed", shard=shard,
                     node=self.topology.shards[shard_index].nodes[index].name, error=error)

    def replica_read(
        self,
        shard_index: int,
        decision: RouteDecision,
        data: Statement,
        decode: Callable[[Any], Any],
        failures: list[tuple[int, str]],
        started: float,
    ) -> Generator[Exec, Response, tuple[Any, ReadResult] | FallbackReason]:
        """Try the decision's replicas in turn; (rows, result) from the first that proves
        the budget, else why none did (failures are appended to ``failures``)."""
        reason = decision.fallback_reason
        candidates = decision.candidates or decision.tentative
        if not candidates:
            assert reason is not None
            return reason
        freshness = decision.freshness
        shard = self.shard_names[shard_index]
        history = decision.shard.history
        runs = self.runs
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
                # The LSN statement runs first, so the data query's snapshot is at least as
                # new as the LSN it reports (one combined statement would not be). Taken
                # just before the send: the LSN is read after it (docs/architecture.md).
                chosen.append(time.monotonic())
                return (_REPLAY_LSN, data), False

            try:
                conn, results = yield Exec(cand.node.config, deadline, plan)
            except PoolTimeout:
                # No free connection in time: busy or reconnecting, not proof the node failed
                # -- unless it was already failing, then it counts (a frozen replica's pool
                # blocks on reconnecting, and every read would pay the deadline otherwise).
                reason = "replica_timeout"
                if cand.node.failures:
                    failures.append((cand.index, "no connection before the read deadline"))
                continue
            except DeadlineExceeded:
                reason = "replica_timeout"
                failures.append((cand.index, "read deadline exceeded"))
                continue
            except psycopg.Error as exc:
                reason = "replica_down"
                failures.append((cand.index, f"read failed: {type(exc).__name__}"))
                continue
            mark = chosen[-1]
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
                lsn, proof, rows = LSN.parse(lsn_value), "pipeline", results[1]
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
            return decode(rows), ReadResult(
                None, None, shard, cand.node.name, True, lsn, bound, None, proof
            )
        assert reason is not None
        return reason

    def verified(self, conn: ConnState, sent_at: float, lsn: LSN) -> None:
        """A read on ``conn`` verified replay LSN ``lsn`` in a round trip sent at
        ``sent_at``: keep it for the connection's later reads and, where the connection
        keeps its server, as a fact about its server run for every connection to that run
        (``proof.RunFacts``; sound as a poll sent at ``sent_at`` is)."""
        remember(conn, lsn)
        run = conn.propstore_run
        if conn.propstore_keeps_server and run is not None:
            self.runs.observe(run, sent_at, lsn)

    def _primary_read(self, shard_index: int, data: Statement
                      ) -> Generator[Exec, Response, tuple[Any, str]]:
        view = self.state.view(shard_index)
        node = _primary_node(view)
        if view.primary is None and view.ruled_out(node):
            # Observed in recovery (or not the HA manager's leader) and no primary seen
            # since: say so instead of blaming the node the file (or the last poll) named.
            raise ShardUnavailableError(view.name, f"no primary observed ({_observed_roles(view)})")

        def plan(conn: ConnState) -> tuple[Sequence[Statement], bool]:
            # A poll that saw this connection's server run as a primary after it opened
            # proves it (demotion needs a restart, which ends it); otherwise check in-line.
            if primary_proven(node.sightings, conn):
                return (data,), False
            return (Statement(_sql.IS_PRIMARY), data), False

        try:
            _conn, results = yield Exec(
                node.config, time.monotonic() + self.routing.primary_deadline, plan
            )
        except (DeadlineExceeded, psycopg.Error) as exc:
            observed = self.state.view(shard_index)
            seen = "" if observed.primary is not None else (
                f" (no primary observed: {_observed_roles(observed)})"
            )
            raise ShardUnavailableError(
                view.name, f"primary {node.name} ({node.config.address}) did not answer: "
                f"{_describe(exc)}{seen}"
            ) from None
        if len(results) == 2:
            if results[0].get_value(0, 0) != b"t":
                raise ShardUnavailableError(
                    view.name, f"{node.name} is no longer a primary (failover in progress; "
                    f"observed: {_observed_roles(self.state.view(shard_index))})"
                )
            return results[1], node.name
        return results[0], node.name

    def write_window(self) -> WriteWindow:
        """The retry window of a write starting now."""
        now = time.monotonic()
        return WriteWindow(now, now + self.routing.write_retry_time,
                           now + self.routing.write_failover_time)

    def write_program(self, shard_index: int, statement: Statement, window: WriteWindow
                      ) -> Generator[Exec, Response, tuple[int | None, WriteMark]]:
        """One attempt at a write on the shard's primary: (new version, where it committed).

        ``pg_current_wal_insert_lsn()``, the write and ``pg_current_wal_flush_lsn()`` with
        the WAL file name are pipelined with a Sync after each, at no extra round trip: the
        first is at or before the write's commit record, the last read after the commit was
        acknowledged (>= the commit record), on the timeline the commit was written on.
        ``window`` caps the attempt, so retries never outlast it.

        The attempt goes to the primary the monitor observes; with none, to the last one
        (it may be restarting) unless the monitor has seen it in recovery since (then it
        fails at once, without I/O). While it waits for a connection it gives up as soon as
        the monitor observes another primary, so no attempt stays blocked on a dead
        primary's pool.
        """
        window.attempts += 1
        view = self.state.view(shard_index)
        node = view.primary
        if node is None:
            node = _primary_node(view)
            if view.ruled_out(node):
                raise PrimaryGone(f"no primary observed ({_observed_roles(view)})")
        window.last_node = node.name
        began = time.monotonic()
        deadline = min(began + self.routing.primary_deadline, window.last_deadline)
        try:
            _conn, results = yield Exec(
                node.config, deadline,
                fixed((Statement(_sql.INSERT_LSN), statement, Statement(_sql.FLUSH_LSN)),
                      commit_each=True),
                valid=functools.partial(self._still_primary, shard_index, node.name),
            )
        finally:
            # Writes are the primary's other load: their latency is part of its health.
            self.primary_limiters[shard_index].sample(time.monotonic() - began)
        start, write, after = results
        version = int(write.get_value(0, 0)) if write.ntuples else None
        wal_file = after.get_value(0, 1)
        return version, WriteMark(
            timeline_of_wal_file(wal_file.decode()) if wal_file else None,
            LSN.parse(after.get_value(0, 0)), LSN.parse(start.get_value(0, 0)),
        )

    def _token_unplaced(self, shard_index: int, freshness: Freshness) -> bool:
        """A token read whose timelines cannot be placed yet: no primary observed so far."""
        if freshness.after is None or self.state.view(shard_index).timelines is not None:
            return False
        marks = freshness.after.marks_for(self.shard_names[shard_index])
        return any(mark.timeline is not None for mark in marks)

    def check_token(self, shard_index: int, freshness: Freshness) -> None:
        """Refuse a token read that no node of the shard can prove: the token's write was
        lost in a failover (:class:`WriteLostError`), or its timeline cannot be placed on
        the observed primary's history yet."""
        if freshness.after is None:
            return
        shard = self.shard_names[shard_index]
        marks = freshness.after.marks_for(shard)
        if not marks or all(mark.timeline is None for mark in marks):
            return
        timelines = self.state.view(shard_index).timelines
        for mark in marks:
            if mark.timeline is None:
                continue
            if timelines is None:
                raise ShardUnavailableError(
                    shard, f"no primary observed yet to place the token's timeline "
                    f"{mark.timeline} on"
                )
            verdict = timelines.verdict(mark)
            if verdict == "lost":
                raise WriteLostError(shard, mark.timeline, mark.lsn,
                                     timelines.switch_of(mark.timeline), timelines.timeline)
            if verdict == "ahead":
                raise ShardUnavailableError(
                    shard, f"the token's write is on timeline {mark.timeline}, newer than the "
                    f"observed primary's {timelines.timeline} (failover in progress)"
                )
            if verdict == "unknown":
                raise StaleReadError(
                    shard, f"cannot prove the token's write at {mark.lsn} on timeline "
                    f"{mark.timeline} survived: {timelines} (the monitor needs to read "
                    "timeline history files, see docs/security.md)"
                )

    # ------------------------------------------------------------ statements

    def merge_statement(self, tenant: str, user_id: str, bucket: int, props: object,
                        replace_all: bool) -> Statement:
        """The upsert for ``set`` (merge) or ``replace``."""
        return Statement(
            _sql.REPLACE if replace_all else _sql.MERGE,
            (tenant.encode(), user_id.encode(), str(bucket).encode(), encode_props(props),
             str(MAX_DOCUMENT_BYTES).encode()),
        )

    @staticmethod
    def unset_statement(tenant: str, user_id: str, keys: object) -> Statement:
        """Remove keys from a user's document."""
        return Statement(_sql.UNSET, (tenant.encode(), user_id.encode(),
                                      _sql.text_array(check_keys(keys))))

    @staticmethod
    def delete_statement(tenant: str, user_id: str) -> Statement:
        """Remove a user's document."""
        return Statement(_sql.DELETE, (tenant.encode(), user_id.encode()))

    def token(self, shard_index: int, mark: WriteMark) -> Token:
        """The token for a write on a shard."""
        return Token(((self.shard_names[shard_index], mark),))

    def _still_primary(self, shard_index: int, name: str) -> bool:
        view = self.state.view(shard_index)
        primary = view.primary
        if primary is not None:
            return primary.name == name
        last = _primary_node(view)  # down (maybe restarting), or not polled yet: keep waiting
        return last.name == name and not view.ruled_out(last)

    def write_exhausted(self, shard_index: int, window: WriteWindow) -> bool:
        """Whether a failed write stops retrying now (see :class:`WriteWindow`)."""
        now = time.monotonic()
        if now >= window.last_deadline:
            return True
        if now < window.retry_until:
            return False
        primary = self.state.view(shard_index).primary
        # Past write_retry_time only a failover keeps the write going: until a primary is
        # observed, and then until it was tried once.
        return primary is not None and primary.name == window.last_node

    def write_retrying(self, kind: type[RetryingT], shard_index: int, window: WriteWindow
                       ) -> RetryingT:
        """The retry policy for writes (``Retrying`` or ``AsyncRetrying``): jittered backoff
        while the error is retryable and :meth:`write_exhausted` says go on; while no
        primary is observed, short waits (an attempt then costs no I/O), so the write
        reaches a new primary within ~20 ms of the monitor observing it."""
        backoff = wait_exponential_jitter(multiplier=0.05, max=0.5)

        def wait(state: RetryCallState) -> float:
            if self.state.view(shard_index).primary is None:
                return 0.02
            return float(backoff(state))

        return kind(
            stop=lambda state: self.write_exhausted(shard_index, window),
            wait=wait,
            retry=retry_if_exception(is_retryable_write_error),
            reraise=True,
        )

    def write_error(self, shard_index: int, exc: BaseException,
                    window: WriteWindow | None = None) -> PropStoreError:
        """The error a caller sees for a write that failed (after any retries); it names
        the roles the monitor observed, never only the file's."""
        view = self.state.view(shard_index)
        node = _primary_node(view)
        shard = self.shard_names[shard_index]
        if is_retryable_write_error(exc):
            tried = "" if window is None else (
                f" after {window.attempts} attempt(s) over "
                f"{time.monotonic() - window.started:.1f}s"
            )
            if view.primary is None:
                return ShardUnavailableError(
                    shard, f"write not applied: no primary observed{tried} "
                    f"({_observed_roles(view)}); last error: {_describe(exc)}",
                )
            return ShardUnavailableError(
                shard, f"write failed on primary {node.name} ({node.config.address}){tried}: "
                f"{_describe(exc)}",
            )
        if isinstance(exc, psycopg.DataError | psycopg.IntegrityError):
            return InvalidInputError("props", f"refused by the database: {_describe(exc)}")
        # Permissions, a missing table (not migrated), ...: a deployment problem, not input.
        return PropStoreError(f"shard {shard}: write refused by {node.name}: {_describe(exc)}")


def _bounded_put(memo: dict[Any, Any], key: Any, value: Any) -> None:
    if len(memo) >= _MEMO_SIZE:
        memo.clear()
    memo[key] = value


def _on_history(view: ShardView, result: Any, lsn: LSN) -> bool:
    """Whether a pipelined ``REPLAY_LSN`` row places the replica on the primary's history
    (its timeline is read in the same statement: a standby switches timelines without
    ending connections, so the poll's timeline does not carry over)."""
    raw = result.get_value(0, 1)
    return raw is not None and view.on_history(int(raw), lsn)


def _observed_roles(view: ShardView) -> str:
    """Every node's observed role and state, e.g. ``m1 replica up, m2 down``, with the HA
    manager's view of it when a source answers (``m1 primary wrong role, patroni replica
    stopping``)."""
    leadership = view.leadership
    return ", ".join(
        f"{node.name} ({node.config.address}) " + (
            node.state if node.role is None or node.state == "down"
            else f"{node.role} {node.state}"
        ) + ("" if leadership is None else f", {leadership.member(node.name) or 'not in patroni'}")
        for node in view.nodes
    )


def _primary_node(view: ShardView) -> NodeView:
    primary = view.primary
    if primary is not None:
        return primary
    index = view.primary_index if view.primary_index is not None else 0
    return view.nodes[index]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, PrimaryGone):
        return str(exc)
    if isinstance(exc, DeadlineExceeded):
        return "deadline exceeded"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def decode_one(result: Any) -> tuple[Props | None, int | None]:
    """Rows of ``GET``: the document and its version, or (None, None)."""
    if not result.ntuples:
        return None, None
    # What json.loads does with a str, minus its argument checks (a read's hottest call).
    return _JSON.decode(result.get_value(0, 0).decode()), int(result.get_value(0, 1))


def decode_many(result: Any) -> dict[str, Props]:
    """The row of ``GET_MANY``: ``{user_id: props}`` (NULL when no user was found)."""
    value = result.get_value(0, 0) if result.ntuples else None
    return json.loads(value) if value is not None else {}


def is_retryable_write_error(exc: BaseException) -> bool:
    """Errors after which a write may be retried on the (possibly new) primary."""
    return isinstance(exc, DeadlineExceeded | psycopg.OperationalError | (
        psycopg.errors.ReadOnlySqlTransaction
    ))
