"""The resolver's small caches: bounded, expiring, one question for many askers."""

from __future__ import annotations

import asyncio

import pytest

from balena_registry_proxy.ttl_cache import TtlCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_one_question_for_many_askers() -> None:
    cache: TtlCache[str, int] = TtlCache(60, 10)
    asked = 0
    release = asyncio.Event()

    async def ask() -> int:
        nonlocal asked
        asked += 1
        await release.wait()
        return 7

    waiting = [asyncio.ensure_future(cache.get("k", ask)) for _ in range(5)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*waiting) == [7] * 5
    assert asked == 1
    assert await cache.get("k", ask) == 7
    assert asked == 1


async def test_values_expire() -> None:
    clock = Clock()
    cache: TtlCache[str, int] = TtlCache(60, 10, clock)
    answers = iter([1, 2])

    async def ask() -> int:
        return next(answers)

    assert await cache.get("k", ask) == 1
    clock.now = 59.9
    assert await cache.get("k", ask) == 1
    clock.now = 60
    assert await cache.get("k", ask) == 2


async def test_the_least_recently_used_go_beyond_the_bound() -> None:
    cache: TtlCache[int, int] = TtlCache(60, 3)
    for n in range(3):
        cache.put(n, n)
    assert cache.peek(0) == 0  # 0 is now the most recent
    cache.put(3, 3)
    assert len(cache) == 3
    assert cache.peek(1) is None
    assert cache.peek(0) == 0


async def test_failures_are_not_kept() -> None:
    cache: TtlCache[str, int] = TtlCache(60, 10)
    calls = 0

    async def ask() -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("down")
        return 5

    with pytest.raises(RuntimeError):
        await cache.get("k", ask)
    assert await cache.get("k", ask) == 5


async def test_an_asker_that_leaves_leaves_the_others_their_answer() -> None:
    cache: TtlCache[str, int] = TtlCache(60, 10)
    release = asyncio.Event()

    async def ask() -> int:
        await release.wait()
        return 3

    first = asyncio.ensure_future(cache.get("k", ask))
    second = asyncio.ensure_future(cache.get("k", ask))
    await asyncio.sleep(0)
    first.cancel()
    release.set()
    assert await second == 3
    assert cache.peek("k") == 3


async def test_zero_ttl_keeps_nothing() -> None:
    cache: TtlCache[str, int] = TtlCache(0, 10)

    async def ask() -> int:
        return 1

    assert await cache.get("k", ask) == 1
    assert len(cache) == 0


async def test_an_answer_of_none_is_kept_like_any_other() -> None:
    # "The API shows nothing of that name" is an answer: asking again at every request would
    # let anonymous clients spend the proxy's API quota on unknown names.
    cache: TtlCache[str, int | None] = TtlCache(60, 10)
    calls = 0

    async def ask() -> int | None:
        nonlocal calls
        calls += 1
        return None

    assert await cache.get("k", ask) is None
    assert await cache.get("k", ask) is None
    assert calls == 1
