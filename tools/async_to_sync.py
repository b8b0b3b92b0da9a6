"""Generate propstore's blocking code from its asyncio source, so the two never drift.

    python tools/async_to_sync.py          # rewrite every generated module
    python tools/async_to_sync.py --check  # exit 1 (with a diff) if any is stale; CI runs it

The async code is the source of truth (as in psycopg, whose sync classes are generated from
its async ones): a whole module (:data:`MODULES`; the generated one starts with a header
naming its source), or a section of a module that keeps both sides (:data:`SECTIONS`). The
transformation works on libcst's concrete syntax tree, so the output keeps the source's
comments, docstrings and layout (``ast.unparse`` would drop the comments and re-wrap every
line), and then ruff sorts its imports and drops the ones only the async side used:

* ``async def`` -> ``def``, ``async with`` / ``async for`` -> ``with`` / ``for``,
  ``await x`` -> ``x`` (with the parentheses that only the ``await`` needed);
* ``AsyncX`` -> ``X`` (``AsyncConnectionPool`` -> ``ConnectionPool``), ``x_async`` -> ``x``
  (``execute_async`` -> ``execute``) and the names in :data:`NAMES` (``__aenter__`` ->
  ``__enter__``, ``_pool_async`` -> ``_pool_sync``...), also in docstrings and comments;
  the ``asyncio`` calls of :data:`DOTTED` (``asyncio.sleep`` -> ``time.sleep``);
* the places that genuinely differ are written in the source as::

      if True:  # ASYNC
          <async-only code>
      else:
          <sync-only code>

  (the ``else`` is optional). Python compiles ``if True`` to at most a NOP and mypy skips
  the ``else`` in the async module; the generated module gets the ``else`` body only.
* a docstring that must differ is followed, in the source, by a bare string literal under a
  ``# SYNC DOCSTRING`` comment: it becomes the generated definition's docstring (in the
  async module the literal costs a NOP each call: not for functions on a read's path).

The output must not mention ``asyncio``, ``await`` or a name starting with ``Async``: the
tool stops and says which name needs a mapping or a marker. ``--check`` also fails on a sync
definition written by hand beside an async one of the same (sync) name, unless
:data:`HAND_KEPT` says why it cannot be generated.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

try:
    import libcst as cst
except ImportError:  # a venv from before libcst joined the dev extra
    raise SystemExit('tools/async_to_sync.py needs libcst: pip install -e ".[dev]" '
                     '(or pip install "libcst>=1.1")') from None

ROOT = Path(__file__).resolve().parent.parent

#: Every generated module: (async source, generated sync module), relative to the repository.
MODULES: tuple[tuple[str, str], ...] = (
    ("propstore/store/_pool_async.py", "propstore/store/_pool_sync.py"),
    ("propstore/store/_async.py", "propstore/store/_sync.py"),
)

#: Modules that hold both sides, one section generated from the other: the lines from
#: ``SOURCE_BEGINS`` to ``GENERATED_BEGINS`` are the async source, those up to
#: ``GENERATED_ENDS`` are generated (for functions that must stay in their module: every read
#: calls ``_wire.execute``).
SECTIONS: tuple[str, ...] = ("propstore/_wire.py",)
SOURCE_BEGINS = "# BEGIN ASYNC SOURCE"
GENERATED_BEGINS = "# BEGIN GENERATED SYNC"
GENERATED_ENDS = "# END GENERATED SYNC"

#: Names (identifiers and attributes) of the async side and their sync counterparts.
#: (Beyond these, ``AsyncX`` is ``X`` and ``x_async`` is ``x``: ``execute_async`` ->
#: ``execute``, ``wait_async`` -> ``wait``.)
NAMES: dict[str, str] = {
    "_pool_async": "_pool_sync",
    "async_pool": "sync_pool",
    "__aenter__": "__enter__",
    "__aexit__": "__exit__",
    "__aiter__": "__iter__",
    "__anext__": "__next__",
}

#: ``asyncio`` waits and their blocking counterparts (the module must import the target).
DOTTED: dict[tuple[str, str], tuple[str, str]] = {
    ("asyncio", "sleep"): ("time", "sleep"),
    ("asyncio", "Lock"): ("threading", "Lock"),
}

ASYNC_MARKER = "# ASYNC"
DOCSTRING_MARKER = "# SYNC DOCSTRING"
#: Any other ``AsyncX`` name is ``X`` (``AsyncPropertyStore`` -> ``PropertyStore``).
_ASYNC_PREFIXED = re.compile(r"Async(?=[A-Z])")
_WORDS = re.compile(r"\b(" + "|".join(sorted(map(re.escape, NAMES), key=len, reverse=True))
                    + r"|Async[A-Z]\w*|\w+_async)\b")
#: One level of block indentation in the sources (what a lifted ``else`` body loses).
_INDENT = "    "


def _header(source: str) -> str:
    return (f"# Generated from {source} by tools/async_to_sync.py: do not edit. Change the\n"
            f"# async source and run `python tools/async_to_sync.py`.\n")


def sync_name(name: str) -> str:
    """The sync counterpart of an identifier of the async source."""
    mapped = NAMES.get(name)
    if mapped is not None:
        return mapped
    if name.startswith("Async"):
        return _ASYNC_PREFIXED.sub("", name, count=1)
    return name.removesuffix("_async") if name.endswith("_async") and len(name) > 6 else name


def _rename_words(text: str) -> str:
    return _WORDS.sub(lambda match: sync_name(match.group(1)), text)


def _is_async_marker(node: cst.If) -> bool:
    comment = node.body.header.comment if isinstance(node.body, cst.IndentedBlock) else None
    return (isinstance(node.test, cst.Name) and node.test.value == "True"
            and comment is not None and comment.value.strip() == ASYNC_MARKER)


def _string_of(statement: cst.CSTNode) -> cst.SimpleString | cst.ConcatenatedString | None:
    """The string literal a statement consists of (a docstring's shape), else None."""
    if (isinstance(statement, cst.SimpleStatementLine) and len(statement.body) == 1
            and isinstance(statement.body[0], cst.Expr)
            and isinstance(statement.body[0].value, cst.SimpleString | cst.ConcatenatedString)):
        return statement.body[0].value
    return None


def _has_marker(statement: cst.SimpleStatementLine) -> bool:
    return any(line.comment is not None and line.comment.value.startswith(DOCSTRING_MARKER)
               for line in statement.leading_lines)


class _Dedent(cst.CSTTransformer):
    """Multi-line strings of a lifted ``else`` body keep their text one level in.

    libcst renders block indentation itself; only a string's own lines are literal text."""

    def leave_SimpleString(self, original_node: cst.SimpleString,
                           updated_node: cst.SimpleString) -> cst.SimpleString:
        return updated_node.with_changes(
            value=updated_node.value.replace("\n" + _INDENT, "\n"))


class _Unindent(cst.CSTTransformer):
    """The parameter lines of a definition aligned with its parenthesis move with it when
    ``async`` goes or the name gets shorter: by ``shift``, those at least ``column`` in.

    Hanging indents (less than the parenthesis's column) stay."""

    def __init__(self, column: int, shift: int) -> None:
        super().__init__()
        self.column = column
        self.shift = shift

    def leave_ParenthesizedWhitespace(
            self, original_node: cst.ParenthesizedWhitespace,
            updated_node: cst.ParenthesizedWhitespace) -> cst.ParenthesizedWhitespace:
        spaces = updated_node.last_line.value
        if len(spaces) < self.column:
            return updated_node
        return updated_node.with_changes(
            last_line=cst.SimpleWhitespace(spaces[self.shift:]))


class _AsyncToSync(cst.CSTTransformer):
    def leave_FunctionDef(self, original_node: cst.FunctionDef,
                          updated_node: cst.FunctionDef) -> cst.FunctionDef:
        prefix = len("async " if updated_node.asynchronous else "") + len("def ")
        column = prefix + len(original_node.name.value) + len("(")
        shift = column - (len("def ") + len(updated_node.name.value) + len("("))
        if shift > 0:
            updated_node = updated_node.with_changes(
                params=updated_node.params.visit(_Unindent(column, shift)))
        return _with_docstring(updated_node.with_changes(asynchronous=None))

    def leave_ClassDef(self, original_node: cst.ClassDef,
                       updated_node: cst.ClassDef) -> cst.ClassDef:
        return _with_docstring(updated_node)

    def leave_Module(self, original_node: cst.Module, updated_node: cst.Module) -> cst.Module:
        body = _docstring_swapped(list(updated_node.body))
        return updated_node.with_changes(body=body)

    def leave_With(self, original_node: cst.With, updated_node: cst.With) -> cst.With:
        return updated_node.with_changes(asynchronous=None)

    def leave_For(self, original_node: cst.For, updated_node: cst.For) -> cst.For:
        return updated_node.with_changes(asynchronous=None)

    def leave_Await(self, original_node: cst.Await,
                    updated_node: cst.Await) -> cst.BaseExpression:
        # ``await``'s operand is a primary (a call, attribute, subscript or atom): it binds
        # at least as tightly as the ``await`` did, so the parentheses ``(await x).y`` needed
        # go with it.
        return updated_node.expression

    def leave_Name(self, original_node: cst.Name, updated_node: cst.Name) -> cst.Name:
        sync = sync_name(updated_node.value)
        return updated_node if sync == updated_node.value else updated_node.with_changes(
            value=sync)

    def leave_Attribute(self, original_node: cst.Attribute,
                        updated_node: cst.Attribute) -> cst.Attribute:
        if isinstance(updated_node.value, cst.Name):
            sync = DOTTED.get((updated_node.value.value, updated_node.attr.value))
            if sync is not None:
                return updated_node.with_changes(value=cst.Name(sync[0]),
                                                 attr=cst.Name(sync[1]))
        return updated_node

    def leave_Comment(self, original_node: cst.Comment, updated_node: cst.Comment
                      ) -> cst.Comment:
        return updated_node.with_changes(value=_rename_words(updated_node.value))

    def leave_If(self, original_node: cst.If, updated_node: cst.If
                 ) -> cst.BaseStatement | cst.FlattenSentinel[cst.BaseStatement] | \
            cst.RemovalSentinel:
        if not _is_async_marker(original_node):
            return updated_node
        orelse = updated_node.orelse
        if orelse is None:
            return cst.RemoveFromParent()
        if not isinstance(orelse, cst.Else) or not isinstance(orelse.body, cst.IndentedBlock):
            raise SystemExit("an `if True:  # ASYNC` block takes a plain `else:`, not `elif`")
        lifted = [statement.visit(_Dedent()) for statement in orelse.body.body]
        if lifted:
            first = lifted[0]
            assert isinstance(first, cst.SimpleStatementLine | cst.BaseCompoundStatement)
            lifted[0] = first.with_changes(  # the comments above the `if` stay above
                leading_lines=[*updated_node.leading_lines, *orelse.leading_lines,
                               *first.leading_lines])
        return cst.FlattenSentinel(lifted)  # type: ignore[arg-type]


def _docstring_swapped(body: list[cst.BaseStatement]) -> list[cst.BaseStatement]:
    """``body`` with its docstring replaced by the ``# SYNC DOCSTRING`` one, if it has one;
    the docstring also gets the sync names."""
    for index, statement in enumerate(body):
        if (index > 0 and isinstance(statement, cst.SimpleStatementLine)
                and _has_marker(statement) and _string_of(statement) is not None):
            if _string_of(body[0]) is None:
                raise SystemExit(f"{DOCSTRING_MARKER} follows a definition with no docstring")
            replacement = statement.with_changes(leading_lines=body[0].leading_lines)
            body = [replacement, *body[1:index], *body[index + 1:]]
            break
    docstring = _string_of(body[0]) if body else None
    if isinstance(docstring, cst.SimpleString):
        first = body[0]
        assert isinstance(first, cst.SimpleStatementLine)
        body[0] = first.with_changes(body=[cst.Expr(docstring.with_changes(
            value=_rename_words(docstring.value)))])
    return body


def _with_docstring(node: cst.FunctionDef | cst.ClassDef) -> cst.FunctionDef | cst.ClassDef:
    block = node.body
    if not isinstance(block, cst.IndentedBlock):
        return node
    return node.with_changes(body=block.with_changes(
        body=_docstring_swapped(list(block.body))))


@dataclass(frozen=True)
class Leftover:
    """Something async that survived the transformation (a mapping or a marker is missing)."""

    line: int
    what: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.what}"


