"""Which topology changes are safe to apply now: :func:`diff_topologies`.

A config change is rolled out like a schema change: first see what it changes. Moving
buckets is the dangerous one — readers and writers follow the new map at once, so users
whose rows are still on the source shard would vanish from reads (and be re-created empty
by writes) — and is refused while the source shard's primary holds any user of the moved
buckets. The structural part (:mod:`._diff`) needs no database; this module asks them.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import psycopg
import psycopg.errors

from propstore.config import NodeConfig, Topology
from propstore.migrate._diff import (
    BucketMove,
    ConfigDiff,
    UnsafeChange,
    load_for_diff,
    structural_diff,
)


def diff_topologies(
    old: Topology | str | os.PathLike[str],
    new: Topology | str | os.PathLike[str],
    *,
    check: bool = True,
    connect_timeout: float = 2.0,
) -> ConfigDiff:
    """What changes from ``old`` to ``new`` (Topology values or topology file paths).

    A path is read without the whole-file validation, so a file that would be rejected
    (a bucket without a shard, or claimed twice, a duplicate node...) comes back as unsafe
    entries instead of an exception; malformed TOML or values still raise
    :class:`~propstore.errors.ConfigError`.

    With ``check`` (the default) the databases are asked: every moved bucket's source
    primary (``SELECT count(*) FROM user_properties WHERE bucket = ANY(...)``) and every
    shard's new primary (reachable, not in recovery). Without it, moves cannot be proven
    empty and are reported unsafe.
    """
    old_t, new_t = load_for_diff(old), load_for_diff(new)
    diff = structural_diff(old_t, new_t)
    moves, unsafe = list(diff.buckets_moved), list(diff.unsafe)
    rehash = old_t.bucket_count != new_t.bucket_count
    if check:
        moves, move_problems = _check_moves(old_t, moves, connect_timeout)
        unsafe += move_problems
        if rehash:
            unsafe += _check_rehash(old_t, new_t, connect_timeout)
        for shard in new_t.shards:
            problem = _primary_problem(shard.primary, connect_timeout)
            if problem is not None:
                unsafe.append(UnsafeChange(f"shard {shard.name}",
                                           f"no reachable primary: {problem}"))
    else:
        unsafe += [UnsafeChange(f"move {m.source} -> {m.target}",
                                "not checked: cannot prove the source holds none of their users")
                   for m in moves if m.target is not None]
        if rehash:
            unsafe.append(UnsafeChange("bucket_count", "changes every user's bucket (not "
                                                       "checked for data)"))
    return dataclasses.replace(diff, buckets_moved=tuple(moves), unsafe=tuple(unsafe),
                               checked=check)


def _connect(node: NodeConfig, timeout: float) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(node.dsn, autocommit=True, connect_timeout=max(2, round(timeout)),
                           application_name="propstore-config-diff")


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _users(node: NodeConfig, buckets: list[int] | None, timeout: float) -> int:
    """Rows of ``buckets`` (all rows when None) on ``node``; 0 before the first migration."""
    with _connect(node, timeout) as conn:
        try:
            if buckets is None:
                row = conn.execute("SELECT count(*) FROM user_properties").fetchone()
            else:
                row = conn.execute(
                    "SELECT count(*) FROM user_properties WHERE bucket = ANY(%s)", (buckets,)
                ).fetchone()
        except psycopg.errors.UndefinedTable:
            return 0
    return int(row[0]) if row else 0


def _primary_problem(node: NodeConfig, timeout: float) -> str | None:
    try:
        with _connect(node, timeout) as conn:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    except psycopg.Error as exc:
        return f"primary {node.name} ({node.address}) unreachable: {_describe(exc)}"
    if row and row[0]:
        return f"primary {node.name} ({node.address}) is a standby (in recovery)"
    return None


def _check_moves(old: Topology, moves: list[BucketMove], timeout: float
                 ) -> tuple[list[BucketMove], list[UnsafeChange]]:
    checked, unsafe = [], []
    for move in moves:
        if move.source is None or move.target is None:
            checked.append(move)
            continue
        source = old.shard(move.source).primary
        try:
            users = _users(source, move.buckets, timeout)
        except psycopg.Error as exc:
            checked.append(move)
            unsafe.append(UnsafeChange(
                f"move {move.source} -> {move.target}",
                f"cannot tell whether {move.source} still holds users of the {move.count} "
                f"bucket(s): its primary {source.name} is unreachable ({_describe(exc)})",
            ))
            continue
        move = dataclasses.replace(move, users=users)
        checked.append(move)
        if users:
            unsafe.append(UnsafeChange(
                f"move {move.source} -> {move.target} ({move.count} bucket(s))",
                f"{move.source} still holds {users} user(s) of these buckets; moving data "
                f"between shards is not supported yet (they would be lost to readers)",
            ))
    return checked, unsafe


def _check_rehash(old: Topology, new: Topology, timeout: float) -> list[UnsafeChange]:
    """A new bucket_count re-buckets every user: only safe on empty shards."""
    problems = []
    for shard in old.shards:
        try:
            users = _users(shard.primary, None, timeout)
        except psycopg.Error as exc:
            problems.append(UnsafeChange("bucket_count", f"cannot count users on {shard.name}"
                                                         f": {_describe(exc)}"))
            continue
        if users:
            problems.append(UnsafeChange(
                f"bucket_count {old.bucket_count} -> {new.bucket_count}",
                f"changes every user's bucket and {shard.name} holds {users} user(s)",
            ))
    return problems
