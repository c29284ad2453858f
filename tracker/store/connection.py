"""Clients from settings: ``create_client`` (sync) and ``create_async_client``.

Both take the same ``Settings`` and share one set of options (timeouts, retry
policy), so a URL, the embedded server's socket or a TLS option means the same
to the CLI, the projector, the servers and the integrations.

Redis Cluster, from the same URL forms:

- ``redis://host:7000`` naming any node (master or replica) of a cluster: detected
  with ``INFO cluster`` (``cluster_enabled:1``), once per URL and process;
- ``redis://h1:7000,h2:7001,...``: several seed nodes, always a cluster (dead seeds
  are skipped; redis-py's own ``from_url`` takes one host only);
- ``redis+cluster://`` / ``rediss+cluster://``: cluster mode without the probe.

A cluster has only database 0 (``/1`` is a one-line ConfigError) and no unix
sockets. Its clients retry every call through failovers and slot moves until
``Settings.retry_deadline`` (``tracker.store.cluster``, ``boundary.Patience``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aredis
import redis.asyncio.cluster as acluster
from redis.asyncio.connection import SSLConnection as AsyncSSLConnection
from redis.asyncio.connection import parse_url as async_parse_url
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode
from redis.retry import Retry

from tracker.errors import ConfigError
from tracker.store import embedded
from tracker.store.boundary import Patience, redis_errors
from tracker.store.cluster import AsyncClusterClient, ClusterClient
from tracker.store.settings import Settings, redact

_probed: dict[str, bool] = {}  # single-host URL -> cluster_enabled, probed once per process


def connection_options(socket_timeout: Optional[float], retry_class: type = Retry) -> dict:
    """Timeouts and retry policy shared by the sync and the asyncio clients."""
    return dict(socket_timeout=socket_timeout, socket_connect_timeout=5,
                retry=retry_class(ExponentialBackoff(cap=1.0, base=0.05), 3),
                retry_on_error=[redis.ConnectionError, redis.TimeoutError])


def bad_url(settings: Settings, err: ValueError) -> ConfigError:
    url = settings.redis_url or ""
    return ConfigError(f"redis-url: {err}".replace(url, redact(url)))


@dataclass(frozen=True)
class Target:
    """Where a URL points: ``url`` is redis-py's single-host form of the first seed,
    without the database (a cluster's is always 0; the probe must not SELECT)."""

    url: str
    seeds: tuple[tuple[str, int], ...]
    cluster: Optional[bool]  # True: a cluster for sure; None: probe; False: unix socket
    db: int


def target(settings: Settings) -> Target:
    """Parse ``settings.redis_url`` (seed lists and ``+cluster`` schemes included)."""
    url = settings.redis_url or ""
    parts = urlsplit(url)
    scheme, forced = parts.scheme, None
    if scheme == "unix":
        return Target(url, (), False, 0)
    if scheme.endswith("+cluster"):
        scheme, forced = scheme[: -len("+cluster")], True
    creds, at, hosts = parts.netloc.rpartition("@")
    seeds = []
    for h in hosts.split(","):
        try:
            one = urlsplit("//" + h)
            seeds.append((one.hostname or "localhost", one.port or 6379))
        except ValueError:
            raise ConfigError(f"redis-url: bad host:port {h[:60]!r} in "
                              f"{redact(url)!r}") from None
    if len(seeds) > 1:
        forced = True
    db_text = parts.path.strip("/") or "0"
    if not db_text.isdigit():
        raise ConfigError(f"redis-url: the database must be a number, got /{db_text[:20]}")
    db = int(db_text)
    if forced and db:
        raise ConfigError(f"redis-url: a Redis Cluster has only database 0, got /{db}")
    first = f"{creds}{at}{hosts.split(',')[0]}"
    return Target(urlunsplit((scheme, first, "", parts.query, "")), tuple(seeds), forced, db)


def is_cluster(settings: Settings, t: Target) -> bool:
    """Whether the URL names a cluster: forced, several seeds, or ``cluster_enabled:1``."""
    if t.cluster is not None:
        return t.cluster
    if t.url not in _probed:
        try:
            probe = redis.Redis.from_url(t.url, socket_timeout=5, socket_connect_timeout=5)
        except ValueError as e:
            raise bad_url(settings, e) from None
        try:
            with redis_errors(settings):
                _probed[t.url] = int(probe.info("cluster").get("cluster_enabled", 0)) == 1
        finally:
            probe.close()
    if _probed[t.url] and t.db:
        raise ConfigError(f"redis-url: {settings.where()} is a Redis Cluster, which has only "
                          f"database 0, got /{t.db}")
    return _probed[t.url]


def create_client(settings: Settings, socket_timeout: Optional[float] = 10.0) -> Any:
    """A redis-py client for the settings (starting the embedded server if needed):
    ``redis.Redis``, or ``ClusterClient`` (a RedisCluster) for a cluster."""
    common = connection_options(socket_timeout)
    if not settings.redis_url:
        sock = embedded.ensure(settings.data_dir)
        return redis.Redis(unix_socket_path=str(sock), **common)
    t = target(settings)
    if is_cluster(settings, t):
        with redis_errors(settings):  # redis-py reads the slot map now
            try:
                client = ClusterClient(url=t.url, startup_nodes=[ClusterNode(h, p) for h, p
                                                                 in t.seeds[1:]],
                                       socket_timeout=socket_timeout, socket_connect_timeout=5,
                                       require_full_coverage=False)
            except ValueError as e:
                raise bad_url(settings, e) from None
        client.patience = Patience(settings.retry_deadline)
        return client
    try:
        return redis.Redis.from_url(settings.redis_url, **common)
    except ValueError as e:
        raise bad_url(settings, e) from None


def create_async_client(settings: Settings, max_connections: int = 32,
                        socket_timeout: Optional[float] = 10.0) -> Any:
    """The redis.asyncio twin of ``create_client``. Its pool blocks when full
    (commands wait for a connection) instead of failing, so a burst of clients
    cannot exhaust it. On a cluster, ``AsyncClusterClient`` (per node, up to
    ``max_connections`` connections; past that a command waits and retries)."""
    common = dict(connection_options(socket_timeout, AsyncRetry), max_connections=max_connections,
                  timeout=socket_timeout)
    pool: aredis.BlockingConnectionPool
    if settings.redis_url:
        t = target(settings)
        if is_cluster(settings, t):
            return _async_cluster(settings, t, max_connections, socket_timeout)
        try:
            pool = aredis.BlockingConnectionPool.from_url(settings.redis_url, **common)
        except ValueError as e:
            raise bad_url(settings, e) from None
    else:
        sock = embedded.ensure(settings.data_dir)
        pool = aredis.BlockingConnectionPool(connection_class=aredis.UnixDomainSocketConnection,
                                             path=str(sock), **common)
    return aredis.Redis.from_pool(pool)


def _async_cluster(settings: Settings, t: Target, max_connections: int,
                   socket_timeout: Optional[float]) -> AsyncClusterClient:
    try:
        options: dict[str, Any] = dict(async_parse_url(t.url))
    except ValueError as e:
        raise bad_url(settings, e) from None
    options.pop("db", None)
    if options.pop("connection_class", None) is AsyncSSLConnection:
        options["ssl"] = True
    client = AsyncClusterClient(
        startup_nodes=[acluster.ClusterNode(h, p) for h, p in t.seeds[1:]],
        max_connections=max_connections, socket_timeout=socket_timeout,
        socket_connect_timeout=5, require_full_coverage=False, **options)
    client.patience = Patience(settings.retry_deadline)
    return client
