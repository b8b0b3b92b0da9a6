"""Asking Patroni's REST API who leads one shard.

The standard library's ``urllib`` does the HTTP: propstore depends on no HTTP client (httpx,
aiohttp, requests are not among its dependencies), this is one small GET per interval per
shard, and ``urllib`` already speaks http and https (with the system's CA store). Each
request runs in a worker thread (``asyncio.to_thread``) bounded by the source's timeout,
so the monitor's event loop never blocks on a member that does not answer (each endpoint
gets ``discovery.timeout``; the next is asked after it).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.request
from typing import Any

import structlog

from propstore.config import DiscoverySettings, ShardConfig
from propstore.discovery._leadership import Leadership, history_of, parse_cluster
from propstore.timeline import TimelineHistory

log = structlog.get_logger("propstore.discovery")


class PatroniSource:
    """The Patroni members of one shard, asked in turn (the last one that answered first).

    :meth:`leadership_now` and :meth:`history_now` block (for tools such as ``migrate``);
    :meth:`leadership` and :meth:`history` run them in a worker thread (for the monitor).
    """

    def __init__(self, shard: ShardConfig, settings: DiscoverySettings) -> None:
        if not shard.patroni_endpoints:
            raise ValueError(f"shard {shard.name} names no Patroni endpoint")
        self.shard = shard
        self.settings = settings
        self._endpoints = list(shard.patroni_endpoints)
        self._failing = False

    def leadership_now(self) -> Leadership | None:
        """Who leads now, from the first endpoint that answers (None when none does: the
        caller then relies on its own observation alone)."""
        errors: list[str] = []
        for endpoint in list(self._endpoints):
            asked_at = time.monotonic()
            try:
                doc = _fetch_json(endpoint + "/cluster", self.settings.timeout)
                found = parse_cluster(doc, self.shard.nodes, endpoint, asked_at)
            except (OSError, ValueError, http.client.HTTPException) as exc:
                errors.append(f"{endpoint}: {type(exc).__name__}: {exc}"[:200])
                continue
            if endpoint != self._endpoints[0]:  # ask the one that answers first next time
                self._endpoints.remove(endpoint)
                self._endpoints.insert(0, endpoint)
            if self._failing:
                log.info("discovery_answering", shard=self.shard.name, endpoint=endpoint)
                self._failing = False
            return found
        if not self._failing:
            log.warning("discovery_unreachable", shard=self.shard.name, errors=errors)
            self._failing = True
        return None

    def history_now(self, leadership: Leadership) -> TimelineHistory | None:
        """The leader's timeline history from ``/history`` (None when it cannot be had
        complete: the monitor's own read of the history file still decides then)."""
        timeline = leadership.timeline
        if timeline is None:
            return None
        try:
            entries = _fetch_json(leadership.endpoint + "/history", self.settings.timeout)
            if not isinstance(entries, list):
                return None
            history = history_of(timeline, entries)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            log.info("discovery_history_unreadable", shard=self.shard.name,
                     error=f"{type(exc).__name__}: {exc}"[:200])
            return None
        return history if history.complete else None

    async def leadership(self) -> Leadership | None:
        """:meth:`leadership_now` without blocking the event loop."""
        return await asyncio.to_thread(self.leadership_now)

    async def history(self, leadership: Leadership) -> TimelineHistory | None:
        """:meth:`history_now` without blocking the event loop."""
        return await asyncio.to_thread(self.history_now, leadership)


def _fetch_json(url: str, timeout: float) -> Any:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # http(s) only: validated
        return json.loads(response.read(1 << 20))


__all__ = ["PatroniSource"]
