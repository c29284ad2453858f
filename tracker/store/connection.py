"""Clients from settings: ``create_client`` (sync) and ``create_async_client``.

Both take the same ``Settings`` and share one set of options (timeouts, retry
policy, connection classes), so a URL, the embedded server's socket or a TLS
option means the same to the CLI, the projector, the servers and the integrations.

Establishing a connection is bounded by ``Settings.connect_timeout``: the TCP
connect, the TLS handshake and Redis's own handshake (HELLO/AUTH/SELECT) each get
that long, not the read timeout, and a timeout there is never retried. Without
this a ``rediss://`` URL pointing at a plain-text port (which answers nothing to
a TLS hello) waited out the 10 s read timeout four times over. Refused or reset
connections (a Redis restarting) are still retried with backoff: they fail fast.

The first connection to a server with a password also asks whether the server
checks it (``AUTH <password>`` alone answers "called without any password
configured" when the default user has none) and logs one warning if it does not.

Redis Cluster, from the same URL forms:

- ``redis://host:7000`` naming any node (master or replica) of a cluster: detected
  with ``INFO cluster`` (``cluster_enabled:1``), once per URL and process;
- ``redis://h1:7000,h2:7001,...``: several seed nodes, always a cluster (dead seeds
  are skipped; redis-py's own ``from_url`` takes one host only);
- ``redis+cluster://`` / ``rediss+cluster://``: cluster mode without the probe.

A cluster has only database 0 (``/1`` is a one-line ConfigError) and no unix
sockets. Its clients retry every call through failovers and slot moves until
``Settings.retry_deadline`` (``tracker.store.cluster``, ``tracker.store.patience``).
Redis errors while connecting are raised as redis-py's; callers translate them
(``boundary.redis_errors``, which imports this module).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aredis
import redis.asyncio.cluster as acluster
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode
from redis.retry import Retry

from tracker.errors import ConfigError
from tracker.store import embedded
from tracker.store.cluster import AsyncClusterClient, ClusterClient
from tracker.store.patience import Patience
from tracker.store.settings import Settings, redact

log = logging.getLogger(__name__)

NO_PASSWORD_SET = "without any password configured"  # Redis 6+: AUTH <pw> to a nopass default


class ConnectTimeout(redis.TimeoutError):
    """No answer within the connect timeout while connecting. Never retried: a peer
    that stays silent once stays silent, and every retry would add the whole wait."""


def _gave_up(err: BaseException) -> bool:
    """Whether ``err`` is, or was raised from, a ConnectTimeout (redis.asyncio wraps
    errors of its socket connect in a ConnectionError ``from`` them)."""
    seen: Optional[BaseException] = err
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, ConnectTimeout):
            return True
        seen = seen.__cause__
    return False


class _Final(Exception):
    """Carries an error that must not be retried through redis-py's retry loop."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


class BoundedRetry(Retry):
    """redis-py's retry, except that a connect timeout is raised at once."""

    def call_with_retry(self, do, fail, *args, **kwargs):
        def once():
            try:
                return do()
            except redis.RedisError as e:
                if _gave_up(e):
                    raise _Final(e) from None
                raise

        try:
            return super().call_with_retry(once, fail, *args, **kwargs)
        except _Final as final:
            error = final.error
        raise error


class BoundedAsyncRetry(AsyncRetry):
    """The asyncio twin of ``BoundedRetry``."""

    async def call_with_retry(self, do, fail, *args, **kwargs):
        async def once():
            try:
                return await do()
            except redis.RedisError as e:
                if _gave_up(e):
                    raise _Final(e) from None
                raise

        try:
            return await super().call_with_retry(once, fail, *args, **kwargs)
        except _Final as final:
            error = final.error
        raise error


def _where(conn: Any) -> str:
    path = getattr(conn, "path", None)
    return str(path) if path else f"{conn.host}:{conn.port}"


def _timed_out(conn: Any, step: str) -> ConnectTimeout:
    hint = " (is that port TLS? a plain-text port answers nothing to a TLS hello)" if (
        step.startswith("TCP connect and TLS")) else ""
    return ConnectTimeout(f"no answer from {_where(conn)} within {conn.socket_connect_timeout:g}s "
                          f"({step}){hint}")


class _SyncBounded:
    """Mixin for redis-py's connections: the TLS handshake runs under the connect
    timeout (redis-py runs it under the read timeout), and the socket keeps that
    timeout until ``_handshake`` has finished Redis's own handshake."""

    socket_timeout: Optional[float]
    socket_connect_timeout: Optional[float]

    def _connect(self):
        read_timeout = self.socket_timeout
        self.socket_timeout = self.socket_connect_timeout
        try:
            return super()._connect()  # type: ignore[misc]
        except TimeoutError:
            raise _timed_out(self, _STEP[type(self)]) from None
        finally:
            self.socket_timeout = read_timeout


