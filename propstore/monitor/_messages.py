"""What the host's lag agent tells its readers, as bytes. Pure; no I/O.

The agent (``_agent``) forwards the *raw* results of its polls — an :class:`Observation`,
a failed poll, a timeline history read — and each reader applies them to its own
:class:`~propstore.monitor.MonitorState` with the same code its own monitor would use
(``MonitorState.observe``/``fail``/``record_history``), and, for a shard with Patroni
endpoints, every answer of the HA manager (:class:`Led`, applied with ``MonitorState.lead``
as the reader's own discovery would). So a reader derives its views,
bounds and facts from the same polls exactly as if it had sent them itself, and every fact
keeps the :class:`~propstore.proof.ServerRun` it was observed on: the rule of
``proof.covers`` applies unchanged. Times are ``time.monotonic()`` (``CLOCK_MONOTONIC``),
which is one clock for every process of a Linux host (of one time namespace: the agent's
key names it, see ``_shared.agent_key``).

One message per line, JSON (stdlib; small and never executed, unlike pickle). A client's
first line says what it wants: :class:`Join` (a store: the stream follows) or :class:`Ask`
(``propstore agent status``: one status document, then the agent closes). A store then
sends only :class:`Counts`, its refusal counters, when they change, and :class:`Pace`,
how often it wants the agent's facts (``_hub``: fast while it reads with tight budgets,
slow while it does not read).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from propstore import __version__
from propstore.config import Topology
from propstore.discovery import Leadership, MemberState
from propstore.lsn import LSN
from propstore.monitor._state import Observation
from propstore.proof import ServerRun
from propstore.timeline import TimelineHistory

#: Bump on any change of the messages below (it is part of the agent's key, so readers and
#: agents of different versions never meet).
PROTOCOL = 4
VERSION = f"{__version__}/{PROTOCOL}"


@dataclass(frozen=True, slots=True)
class Hello:
    """The agent's first line: who it is and its clock when it wrote it."""

    pid: int
    now: float
    version: str


@dataclass(frozen=True, slots=True)
class Beat:
    """The agent is alive and its loop runs (a send to a store with nothing newer)."""

    now: float


@dataclass(frozen=True, slots=True)
class Polled:
    """A successful poll of node ``node`` of shard ``shard``."""

    shard: int
    node: int
    observation: Observation


@dataclass(frozen=True, slots=True)
class Failed:
    """A failed poll of a node at ``at`` (the agent's clock)."""

    shard: int
    node: int
    at: float
    error: str


@dataclass(frozen=True, slots=True)
class HistoryRead:
    """The timeline history the agent read from a shard's primary."""

    shard: int
    history: TimelineHistory


@dataclass(frozen=True, slots=True)
class Led:
    """The HA manager's answer for shard ``shard`` (None: no endpoint answered), asked at
    ``at`` (the agent's clock: the answer's ``asked_at``, or when it found none)."""

    shard: int
    at: float
    leadership: Leadership | None


Message = Hello | Beat | Polled | Failed | HistoryRead | Led


@dataclass(frozen=True, slots=True)
class Join:
    """A store's first line: send me your polls."""


@dataclass(frozen=True, slots=True)
class Ask:
    """A status request's first line: answer one status document and close."""


#: Refusal counters a store reports (bounded: shards x profiles x reasons of one config).
MAX_COUNTS = 512
#: Longest profile or reason name kept (longer ones are cut: they are labels, not data).
MAX_LABEL = 64


@dataclass(frozen=True, slots=True)
class Counts:
    """A store's ``StaleReadError`` counters so far: ``(shard, profile, reason, count)``."""

    refusals: tuple[tuple[str, str, str, int], ...]


@dataclass(frozen=True, slots=True)
class Pace:
    """A store's wish: send me your facts every ``seconds`` (the agent rounds it down to
    one of its paces, ``_hub.paces``). Only liveness depends on it: a fact sent later is an
    older fact, whose bound is larger, never wrong."""

    seconds: float


Request = Join | Ask | Counts | Pace


def encode(message: Message) -> bytes:
    """One line of JSON for ``message``."""
    return (json.dumps(_to_json(message), separators=(",", ":")) + "\n").encode()


