"""Replicas sharing a cache coordinate through Redis: leases, confirmations, the LRU index.

What is kept where, and under which names, is decided in ``sharing.py``; this module carries
it out with redis-py's asyncio client. Redis is a helper, never a dependency of an answer:
every operation has a fallback for when Redis cannot be reached (no lease: this replica
downloads on its own; no shared confirmation: the upstream is asked; no index: nothing is
evicted), the failure is logged (at most every ``WARN_EVERY_SECONDS``) and counted, and Redis
is left alone for ``PAUSE_SECONDS`` so that requests do not each wait for its timeout.

Leases, pins and the index are plain keys read by Lua scripts that name them from their
arguments, so the cache needs one Redis (or a primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from .confirmations import CONFIRMATION_SECONDS
from .metrics import Metrics
from .sharing import (
    LEASE_SECONDS,
    Holder,
    Kind,
    confirmation_key,
    index_member,
    lease_key,
    lease_value,
    member_object,
    parse_lease,
    pin_key,
)

log = logging.getLogger("balena_registry_proxy")

T = TypeVar("T")

# A Redis that does not answer within this is treated as down: requests wait for it at most
# this long, then go on without it.
TIMEOUT_SECONDS = 1.0
PAUSE_SECONDS = 5.0
WARN_EVERY_SECONDS = 30.0
# How many of the least recently used entries one eviction pass looks at.
EVICTION_WINDOW = 64

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""
# KEYS: the index (member -> last use), sizes (member -> bytes), total. ARGV: member, size.
# Redis's clock, not each replica's: the order of uses is the same for all. A member added
# here (kept by a replica, or found in the bucket but missing from the index) adds its size.
_TOUCH = """
local now = redis.call('time')
local added = redis.call('zadd', KEYS[1], now[1] + now[2] / 1000000, ARGV[1])
if added == 1 then
    redis.call('hset', KEYS[2], ARGV[1], ARGV[2])
    redis.call('incrby', KEYS[3], ARGV[2])
end
return tonumber(redis.call('get', KEYS[3]) or '0')
"""
# KEYS: index, sizes, total. ARGV: the limit, the pin key prefix, the window, the lease key
# prefix. The least recently used go first, but none that is pinned (just served, or
# presigned) or being filled (its lease is held). Returns the total, then the members taken
# out of the index: their objects are deleted by the caller.
_EVICT = """
local total = tonumber(redis.call('get', KEYS[3]) or '0')
local limit = tonumber(ARGV[1])
local result = {}
if total > limit then
    for _, member in ipairs(redis.call('zrange', KEYS[1], 0, tonumber(ARGV[3]) - 1)) do
        if total <= limit then break end
        local digest = string.sub(member, string.find(member, '/', 1, true) + 1)
        if redis.call('exists', ARGV[2] .. member) == 0
            and redis.call('exists', ARGV[4] .. digest) == 0 then
            local size = tonumber(redis.call('hget', KEYS[2], member) or '0')
            redis.call('zrem', KEYS[1], member)
            redis.call('hdel', KEYS[2], member)
            total = redis.call('decrby', KEYS[3], size)
            table.insert(result, member)
        end
    end