class BoundedConnection(_SyncBounded, redis.Connection):
    pass


class BoundedSSLConnection(_SyncBounded, redis.SSLConnection):
    pass


class BoundedUnixConnection(_SyncBounded, redis.UnixDomainSocketConnection):
    pass


class _AsyncBounded:
    """The asyncio twin: the whole socket connect (redis.asyncio's unix connection
    also runs a handshake inside it) under the connect timeout."""

    socket_connect_timeout: Optional[float]

    async def _connect(self):
        try:
            return await asyncio.wait_for(super()._connect(),  # type: ignore[misc]
                                          self.socket_connect_timeout)
        except (TimeoutError, redis.TimeoutError):
            raise _timed_out(self, _STEP[type(self)]) from None


class BoundedAsyncConnection(_AsyncBounded, aredis.Connection):
    pass


class BoundedAsyncSSLConnection(_AsyncBounded, aredis.SSLConnection):
    pass


class BoundedAsyncUnixConnection(_AsyncBounded, aredis.UnixDomainSocketConnection):
    pass


_STEP = {BoundedConnection: "TCP connect", BoundedAsyncConnection: "TCP connect",
         BoundedSSLConnection: "TCP connect and TLS handshake",
         BoundedAsyncSSLConnection: "TCP connect and TLS handshake",
         BoundedUnixConnection: "unix socket connect",
         BoundedAsyncUnixConnection: "unix socket connect and handshake"}
_CLASSES = {  # URL scheme -> (sync, asyncio) connection class
    "redis": (BoundedConnection, BoundedAsyncConnection),
    "rediss": (BoundedSSLConnection, BoundedAsyncSSLConnection),
    "unix": (BoundedUnixConnection, BoundedAsyncUnixConnection),
}

# ------------------------------------------------- is the password checked at all?
_checked: set[str] = set()
_checked_lock = threading.Lock()


def _should_check(conn: Any) -> bool:
    """Once per server per process, and only for the default user: a named user's
    password is checked against that user, and AUTH <pw> alone would try it on
    ``default``."""
    if not conn.password or (conn.username or "default") != "default":
        return False
    with _checked_lock:
        if _where(conn) in _checked:
            return False
        _checked.add(_where(conn))
    return True


def _warn_unchecked(conn: Any) -> None:
    log.warning("Redis at %s has no password set, so the password given is not checked "
                "(anyone can connect): set one on the server (requirepass or ACL SETUSER) "
                "or leave it out of the URL", _where(conn))


def _handshake(conn: Any) -> None:
    """Redis's handshake (HELLO/AUTH/SELECT) under the connect timeout, then the
    password check; the socket gets its read timeout back afterwards."""
    try:
        conn.on_connect()
        if _should_check(conn):
            conn.send_command("AUTH", conn.password, check_health=False)
            try:
                conn.read_response()
            except redis.AuthenticationError as e:
                if NO_PASSWORD_SET not in str(e):
                    raise
                _warn_unchecked(conn)
    except redis.TimeoutError:
        raise _timed_out(conn, "Redis handshake") from None
    finally:
        sock = getattr(conn, "_sock", None)
        if sock is not None:
            sock.settimeout(conn.socket_timeout)


async def _async_handshake(conn: Any) -> None:
    """The asyncio twin of ``_handshake`` (its reads take their timeout per call)."""

    async def run() -> None:
        await conn.on_connect()
        if _should_check(conn):
            await conn.send_command("AUTH", conn.password, check_health=False)
            try:
                await conn.read_response()
            except redis.AuthenticationError as e:
                if NO_PASSWORD_SET not in str(e):
                    raise
                _warn_unchecked(conn)

    try:
        await asyncio.wait_for(run(), conn.socket_connect_timeout)
    except (TimeoutError, redis.TimeoutError):
        raise _timed_out(conn, "Redis handshake") from None


def connection_options(settings: Settings, socket_timeout: Optional[float],
                       asynchronous: bool = False) -> dict:
    """Timeouts, retry policy and handshake shared by the sync and the asyncio clients."""
    retry = (BoundedAsyncRetry if asynchronous else BoundedRetry)(
        ExponentialBackoff(cap=1.0, base=0.05), 3)
    return dict(socket_timeout=socket_timeout, socket_connect_timeout=settings.connect_timeout,
                retry=retry, retry_on_error=[redis.ConnectionError, redis.TimeoutError],
                redis_connect_func=_async_handshake if asynchronous else _handshake)


def bad_url(settings: Settings, err: ValueError) -> ConfigError:
    url = settings.redis_url or ""
    return ConfigError(f"redis-url: {err}".replace(url, redact(url)))


def _url(settings: Settings) -> str:
    """The URL to connect to (starting the embedded server if none is configured)."""
    if settings.redis_url:
        return settings.redis_url
    return f"unix://{embedded.ensure(settings.data_dir)}"