def decode(line: bytes) -> Message:
    """The message of one line; ``ValueError`` on anything malformed."""
    try:
        data = json.loads(line)
        return _from_json(data)
    except (KeyError, TypeError, IndexError, json.JSONDecodeError) as exc:
        raise ValueError(f"malformed agent message: {exc}") from None


def encode_request(request: Request) -> bytes:
    """One line of JSON for a client's ``request``."""
    if isinstance(request, Join):
        data: dict[str, Any] = {"k": "join"}
    elif isinstance(request, Ask):
        data = {"k": "ask"}
    elif isinstance(request, Pace):
        data = {"k": "pace", "t": request.seconds}
    else:
        data = {"k": "counts", "r": [list(c) for c in request.refusals[:MAX_COUNTS]]}
    return (json.dumps(data, separators=(",", ":")) + "\n").encode()


def decode_request(line: bytes) -> Request:
    """The request of one line; ``ValueError`` on anything malformed. Counters past
    :data:`MAX_COUNTS`, negative ones and overlong labels are dropped or cut: a client's
    line never makes the agent hold more than a bounded tally."""
    try:
        data = json.loads(line)
        kind = data["k"]
        if kind == "join":
            return Join()
        if kind == "ask":
            return Ask()
        if kind == "pace":
            seconds = float(data["t"])
            if not (math.isfinite(seconds) and seconds > 0):
                raise ValueError(f"pace {seconds!r}")
            return Pace(seconds)
        if kind != "counts":
            raise KeyError(f"kind {kind!r}")
        counts = []
        for shard, profile, reason, count in data["r"][:MAX_COUNTS]:
            if int(count) > 0:
                counts.append((str(shard)[:MAX_LABEL], str(profile)[:MAX_LABEL],
                               str(reason)[:MAX_LABEL], int(count)))
        return Counts(tuple(counts))
    except (KeyError, TypeError, IndexError, ValueError, json.JSONDecodeError) as exc:
        raise ValueError(f"malformed agent request: {exc}") from None


def timestamp(message: Message) -> float | None:
    """The agent's clock reading the message carries (None for a history)."""
    if isinstance(message, (Hello, Beat)):  # a constant tuple: no object per call
        return message.now
    if isinstance(message, Polled):
        return message.observation.sent_at
    if isinstance(message, (Failed, Led)):
        return message.at
    return None


def _lsn(value: LSN | None) -> str | None:
    return None if value is None else str(value)


def _unlsn(value: Any) -> LSN | None:
    return None if value is None else LSN.parse(str(value))


def _to_json(message: Message) -> dict[str, Any]:
    if isinstance(message, Hello):
        return {"k": "hello", "pid": message.pid, "now": message.now, "v": message.version}
    if isinstance(message, Beat):
        return {"k": "beat", "now": message.now}
    if isinstance(message, Failed):
        return {"k": "fail", "s": message.shard, "n": message.node, "at": message.at,
                "err": message.error}
    if isinstance(message, HistoryRead):
        h = message.history
        return {"k": "hist", "s": message.shard, "tl": h.timeline, "ok": h.complete,
                "anc": [[tli, str(lsn)] for tli, lsn in h.ancestors]}
    if isinstance(message, Led):
        led = message.leadership
        return {"k": "led", "s": message.shard, "at": message.at, "l": None if led is None else {
            "leader": led.leader, "tl": led.timeline, "ep": led.endpoint, "asked": led.asked_at,
            "m": [[m.node, m.name, m.role, m.state, m.timeline, m.lag] for m in led.members]}}
    o = message.observation
    run = o.run
    return {
        "k": "obs", "s": message.shard, "n": message.node, "at": o.sent_at,
        "rec": o.in_recovery, "lsn": _lsn(o.lsn), "rcv": _lsn(o.receive_lsn),
        "pause": o.replay_paused, "stream": o.receiver_streaming, "sys": o.system_id,
        "hs": None if o.hot_standby_settings is None else ",".join(
            str(v) for v in o.hot_standby_settings),
        "tl": o.timeline, "pool": o.pooler_seen,
        "run": None if run is None else json.dumps(
            [run.system_id, run.address, run.port, run.started_at]),
    }


