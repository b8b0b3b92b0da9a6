"""Connection strings are parsed by libpq itself (propstore._conninfo calls PQconninfoParse
through ctypes, so reading a topology file does not import psycopg): every string gets the
answer psycopg.conninfo gives, good or bad, and a topology file with a bad DSN is refused with
the same error as before, before anything connects and without loading psycopg."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg
import psycopg.conninfo
import pytest

from propstore import ConfigError, Topology, _conninfo
from propstore.config import redact_dsn

GOOD = [
    "", "host=127.0.0.1 port=5432 dbname=propstore", "host = a  port= 5",
    "host='a b' password='x\\'y' user=\\\\u", "dbname=é application_name=''",
    "postgresql://u:p@h1:5,h2:6/db?sslmode=require&connect_timeout=3",
    "postgres://[::1]:5432/d", "postgresql:///d?host=/tmp", "postgresql://%41@h/d",
    "service=foo", "host=a=b", "target_session_attrs=read-write host=a,b port=1,2",
]
BAD = [
    "hots=a", "host=a port", "'", "host='unterminated", "=x", "a\x00b",
    "postgresql://%zz", "postgresql://h/d?bogus=1", "postgresql://h:5/d?sslmode",
    "password=se cret",
]


def psycopg_answer(dsn: str) -> dict[str, str] | str:
    try:
        return {k: str(v) for k, v in psycopg.conninfo.conninfo_to_dict(dsn).items()}
    except psycopg.ProgrammingError as exc:
        return str(exc).strip()


def our_answer(dsn: str, parse: object = _conninfo.parse) -> dict[str, str] | str:
    assert callable(parse)
    try:
        result = parse(dsn)
    except _conninfo.DsnSyntaxError as exc:
        return str(exc)
    assert isinstance(result, dict)
    return result


@pytest.mark.parametrize("dsn", GOOD + BAD)
def test_every_string_gets_psycopgs_answer_by_either_path(dsn: str) -> None:
    expected = psycopg_answer(dsn)
    assert our_answer(dsn) == expected
    assert our_answer(dsn, _conninfo._parse_with_psycopg) == expected
    assert isinstance(expected, dict) == (dsn in GOOD)


def test_libpq_is_loaded_through_ctypes_here() -> None:
    # Else every answer above came from the psycopg fallback and proved nothing.
    assert _conninfo._libpq() is not None


@pytest.mark.parametrize("params", [
    {"host": "a b", "password": "x'y\\z", "dbname": ""},
    {"host": "127.0.0.1", "port": "5432", "application_name": "tab\there"},
])
def test_made_strings_parse_back_and_match_psycopgs(params: dict[str, str]) -> None:
    made = _conninfo.make(params)
    assert _conninfo.parse(made) == params
    assert made == psycopg.conninfo.make_conninfo(**params)
    with pytest.raises(_conninfo.DsnSyntaxError, match="invalid connection option"):
        _conninfo.make({"hots": "a"})


def test_redacted_dsn_has_no_password_and_keeps_the_rest() -> None:
    redacted = redact_dsn("postgresql://u:s3cret@h:5/d")
    assert _conninfo.parse(redacted) == {"user": "u", "host": "h", "port": "5", "dbname": "d"}
    assert redact_dsn("host=a password=s3cret") == "host=a"
    assert redact_dsn("hots=a") == "<unparsable dsn>"


_TOPOLOGY = """
[[shards]]
name = "shard0"
buckets = ["0-4095"]
primary = "host=127.0.0.1 port=54001 dbname=propstore"
replicas = [{{ name = "r1", dsn = {dsn} }}]
"""

_PROBE = """
import json, sys
from propstore import ConfigError, Topology
try:
    Topology.load(sys.argv[1], environ={})
    error = None
except ConfigError as exc:
    error = str(exc)
print(json.dumps({"error": error, "psycopg": "psycopg" in sys.modules}))
"""


@pytest.mark.parametrize("dsn", BAD)
def test_a_bad_dsn_is_refused_as_before_without_loading_psycopg(tmp_path: Path, dsn: str
                                                                ) -> None:
    config = tmp_path / "propstore.toml"
    config.write_text(_TOPOLOGY.format(dsn=json.dumps(dsn)))
    out = subprocess.run([sys.executable, "-c", _PROBE, str(config)], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    report = json.loads(out)
    # The message of the psycopg-based check this replaced (f7862bd), word for word.
    assert report == {"error": f"{config}: shard shard0: node r1 has an unparsable dsn",
                      "psycopg": False}
    with pytest.raises(ConfigError, match=r": node r1 has an unparsable dsn$"):
        Topology.load(config, environ={})


def test_the_configured_password_is_added_to_every_dsn() -> None:
    text = _TOPOLOGY.format(dsn=json.dumps("postgresql://u@127.0.0.1:54002/propstore"))
    topology = Topology.from_toml(text, environ={"PROPSTORE_PASSWORD": "pa ss'word"})
    for node in topology.shards[0].nodes:
        assert psycopg.conninfo.conninfo_to_dict(node.dsn)["password"] == "pa ss'word"
        assert "pa ss" not in node.safe_dsn
