"""When a fact about a server may prove a read: the rule of ``docs/architecture.md``
("Proofs are about server runs"), in one place, without I/O.

A *fact* (:class:`Sighting`) is what one poll saw on one server run: its replay LSN (or that
it is a primary) at the time the poll was sent. A read reuses a fact, instead of checking in
its own round trip, only when :func:`covers` holds: the read's connection learned in-band,
when it opened, that it is on the same server run as the fact (:class:`ServerRun`), it
provably stays on that server for its whole life (``keeps_server``), and it was already open
when the poll was sent. Everything else is verified in the read's own round trip.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from propstore.lsn import LSN

#: How a node's DSN reaches its server(s) (``via`` in the topology file, docs/config.md).
#: ``auto`` = detect: a pooler in between is treated as transaction pooling (the safe case).
Via = Literal["auto", "direct", "session_pooler", "transaction_pooler", "load_balancer"]
VIA_CHOICES: tuple[Via, ...] = (
    "auto", "direct", "session_pooler", "transaction_pooler", "load_balancer",
)
Proof = Literal["primary", "monitor", "connection", "run", "pipeline", "unproven"]


@dataclass(frozen=True, slots=True)
class ServerRun:
    """The identity of one server run, as a connection learns it in-band.

    ``system_id`` tells clusters apart (physical replicas share their primary's), the
    address and port tell servers apart on one network (NULL over a Unix socket), and the
    postmaster's start time (microseconds) tells runs of one server apart across restarts.
    A crash-reinitialisation under ``restart_after_crash`` keeps the postmaster, so its
    start time may not change; it ends every backend, though, which is why :func:`covers`
    also needs the connection to have been open, and alive, since before the fact.
    """

    system_id: int | None
    address: str | None
    port: int | None
    started_at: str
    # Every read looks its run up in ``RunFacts``: the hash is computed once.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash(
            (self.system_id, self.address, self.port, self.started_at)))

    def __hash__(self) -> int:
        return self._hash

    @classmethod
    def from_row(cls, row: tuple[bytes | None, ...]) -> ServerRun:
        """From the first four text columns of ``_sql.IDENTITY_COLUMNS``.

        Every poll and every new connection reads its identity; the same server run is
        parsed once and shared (a bounded cache), so they allocate nothing per poll.
        """
        return _run_of(*row[:4])

    def __str__(self) -> str:
        where = f"{self.address}:{self.port}" if self.address else "unix socket"
        return f"{where} (system {self.system_id}, up since {self.started_at})"


@functools.lru_cache(maxsize=256)
def _run_of(system_id: bytes | None, address: bytes | None, port: bytes | None,
            started: bytes | None) -> ServerRun:
    return canonical_run(ServerRun(
        int(system_id) if system_id else None,
        address.decode() if address else None,
        int(port) if port else None,
        (started or b"").decode(),
    ))


_CANONICAL: dict[ServerRun, ServerRun] = {}


def canonical_run(run: ServerRun) -> ServerRun:
    """The one object kept for runs equal to ``run`` (bounded: 256 runs, then it starts
    over), so that :func:`covers` compares a connection's run with a fact's by identity.

    Runs reach a store from several sources (its connections' identity rows, its own polls,
    a host agent's messages); a run not made canonical, or made so before a restart of the
    table, still compares equal, only at the cost of ``__eq__``.
    """
    found = _CANONICAL.get(run)
    if found is None:
        if len(_CANONICAL) >= 256:
            _CANONICAL.clear()
        found = _CANONICAL.setdefault(run, run)
    return found


@dataclass(frozen=True, slots=True)
class Sighting:
    """A poll's fact: server run ``run`` had replayed ``lsn`` (a replica) or was a primary
    (``in_recovery`` false) when the poll was sent at ``at`` (monotonic seconds)."""

    run: ServerRun
    at: float
    in_recovery: bool
    lsn: LSN | None


class Connection(Protocol):
    """What a pooled connection learned when it opened, and what it has verified since."""

    propstore_opened_at: float
    propstore_run: ServerRun | None
    #: True when the connection provably stays on one server run for its life: a TCP
    #: stream to the server (direct or through a TCP proxy), or a session-pooled client.
    propstore_keeps_server: bool
    propstore_verified_lsn: LSN | None


def covers(fact: Sighting, conn: Connection) -> bool:
    """Whether ``fact`` holds for a read on ``conn`` (the rule; see the module doc)."""
    return (
        conn.propstore_keeps_server
        and conn.propstore_opened_at < fact.at
        and conn.propstore_run is not None
        # Runs are shared objects (``ServerRun.from_row``): identity first, then equality.
        and (conn.propstore_run is fact.run or conn.propstore_run == fact.run)
    )


def known_lsn(facts: Iterable[Sighting], conn: Connection, runs: RunFacts | None = None
              ) -> tuple[LSN, Proof] | None:
    """The newest replay LSN proven for the server behind ``conn``, and by what: its own
    earlier verified read (``connection``), a monitor poll that covers it (``monitor``), or
    a read verified on another connection to the same server run (``run``, from ``runs``)."""
    if not conn.propstore_keeps_server:
        return None
    best: tuple[LSN, Proof] | None = None
    if conn.propstore_verified_lsn is not None:
        best = (conn.propstore_verified_lsn, "connection")
    # The rule last: a fact no newer than the best so far changes nothing (a token read
    # right after a write meets facts all older than the connection's own last check).
    for fact in facts:
        if fact.in_recovery and fact.lsn is not None and (
            best is None or fact.lsn > best[0]
        ) and covers(fact, conn):
            best = (fact.lsn, "monitor")
    if runs is not None and conn.propstore_run is not None:
        verified = runs.get(conn.propstore_run)
        if verified is not None and verified.lsn is not None and (
            best is None or verified.lsn > best[0]
        ) and covers(verified, conn):
            best = (verified.lsn, "run")
    return best


def primary_proven(facts: Iterable[Sighting], conn: Connection) -> bool:
    """Whether ``conn`` is proven to be on a primary: a poll saw its server run out of
    recovery after it opened (a primary becomes a standby only through a restart)."""
    return any(not fact.in_recovery and covers(fact, conn) for fact in facts)


def remember(conn: Connection, lsn: LSN) -> None:
    """Keep a replay LSN verified on ``conn`` for its later reads, where that is sound."""
    if conn.propstore_keeps_server and (
        conn.propstore_verified_lsn is None or lsn > conn.propstore_verified_lsn
    ):
        conn.propstore_verified_lsn = lsn


class RunFacts:
    """Replay LSNs that reads verified in their own round trip, one fact per server run.

    A read whose pipelined check returned replay LSN ``L`` from server run ``R``, in a round
    trip *sent* at ``at``, proves "``R`` had replayed ``L`` by ``at``'s observation" exactly
    as a poll sent at ``at`` would: :func:`covers` lets another connection reuse it under
    the same rule (same run, keeps its server, open before ``at``); see docs/architecture.md
    ("Verified reads are facts too"). In-process, thread-safe, bounded (``size`` runs, the
    least recently refreshed dropped) and monotonic: a fact is replaced only by one newer in
    both LSN and time, so no reader ever sees a run's fact go back.
    """

    __slots__ = ("_facts", "_lock", "size")

    def __init__(self, size: int = 256) -> None:
        self._facts: dict[ServerRun, Sighting] = {}
        self._lock = threading.Lock()
        self.size = size

    def get(self, run: ServerRun) -> Sighting | None:
        """The newest verified fact about ``run`` (None: none kept)."""
        return self._facts.get(run)

    def observe(self, run: ServerRun, at: float, lsn: LSN) -> Sighting | None:
        """Record that ``run`` had replayed ``lsn`` when a round trip sent at ``at``
        (``time.monotonic()``) read it; the new fact, or None when the kept one is as new."""
        old = self._facts.get(run)
        if old is not None and old.lsn is not None and old.lsn >= lsn:
            return None  # the common case, decided without the lock
        fact = Sighting(run, at, True, lsn)
        with self._lock:
            old = self._facts.get(run)
            if old is not None and (
                (old.lsn is not None and old.lsn >= lsn) or old.at > at
            ):
                return None
            self._facts.pop(run, None)
            self._facts[run] = fact
            while len(self._facts) > self.size:
                del self._facts[next(iter(self._facts))]
        return fact

    def snapshot(self) -> tuple[Sighting, ...]:
        """Every kept fact (for publishing them elsewhere, e.g. the host's observations)."""
        with self._lock:
            return tuple(self._facts.values())


def keeps_server(via: Via, pooler_seen: bool) -> bool:
    """Whether connections of a node reached ``via`` keep their server run for life.

    ``pooler_seen``: the connection's BackendKeyData pid differs from ``pg_backend_pid()``
    (PgBouncer hands clients keys of its own; a TCP proxy passes the server's through).
    Transaction pooling cannot be told from session pooling that way, so a detected pooler
    keeps connection-scoped facts only where the file declares ``session_pooler``.
    """
    if via == "transaction_pooler":
        return False
    if via == "session_pooler":
        return True
    return not pooler_seen


def describe_mode(via: Via, pooler_seen: bool | None, statements_lost: bool = False, *,
                  backend: str | None = None, proxied: bool = False,
                  tracks_prepared: bool = False) -> str:
    """The proof mode of a node in a few words (``propstore lag``'s ``proofs`` field).

    ``backend``: the server the monitor's connection reached; ``proxied``: the DSN names
    several hosts or the backend's port is not the DSN's (a proxy or load balancer);
    ``tracks_prepared``: the node declares a pooler that tracks prepared statements.
    """
    if statements_lost or via == "transaction_pooler" or (
        pooler_seen and via in ("auto", "direct", "load_balancer")
    ):
        named = ", named statements" if tracks_prepared and not statements_lost else ""
        return f"transaction pooler: per-read proofs only{named}"
    if via == "session_pooler":
        return "session pooler: proofs tied to the server run"
    if via == "load_balancer" or proxied:
        seen = f" ({backend})" if backend else ""
        return f"load balancer: figures are of one backend{seen}; others verified per read"
    return "direct: proofs tied to the server run"


def add_sighting(facts: tuple[Sighting, ...], new: Sighting, keep: int = 8
                 ) -> tuple[Sighting, ...]:
    """``facts`` with ``new`` replacing the older fact about the same run; at most ``keep``
    runs, newest first (behind a load balancer each poll may reach another backend)."""
    run = canonical_run(new.run)
    if run is not new.run:
        new = Sighting(run, new.at, new.in_recovery, new.lsn)
    rest = tuple(f for f in facts if f.run != run)
    return (new, *rest[: keep - 1])


__all__ = [
    "VIA_CHOICES", "Connection", "Proof", "RunFacts", "ServerRun", "Sighting", "Via",
    "add_sighting", "canonical_run", "covers", "describe_mode", "keeps_server", "known_lsn",
    "primary_proven", "remember",
]
