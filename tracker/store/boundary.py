"""The one place where redis-py's exceptions become tracker's.

Every call into Redis runs inside ``redis_errors(settings)``; what leaves it is
a ``TrackerError`` whose message names the server (password hidden) and says
what to do. Replies that carry an error in place (pipelines run with
``raise_on_error=False``) go through ``check``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from tracker.errors import RedisUnavailable
from tracker.store.connection import ConnectTimeout
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
    if isinstance(err, ConnectTimeout) or isinstance(err.__cause__, ConnectTimeout):
        return RedisUnavailable(f"cannot use Redis at {where}: {text}. Check the URL's host, "
                                "port and scheme, or raise TRACKER_CONNECT_TIMEOUT.")
    if isinstance(err, (redis.ConnectionError, redis.TimeoutError)):
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
    except redis.RedisError as e:
        raise unavailable(settings, e) from e


def check(settings: Settings, reply: Any) -> Any:
    """A pipeline reply, or its in-place error raised as ``RedisUnavailable``."""
    if isinstance(reply, BaseException):
        raise unavailable(settings, reply) from reply
    return reply