def leftovers(code: str) -> list[Leftover]:
    """What the generated ``code`` still says in async terms."""
    found = []
    for node in ast.walk(ast.parse(code)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.AsyncFunctionDef | ast.AsyncWith | ast.AsyncFor | ast.Await):
            found.append(Leftover(line, f"an {type(node).__name__} the tool did not convert"))
        elif isinstance(node, ast.Name) and (node.id.startswith("Async") or node.id == "asyncio"):
            found.append(Leftover(line, f"name {node.id}: map it in NAMES or mark it ASYNC"))
        elif isinstance(node, ast.Attribute) and node.attr.startswith("Async"):
            found.append(Leftover(line, f"attribute {node.attr}: map it in NAMES"))
        elif isinstance(node, ast.alias) and (node.name.startswith("Async")
                                              or node.name == "asyncio"):
            found.append(Leftover(line, f"import of {node.name}: map it or mark it ASYNC"))
    return found


def _imports_tidied(code: str, target: str) -> str:
    """ruff (the project's linter, with its settings) sorts the renamed imports and drops
    those only the async side used."""
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--quiet", "--fix", "--exit-zero",
         "--select", "I001,F401", "--stdin-filename", target, "-"],
        input=code, capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode:
        raise SystemExit(f"ruff could not tidy {target}'s imports (is ruff installed in "
                         f"{sys.executable}'s environment? the dev extra has it):\n"
                         f"{done.stderr.strip()}")
    return done.stdout


