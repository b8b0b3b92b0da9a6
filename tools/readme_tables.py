"""Render the README's generated tables (and tools/RESULTS.md) from their sources.

    python tools/readme_tables.py          # rewrite every generated section in place
    python tools/readme_tables.py --check  # exit 1 (with a diff) if any is stale; CI runs it

A generated section sits between two markers in the README::

    <!-- BEGIN GENERATED: <section> -->
    ...
    <!-- END GENERATED: <section> -->

and its text is a pure function of a committed source file, so the check needs no servers
and no extras (standard library and this folder only). Sections:

* ``benchmarks`` -- the benchmark table, from ``tools/RESULTS.json`` (written by
  ``tools/bench.py``); ``tools/RESULTS.md`` is rendered from the same file and checked too.
* ``reliability`` -- the reliability table, from ``tests/claims.py``: the figures the tests
  import and assert, so the README states only what a test asserts.

To add a table: write a function returning the section's text from its source, add it to
:data:`SECTIONS` (and a file to :data:`FILES` if it renders a whole file), put the markers in
the README.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # for _bench when run as a script from anywhere

from _bench import document, render  # noqa: E402

ROOT = HERE.parent
sys.path.insert(1, str(ROOT))  # tests/claims.py, imported as ``tests.claims``

from tests import claims  # noqa: E402

README = ROOT / "README.md"
RESULTS_JSON = HERE / "RESULTS.json"


def benchmarks() -> str:
    """The README's benchmark table."""
    return render.readme_benchmarks(document.load(RESULTS_JSON))


def results_page() -> str:
    """tools/RESULTS.md."""
    return render.results_markdown(document.load(RESULTS_JSON))


#: README section name -> its text (without the marker lines).
SECTIONS: dict[str, Callable[[], str]] = {
    "benchmarks": benchmarks,
    "reliability": claims.render_reliability_table,
}

#: Whole files rendered from a source.
FILES: dict[Path, Callable[[], str]] = {
    HERE / "RESULTS.md": results_page,
}


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- BEGIN GENERATED: {re.escape(name)} -->\n)(.*?)(<!-- END GENERATED: "
        rf"{re.escape(name)} -->)", re.DOTALL)


def render_readme(text: str) -> str:
    """``text`` (the README) with every generated section re-rendered.

    Raises ``ValueError`` when a section's markers are missing or appear more than once.
    """
    for name, make in SECTIONS.items():
        pattern = _pattern(name)
        found = len(pattern.findall(text))
        if found != 1:
            raise ValueError(f"README: expected one '<!-- BEGIN GENERATED: {name} -->' ... "
                             f"'<!-- END GENERATED: {name} -->' block, found {found}")
        body = make().rstrip("\n") + "\n"

        def replace(match: re.Match[str], body: str = body) -> str:
            return match.group(1) + body + match.group(3)

        text = pattern.sub(replace, text)
    return text


def targets() -> dict[Path, tuple[str, str]]:
    """Each generated file: (committed text, what it should be)."""
    current = README.read_text()
    wanted = {README: (current, render_readme(current))}
    for path, make in FILES.items():
        wanted[path] = (path.read_text() if path.exists() else "", make())
    return wanted


def main(argv: list[str] | None = None) -> int:
    """Rewrite the generated tables, or with ``--check`` report the stale ones (exit 1)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 and show a diff if a table is stale")
    args = parser.parse_args(argv)
    stale = 0
    for path, (have, want) in targets().items():
        if have == want:
            continue
        stale += 1
        shown = path.relative_to(ROOT)
        if args.check:
            sys.stdout.writelines(difflib.unified_diff(
                have.splitlines(keepends=True), want.splitlines(keepends=True),
                f"{shown} (committed)", f"{shown} (rendered)"))
        else:
            path.write_text(want)
            print(f"updated {shown}")
    if args.check and stale:
        print(f"\n{stale} generated file(s) stale: run `python tools/readme_tables.py` and "
              "commit the result", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
