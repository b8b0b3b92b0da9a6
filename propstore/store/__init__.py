"""The public get/set API: ``PropertyStore`` (blocking) and ``AsyncPropertyStore``."""

from propstore.store._async import AsyncPropertyStore
from propstore.store._core import ReadObserver, ReadResult, ReadStats
from propstore.store._sync import PropertyStore

__all__ = ["AsyncPropertyStore", "PropertyStore", "ReadObserver", "ReadResult", "ReadStats"]
