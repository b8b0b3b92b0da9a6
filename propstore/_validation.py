"""Input checks done before anything is sent: a refused input writes nothing.

Limits are module constants documented in the README. jsonb cannot store ``\\u0000`` nor
NaN/Infinity, and a property document must be a JSON object of string keys; values are the
JSON types only (no bytes, sets or datetimes: encode those explicitly, e.g. ISO 8601 text).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any

from propstore.errors import InvalidInputError
from propstore.schema import MAX_ID_LENGTH

# json.dumps with any option builds a JSONEncoder per call (~1.5 us of a write's ~20 us of
# Python); one, shared, is the same encoder (it keeps no state between calls).
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
# And its encode() builds the C encoder it ends in on every call (~1.1 us of a write's ~1.8
# us of encoding, measured): the same one, built once. It is built without the circular-
# reference markers: a document reaches it only after _check_value walked it, which refuses
# nesting deeper than MAX_DEPTH (so a cycle) and every non-JSON value; so it keeps no state
# between calls either. None without json's C module: then the encoder's own encode().
_C_ENCODE: Callable[[Any, int], Sequence[str]] | None = (
    None if c_make_encoder is None else c_make_encoder(
        None, _ENCODER.default, encode_basestring, None, ":", ",", False, False, False))

#: Largest property document accepted, in bytes of its JSON text (per user, after a merge).
MAX_DOCUMENT_BYTES = 1 << 20
#: Longest property key, in characters.
MAX_KEY_LENGTH = 255
#: Deepest nesting of objects and arrays inside a document.
MAX_DEPTH = 32
#: Most user ids in one ``get_many`` call.
MAX_BATCH = 100_000
#: Tenants are account identifiers: letters, digits, ``_ . -``, starting with a letter/digit.
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_tenant(value: object) -> str:
    """A tenant id: ``TENANT_PATTERN``, at most ``MAX_ID_LENGTH`` characters."""
    tenant = check_id("tenant", value)
    if not TENANT_PATTERN.fullmatch(tenant):
        raise InvalidInputError(
            "tenant", f"{tenant[:40]!r} may hold only letters, digits and _ . - "
        )
    return tenant


def check_id(field: str, value: object) -> str:
    """A tenant or user id: a non-empty string of at most ``MAX_ID_LENGTH`` characters."""
    if not isinstance(value, str):
        raise InvalidInputError(field, f"must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidInputError(field, "must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidInputError(field, f"longer than {MAX_ID_LENGTH} characters")
    if "\x00" in value:
        raise InvalidInputError(field, "contains a NUL character")
    if value != value.strip() or not value.isprintable():
        raise InvalidInputError(field, "has leading/trailing whitespace or control characters")
    return value


def check_key(key: object, where: str = "props") -> str:
    """A property key: a non-empty string without NUL, at most ``MAX_KEY_LENGTH`` long."""
    if not isinstance(key, str):
        raise InvalidInputError(where, f"keys must be strings, got {type(key).__name__}")
    if not key:
        raise InvalidInputError(where, "keys must not be empty")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidInputError(where, f"key longer than {MAX_KEY_LENGTH} characters")
    if "\x00" in key:
        raise InvalidInputError(where, f"key {key[:40]!r} contains a NUL character")
    return key


def _check_value(value: Any, depth: int, path: str) -> None:
    if value is None or isinstance(value, bool | int):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInputError("props", f"{path} is {value} (JSON has no NaN/Infinity)")
        return
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidInputError("props", f"{path} contains a NUL character")
        return
    if depth >= MAX_DEPTH:
        raise InvalidInputError("props", f"{path} nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, Mapping):
        for key, item in value.items():
            check_key(key)
            _check_value(item, depth + 1, f"{path}.{key}")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_value(item, depth + 1, f"{path}[{i}]")
        return
    raise InvalidInputError(
        "props",
        f"{path} is a {type(value).__name__}, not a JSON value "
        "(encode bytes, sets and datetimes explicitly, e.g. ISO 8601 strings)",
    )


def encode_props(props: object) -> bytes:
    """Validate a property document and return its JSON text (UTF-8)."""
    if not isinstance(props, Mapping):
        raise InvalidInputError("props", f"must be a mapping, got {type(props).__name__}")
    for key, value in props.items():
        check_key(key)
        _check_value(value, 1, str(key))
    text = _ENCODER.encode(props) if _C_ENCODE is None else "".join(_C_ENCODE(props, 0))
    data = text.encode()
    if len(data) > MAX_DOCUMENT_BYTES:
        raise InvalidInputError(
            "props", f"document is {len(data)} bytes, over the {MAX_DOCUMENT_BYTES} limit"
        )
    return data


def check_keys(keys: object) -> list[str]:
    """Keys to unset: a non-string iterable of valid keys."""
    if isinstance(keys, str | bytes) or not isinstance(keys, Iterable):
        raise InvalidInputError("keys", "must be a list of property keys")
    return [check_key(k, "keys") for k in keys]


def check_user_ids(user_ids: object) -> list[str]:
    """User ids for a batch read (duplicates removed, order kept)."""
    if isinstance(user_ids, str | bytes) or not isinstance(user_ids, Iterable):
        raise InvalidInputError("user_ids", "must be a list of user ids")
    unique: dict[str, None] = {}
    for user_id in user_ids:
        # The common case in one expression (a batch checks up to MAX_BATCH ids); anything
        # it does not accept gets check_id's full checks and their messages.
        if not (type(user_id) is str and 0 < len(user_id) <= MAX_ID_LENGTH
                and user_id.isprintable() and user_id == user_id.strip()):
            check_id("user_id", user_id)
        unique[user_id] = None
    ids = list(unique)
    if len(ids) > MAX_BATCH:
        raise InvalidInputError("user_ids", f"more than {MAX_BATCH} ids in one call")
    return ids
