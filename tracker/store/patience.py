"""Retry by deadline: how a call on a Redis Cluster waits out a failover or a slot move.

``Patience`` is the retry policy of a cluster client (``tracker.store.cluster``
applies it to every command and every per-node pipeline, sync and asyncio): a
connection lost to a killed master, CLUSTERDOWN while its replica takes over,
TRYAGAIN while a partition's slot migrates (the fence, ``keys.fence``) and
redis-py's "TTL exhausted" after too many redirections are retried with backoff
(0.05 s doubling to 0.5 s) until ``Settings.retry_deadline`` has passed, by time,
not by count: redis-py's own count-based retries give up within ~0.2 s, far
inside a 2-3 s failover. Single Redis keeps redis-py's short reconnect retry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from redis.exceptions import (
    ClusterDownError,
    ClusterError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)

T = TypeVar("T")
RETRYABLE = (redis.ConnectionError, redis.TimeoutError, ClusterDownError, TryAgainError,
             SlotNotCoveredError)
NEVER = (redis.AuthenticationError, redis.exceptions.AuthorizationError)


def retryable(err: BaseException) -> bool:
    """True for the errors a failover or a resharding causes, which pass by themselves."""
    if isinstance(err, NEVER):
        return False
    if isinstance(err, RETRYABLE):
        return True
    return isinstance(err, ClusterError) and "TTL exhausted" in str(err)


@dataclass(frozen=True)
class Patience:
    """Retry by deadline: backoff ``first`` doubling to ``cap`` until ``seconds`` passed."""

    seconds: float = 10.0
    first: float = 0.05
    cap: float = 0.5

    def delays(self) -> Iterator[float]:
        """The pauses before each retry; ends when another would pass the deadline."""
        end = time.monotonic() + self.seconds
        delay = self.first
        while time.monotonic() + delay <= end:
            yield delay
            delay = min(delay * 2, self.cap)

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(seconds)

    @staticmethod
    async def asleep(seconds: float) -> None:
        await asyncio.sleep(seconds)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        delays = self.delays()
        while True:
            try:
                return fn(*args, **kwargs)
            except (redis.RedisError, RedisClusterException) as e:
                pause = next(delays, None) if retryable(e) else None
                if pause is None:
                    raise
            time.sleep(pause)

    async def acall(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        delays = self.delays()
        while True:
            try:
                return await fn(*args, **kwargs)
            except (redis.RedisError, RedisClusterException) as e:
                pause = next(delays, None) if retryable(e) else None
                if pause is None:
                    raise
            await asyncio.sleep(pause)
