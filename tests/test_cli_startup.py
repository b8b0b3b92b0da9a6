"""The CLI starts fast because it imports only what the command needs: ``--help``,
``--version``, ``shards`` and every subcommand's ``--help`` never load the store, psycopg,
SQLAlchemy, alembic or structlog (the time itself is measured in tools/, scenario
``cli-startup``). The command list is declared, so help still shows every command, and each
declared summary is the command's own."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import propstore
from propstore.cli import COMMANDS, load, main

_PROBE = """
import json, sys
from propstore.cli import main
try:
    main(sys.argv[1:], prog_name="propstore")
except SystemExit as exit:
    code = exit.code
print(json.dumps({"exit": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""

#: What a command that needs no database must not load (each costs 0.1-0.5 s).
HEAVY = ("propstore.store", "propstore.monitor", "propstore.sandbox", "propstore.migrate",
         "propstore.metrics", "sqlalchemy", "alembic", "structlog", "psycopg_pool",
         "tenacity", "prometheus_client", "rich.live")

_TOPOLOGY = """
[profiles.workflow]
max_staleness = "500ms"
[[shards]]
name = "shard0"
buckets = ["0-4095"]
primary = "host=127.0.0.1 port=54001 dbname=propstore"
replicas = ["host=127.0.0.1 port=54002 dbname=propstore"]
"""


def loaded_by(*args: str) -> tuple[int, list[str]]:
    """The exit status and every module loaded when a fresh interpreter runs the command."""
    process = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True,
                             text=True, timeout=120, check=False)
    report = json.loads(process.stderr.strip().splitlines()[-1])
    return report["exit"], report["modules"]


def heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)]


@pytest.mark.parametrize("args", [["--help"], ["--version"]])
def test_help_and_version_load_neither_the_driver_nor_rich(args: list[str]) -> None:
    status, modules = loaded_by(*args)
    assert status == 0
    assert heavy(modules) == []
    assert not [m for m in modules if m.split(".")[0] in ("psycopg", "rich")]


def test_a_commands_help_loads_only_that_command() -> None:
    status, modules = loaded_by("shards", "--help")
    assert status == 0 and heavy(modules) == []
    assert "propstore.cli._shards" in modules and "propstore.cli._demo" not in modules


def every_command_path() -> list[list[str]]:
    """``[command]`` and ``[group, subcommand]`` for everything ``propstore`` offers."""
    paths = []
    for entry in COMMANDS:
        command = load(entry)
        paths.append([entry.name])
        if isinstance(command, click.Group):
            paths += [[entry.name, sub] for sub in command.commands]
    return paths


@pytest.mark.parametrize("path", every_command_path(), ids=" ".join)
def test_every_commands_help_loads_neither_the_driver_nor_the_library_stack(
        path: list[str]) -> None:
    status, modules = loaded_by(*path, "--help")
    assert status == 0
    assert heavy(modules) == []
    assert not [m for m in modules if m.split(".")[0] in ("psycopg", "psycopg_binary")]


def test_shards_loads_no_store_pool_sqlalchemy_alembic_or_structlog(tmp_path: Path) -> None:
    config = tmp_path / "propstore.toml"
    config.write_text(_TOPOLOGY)
    status, modules = loaded_by("--config", str(config), "shards")
    assert status == 0
    assert heavy(modules) == []
    # The DSNs are checked by libpq's own parser, called without psycopg (tests/test_conninfo.py).
    assert "propstore.config" in modules and "propstore.cli._lag" not in modules
    assert "psycopg" not in modules and "propstore._conninfo" in modules


def test_a_command_that_needs_the_library_loads_it_so_the_probe_sees_imports(
        tmp_path: Path) -> None:
    config = tmp_path / "propstore.toml"
    config.write_text(_TOPOLOGY)
    status, modules = loaded_by("config", "diff", "--no-check", str(config), str(config))
    assert status == 0 and "propstore.migrate" in modules and "structlog" in modules


def test_the_sandbox_front_choices_are_the_sandboxes() -> None:
    from propstore.cli._sandbox import FRONT_CHOICES
    from propstore.sandbox._poolers import FRONT_KINDS

    assert FRONT_CHOICES == FRONT_KINDS


