"""Which shard holds a user: a stable hash into virtual buckets, and a bucket-to-shard map.

``bucket_of`` must give the same answer in every process, Python version and machine for
as long as the data lives, so it is a keyed-nothing BLAKE2b over the UTF-8 bytes of
``tenant \\0 user_id`` (identifiers cannot contain NUL, so the encoding is unambiguous),
never Python's randomised ``hash()``.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

DEFAULT_BUCKET_COUNT = 4096
_U64 = struct.Struct(">Q").unpack


def bucket_of(tenant: str, user_id: str, bucket_count: int = DEFAULT_BUCKET_COUNT) -> int:
    """The virtual bucket (``0 <= b < bucket_count``) of a user; stable forever."""
    digest = hashlib.blake2b(
        tenant.encode() + b"\0" + user_id.encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big") % bucket_count


def tenant_bucket_of(tenant: str, bucket_count: int = DEFAULT_BUCKET_COUNT
                     ) -> Callable[[str], int]:
    """``bucket_of`` for many users of one tenant (a batch read): the same hash, with the
    tenant's part absorbed once and copied per user (about a third cheaper per id than
    hashing from scratch)."""
    prefix = hashlib.blake2b(tenant.encode() + b"\0", digest_size=8)

    def bucket(user_id: str) -> int:
        h = prefix.copy()
        h.update(user_id.encode())
        return int(_U64(h.digest())[0]) % bucket_count

    return bucket


@dataclass(frozen=True, slots=True)
class BucketRange:
    """An inclusive range of buckets, ``first..last``."""

    first: int
    last: int

    @classmethod
    def parse(cls, text: str) -> BucketRange:
        """Read ``"0-2047"`` or a single bucket ``"17"``; raises ``ValueError``."""
        first, sep, last = text.strip().partition("-")
        try:
            lo = int(first)
            hi = int(last) if sep else lo
        except ValueError:
            raise ValueError(f"bucket range {text!r} is not 'first-last'") from None
        if lo < 0 or hi < lo:
            raise ValueError(f"bucket range {text!r} is empty or negative")
        return cls(lo, hi)

    def __len__(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


class BucketMap:
    """Maps every bucket to exactly one shard (index into the topology's shard list)."""

    __slots__ = ("_owner", "bucket_count")

    def __init__(self, bucket_count: int, ranges: Sequence[Sequence[BucketRange]]) -> None:
        """Build from each shard's ranges; raises ``ValueError`` on overlap or gap."""
        owner = [-1] * bucket_count
        for shard_index, shard_ranges in enumerate(ranges):
            for rng in shard_ranges:
                if rng.last >= bucket_count:
                    raise ValueError(f"bucket range {rng} exceeds bucket_count {bucket_count}")
                for bucket in range(rng.first, rng.last + 1):
                    if owner[bucket] != -1:
                        raise ValueError(
                            f"bucket {bucket} is assigned twice (shards #{owner[bucket]} "
                            f"and #{shard_index})"
                        )
                    owner[bucket] = shard_index
        missing = [b for b, o in enumerate(owner) if o == -1]
        if missing:
            raise ValueError(
                f"{len(missing)} bucket(s) have no shard, first {_compress(missing[:50])}"
            )
        self._owner = bytes(owner) if len(ranges) < 256 else tuple(owner)
        self.bucket_count = bucket_count

    def shard_index(self, bucket: int) -> int:
        """Index of the shard owning ``bucket``."""
        return self._owner[bucket]

    def group(self, tenant: str, user_ids: Iterable[str]) -> dict[int, list[str]]:
        """``user_ids`` of ``tenant`` by the index of the shard owning each (``get_many``):
        :func:`bucket_of`'s hash, with the tenant's part absorbed once, in one loop.

        The loop is a batch's hottest Python (10,000 ids): no call per id but the hash's
        own, ~30% less CPU than a ``tenant_bucket_of`` call and a ``setdefault`` per id
        (4.6 vs 6.6 ms for 10,000 ids, measured).
        """
        copy = hashlib.blake2b(tenant.encode() + b"\0", digest_size=8).copy
        count, owner, from_bytes = self.bucket_count, self._owner, int.from_bytes
        lists: list[list[str]] = [[] for _ in range(max(owner) + 1)]
        appends = [found.append for found in lists]
        for user_id in user_ids:
            h = copy()
            h.update(user_id.encode())
            appends[owner[from_bytes(h.digest(), "big") % count]](user_id)
        return {index: found for index, found in enumerate(lists) if found}

    def buckets_of(self, shard_index: int) -> list[int]:
        """Every bucket owned by a shard."""
        return [b for b, o in enumerate(self._owner) if o == shard_index]


def _compress(buckets: Sequence[int]) -> str:
    """``[1,2,3,7]`` -> ``"1-3, 7"``, for error messages."""
    out: list[str] = []
    start = prev = buckets[0]
    for bucket in [*buckets[1:], None]:
        if bucket is not None and bucket == prev + 1:
            prev = bucket
            continue
        out.append(str(BucketRange(start, prev)))
        if bucket is not None:
            start = prev = bucket
    return ", ".join(out)


def ranges_of(buckets: Sequence[int]) -> list[BucketRange]:
    """Contiguous ranges covering ``buckets`` (sorted)."""
    result: list[BucketRange] = []
    for bucket in sorted(buckets):
        if result and result[-1].last == bucket - 1:
            result[-1] = BucketRange(result[-1].first, bucket)
        else:
            result.append(BucketRange(bucket, bucket))
    return result


__all__ = [
    "DEFAULT_BUCKET_COUNT", "BucketMap", "BucketRange", "bucket_of", "ranges_of",
    "tenant_bucket_of",
]