def generate(source_code: str, source: str, target: str) -> str:
    """The sync module for the async ``source_code`` (``source``, ``target``: repository
    paths, for the header and ruff's settings)."""
    module = cst.parse_module(source_code).visit(_AsyncToSync())
    header = [cst.EmptyLine(comment=cst.Comment(line))
              for line in _header(source).splitlines()]
    code = module.with_changes(header=[*header, *module.header]).code
    code = _imports_tidied(code, target)
    left = leftovers(code)
    if left:
        raise SystemExit(f"{target} generated from {source} still has async parts:\n  "
                         + "\n  ".join(map(str, left)))
    return code


def generate_section(text: str, path: str) -> str:
    """``text`` (the module ``path``) with its generated sync section made from its async
    source section (see :data:`SECTIONS`)."""
    lines = text.splitlines(keepends=True)
    marks = {}
    for index, line in enumerate(lines):
        for mark in (SOURCE_BEGINS, GENERATED_BEGINS, GENERATED_ENDS):
            if line.startswith(mark):
                if mark in marks:
                    raise SystemExit(f"{path}: more than one line starts with {mark!r}")
                marks[mark] = index
    if len(marks) != 3 or not (marks[SOURCE_BEGINS] < marks[GENERATED_BEGINS]
                               < marks[GENERATED_ENDS]):
        raise SystemExit(f"{path}: wants the lines {SOURCE_BEGINS!r}, {GENERATED_BEGINS!r} "
                         f"and {GENERATED_ENDS!r}, in that order")
    source = "".join(lines[marks[SOURCE_BEGINS] + 1:marks[GENERATED_BEGINS]])
    code = cst.parse_module(source).visit(_AsyncToSync()).code
    left = leftovers(code)
    if left:
        raise SystemExit(f"{path}: the generated sync section still has async parts:\n  "
                         + "\n  ".join(map(str, left)))
    return ("".join(lines[:marks[GENERATED_BEGINS] + 1]) + code
            + "".join(lines[marks[GENERATED_ENDS]:]))


