"""A small in-memory cache of answers that take a request to get: bounded, expiring, shared.

A pull asks for several things at once (a manifest and its layers, all under one name): the
first asks, the others wait for its answer instead of asking too. Failures are not kept, so
the next request asks again.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """Values by key, each kept for ``ttl`` seconds, at most ``max_entries`` of them."""

    def __init__(
        self,
        ttl: float,
        max_entries: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Keep values ``ttl`` seconds (0: only while being asked for); the least recently
        used go first beyond ``max_entries``."""
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        self._values: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._asking: dict[K, asyncio.Future[V]] = {}

    def __len__(self) -> int:
        """How many values are kept (expired ones included until they are next looked up)."""
        return len(self._values)

    def peek(self, key: K) -> V | None:
        """The value kept for ``key``, if it has not expired; never asks."""
        kept = self._kept(key)
        return None if kept is None else kept[0]

    def _kept(self, key: K) -> tuple[V] | None:
        """The value kept for ``key``, boxed so that a kept None (an answer that says
        "nothing") is told apart from nothing kept."""
        kept = self._values.get(key)
        if kept is None:
            return None
        expires, value = kept
        if expires <= self._clock():
            del self._values[key]
            return None
        self._values.move_to_end(key)
        return (value,)

    def put(self, key: K, value: V, ttl: float | None = None) -> None:
        """Keep ``value`` for ``key`` (``ttl`` seconds, if not the cache's own)."""
        self._values[key] = (self._clock() + (self._ttl if ttl is None else ttl), value)
        self._values.move_to_end(key)
        while len(self._values) > self._max_entries:
            self._values.popitem(last=False)

    async def get(self, key: K, ask: Callable[[], Awaitable[V]]) -> V:
        """The value for ``key``: kept, being asked for by another caller, or asked now.

        The asking runs on its own: a caller that leaves (its client went away) leaves the
        others waiting for the same answer, and the answer is kept for the next.
        """
        kept = self._kept(key)
        if kept is not None:
            return kept[0]
        task = self._asking.get(key)
        if task is None:
            task = asyncio.ensure_future(self._ask(key, ask))
            self._asking[key] = task
        return await asyncio.shield(task)

    async def _ask(self, key: K, ask: Callable[[], Awaitable[V]]) -> V:
        try:
            value = await ask()
        finally:
            del self._asking[key]
        if self._ttl > 0:
            self.put(key, value)
        return value
