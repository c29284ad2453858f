"""Clients from settings: ``create_client`` (sync) and ``create_async_client``.

Both take the same ``Settings`` and share one set of options (timeouts, retry
policy), so a URL, the embedded server's socket or a TLS option means the same
to the CLI, the projector, the servers and the integrations.
"""

from __future__ import annotations

from typing import Optional

import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from tracker.errors import ConfigError
from tracker.store import embedded
from tracker.store.settings import Settings, redact


def connection_options(socket_timeout: Optional[float], retry_class: type = Retry) -> dict:
    """Timeouts and retry policy shared by the sync and the asyncio clients."""
    return dict(socket_timeout=socket_timeout, socket_connect_timeout=5,
                retry=retry_class(ExponentialBackoff(cap=1.0, base=0.05), 3),
                retry_on_error=[redis.ConnectionError, redis.TimeoutError])


def bad_url(settings: Settings, err: ValueError) -> ConfigError:
    url = settings.redis_url or ""
    return ConfigError(f"redis-url: {err}".replace(url, redact(url)))


def create_client(settings: Settings, socket_timeout: Optional[float] = 10.0) -> redis.Redis:
    """A redis-py client for the settings (starting the embedded server if needed)."""
    common = connection_options(socket_timeout)
    if settings.redis_url:
        try:
            return redis.Redis.from_url(settings.redis_url, **common)
        except ValueError as e:
            raise bad_url(settings, e) from None
    sock = embedded.ensure(settings.data_dir)
    return redis.Redis(unix_socket_path=str(sock), **common)


def create_async_client(settings: Settings, max_connections: int = 32,
                        socket_timeout: Optional[float] = 10.0) -> aredis.Redis:
    """The redis.asyncio twin of ``create_client``. Its pool blocks when full
    (commands wait for a connection) instead of failing, so a burst of clients
    cannot exhaust it."""
    common = dict(connection_options(socket_timeout, AsyncRetry), max_connections=max_connections,
                  timeout=socket_timeout)
    pool: aredis.BlockingConnectionPool
    if settings.redis_url:
        try:
            pool = aredis.BlockingConnectionPool.from_url(settings.redis_url, **common)
        except ValueError as e:
            raise bad_url(settings, e) from None
    else:
        sock = embedded.ensure(settings.data_dir)
        pool = aredis.BlockingConnectionPool(connection_class=aredis.UnixDomainSocketConnection,
                                             path=str(sock), **common)
    return aredis.Redis.from_pool(pool)
