"""The HA manager source (``propstore.discovery``) as values: parsing Patroni's answers, the
topology file's ``members``/``patroni`` keys, and what an answer does to a shard's view
(driven by explicit times; the real cluster is in tests/test_patroni.py)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from propstore import ConfigError, Topology
from propstore.discovery import Leadership, history_of, parse_cluster
from propstore.lsn import LSN
from propstore.monitor import Observation
from propstore.monitor._shared import SharedMonitor
from propstore.monitor._state import apply_leadership, apply_observation, initial_views

MEMBERS = """
bucket_count = 16

[discovery]
interval = "2s"

[[shards]]
name = "s"
buckets = ["0-15"]
members = [
  { name = "m1", dsn = "host=127.0.0.1 port=6001", patroni = "http://127.0.0.1:8008" },
  { name = "m2", dsn = "host=127.0.0.1 port=6002", patroni = "http://127.0.0.1:8009/" },
  { name = "m3", dsn = "host=127.0.0.1 port=6003 dbname=propstore" },
]
"""
TOPO = Topology.from_toml(MEMBERS, environ={})
NODES = TOPO.shards[0].nodes


def _cluster(*members: tuple[str, str, str], port_of: dict[str, int] | None = None
             ) -> dict[str, Any]:
    return {"members": [
        {"name": name, "role": role, "state": state, "host": "127.0.0.1",
         "port": (port_of or {}).get(name, 0), "timeline": 2, "lag": 0}
        for name, role, state in members
    ]}


def _leads(leader: str | None) -> Leadership:
    members = [(n, "leader" if n == leader else "replica", "running") for n in ("m1", "m2")]
    return parse_cluster(_cluster(*members), NODES, "http://127.0.0.1:8008")


def primary(at: float, lsn: int) -> Observation:
    return Observation(at, False, LSN(lsn), None, False, False, 1, timeline=1)


def replica(at: float, lsn: int) -> Observation:
    return Observation(at, True, LSN(lsn), LSN(lsn), False, True, 1, timeline=1)


def test_members_give_no_fixed_roles_and_name_their_patroni_endpoints() -> None:
    shard = TOPO.shards[0]
    assert [n.name for n in shard.nodes] == ["m1", "m2", "m3"]
    assert shard.patroni_endpoints == ("http://127.0.0.1:8008", "http://127.0.0.1:8009")
    assert TOPO.discovery.interval == pytest.approx(2.0)


@pytest.mark.parametrize(("change", "message"), [
    ('patroni = "http://127.0.0.1:8008" }', "must be the member's Patroni REST API"),
    ('patroni = "ftp://x:1" }', "must be the member's Patroni REST API"),
])
def test_a_bad_patroni_endpoint_is_refused_naming_the_node(change: str, message: str) -> None:
    text = MEMBERS.replace('patroni = "http://127.0.0.1:8008" }', change.replace(
        "http://127.0.0.1:8008", "127.0.0.1:8008"))
    with pytest.raises(ConfigError, match=f"node m1: .*{message}"):
        Topology.from_toml(text, environ={})


def test_members_and_fixed_roles_together_are_refused() -> None:
    text = MEMBERS.replace('buckets = ["0-15"]', 'buckets = ["0-15"]\nprimary = "host=x"')
    with pytest.raises(ConfigError, match="members, or primary and replicas, not both"):
        Topology.from_toml(text, environ={})
    with pytest.raises(ConfigError, match=r"\[discovery\] intervals"):
        Topology.from_toml(MEMBERS.replace('interval = "2s"', "timeout = 0"), environ={})


def test_members_map_by_name_else_address_and_only_a_running_leader_leads() -> None:
    found = parse_cluster(_cluster(("m1", "replica", "streaming"), ("pg3", "leader", "running"),
                                   port_of={"pg3": 6003}), NODES, "e")
    assert found.leader == "m3" and found.timeline == 2
    assert found.member("m1") is not None and str(found.member("m1")) == "patroni replica streaming"
    stopping = parse_cluster(_cluster(("m1", "leader", "stopping"), ("m2", "replica", "running")),
                             NODES, "e")
    assert stopping.leader is None  # holds the lock but is shutting down: nobody leads
    stranger = parse_cluster(_cluster(("x9", "leader", "running")), NODES, "e")
    assert stranger.leader is None  # a member the file does not name is never written to
    with pytest.raises(ValueError, match="not a Patroni /cluster answer"):
        parse_cluster({"error": "no such page"}, NODES, "e")


def test_history_is_complete_only_when_every_earlier_timeline_is_listed() -> None:
    full = history_of(3, [[1, 100, "r", "t", "m2"], [2, 4096, "r", "t", "m1"]])
    assert full.complete and full.switch_of(2) == LSN(4096)
    assert not history_of(3, [[2, 4096, "r", "t", "m1"]]).complete
    with pytest.raises(ValueError, match="malformed"):
        history_of(2, [["x"]])


def test_a_primary_the_source_no_longer_names_is_dropped_at_once() -> None:
    view = initial_views(TOPO.shards, 0.0)[0]
    view = apply_observation(view, 0, primary(0.0, 100), 16)
    view = apply_observation(view, 1, replica(0.0, 100), 16)
    view = apply_leadership(view, _leads("m1"), 0.1)
    assert view.primary is not None and view.primary.name == "m1"
    # Patroni says m2 leads: m1 is dropped before any poll of it (it still answers as primary).
    view = apply_leadership(view, _leads("m2"), 0.2)
    assert view.primary is None and view.ruled_out(view.nodes[0])
    assert view.nodes[0].state == "wrong role"
    view = apply_observation(view, 0, primary(0.3, 120), 16)
    assert view.primary is None  # its own poll alone does not bring it back
    # m2 becomes the primary only once its own poll says so (the in-band check decides).
    view = apply_observation(view, 1, primary(0.4, 130), 16)
    assert view.primary is not None and view.primary.name == "m2"


def test_a_source_naming_a_replica_or_not_answering_never_makes_a_primary() -> None:
    view = initial_views(TOPO.shards, 0.0)[0]
    view = apply_observation(view, 0, primary(0.0, 100), 16)
    view = apply_observation(view, 1, replica(0.0, 100), 16)
    view = apply_leadership(view, _leads("m2"), 0.1)  # stale or wrong: m2 is in recovery
    assert view.primary is None
    view = apply_observation(view, 1, replica(0.2, 100), 16)
    assert view.primary is None
    # The source stops answering: the in-band observation alone decides again.
    view = apply_leadership(view, None, 0.3)
    assert view.primary is not None and view.primary.name == "m1"
    # Nobody leads (a failover under way): no primary, replicas still serve on their bound.
    view = apply_leadership(view, _leads(None), 0.4)
    assert view.primary is None and view.nodes[1].serves_replica_reads


def test_a_primary_on_an_older_timeline_than_another_is_never_the_primary() -> None:
    # An ex-leader whose HA agent hung keeps writing on its timeline after another member
    # was promoted (a newer timeline): with or without a source, it is never chosen again.
    view = initial_views(TOPO.shards, 0.0)[0]
    view = apply_observation(view, 0, primary(0.0, 100), 16)
    view = apply_observation(view, 1, replica(0.0, 100), 16)
    promoted = Observation(0.5, False, LSN(200), None, False, False, 1, timeline=2)
    view = apply_observation(view, 1, promoted, 16)
    view = apply_observation(view, 0, primary(0.6, 300), 16)  # still answers as a primary
    assert view.primary is not None and view.primary.name == "m2"
    assert view.ruled_out(view.nodes[0]) and view.nodes[0].state == "wrong role"
    # A stale source naming the old leader does not bring it back.
    view = apply_leadership(view, _leads("m1"), 0.7)
    assert view.primary is None and view.ruled_out(view.nodes[0])
    # Once the newer one is seen in recovery (the HA manager went back), it may lead again.
    view = apply_leadership(view, None, 0.8)
    view = apply_observation(view, 1, replica(0.9, 300), 16)
    view = apply_observation(view, 0, primary(1.0, 310), 16)
    assert view.primary is not None and view.primary.name == "m1"


def test_the_documented_members_example_loads() -> None:
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "config.md").read_text()
    block = text.split("### A shard run by an HA manager", 1)[1].split("```toml", 1)[1]
    topology = Topology.from_toml(block.split("```", 1)[0], environ={})
    assert [n.patroni for n in topology.shards[0].nodes] == [
        f"http://10.0.0.{i}:8008" for i in (1, 2, 3)]
    assert topology.discovery.fast_interval == pytest.approx(0.2)


def test_the_source_asks_the_next_endpoint_and_ignores_what_is_not_patroni() -> None:
    import http.server
    import json
    import threading

    from propstore.config import DiscoverySettings
    from propstore.discovery import PatroniSource
    from propstore.sandbox._datadir import free_port

    answers: dict[str, object] = {"/cluster": _cluster(("m1", "replica", "streaming"),
                                                        ("m2", "leader", "running"))}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(answers.get(self.path, {"error": "no"})).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        live = f"http://127.0.0.1:{server.server_address[1]}"
        text = MEMBERS.replace("http://127.0.0.1:8008", dead).replace(
            "http://127.0.0.1:8009/", live)
        shard = Topology.from_toml(text, environ={}).shards[0]
        source = PatroniSource(shard, DiscoverySettings(timeout=0.5))
        found = source.leadership_now()
        assert found is not None and found.leader == "m2" and found.endpoint == live
        answers["/cluster"] = ["not", "a", "cluster"]  # a wrong URL: never "no leader"
        assert source.leadership_now() is None
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_the_host_agent_asks_patroni_as_its_stores_would_and_forwards_every_answer() -> None:
    from propstore.monitor._agent import agent_topology
    from propstore.monitor._messages import Led, decode, encode
    from propstore.monitor._place import agent_key, answer_limit

    agent = agent_topology(TOPO)  # what a spawned agent reads from its stdin
    assert agent.shards[0].patroni_endpoints == TOPO.shards[0].patroni_endpoints
    assert agent.discovery == TOPO.discovery
    other = Topology.from_toml(MEMBERS.replace("8009", "8010"), environ={})
    assert agent_key(other) != agent_key(TOPO)  # another HA source: another agent
    # interval + (endpoints + 1) x timeout: the longest a store's own discovery waits.
    assert answer_limit(TOPO, 0) == 2.0 + 3 * 1.0
    for message in (Led(0, 5.0, replace_asked(_leads("m2"), 5.0)), Led(0, 6.0, None)):
        assert decode(encode(message)) == message


def replace_asked(leadership: Leadership, at: float) -> Leadership:
    from dataclasses import replace

    return replace(leadership, asked_at=at)


def test_a_store_applies_its_agents_answers_unless_its_own_was_asked_later() -> None:
    from propstore.monitor._messages import Led

    monitor = SharedMonitor(TOPO)
    state = monitor.state
    state.observe(0, 0, primary(1.0, 100))
    state.observe(0, 1, replica(1.0, 100))
    assert state.view(0).primary is not None and state.view(0).primary.name == "m1"
    monitor._lead(Led(0, 2.0, replace_asked(_leads("m2"), 2.0)))
    assert state.view(0).primary is None  # vetoed at once: m2 leads, m1 is no primary
    monitor._lead(Led(0, 1.5, replace_asked(_leads("m1"), 1.5)))  # an older answer, replayed
    assert state.view(0).primary is None and state.view(0).leadership is not None
    assert state.view(0).leadership.leader == "m2"
    monitor._lead(Led(0, 3.0, replace_asked(_leads("m1"), 3.0)))
    assert state.view(0).primary is not None and state.view(0).primary.name == "m1"


class _ScriptedAgent:
    """An agent that answers on a store's agent socket with a hello and heartbeats, and HA
    manager answers (none answered) while :attr:`answering` is set."""

    def __init__(self, path: Path) -> None:
        from propstore.monitor._messages import VERSION

        self.version = VERSION
        self.answering = threading.Event()
        self.answering.set()
        self.last_answer = 0.0
        self.stop = threading.Event()
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(4)
        self.server.settimeout(0.1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        from propstore.monitor._messages import Beat, Hello, Led, encode

        while not self.stop.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(1024)  # the store's join
                conn.sendall(encode(Hello(os.getpid(), time.monotonic(), self.version)))
                with contextlib.suppress(OSError):
                    while not self.stop.is_set():
                        now = time.monotonic()
                        conn.sendall(encode(Beat(now)))
                        if self.answering.is_set():
                            conn.sendall(encode(Led(0, now, None)))
                            self.last_answer = now
                        time.sleep(0.2)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.server.close()


def _without_patroni() -> Topology:
    """:data:`MEMBERS` with no Patroni endpoints."""
    return Topology.from_toml(MEMBERS.replace(', patroni = "http://127.0.0.1:8008"', "")
                              .replace(', patroni = "http://127.0.0.1:8009/"', ""), environ={})


def _await_following(monitor: SharedMonitor, seconds: float = 10.0) -> None:
    """Until ``monitor`` follows an agent (its join error if it does not in ``seconds``)."""
    deadline = time.monotonic() + seconds
    while monitor.source != "agent":
        assert time.monotonic() < deadline, monitor.join_error
        time.sleep(0.01)


@pytest.mark.slow
def test_a_store_asks_patroni_itself_once_its_agents_answers_are_older_than_its_own_would_be(
    tmp_path: Path,
) -> None:
    from propstore.monitor._place import AgentPaths, answer_limit
    from tests._agent_worker import agent_dir

    fast = Topology.from_toml(MEMBERS.replace('interval = "2s"',
                                              'interval = "0.5s"\ntimeout = "0.5s"'),
                              environ={})
    limit = answer_limit(fast, 0)
    assert limit == 0.5 + 3 * 0.5
    with agent_dir(tmp_path / "agents"):
        agent = _ScriptedAgent(AgentPaths.of(fast).socket)
        monitor = SharedMonitor(fast)
        try:
            monitor.start()
            _await_following(monitor)
            time.sleep(3 * limit)  # answers keep coming: the store keeps following
            assert (monitor.source, monitor.fallbacks) == ("agent", 0), monitor.own_reason
            agent.answering.clear()
            deadline = time.monotonic() + 3 * limit
            while monitor.fallbacks == 0:
                assert time.monotonic() < deadline, "the store never stopped following"
                time.sleep(0.01)
            late = time.monotonic() - agent.last_answer
        finally:
            monitor.stop()
            agent.close()
    print(f"fell back {late:.2f} s after the agent's last answer (limit {limit:.2f} s)")
    assert "Patroni answers came late" in monitor.own_reason, monitor.own_reason
    # Not before the limit (beats kept coming), and at it: within a scheduling delay.
    assert limit <= late <= limit + 1.0


def test_a_store_without_patroni_endpoints_has_no_answer_deadline() -> None:

    plain = _without_patroni()
    assert not plain.shards[0].patroni_endpoints
    # inf, never NaN (-inf + inf): a NaN deadline made every wait for the agent's bytes
    # zero, a busy loop that never took a stopped agent for stuck.
    assert SharedMonitor(plain)._next_answer_due() == float("inf")


def test_a_store_following_an_idle_agent_sleeps_between_its_messages(tmp_path: Path) -> None:
    """Without Patroni endpoints too: the wait for the agent's bytes is never zero (a NaN
    answer deadline made it a busy loop: 241 ms of CPU per second at load 50, vs 2)."""
    from propstore.monitor._place import AgentPaths
    from tests._agent_worker import agent_dir

    plain = _without_patroni()
    with agent_dir(tmp_path / "agents"):
        agent = _ScriptedAgent(AgentPaths.of(plain).socket)
        agent.answering.clear()  # beats only, every 0.2 s
        monitor = SharedMonitor(plain)
        try:
            monitor.start()
            _await_following(monitor)
            cpu, wall = time.process_time(), time.monotonic()
            time.sleep(2.0)
            per_second = (time.process_time() - cpu) / (time.monotonic() - wall)
        finally:
            monitor.stop()
            agent.close()
    assert monitor.source == "agent" and per_second < 0.05, per_second