def _from_json(d: Mapping[str, Any]) -> Message:
    kind = d["k"]
    if kind == "hello":
        return Hello(int(d["pid"]), float(d["now"]), str(d["v"]))
    if kind == "beat":
        return Beat(float(d["now"]))
    if kind == "fail":
        return Failed(int(d["s"]), int(d["n"]), float(d["at"]), str(d["err"]))
    if kind == "hist":
        return HistoryRead(int(d["s"]), TimelineHistory(
            int(d["tl"]), tuple((int(t), LSN.parse(str(lsn))) for t, lsn in d["anc"]),
            bool(d["ok"])))
    if kind == "led":
        return Led(int(d["s"]), float(d["at"]), None if d["l"] is None else _leadership(d["l"]))
    if kind != "obs":
        raise KeyError(f"kind {kind!r}")
    run = d["run"]
    return Polled(int(d["s"]), int(d["n"]), Observation(
        sent_at=float(d["at"]), in_recovery=bool(d["rec"]), lsn=_unlsn(d["lsn"]),
        receive_lsn=_unlsn(d["rcv"]), replay_paused=bool(d["pause"]),
        receiver_streaming=bool(d["stream"]),
        system_id=None if d["sys"] is None else int(d["sys"]),
        hot_standby_settings=None if d["hs"] is None else _settings(str(d["hs"])),
        timeline=None if d["tl"] is None else int(d["tl"]),
        run=None if run is None else _run(str(run)),
        pooler_seen=bool(d["pool"]),
    ))


def _leadership(d: Mapping[str, Any]) -> Leadership:
    def opt_int(value: Any) -> int | None:
        return None if value is None else int(value)

    members = tuple(
        MemberState(None if node is None else str(node), str(name), str(role), str(state),
                    opt_int(tli), opt_int(lag))
        for node, name, role, state, tli, lag in d["m"])
    return Leadership(None if d["leader"] is None else str(d["leader"]), members,
                      opt_int(d["tl"]), str(d["ep"]),
                      None if d["asked"] is None else float(d["asked"]))


# The values below repeat in every poll of a server: one object per distinct value (bounded
# caches keyed by the message's own text), as ``proof.ServerRun.from_row`` does for polls.
@functools.lru_cache(maxsize=256)
def _run(text: str) -> ServerRun:
    system_id, address, port, started = json.loads(text)
    return ServerRun(None if system_id is None else int(system_id),
                     None if address is None else str(address),
                     None if port is None else int(port), str(started))


@functools.lru_cache(maxsize=64)
def _settings(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def topology_document(topology: Topology) -> dict[str, Any]:
    """What the agent needs of a topology, in the form ``Topology.from_dict`` reads: the
    nodes (DSNs with any password already in them, Patroni endpoints), the monitor and
    discovery settings, the connect timeout. Sent on the agent's stdin, never its command
    line (``ps`` shows that)."""
    m, d = topology.monitor, topology.discovery

    def node(n: Any) -> dict[str, Any]:
        extra: dict[str, Any] = {"pooler_tracks_prepared": True} if (
            n.pooler_tracks_prepared) else {}
        if n.patroni:
            extra["patroni"] = n.patroni
        return {"name": n.name, "dsn": n.dsn, "via": n.via, **extra}

    # Only where an HA manager is asked (no other topology's document, or key, has them).
    discovery = {"discovery": {"interval": d.interval, "fast_interval": d.fast_interval,
                               "timeout": d.timeout}} if any(
        s.patroni_endpoints for s in topology.shards) else {}
    return {
        "bucket_count": topology.bucket_count,
        "monitor": {"interval": m.interval, "poll_timeout": m.poll_timeout,
                    "history_size": m.history_size,
                    "failures_before_down": m.failures_before_down,
                    "max_backoff": m.max_backoff, "sharing": "off"},
        "routing": {"connect_timeout": topology.routing.connect_timeout},
        **discovery,
        "shards": [
            {"name": s.name, "buckets": [str(b) for b in s.buckets], "primary": node(s.primary),
             "replicas": [node(r) for r in s.replicas]}
            for s in topology.shards
        ],
    }


__all__ = [
    "MAX_COUNTS", "MAX_LABEL", "PROTOCOL", "VERSION", "Ask", "Beat", "Counts", "Failed",
    "Hello", "HistoryRead", "Join", "Led", "Message", "Pace", "Polled", "Request", "decode",
    "decode_request", "encode", "encode_request", "timestamp", "topology_document",
]
