"""Settings, and the connection every command and API object shares.

A ``Deployment`` is one tracker installation: a Redis, a key prefix, a fixed
partition count (stored in Redis, so every process agrees), the TTL. Redis
errors met while opening it become ``TrackerError`` with the URL redacted.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from tracker import embedded, keys
from tracker.errors import ConfigError, RedisUnavailable
from tracker.scripts import Scripts

DEFAULT_PARTITIONS = 4
DEFAULT_TTL = 1800
MAX_PARTITIONS = 1024
PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def redact(url: str) -> str:
    """The URL with any password replaced, fit for logs and errors."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _env_int(name: str) -> Optional[int]:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a whole number, got {raw!r}") from None


def _default(value: Optional[int], default: int) -> int:
    return default if value is None else value


@dataclass
class Settings:
    redis_url: Optional[str] = None  # None: the embedded Redis under data_dir
    data_dir: Path = field(default_factory=embedded.default_data_dir)
    prefix: str = "tracker"
    partitions: Optional[int] = None  # None: whatever Redis holds, else DEFAULT_PARTITIONS
    ttl: Optional[int] = None  # seconds a track outlives its last update / reservation;
    # None: whatever the deployment holds, else DEFAULT_TTL (a fold parameter, so stored)
    grace: int = 300  # seconds a snapshot key outlives its logical expiry

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        """Environment (TRACKER_*) first, then explicit non-None overrides."""
        s = cls(redis_url=os.environ.get("TRACKER_REDIS_URL") or None,
                prefix=os.environ.get("TRACKER_PREFIX") or "tracker",
                partitions=_env_int("TRACKER_PARTITIONS"),
                ttl=_env_int("TRACKER_TTL"),
                grace=_default(_env_int("TRACKER_GRACE"), 300))
        if os.environ.get("TRACKER_DATA_DIR"):
            s.data_dir = Path(os.environ["TRACKER_DATA_DIR"])
        for k, v in overrides.items():
            if v is not None:
                setattr(s, k, v)
        s.validate()
        return s

    def validate(self) -> None:
        if not PREFIX_RE.fullmatch(self.prefix or ""):
            raise ConfigError(f"prefix: use 1-64 letters, digits, '_', '.' or '-', "
                              f"got {self.prefix!r}")
        if self.partitions is not None and not 1 <= self.partitions <= MAX_PARTITIONS:
            raise ConfigError(f"partitions: expected 1..{MAX_PARTITIONS}, got {self.partitions}")
        if self.ttl is not None and not 1 <= self.ttl <= 10**7:
            raise ConfigError(f"ttl: expected 1..10000000 seconds, got {self.ttl}")
        if not 0 <= self.grace <= 10**7:
            raise ConfigError(f"grace: expected 0..10000000 seconds, got {self.grace}")
        if self.redis_url is not None and not re.match(r"(rediss?|unix)://", self.redis_url):
            raise ConfigError(f"redis-url: expected redis://, rediss:// or unix://, "
                              f"got {redact(self.redis_url)!r}")

    def where(self) -> str:
        return redact(self.redis_url) if self.redis_url else f"embedded Redis in {self.data_dir}"


def connection_options(socket_timeout: Optional[float], retry_class=Retry) -> dict:
    """Timeouts and retry policy shared by the sync and the asyncio clients."""
    return dict(socket_timeout=socket_timeout, socket_connect_timeout=5,
                retry=retry_class(ExponentialBackoff(cap=1.0, base=0.05), 3),
                retry_on_error=[redis.ConnectionError, redis.TimeoutError])


def bad_url(settings: Settings, err: ValueError) -> ConfigError:
    return ConfigError(f"redis-url: {err}".replace(settings.redis_url, redact(settings.redis_url)))


