"""The one place where redis-py's exceptions become tracker's.

Every call into Redis runs inside ``redis_errors(settings)``; what leaves it is
a ``TrackerError`` whose message names the server (password hidden) and says
what to do. Replies that carry an error in place (pipelines run with
``raise_on_error=False``) go through ``check``.

On a Redis Cluster, calls first ride out failovers and slot moves
(``tracker.store.patience``); what is left after its deadline is translated here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.exceptions import (
    RedisClusterException,
)

from tracker.errors import RedisUnavailable
from tracker.store.connection import ConnectTimeout
from tracker.store.patience import retryable
from tracker.store.settings import Settings, hide_password


def unavailable(settings: Settings, err: BaseException) -> RedisUnavailable:
    """The TrackerError for a Redis failure, with advice and the password hidden."""
    text = hide_password(settings.redis_url, str(err))
    where = settings.where()
    if isinstance(err, redis.AuthenticationError):
        return RedisUnavailable(f"Redis at {where} refused the credentials: {text}")
    if isinstance(err, redis.exceptions.NoPermissionError) or text.startswith("NOPERM"):
        return RedisUnavailable(f"the Redis user at {where} lacks a permission: {text}. "
                                "See the README's least-privilege section.")
    text = text.rstrip(".")
    if "Cluster mode is not enabled" in text:
        return RedisUnavailable(f"Redis at {where} is not a Redis Cluster: drop '+cluster' from "
                                "the URL (a plain server is used as it is)")
    if retryable(err) and not isinstance(err, (redis.ConnectionError, redis.TimeoutError)):
        return RedisUnavailable(f"the Redis Cluster at {where} did not settle within "
                                f"{settings.retry_deadline:g}s ({text}): a failover or a slot "
                                "move still under way? Retry, or raise TRACKER_RETRY_DEADLINE.")
    if isinstance(err, ConnectTimeout) or isinstance(err.__cause__, ConnectTimeout):
        return RedisUnavailable(f"cannot use Redis at {where}: {text}. Check the URL's host, "
                                "port and scheme, or raise TRACKER_CONNECT_TIMEOUT.")
    if isinstance(err, (redis.ConnectionError, redis.TimeoutError)) or (
            isinstance(err, RedisClusterException) and "cannot be connected" in text):
        return RedisUnavailable(f"cannot use Redis at {where}: {text}. Is it running? "
                                "Set --redis-url or TRACKER_REDIS_URL.")
    return RedisUnavailable(f"Redis at {where} answered an error: {text}")


@contextmanager
def redis_errors(settings: Settings) -> Iterator[None]:
    """Turn any ``redis.RedisError`` raised inside the block into ``RedisUnavailable``.

    Works around ``await`` too: the translation happens when the exception passes.
    """
    try:
        yield
    except (redis.RedisError, RedisClusterException) as e:
        raise unavailable(settings, e) from e


def check(settings: Settings, reply: Any) -> Any:
    """A pipeline reply, or its in-place error raised as ``RedisUnavailable``."""
    if isinstance(reply, BaseException):
        raise unavailable(settings, reply) from reply
    return reply