def wanted(root: Path = ROOT) -> list[tuple[str, str, str, str]]:
    """``(generated file, its source, committed text, generated text)`` for every target."""
    out = []
    for source, target in MODULES:
        path = root / target
        out.append((target, source, path.read_text() if path.exists() else "",
                    generate((root / source).read_text(), source, target)))
    for module in SECTIONS:
        text = (root / module).read_text()
        out.append((module, "its async section", text, generate_section(text, module)))
    return out


#: Hand-kept sync/async pairs (async qualified name: why it cannot be generated). Any other
#: async definition whose sync name is also defined by hand fails ``--check``.
HAND_KEPT: dict[str, str] = {
    "Changes.wait_async": "store/_degrade.py: the sync side blocks on a threading.Event of "
                          "its own, the async side on a loop future the notifier (or the "
                          "read that granted its turn) resolves thread-safely",
}


def _generated_lines(text: str, path: str) -> range:
    """The lines of ``path`` that the tool generates (all, none, or its sync section)."""
    if path in {target for _source, target in MODULES}:
        return range(1, text.count("\n") + 2)
    if path in SECTIONS:
        lines = text.splitlines()
        begins = next(i for i, line in enumerate(lines) if line.startswith(GENERATED_BEGINS))
        ends = next(i for i, line in enumerate(lines) if line.startswith(GENERATED_ENDS))
        return range(begins + 1, ends + 2)
    return range(0)


