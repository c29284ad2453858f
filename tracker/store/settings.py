"""Settings: the one object every connection, sync or asyncio, is built from.

As arq's ``RedisSettings`` does, one value says where Redis is and how to talk
to it; ``tracker.store.connection`` turns it into clients. ``from_env`` reads
the ``TRACKER_*`` variables the CLI documents, then explicit overrides.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit, urlunsplit

from tracker.errors import ConfigError
from tracker.store import embedded

DEFAULT_PARTITIONS = 4
DEFAULT_CLUSTER_PARTITIONS = 64  # a Redis Cluster: >= 16 per master spreads them evenly (README)
DEFAULT_TTL = 1800
DEFAULT_GRACE = 300
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 5.0
READ_MODES = ("fold", "wait", "stale")  # see tracker/freshness.py
MAX_PARTITIONS = 1024
PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
URL_RE = re.compile(r"(rediss?(\+cluster)?|unix)://")


def redact(url: str) -> str:
    """The URL with any password replaced, fit for logs and errors (also a seed list,
    ``redis://user:pw@h1:7000,h2:7001``, whose netloc urllib cannot give a port)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    creds, at, hosts = parts.netloc.rpartition("@")
    if not at or ":" not in creds:
        return url
    user = creds.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))


def hide_password(url: Optional[str], text: str) -> str:
    """``text`` with the URL's password (if any) replaced by ``***``."""
    if url:
        try:
            password = urlsplit(url).password
        except ValueError:
            password = None
        if password:
            text = text.replace(password, "***")
    return text


def env_int(name: str) -> Optional[int]:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a whole number, got {raw!r}") from None


def env_seconds(name: str) -> Optional[float]:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return None
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a number of seconds, got {raw!r}") from None


def _or(value: Optional[float], default: float) -> float:
    return default if value is None else value


@dataclass
class Settings:
    redis_url: Optional[str] = None  # None: the embedded Redis under data_dir
    data_dir: Path = field(default_factory=embedded.default_data_dir)
    prefix: str = "tracker"
    partitions: Optional[int] = None  # None: whatever Redis holds, else DEFAULT_PARTITIONS
    ttl: Optional[int] = None  # seconds a track outlives its last update / reservation;
    # None: whatever the deployment holds, else DEFAULT_TTL (a fold parameter, so stored)
    grace: int = DEFAULT_GRACE  # seconds a snapshot key outlives its logical expiry
    # Seconds to establish a connection: TCP connect, TLS handshake and Redis's handshake
    # (HELLO/AUTH) each. A peer that does not answer fails once, fast, instead of waiting
    # out the read timeout on every retry.
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    read: str = "fold"  # how reads reach the log's tip: fold | wait | stale (freshness.py)
    read_timeout: float = DEFAULT_READ_TIMEOUT  # seconds a read may wait on a stalled fold
    # Redis Cluster: how long a call keeps retrying through a failover or a slot move
    # (connection lost, CLUSTERDOWN, TRYAGAIN) before the error reaches the caller.
    retry_deadline: float = 10.0
    # Durable publish: each append waits (WAIT, on the connection that sent it) until this
    # many replicas have it, else the call fails naming the setting (0: do not wait).
    durable_replicas: int = 0
    durable_timeout: float = 1.0  # seconds WAIT may take

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Environment (TRACKER_*) first, then explicit non-None overrides."""
        grace = env_int("TRACKER_GRACE")
        connect_timeout = env_seconds("TRACKER_CONNECT_TIMEOUT")
        read_timeout = env_seconds("TRACKER_READ_TIMEOUT")
        s = cls(redis_url=os.environ.get("TRACKER_REDIS_URL") or None,
                prefix=os.environ.get("TRACKER_PREFIX") or "tracker",
                partitions=env_int("TRACKER_PARTITIONS"),
                ttl=env_int("TRACKER_TTL"),
                grace=DEFAULT_GRACE if grace is None else grace,
                connect_timeout=(DEFAULT_CONNECT_TIMEOUT if connect_timeout is None
                                 else connect_timeout),
                read=os.environ.get("TRACKER_READ") or "fold",
                read_timeout=(DEFAULT_READ_TIMEOUT if read_timeout is None else read_timeout),
                retry_deadline=_or(env_seconds("TRACKER_RETRY_DEADLINE"), 10.0),
                durable_replicas=env_int("TRACKER_DURABLE_REPLICAS") or 0,
                durable_timeout=_or(env_seconds("TRACKER_DURABLE_TIMEOUT"), 1.0))
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
        if not 0 < self.connect_timeout <= 600:
            raise ConfigError(f"connect-timeout: expected more than 0 and at most 600 seconds, "
                              f"got {self.connect_timeout:g}")
        if self.read not in READ_MODES:
            raise ConfigError(f"read: expected one of {', '.join(READ_MODES)}, got {self.read!r}")
        if not 0 < self.read_timeout <= 3600:
            raise ConfigError(f"read-timeout: expected 0..3600 seconds, got {self.read_timeout}")
        if not 0 < self.retry_deadline <= 3600:
            raise ConfigError(f"retry-deadline: expected 0..3600 seconds, got {self.retry_deadline}")
        if not 0 <= self.durable_replicas <= 100:
            raise ConfigError(f"durable-replicas (TRACKER_DURABLE_REPLICAS): expected 0..100, "
                              f"got {self.durable_replicas}")
        if not 0 < self.durable_timeout <= 3600:
            raise ConfigError(f"durable-timeout: expected 0..3600 seconds, got {self.durable_timeout}")
        if self.redis_url is not None and not URL_RE.match(self.redis_url):
            raise ConfigError(f"redis-url: expected redis://, rediss://, redis+cluster://, "
                              f"rediss+cluster:// or unix://, got {redact(self.redis_url)!r}")

    def where(self) -> str:
        return redact(self.redis_url) if self.redis_url else f"embedded Redis in {self.data_dir}"