end
table.insert(result, 1, total)
return result
"""


class Coordination:
    """One replica's view of the shared Redis."""

    def __init__(self, url: str, space: str, me: Holder, metrics: Metrics, secret: str) -> None:
        """Coordinate through the Redis at ``url`` under key prefix ``space``, as ``me``;
        confirmations are keyed by an HMAC under the replicas' ``secret``."""
        self._redis: Redis = Redis.from_url(
            url,
            socket_timeout=TIMEOUT_SECONDS,
            socket_connect_timeout=TIMEOUT_SECONDS,
            decode_responses=True,
        )
        self._space = space
        self._secret = secret
        self.me = me
        self._value = lease_value(me)
        self._metrics = metrics
        self._renew = self._redis.register_script(_RENEW)
        self._release = self._redis.register_script(_RELEASE)
        self._touch = self._redis.register_script(_TOUCH)
        self._evict = self._redis.register_script(_EVICT)
        self._index = (f"{space}lru", f"{space}sizes", f"{space}total")
        self._paused_until = 0.0
        self._warned = 0.0
        self.size = 0
        """Bytes in the shared cache, as the index last said."""
        self.evictions = 0
        """Entries this replica evicted since start."""

    @property
    def available(self) -> bool:
        """Whether Redis is used now (not paused after a failure)."""
        return time.monotonic() >= self._paused_until

    async def close(self) -> None:
        """Close the connections."""
        await self._redis.aclose()

    async def _guarded(self, operation: Callable[[], Awaitable[T]], fallback: T) -> T:
        """``operation``'s result, or ``fallback`` while Redis fails (or was just failing)."""
        if not self.available:
            return fallback
        try:
            return await operation()
        except (RedisError, OSError, TimeoutError) as error:
            self._failed(error)
            return fallback

    def _failed(self, error: BaseException) -> None:
        now = time.monotonic()
        self._paused_until = now + PAUSE_SECONDS
        self._metrics.cache_infrastructure_errors.labels("redis").inc()
        if now - self._warned >= WARN_EVERY_SECONDS:
            self._warned = now
            log.warning(
                "the cache's Redis failed (%s: %s): each replica downloads on its own and "
                "serves hits from storage until it answers again",
                type(error).__name__,
                error,
            )

    async def acquire(self, digest: str) -> Holder | None:
        """Take the lease on filling ``digest``: ``me`` if taken, the other holder if another
        replica has it, None when Redis cannot say (then fill without one)."""

        async def take() -> Holder | None:
            previous = await self._redis.set(
                lease_key(self._space, digest),
                self._value,
                nx=True,
                px=int(LEASE_SECONDS * 1000),
                get=True,
            )
            if previous is None:
                return self.me
            return parse_lease(str(previous))

        return await self._guarded(take, None)

    async def holder(self, digest: str) -> Holder | None:
        """The replica holding the lease on ``digest``, if any (and if Redis can say)."""

        async def read() -> Holder | None:
            value = await self._redis.get(lease_key(self._space, digest))
            return None if value is None else parse_lease(str(value))

        return await self._guarded(read, None)

    async def renew(self, digest: str) -> bool:
        """Extend this replica's lease on ``digest``; False if it is no longer this one's."""

        async def extend() -> bool:
            keys = [lease_key(self._space, digest)]
            args: list[str | int] = [self._value, int(LEASE_SECONDS * 1000)]
            return bool(await self._renew(keys=keys, args=args))

        return await self._guarded(extend, False)

    async def release(self, digest: str) -> None:
        """Give up this replica's lease on ``digest`` (another's stays)."""

        async def drop() -> None:
            await self._release(keys=[lease_key(self._space, digest)], args=[self._value])

        await self._guarded(drop, None)

    async def confirmed(self, credentials: str, repository: str, digest: str) -> bool:
        """Whether a replica noted that the upstream let ``credentials`` read ``digest`` under
        ``repository``, and it is still fresh."""
        key = confirmation_key(self._secret, self._space, credentials, repository, digest)

        async def read() -> bool:
            return bool(await self._redis.exists(key))

        return await self._guarded(read, False)

    async def confirm(self, credentials: str, repository: str, digest: str) -> None:
        """Note for the other replicas that the upstream let ``credentials`` read ``digest``
        under ``repository``, for as long as that is fresh."""
        key = confirmation_key(self._secret, self._space, credentials, repository, digest)

        async def write() -> None:
            await self._redis.set(key, "1", ex=int(CONFIRMATION_SECONDS))

        await self._guarded(write, None)

    async def used(self, kind: Kind, digest: str, size: int, pin_seconds: float = 0) -> None:
        """Note that an object was just kept or served (and keep it from eviction for
        ``pin_seconds``)."""
        member = index_member(kind, digest)

        async def touch() -> None:
            if pin_seconds > 0:
                await self._redis.set(pin_key(self._space, member), "1", px=int(pin_seconds * 1000))
            self.size = int(await self._touch(keys=list(self._index), args=[member, size]))

        await self._guarded(touch, None)

    async def evict(self, limit: int) -> list[tuple[Kind, str]]:
        """Take the least recently used objects out of the index until the cache is within
        ``limit`` bytes; the objects to delete. Nothing without Redis."""

        async def choose() -> list[tuple[Kind, str]]:
            result = await self._evict(
                keys=list(self._index),
                # The key prefixes from sharing's own key functions, so the script names
                # pins and leases as the rest of the proxy does.
                args=[limit, pin_key(self._space, ""), EVICTION_WINDOW, lease_key(self._space, "")],
            )
            self.size = int(result[0])
            victims = [member_object(str(member)) for member in result[1:]]
            return [victim for victim in victims if victim is not None]

        nothing: list[tuple[Kind, str]] = []
        victims = await self._guarded(choose, nothing)
        self.evictions += len(victims)
        return victims