def client_for(settings: Settings, socket_timeout: Optional[float] = 10.0) -> redis.Redis:
    """A redis-py client for the settings (starting the embedded server if needed)."""
    common = connection_options(socket_timeout)
    if settings.redis_url:
        try:
            return redis.Redis.from_url(settings.redis_url, **common)
        except ValueError as e:
            raise bad_url(settings, e) from None
    sock = embedded.ensure(settings.data_dir)
    return redis.Redis(unix_socket_path=str(sock), **common)


def unavailable(settings: Settings, err: Exception) -> RedisUnavailable:
    text = str(err)
    if settings.redis_url:
        parts = urlsplit(settings.redis_url)
        if parts.password:
            text = text.replace(parts.password, "***")
    if isinstance(err, redis.exceptions.NoPermissionError) or text.startswith("NOPERM"):
        return RedisUnavailable(f"the Redis user at {settings.where()} lacks a permission: {text}. "
                                "See the README's least-privilege section.")
    text = text.rstrip(".")
    if isinstance(err, (redis.ConnectionError, redis.TimeoutError)):
        return RedisUnavailable(f"cannot use Redis at {settings.where()}: {text}. Is it running? "
                                "Set --redis-url or TRACKER_REDIS_URL.")
    return RedisUnavailable(f"Redis at {settings.where()} answered an error: {text}")


class Deployment:
    """One tracker installation: client, prefix, partitions, TTL, scripts."""

    def __init__(self, client: redis.Redis, settings: Settings, partitions: int,
                 ttl: Optional[int] = None):
        self.client = client
        self.settings = settings
        self.prefix = settings.prefix
        self.partitions = partitions
        self.ttl = ttl or settings.ttl or DEFAULT_TTL
        self.ttl_ms = self.ttl * 1000
        self.grace_ms = settings.grace * 1000
        self.scripts = Scripts(client)

    @classmethod
    def open(cls, settings: Optional[Settings] = None, client: Optional[redis.Redis] = None,
             check_version: bool = True, **overrides) -> "Deployment":
        settings = settings or Settings.from_env(**overrides)
        client = client or client_for(settings)
        try:
            if check_version:
                version = client.info("server").get("redis_version", "0")
                if tuple(int(x) for x in re.findall(r"\d+", str(version))[:2]) < (6, 2):
                    raise ConfigError(f"Redis {version} at {settings.where()} is too old: "
                                      "tracker needs 6.2 or newer")
            partitions, ttl = cls._agree(client, settings)
        except redis.AuthenticationError as e:
            raise RedisUnavailable(f"Redis at {settings.where()} refused the credentials: "
                                   f"{e}") from e
        except redis.RedisError as e:
            raise unavailable(settings, e) from e
        return cls(client, settings, partitions, ttl)

    @staticmethod
    def _agree(client: redis.Redis, settings: Settings) -> tuple[int, int]:
        """Partition count and TTL, fixed in the config hash by the first process, so every
        projector, replay and verify folds alike (one round trip when already set)."""
        key = keys.config(settings.prefix)
        stored = client.hmget(key, "partitions", "ttl")
        if None in stored:
            pipe = client.pipeline(transaction=False)
            pipe.hsetnx(key, "partitions", settings.partitions or DEFAULT_PARTITIONS)
            pipe.hsetnx(key, "ttl", settings.ttl or DEFAULT_TTL)
            pipe.hmget(key, "partitions", "ttl")
            stored = pipe.execute()[-1]
        n, ttl = int(stored[0]), int(stored[1])
        for name, mine, theirs in (("partitions", settings.partitions, n),
                                   ("ttl", settings.ttl, ttl)):
            if mine is not None and mine != theirs:
                raise ConfigError(f"{name}: this deployment (prefix {settings.prefix!r}) uses "
                                  f"{theirs}, fixed when it was first used (all processes must "
                                  f"fold alike); drop --{name} or use another --prefix")
        return n, ttl

    def partition(self, jid: str) -> int:
        return keys.partition_of(jid, self.partitions)

    def stream(self, jid: str) -> str:
        return keys.stream(self.prefix, self.partition(jid))

    def close(self) -> None:
        self.client.close()
