"""The public get/set API: ``PropertyStore`` (blocking) and ``AsyncPropertyStore``."""

from propstore.store._async import AsyncPropertyStore
from propstore.store._program import ReadObserver, ReadResult
from propstore.store._stats import ReadStats
from propstore.store._sync import PropertyStore

__all__ = ["AsyncPropertyStore", "PropertyStore", "ReadObserver", "ReadResult", "ReadStats"]
