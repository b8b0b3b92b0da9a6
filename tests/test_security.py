"""Isolation and security: tenants never see each other, SQL is parameterised, passwords
never leak, and readers work with a role that cannot write."""

from __future__ import annotations

import ast
import logging
import re
import socket
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

import propstore
from propstore import PropertyStore, PropStoreError, Topology
from propstore.sandbox import LocalCluster
from tests.conftest import users_on_shard
from tests.test_store import wait_for

PACKAGE = Path(propstore.__file__).parent
SQL_WORDS = re.compile(
    r"\b(SELECT|INSERT|UPDATE|DELETE|ALTER|CREATE|DROP|GRANT|TRUNCATE|PREPARE|EXECUTE)\b"
)
#: Formatted SQL that is reviewed and safe: identifiers/values from code, never from input.
ALLOWED = {
    ("_sql.py", "prepare_sql"),  # statement names are module constants
}


def _formatted_sql(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, innermost function) of every f-string / .format / % whose literal has SQL."""
    functions = [f for f in ast.walk(tree)
                 if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)]

    def enclosing(line: int) -> str:
        inside = [f for f in functions if f.lineno <= line <= (f.end_lineno or f.lineno)]
        return max(inside, key=lambda f: f.lineno).name if inside else "<module>"

    def literal_text(node: ast.AST) -> str:
        if isinstance(node, ast.JoinedStr):
            return "".join(v.value for v in node.values if isinstance(v, ast.Constant)
                           and isinstance(v.value, str))
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        return ""

    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        text = ""
        if isinstance(node, ast.JoinedStr) and any(
            isinstance(v, ast.FormattedValue) for v in node.values
        ):
            text = literal_text(node)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
            node.func.attr == "format"
        ):
            text = literal_text(node.func.value)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
            text = literal_text(node.left)
        if SQL_WORDS.search(text):
            found.append((node.lineno, enclosing(node.lineno)))
    return found


def test_no_sql_is_built_by_string_formatting() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for line, func in _formatted_sql(ast.parse(path.read_text())):
            if (path.name, func) not in ALLOWED:
                offenders.append(f"{path.relative_to(PACKAGE)}:{line} in {func}")
    assert offenders == [], "SQL built by string formatting:\n" + "\n".join(sorted(set(offenders)))


INJECTIONS = [
    "x'; DROP TABLE user_properties; --", 'a"b', "back\\slash", "{brace}", "co,mma",
    "$1", "' OR '1'='1", "NULL", "\"},{\"",
]


def test_injection_attempts_through_every_input_are_stored_verbatim(
    store: PropertyStore, topology: Topology
) -> None:
    for i, evil in enumerate(INJECTIONS):
        user = f"inj{i}-{evil}"
        token = store.set("acme", user, {evil: evil, "nested": {evil: [evil]}})
        token = token | store.unset("acme", user, [evil, "absent"])
        assert store.get("acme", user, after=token) == {"nested": {evil: [evil]}}
    users = [f"inj{i}-{evil}" for i, evil in enumerate(INJECTIONS)]
    found = store.get_many("acme", [*users, *INJECTIONS], consistency="strong")
    assert all(found[u] == {"nested": {e: [e]}} for u, e in zip(users, INJECTIONS, strict=True))
    assert all(found[e] is None for e in INJECTIONS)
    stored = 0
    for shard in topology.shards:  # the table is intact everywhere, holding just these users
        with psycopg.connect(shard.primary.dsn) as conn:
            row = conn.execute("SELECT count(*), count(*) FILTER (WHERE user_id = ANY(%s))"
                               " FROM user_properties", (users,)).fetchone()
            assert row is not None and row[0] == row[1]
            stored += row[0]
    assert stored == len(INJECTIONS)


@pytest.mark.slow
def test_a_tenant_never_reads_another_tenants_user(
    migrated_cluster: LocalCluster, propstore_clean_state: LocalCluster
) -> None:
    assert propstore_clean_state.config_path is not None
    topology = Topology.load(propstore_clean_state.config_path)
    with PropertyStore(topology) as store:

        @settings(max_examples=40, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(tenants=st.lists(st.from_regex(r"[a-z][a-z0-9.-]{0,6}", fullmatch=True),
                                min_size=2, max_size=4, unique=True),
               users=st.lists(st.from_regex(r"[a-z0-9]{1,4}", fullmatch=True),
                              min_size=1, max_size=4, unique=True))
        def run(tenants: list[str], users: list[str]) -> None:
            token = None
            for tenant in tenants:
                for user in users:  # the same user ids in every tenant
                    written = store.replace(tenant, user, {"owner": tenant, "user": user})
                    token = written if token is None else token | written
            for tenant in tenants:
                for user in users:
                    assert store.get(tenant, user, after=token) == {"owner": tenant,
                                                                     "user": user}
                found = store.get_many(tenant, users, after=token)
                assert all(found[u] == {"owner": tenant, "user": u} for u in users)

        run()


SECRET = "pw-SECRET-4242"


def test_passwords_never_appear_in_logs_errors_or_reprs(
    cluster: LocalCluster, topology: Topology, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PROPSTORE_PASSWORD", SECRET)
    assert cluster.config_path is not None
    secret_topology = Topology.load(cluster.config_path)  # trust auth ignores the password
    assert SECRET in secret_topology.shards[0].primary.dsn
    seen: list[str] = [repr(secret_topology), str(secret_topology)]
    errors: list[PropStoreError] = []
    caplog.set_level(logging.DEBUG)
    with capture_logs() as logs, PropertyStore(secret_topology) as store:
        token = store.set("acme", "secret-user", {"a": 1})
        result = store.read("acme", "secret-user", after=token)
        seen += [repr(result), repr(store.shard_views()), store.route("acme", "x").explain()]
        for bad in ({"a": float("nan")}, "not a mapping"):
            try:
                store.set("acme", "secret-user", bad)  # type: ignore[arg-type]
            except PropStoreError as exc:
                errors.append(exc)
                seen.append(str(exc))
        primary = cluster.shards[0].primary
        primary.kill()
        users = [u for u in (f"s{i}" for i in range(50))
                 if secret_topology.shard_of("acme", u).name == "shard0"]
        try:
            store.set("acme", users[0], {"a": 1})
        except PropStoreError as exc:
            errors.append(exc)
            seen.append(str(exc))
            seen.append(repr(exc))
        finally:
            primary.start()
    seen += [repr(event) for event in logs]
    seen += [record.getMessage() for record in caplog.records]
    leaks = [text for text in seen if SECRET in text]
    assert leaks == []
    # The error paths really ran: two refused inputs, then the dead primary's error, which
    # names the node's address (where a DSN with its password could have leaked).
    assert [type(e).__name__ for e in errors] == ["InvalidInputError", "InvalidInputError",
                                                  "ShardUnavailableError"], errors
    assert "127.0.0.1:" in str(errors[-1])
    assert any(e["event"] == "node_state_changed" and e.get("node") == primary.name
               for e in logs)  # the monitor's events about the dead primary were captured


def test_readers_and_the_monitor_work_with_a_role_that_cannot_write(
    store: PropertyStore, cluster: LocalCluster, topology: Topology
) -> None:
    primary = cluster.shards[0].primary
    for shard in cluster.shards:
        shard.primary.execute(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'propstore_reader')"
            " THEN CREATE ROLE propstore_reader LOGIN IN ROLE pg_monitor; END IF; END $$"
        )
        shard.primary.execute("GRANT SELECT ON user_properties TO propstore_reader")
    del primary
    token = store.set("acme", "ro-user", {"plan": "pro"})
    cluster.wait_caught_up()
    assert cluster.config_path is not None
    text = cluster.config_path.read_text().replace("user=postgres", "user=propstore_reader")
    reader_topology = Topology.from_toml(text, environ={})
    with PropertyStore(reader_topology) as reader:
        result = reader.read("acme", "ro-user", after=token)
        assert result.props == {"plan": "pro"}
        assert all(n.up for view in reader.shard_views() for n in view.nodes)
        with pytest.raises(PropStoreError, match="permission denied"):
            reader.set("acme", "ro-user", {"plan": "free"})
    assert store.get("acme", "ro-user", consistency="strong") == {"plan": "pro"}




def test_passwords_never_appear_in_cli_output_or_metrics(
    migrated_cluster: LocalCluster, cluster: LocalCluster, tmp_path: Path
) -> None:
    from click.testing import CliRunner
    from prometheus_client import generate_latest

    from propstore.cli import main
    from propstore.metrics import StoreMetrics

    assert cluster.config_path is not None
    text = cluster.config_path.read_text().replace(
        "user=postgres", f"user=postgres password={SECRET}"
    )
    config = tmp_path / "with-password.toml"
    config.write_text(text)
    broken = tmp_path / "broken.toml"  # an error path: shard0's primary cannot be reached
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    live = f"host=127.0.0.1 port={cluster.shards[0].primary.port} "
    assert text.count(live) == 1
    broken.write_text(text.replace(live, f"host=127.0.0.1 port={closed} "))
    topology = Topology.load(config)
    (victim,) = users_on_shard(topology, topology.shards[0].name, 1, prefix="cli")
    outputs: list[str] = []
    codes: dict[str, int] = {}
    for path, args in [
        (config, ["lag"]), (config, ["lag", "--json"]), (config, ["shards"]),
        (config, ["shards", "--json"]), (config, ["route", "acme", "u1"]),
        (config, ["set", "acme", "u1", "plan=pro"]), (config, ["get", "acme", "u1", "--json"]),
        (config, ["get", "ac/me", "u1"]), (broken, ["lag"]),
        (broken, ["set", "acme", victim, "a=1"]),
        (config, ["--debug", "get", "acme", ""]),
    ]:
        result = CliRunner().invoke(main, ["--config", str(path), *args])
        outputs += [result.output, repr(result.exception)]
        codes[f"{path.stem} {' '.join(args)}"] = result.exit_code
    with PropertyStore(Topology.load(config)) as store:
        metrics = StoreMetrics(store)
        wait_for(lambda: all(n.up for v in store.shard_views() for n in v.nodes))
        store.get("acme", "u1", max_staleness=5)
        outputs.append(generate_latest(metrics.registry).decode())
    assert [o for o in outputs if SECRET in o] == []
    # The error paths really ran (a leak is likeliest there) and the happy ones succeeded.
    print(f"cli exit codes: {codes}")
    assert codes["with-password set acme u1 plan=pro"] == 0
    assert codes["with-password get acme u1 --json"] == 0
    assert codes[f"broken set acme {victim} a=1"] != 0
    assert codes["with-password get ac/me u1"] != 0
    assert codes["with-password --debug get acme "] != 0
