"""Input limits, checked before anything is sent (pure)."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from propstore import InvalidInputError
from propstore._validation import (
    MAX_DEPTH,
    MAX_DOCUMENT_BYTES,
    check_id,
    check_tenant,
    encode_props,
)


def nested(depth: int) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for _ in range(depth):
        doc = {"k": doc}
    return doc


@pytest.mark.parametrize("props", [
    {"x": float("nan")}, {"x": float("inf")}, {"x": -float("inf")}, {"x": b"bytes"},
    {"x": {1, 2}}, {"x": datetime.datetime(2026, 1, 1)}, {"x": "nul\x00"}, {"": 1},
    {"k" * 256: 1}, {1: "int key"}, {"a": {"b": {2: 3}}}, nested(MAX_DEPTH + 1),
    {"x": "y" * MAX_DOCUMENT_BYTES}, ["not", "a", "mapping"], "text", None,
])
def test_bad_documents_are_refused(props: Any) -> None:
    with pytest.raises(InvalidInputError):
        encode_props(props)


def test_good_document_encodes_compactly() -> None:
    assert encode_props({"plan": "pro", "n": [1, 2.5, None, True]}) == (
        b'{"plan":"pro","n":[1,2.5,null,true]}'
    )


@pytest.mark.parametrize("value", ["", "x" * 256, 42, None, "a\x00b", " padded", "tab\t"])
def test_bad_user_ids_are_refused(value: Any) -> None:
    with pytest.raises(InvalidInputError):
        check_id("user_id", value)


@pytest.mark.parametrize("value", ["a/b", "a b", "x'; DROP TABLE user_properties; --", "a:b",
                                   "-lead", "tenant\n"])
def test_tenants_with_separators_or_sql_metacharacters_are_refused(value: str) -> None:
    with pytest.raises(InvalidInputError, match="tenant"):
        check_tenant(value)


def test_email_like_user_ids_are_fine() -> None:
    assert check_id("user_id", "ann.o'neil+promo@example.com") == "ann.o'neil+promo@example.com"
