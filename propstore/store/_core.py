"""What the sync and async stores share: the store's state, argument checks, and each
operation as a program.

A *program* is a generator that yields :class:`Exec` requests ("run these statements on
that node before this deadline") and receives ``(connection, results)`` or has the error
thrown into it. All routing, proof and fallback logic lives in the programs; the sync and
async stores only drive them (check a connection out, run ``_wire``, hand results back), so
the two can never disagree about what makes a read fresh enough.

``StoreCore`` resolves budgets, locates users and runs a read's program: the token checks,
the route decision, then the replicas (``_replica``) and, past them, the primary or the
degrade policy (``_degrade``, reading on the primary through ``_retry``: admission, and
retries while it restarts; the attempt itself is ``_primary``'s). A write's
attempt and retries are ``_writes``'s programs; ``_statements`` builds and decodes what
both send. None of those modules imports this one: they get the state they need.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from collections.abc import Callable, Generator
from datetime import timedelta
from operator import is_not
from typing import Any

import structlog

from propstore._limiter import PrimaryLimiter
from propstore._repeats import Repeats
from propstore._validation import check_id, check_tenant, check_user_ids
from propstore._wire import Statement
from propstore.config import Topology
from propstore.degrade import Degrade
from propstore.errors import InvalidInputError
from propstore.freshness import STRONG, Freshness, Token, coerce_token
from propstore.monitor import MonitorState
from propstore.proof import RunFacts
from propstore.router import DecisionCache, FallbackLimiter, RouteDecision, route
from propstore.sharding import tenant_bucket_of
from propstore.store import _degrade, _statements, _tokens
from propstore.store._primary import PrimaryReads
from propstore.store._program import (
    Failure,
    Program,
    Props,
    ReadObserver,
    ReadResult,
    Request,
    Response,
    Wait,
)
from propstore.store._replica import ReplicaReads
from propstore.store._stats import ReadStats
from propstore.store._writes import Writes
from propstore.timeline import WriteMark

log = structlog.get_logger("propstore.store")

_set_field = object.__setattr__

_BUDGET_ORDER = ("max_staleness", "after", "profile", "consistency", "on_stale", "degrade")
_BUDGET_KEYS = frozenset(_BUDGET_ORDER)
#: Entries of the budget and tenant memos (cleared when full: a service uses a few).
_MEMO_SIZE = 256
#: A replica read failure of one node and reason is logged at once, then at most once per
#: this many seconds with how many failed alike meanwhile (``repeated``).
FAILURE_EVENT_EVERY = 10.0
_NONES = itertools.repeat(None)


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
        #: Wakes reads waiting under a ``Degrade.wait`` policy (monitor news) and reads
        #: queued for room on a primary (their turn granted).
        self.changes = _degrade.Changes(len(topology.shards))
        self.state.listeners.append(self.changes.notify)
        self.primary_limiters = [PrimaryLimiter(limiter, clock, self.changes.granted)
                                 for _ in topology.shards]
        self.shard_names = tuple(s.name for s in topology.shards)
        self.stats = ReadStats()
        self._rotation = itertools.count()
        #: Route decisions reused while provably unchanged (the read path's first step).
        self.decisions = DecisionCache(len(topology.shards))
        #: Replay LSNs verified by reads, per server run (``proof.RunFacts``): a read on
        #: another connection to that run may reuse one instead of checking in-line.
        self.runs = RunFacts()
        #: The programs past the route decision: replica reads, primary reads, writes.
        self.replicas = ReplicaReads(self.state, self.runs, self.routing)
        self.primary = PrimaryReads(self.state, self.routing)
        self.writes = Writes(self.state, self.routing, self.primary_limiters,
                             self.shard_names)
        self.observers: list[ReadObserver] = []
        #: Which replica read failures to log: a frozen replica fails every read alike.
        self.failure_events = Repeats(FAILURE_EVENT_EVERY)
        #: (keyword given (None: none), type of its value, value) -> budget.
        self._budgets: dict[tuple[str | None, type, Any], tuple[Freshness, Degrade]] = {}
        self._combined_budgets: dict[Any, tuple[Freshness, Degrade]] = {}
        #: Checked tenant -> (the tenant, its ``bucket_of`` with the tenant's part hashed).
        self._tenants: dict[object, tuple[str, Callable[[str], int]]] = {}
        #: The routing settings' default degrade policy (a property: built once here).
        self._policy = topology.routing.policy
        self._bucket_count = topology.bucket_count
        self._shard_of_bucket = topology.bucket_map.shard_index

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
        giving one keyword (or none) finds its budget in one lookup, keyed by the keyword,
        the value's type (1 == 1.0 == True, but True is refused) and the value.
        """
        name: str | None
        value: Any
        if len(options) == 1:  # get(..., max_staleness=1.0), or a read giving one budget
            ((name, value),) = options.items()
            if value is None:
                name = None
            several = False
        else:
            # How many keywords carry a value, counted in C (no Python loop over the six a
            # read may pass), then the one that does, if one does.
            given = sum(map(is_not, options.values(), _NONES))
            several = given > 1
            name = value = None
            if given == 1:
                for name, value in options.items():  # noqa: B007 (the loop finds them)
                    if value is not None:
                        break
        if name == "after" and type(value) is Token:
            # A token differs per write: its budget is built, not memoised (what
            # freshness() returns for a token alone, without its general steps).
            return Freshness(after=coerce_token(value, self.shard_names)), self._policy
        if not several:
            try:
                found = self._budgets.get((name, type(value), value))
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
        # An unhashable value freshness() accepted (converted) is not kept.
        with contextlib.suppress(TypeError):
            _bounded_put(self._budgets, (name, type(value), value), resolved)
        return resolved

    def locate(self, tenant: object, user_id: object) -> tuple[str, str, int, int]:
        """Check the ids; return them with the user's bucket and shard index."""
        # Tenants are few: each is checked once (the memo is bounded), and its part of the
        # bucket hash absorbed once (a third of bucket_of's cost); user ids every time.
        known = self._tenants.get(tenant) if type(tenant) is str else None
        if known is None:
            tenant_s = check_tenant(tenant)
            known = (tenant_s, tenant_bucket_of(tenant_s, self._bucket_count))
            _bounded_put(self._tenants, tenant_s, known)
        tenant_s, bucket_of_user = known
        user_s = check_id("user_id", user_id)
        bucket = bucket_of_user(user_s)
        return tenant_s, user_s, bucket, self._shard_of_bucket(bucket)

    def group(self, tenant: object, user_ids: object) -> tuple[str, dict[int, list[str]]]:
        """Check a batch; group user ids by shard index."""
        tenant_s = check_tenant(tenant)
        return tenant_s, self.topology.bucket_map.group(tenant_s, check_user_ids(user_ids))

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
        data = _statements.get(tenant_s, user_s)
        (props, version), result = yield from self.read_program(
            shard, freshness, policy, data, _statements.decode_one, started
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
            data = _statements.get_many(tenant_s, ids)
            found, result = yield from self.read_program(
                shard, freshness, policy, data, _statements.decode_many
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
        return shard, _statements.write(kind, tenant_s, user_s, bucket, argument)

    def write_done(self, shard: int, statement: Statement,
                   outcome: tuple[int | None, WriteMark]) -> Token:
        """The token of a completed write (refusing a merge the size limit stopped)."""
        version, lsn = outcome
        if version is None and _statements.is_upsert(statement):
            # The upsert's WHERE refused the update: nothing was written.
            raise InvalidInputError("props", "the merged document would exceed the size limit")
        name = self.shard_names[shard]
        self.stats.record_write(name)
        return Token(((name, lsn),))

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
        began: float | None = None,
    ) -> Generator[Request, Response, tuple[Any, ReadResult]]:
        """Serve one query on one shard within ``freshness``; returns (decoded rows, result).

        ``began``: when the caller asked (``time.monotonic()``; default now). The replicas'
        deadline runs from then, so the time spent before the first replica is tried
        (checks, routing, the connection's checkout) is inside it, not added after it: a
        read that meets a frozen replica ends at the deadline plus a primary read.

        The common case is one straight line: a cached route decision (``DecisionCache``),
        one connection whose facts prove the budget (``proof.known_lsn``), one statement,
        one round trip. Replica failures are reported to the monitor (and logged) only once
        the read is answered: that bookkeeping must not add to the latency of the read that
        hit them.
        """
        token = freshness.after
        if token is not None:
            shard = self.shard_names[shard_index]
            if _tokens.unplaced(self.state.view(shard_index), shard, token):
                # Just started: a token's timeline can be placed once the monitor has seen
                # the primary (its first round may outlast start-up on a busy host). Wait
                # for that, bounded, rather than refuse a read the healthy primary serves.
                until = time.monotonic() + self.routing.primary_deadline
                while _tokens.unplaced(self.state.view(shard_index), shard, token) and (
                    time.monotonic() < until
                ):
                    yield Wait(shard_index, until)
                began = None  # waited for the monitor, not for a replica
            _tokens.check(self.state.view(shard_index), shard, token)
        deadline = (time.monotonic() if began is None else began) + (
            self.routing.replica_deadline)
        # How fresh the monitor's facts must arrive (a host agent sends them that often).
        if freshness.monitor_budget < self.state.demand.tightest:
            self.state.demand.tightest = freshness.monitor_budget
        started = self.clock()
        decision = self.decisions.decide(self.state.view(shard_index), freshness, started,
                                         next(self._rotation))
        failures: list[Failure] = []
        try:
            served = yield from self.replicas.read(shard_index, decision, data, decode,
                                                   failures, started, deadline)
            if isinstance(served, tuple):
                return served
            return (yield from _degrade.fallback(self, shard_index, decision, served, policy,
                                                 data, decode, started, failures))
        finally:
            if failures:
                self._report_failures(shard_index, failures)

    def _report_failures(self, shard_index: int, failures: list[Failure]) -> None:
        shard = self.shard_names[shard_index]
        for index, error, timed_out in failures:
            # A missed deadline is no new proof; only an error counts toward down.
            (self.state.unanswered if timed_out else self.state.fail)(shard_index, index, error)
            held = self.failure_events.emit((shard_index, index, error))
            if held is not None:
                log.info("replica_read_failed", shard=shard,
                         node=self.topology.shards[shard_index].nodes[index].name, error=error,
                         **({"repeated": held} if held else {}))


def _bounded_put(memo: dict[Any, Any], key: Any, value: Any) -> None:
    if len(memo) >= _MEMO_SIZE:
        memo.clear()
    memo[key] = value