def hand_kept_twins(root: Path = ROOT, package: str = "propstore") -> list[str]:
    """Async definitions of ``package`` whose sync counterpart (same qualified name, sync
    names) is written by hand rather than generated: ``"async (file:line) ~ sync
    (file:line)"`` for each, the :data:`HAND_KEPT` ones left out."""
    hand: dict[str, list[str]] = {}  # sync qualified name -> where it is defined by hand
    asyncs: list[tuple[str, str]] = []  # (async qualified name, where)
    for path in sorted((root / package).rglob("*.py")):
        relative = str(path.relative_to(root))
        text = path.read_text()
        generated = _generated_lines(text, relative)

        def visit(node: ast.AST, prefix: str, relative: str = relative,
                  generated: range = generated) -> None:
            for child in ast.iter_child_nodes(node):
                if not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    continue
                name = prefix + child.name
                where = f"{relative}:{child.lineno}"
                if isinstance(child, ast.AsyncFunctionDef) or child.name.startswith("Async"):
                    asyncs.append((name, where))
                elif child.lineno not in generated:
                    hand.setdefault(name, []).append(where)
                if isinstance(child, ast.ClassDef):
                    visit(child, name + ".")

        visit(ast.parse(text), "")
    found = []
    for name, where in asyncs:
        sync = ".".join(sync_name(part) for part in name.split("."))
        if sync != name and name not in HAND_KEPT:
            found += [f"{name} ({where}) ~ {sync} ({other})" for other in hand.get(sync, [])]
    return found


def stale(root: Path = ROOT) -> list[tuple[str, str]]:
    """``(target, diff)`` for every generated module or section that is not up to date."""
    return [(target, "".join(difflib.unified_diff(
                have.splitlines(True), want.splitlines(True), f"{target} (committed)",
                f"{target} (from {source})")))
            for target, source, have, want in wanted(root) if have != want]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 with a diff if a generated module is stale")
    args = parser.parse_args(argv)
    twins = hand_kept_twins()
    for twin in twins:
        print(f"hand-kept sync twin of async code: {twin} (generate it, share it, or say in "
              "HAND_KEPT why not)")
    if args.check:
        found = stale()
        for target, diff in found:
            print(f"{target} is stale: run `python tools/async_to_sync.py`\n{diff}")
        return 1 if found or twins else 0
    for target, source, have, want in wanted():
        if have != want:
            (ROOT / target).write_text(want)
            print(f"wrote {target} (from {source})")
    return 1 if twins else 0


if __name__ == "__main__":
    sys.exit(main())