_probed: dict[str, bool] = {}  # single-host URL -> cluster_enabled, probed once per process


@dataclass(frozen=True)
class Target:
    """Where a URL points: ``url`` is redis-py's single-host form of the first seed,
    without the database (a cluster's is always 0; the probe must not SELECT)."""

    url: str
    seeds: tuple[tuple[str, int], ...]
    cluster: Optional[bool]  # True: a cluster for sure; None: probe; False: unix socket
    db: int
    scheme: str = "redis"  # redis, rediss or unix (without '+cluster')


def target(settings: Settings) -> Target:
    """Parse ``settings.redis_url`` (seed lists and ``+cluster`` schemes included)."""
    url = settings.redis_url or ""
    parts = urlsplit(url)
    scheme, forced = parts.scheme, None
    if scheme == "unix":
        return Target(url, (), False, 0, "unix")
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
    return Target(urlunsplit((scheme, first, "", parts.query, "")), tuple(seeds), forced, db,
                  scheme)


def is_cluster(settings: Settings, t: Target) -> bool:
    """Whether the URL names a cluster: forced, several seeds, or ``cluster_enabled:1``."""
    if t.cluster is not None:
        return t.cluster
    if t.url not in _probed:
        try:
            probe = redis.Redis.from_url(t.url, connection_class=_CLASSES[t.scheme][0],
                                         **connection_options(settings, 5.0))
        except ValueError as e:
            raise bad_url(settings, e) from None
        try:
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
    url = _url(settings)
    common = connection_options(settings, socket_timeout)
    if settings.redis_url:
        t = target(settings)
        if is_cluster(settings, t):
            return _cluster(settings, t, socket_timeout)
    try:
        connection_class = _CLASSES[url.split("://", 1)[0]][0]
        return redis.Redis.from_url(url, connection_class=connection_class, **common)
    except (ValueError, KeyError) as e:
        raise bad_url(settings, ValueError(str(e))) from None


def create_async_client(settings: Settings, max_connections: int = 32,
                        socket_timeout: Optional[float] = 10.0) -> Any:
    """The redis.asyncio twin of ``create_client``. Its pool blocks when full
    (commands wait for a connection) instead of failing, so a burst of clients
    cannot exhaust it. On a cluster, ``AsyncClusterClient`` (per node, up to
    ``max_connections`` connections; past that a command waits and retries)."""
    if settings.redis_url:
        t = target(settings)
        if is_cluster(settings, t):
            return _async_cluster(settings, t, max_connections, socket_timeout)
    url = _url(settings)
    common = dict(connection_options(settings, socket_timeout, asynchronous=True),
                  max_connections=max_connections, timeout=socket_timeout)
    try:
        # redis.asyncio's from_url lets the URL's scheme pick the connection class;
        # parse the URL here so the bounded classes are used for every scheme.
        options = aredis.connection.parse_url(url)
        options["connection_class"] = _CLASSES[url.split("://", 1)[0]][1]
    except (ValueError, KeyError) as e:
        raise bad_url(settings, ValueError(str(e))) from None
    pool = aredis.BlockingConnectionPool(**{**common, **options})  # the URL's options win
    return aredis.Redis.from_pool(pool)


def _cluster(settings: Settings, t: Target, socket_timeout: Optional[float]) -> ClusterClient:
    """redis-py's RedisCluster (reading the slot map now). It builds each node's client
    itself, with redis-py's own connection classes and handshake: the connect timeout
    bounds the TCP connect only, and the unchecked-password warning is not given."""
    try:
        options: dict[str, Any] = dict(redis.connection.parse_url(t.url))
    except ValueError as e:
        raise bad_url(settings, e) from None
    options.pop("db", None)
    if options.pop("connection_class", None) is redis.SSLConnection:
        options["ssl"] = True
    client = ClusterClient(startup_nodes=[ClusterNode(h, p) for h, p in t.seeds[1:]],
                           socket_timeout=socket_timeout,
                           socket_connect_timeout=settings.connect_timeout,
                           require_full_coverage=False, **options)
    client.patience = Patience(settings.retry_deadline)
    return client


def _async_cluster(settings: Settings, t: Target, max_connections: int,
                   socket_timeout: Optional[float]) -> AsyncClusterClient:
    try:
        options: dict[str, Any] = dict(aredis.connection.parse_url(t.url))
    except ValueError as e:
        raise bad_url(settings, e) from None
    options.pop("db", None)
    if options.pop("connection_class", None) is aredis.SSLConnection:
        options["ssl"] = True
    client = AsyncClusterClient(
        startup_nodes=[acluster.ClusterNode(h, p) for h, p in t.seeds[1:]],
        max_connections=max_connections, socket_timeout=socket_timeout,
        socket_connect_timeout=settings.connect_timeout, require_full_coverage=False,
        **options)
    client.patience = Patience(settings.retry_deadline)
    return client
