"""Connection strings parsed by libpq itself, without importing psycopg.

Reading a topology file checks every DSN before anything connects, and ``propstore shards``
shows each node's address; both only parse. ``psycopg.conninfo`` does that with libpq's
``PQconninfoParse``, but importing psycopg costs about 0.3 s (its whole package loads:
adapters, errors, asyncio), more than the CLI's whole start-up budget (issue 15). So this
module calls the same libpq function through ctypes, in the library psycopg itself loads
(the one bundled with ``psycopg-binary``, else the system's ``libpq.so.5``), and builds
strings with libpq's documented quoting rule. Where no such library can be loaded it falls
back to ``psycopg.conninfo``: the answers are the same, only slower
(tests/test_conninfo.py compares the two on good and bad strings).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import importlib.util
import os
import re
from pathlib import Path

_ESCAPED = re.compile(r"([\\'])")
_SPACE = re.compile(r"\s")


class DsnSyntaxError(ValueError):
    """libpq refused the connection string; the message is libpq's."""


class _Option(ctypes.Structure):
    # PQconninfoOption (libpq-fe.h).
    _fields_ = [
        ("keyword", ctypes.c_char_p),
        ("envvar", ctypes.c_char_p),
        ("compiled", ctypes.c_char_p),
        ("val", ctypes.c_char_p),
        ("label", ctypes.c_char_p),
        ("dispchar", ctypes.c_char_p),
        ("dispsize", ctypes.c_int),
    ]


def _candidates() -> list[str]:
    """libpq files in the order psycopg picks its implementation: the C build (system
    libpq), the binary wheel (its bundled libpq), the pure-Python one (system libpq)."""
    system = ["libpq.so.5"]
    wanted = os.environ.get("PSYCOPG_IMPL", "")
    if wanted in ("c", "python") or (
            not wanted and importlib.util.find_spec("psycopg_c") is not None):
        return system
    spec = importlib.util.find_spec("psycopg_binary")
    if spec is None or spec.origin is None:
        return system
    bundled = Path(spec.origin).parent.parent / "psycopg_binary.libs"
    return sorted(glob.glob(str(bundled / "libpq*.so*"))) + ([] if wanted else system)


@functools.cache
def _libpq() -> ctypes.CDLL | None:
    for path in _candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        lib.PQconninfoParse.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
        lib.PQconninfoParse.restype = ctypes.POINTER(_Option)
        lib.PQconninfoFree.argtypes = [ctypes.POINTER(_Option)]
        lib.PQconninfoFree.restype = None
        lib.PQfreemem.argtypes = [ctypes.c_void_p]
        lib.PQfreemem.restype = None
        return lib
    return None


def parse(dsn: str) -> dict[str, str]:
    """The parameters set in ``dsn`` (key/value or URI form), as
    ``psycopg.conninfo.conninfo_to_dict`` returns them; :class:`DsnSyntaxError` when libpq
    refuses the string (unknown keyword, bad quoting, bad URI, ...)."""
    lib = _libpq()
    if lib is None:
        return _parse_with_psycopg(dsn)
    error = ctypes.c_void_p()
    options = lib.PQconninfoParse(dsn.encode(), ctypes.byref(error))
    if not options:
        message = "out of memory"
        if error.value:
            message = (ctypes.string_at(error.value).decode(errors="replace").strip()
                       or message)
            lib.PQfreemem(error)
        raise DsnSyntaxError(message)
    try:
        params: dict[str, str] = {}
        index = 0
        while (option := options[index]).keyword is not None:
            if option.val is not None:
                params[option.keyword.decode()] = option.val.decode()
            index += 1
        return params
    finally:
        lib.PQconninfoFree(options)


def _parse_with_psycopg(dsn: str) -> dict[str, str]:
    import psycopg.conninfo

    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise DsnSyntaxError(str(exc).strip()) from None
    return {key: str(value) for key, value in params.items()}


def _quote(value: str) -> str:
    # libpq: single quotes and backslashes are escaped with a backslash; an empty value or
    # one holding whitespace is written in single quotes.
    value = _ESCAPED.sub(r"\\\1", value)
    return f"'{value}'" if not value or _SPACE.search(value) else value


def make(params: dict[str, str]) -> str:
    """A key/value connection string of ``params`` (checked by libpq: a keyword it does not
    know is :class:`DsnSyntaxError`)."""
    dsn = " ".join(f"{key}={_quote(value)}" for key, value in params.items())
    parse(dsn)
    return dsn


__all__ = ["DsnSyntaxError", "make", "parse"]