def test_importing_propstore_loads_nothing_until_a_name_is_used() -> None:
    code = ("import sys, propstore; before = 'psycopg' in sys.modules; propstore.Token; "
            "print(before, 'propstore.freshness' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert out == ["False", "True"]
    assert set(dir(propstore)) >= set(propstore.__all__)


def test_every_declared_command_loads_and_its_summary_is_its_own() -> None:
    for entry in COMMANDS:
        command = load(entry)
        assert command.name == entry.name
        assert command.get_short_help_str(limit=10_000) == entry.summary, entry.name
    listing = CliRunner().invoke(main, ["--help"]).stdout
    for entry in COMMANDS:
        assert any(line.split()[:1] == [entry.name] for line in listing.splitlines())


def test_version_is_the_installed_distributions() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.stdout.strip() == f"propstore, version {importlib.metadata.version('propstore')}"


def test_global_options_work_after_the_command_too(tmp_path: Path) -> None:
    config = tmp_path / "propstore.toml"
    config.write_text(_TOPOLOGY)
    before = CliRunner().invoke(main, ["--config", str(config), "shards", "--json"])
    after = CliRunner().invoke(main, ["shards", "--json", "--config", str(config)])
    assert before.exit_code == after.exit_code == 0
    assert json.loads(before.stdout) == json.loads(after.stdout)
    missing = str(tmp_path / "missing.toml")
    for args in (["lag", "--config", missing], ["demo", "--config", missing],
                 ["migrate", "status", "--config", missing]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and "missing.toml" in result.stderr, (args, result.output)
        assert "No such option" not in result.stderr
    debug = CliRunner().invoke(main, ["lag", "--config", missing, "--debug"])
    assert isinstance(debug.exception, propstore.ConfigError)


def test_every_subcommand_accepts_the_global_options() -> None:
    def walk(command: click.Command) -> list[click.Command]:
        found = [command]
        if isinstance(command, click.Group):
            for sub in command.commands.values():
                found += walk(sub)
        return found

    for entry in COMMANDS:
        for command in walk(load(entry)):
            names = {param.name for param in command.params}
            assert {"config", "debug"} <= names, command.name


def runtime_uses_of_type_checking_names(source: str) -> list[str]:
    """``line: name`` for every name imported only under ``if TYPE_CHECKING:`` that a function
    body uses at run time without importing it itself (annotations aside)."""
    tree = ast.parse(source)
    only_typing: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            only_typing |= {alias.asname or alias.name.split(".")[0]
                            for sub in ast.walk(node)
                            if isinstance(sub, ast.ImportFrom | ast.Import)
                            for alias in sub.names}
    found: list[str] = []

    def imported_in(function: ast.AST) -> set[str]:
        return {alias.asname or alias.name.split(".")[0] for sub in ast.walk(function)
                if isinstance(sub, ast.ImportFrom | ast.Import) for alias in sub.names}

    def visit(node: ast.AST, local: set[str]) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            inner = local | imported_in(node)
            for child in [*node.decorator_list, *node.body]:
                visit(child, inner)
            return
        if isinstance(node, ast.AnnAssign):
            if node.value is not None:
                visit(node.value, local)
            return
        if isinstance(node, ast.arg):
            return
        if (isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)
                and node.id in only_typing and node.id not in local):
            found.append(f"{node.lineno}: {node.id}")
        for child in ast.iter_child_nodes(node):
            visit(child, local)

    visit(tree, set())
    return found


def test_no_cli_module_uses_a_lazily_imported_name_without_importing_it() -> None:
    # The heavy imports of the CLI live under TYPE_CHECKING and inside the functions that use
    # them; a function using one without its own import fails only when it runs.
    folder = Path(propstore.__file__).parent / "cli"
    found = {path.name: runtime_uses_of_type_checking_names(path.read_text())
             for path in sorted(folder.glob("*.py"))}
    assert {name: uses for name, uses in found.items() if uses} == {}
    assert runtime_uses_of_type_checking_names(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from rich.text import Text\n"
        "def f() -> Text:\n    return Text('x')\n") == ["5: Text"]
