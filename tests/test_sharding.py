"""Bucket hash and bucket map."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from propstore.sharding import BucketMap, BucketRange, bucket_of, ranges_of, tenant_bucket_of


def test_bucket_hash_is_identical_across_processes() -> None:
    # Python's hash() is randomised per process; the bucket hash must not be.
    code = "from propstore.sharding import bucket_of; print(bucket_of('acme', 'user-42'))"
    outputs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, env={"PYTHONHASHSEED": seed}).stdout.strip()
        for seed in ("1", "2", "3")
    }
    assert outputs == {str(bucket_of("acme", "user-42"))}


def test_bucket_hash_is_pinned() -> None:
    # Changing these values would move every user to another shard: never do it.
    assert bucket_of("acme", "user-42") == 3423
    assert bucket_of("acme", "user-42", 16) == 3423 % 16  # 4096 is a multiple of 16


@given(st.integers(min_value=1, max_value=100_000), st.text(min_size=1, max_size=20))
def test_bucket_is_always_in_range(count: int, user: str) -> None:
    assert 0 <= bucket_of("acme", user, count) < count


@given(st.text(min_size=1, max_size=20), st.lists(st.text(min_size=1, max_size=20)),
       st.integers(min_value=1, max_value=100_000))
def test_batch_bucket_hash_equals_bucket_of(tenant: str, users: list[str], count: int) -> None:
    # Stores place users with the tenant form (get, set and get_many): it must place every
    # user where bucket_of (the data's placement, forever) does.
    bucket = tenant_bucket_of(tenant, count)
    assert [bucket(user) for user in users] == [bucket_of(tenant, user, count) for user in users]
    assert tenant_bucket_of("acme")("user-42") == 3423


@given(st.text(min_size=1, max_size=20), st.lists(st.text(min_size=1, max_size=20)),
       st.integers(min_value=1, max_value=3))
def test_batch_grouping_puts_every_user_on_the_shard_get_reads(
        tenant: str, users: list[str], shards: int) -> None:
    # get_many's one-loop grouping: every user, in order, on the shard of bucket_of.
    count = 64
    bounds = [count * i // shards for i in range(shards + 1)]
    buckets = BucketMap(count, [[BucketRange(bounds[i], bounds[i + 1] - 1)]
                                for i in range(shards)])
    expected: dict[int, list[str]] = {}
    for user in users:
        expected.setdefault(buckets.shard_index(bucket_of(tenant, user, count)), []).append(user)
    assert buckets.group(tenant, users) == expected


def test_bucket_map_rejects_overlaps_and_gaps() -> None:
    with pytest.raises(ValueError, match="assigned twice"):
        BucketMap(8, [[BucketRange(0, 4)], [BucketRange(4, 7)]])
    with pytest.raises(ValueError, match="have no shard"):
        BucketMap(8, [[BucketRange(0, 3)], [BucketRange(5, 7)]])
    mapping = BucketMap(8, [[BucketRange(0, 3)], [BucketRange(4, 7)]])
    assert [mapping.shard_index(b) for b in range(8)] == [0] * 4 + [1] * 4


def test_ranges_compress_contiguous_buckets() -> None:
    assert [str(r) for r in ranges_of([5, 1, 2, 3, 9])] == ["1-3", "5", "9"]
