"""The statements a store's operations send, built from checked input, and their rows
decoded: pure (no I/O), so every program and driver shares one form of each."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from propstore import _sql
from propstore._validation import MAX_DOCUMENT_BYTES, check_keys, encode_props
from propstore._wire import Statement
from propstore.store._program import Props

#: Pipelined before a replica's data query when no fact proves the read (its own check).
REPLAY_LSN = Statement(_sql.REPLAY_LSN)
#: Pipelined before a primary read whose connection no poll proves on a primary.
IS_PRIMARY = Statement(_sql.IS_PRIMARY)
#: Where the data columns of a :func:`one_statement` read's row start.
VERIFIED_DATA_COLUMN = _sql.VERIFIED_DATA_COLUMN
#: The upserts' size limit parameter (a constant: encoded once).
_MAX_DOCUMENT_BYTES = str(MAX_DOCUMENT_BYTES).encode()
_JSON = json.JSONDecoder()
# What the decoder itself scans with (typeshed does not declare the attribute).
_SCAN: Callable[[str, int], tuple[Any, int]] = _JSON.scan_once  # type: ignore[attr-defined]


def get(tenant: str, user_id: str) -> Statement:
    """One user's document and version."""
    return Statement(_sql.GET, (tenant.encode(), user_id.encode()))


def get_many(tenant: str, user_ids: list[str]) -> Statement:
    """Documents of many users of a tenant (one shard's part of ``get_many``)."""
    return Statement(_sql.GET_MANY, (tenant.encode(), _sql.text_array(user_ids)))


def one_statement(data: Statement) -> Statement | None:
    """The statement verifying ``data`` by itself (replay LSN and timeline, then ``data``'s
    columns, from migration 0002's functions), or None when there is none for it."""
    name = _sql.VERIFIED.get(data.name)
    return None if name is None else Statement(name, data.params)


def write(kind: str, tenant: str, user_id: str, bucket: int, argument: object) -> Statement:
    """The statement of a ``set``/``replace`` (``argument``: props), ``unset`` (keys) or
    ``delete``; refuses bad props or keys (``InvalidInputError``) before anything is sent."""
    if kind in ("set", "replace"):
        return Statement(
            _sql.REPLACE if kind == "replace" else _sql.MERGE,
            (tenant.encode(), user_id.encode(), str(bucket).encode(), encode_props(argument),
             _MAX_DOCUMENT_BYTES),
        )
    if kind == "unset":
        return Statement(_sql.UNSET, (tenant.encode(), user_id.encode(),
                                      _sql.text_array(check_keys(argument))))
    return Statement(_sql.DELETE, (tenant.encode(), user_id.encode()))


def is_upsert(statement: Statement) -> bool:
    """Whether ``statement`` is a merge or replace (whose size check may refuse it)."""
    return statement.name in (_sql.MERGE, _sql.REPLACE)


def decode_one(result: Any, column: int = 0) -> tuple[Props | None, int | None]:
    """Rows of ``GET`` (or of ``VERIFIED_GET`` from ``column`` 2): the document and its
    version, or (None, None)."""
    raw = result.get_value(0, column) if result.ntuples else None
    if raw is None:  # no such user (the function returns its one row with NULLs)
        return None, None
    text = raw.decode()
    # The JSON scanner (C) that json.loads ends in, without the Python layers around it
    # (a read's hottest call): PostgreSQL prints a jsonb as exactly one value, nothing
    # around it. Anything else goes through the full decoder, which says what is wrong.
    try:
        props, end = _SCAN(text, 0)
    except StopIteration:
        end = -1
    if end != len(text):
        props = _JSON.decode(text)
    return props, int(result.get_value(0, column + 1))


def decode_many(result: Any, column: int = 0) -> dict[str, Props]:
    """The row of ``GET_MANY`` (or ``VERIFIED_GET_MANY`` from ``column`` 2): ``{user_id:
    props}`` (NULL when no user was found)."""
    value = result.get_value(0, column) if result.ntuples else None
    return json.loads(value) if value is not None else {}
