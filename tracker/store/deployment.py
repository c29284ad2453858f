"""A ``Deployment``: one tracker installation, as every service sees it.

A Redis, a key prefix, a fixed partition count and TTL (stored in Redis the
first time, so every process folds alike), the scripts. Services take a
Deployment and never build clients or key names of their own.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from tracker.errors import ConfigError, ValidationError
from tracker.store import cluster, keys
from tracker.store.boundary import redis_errors
from tracker.store.connection import create_client
from tracker.store.settings import DEFAULT_CLUSTER_PARTITIONS, DEFAULT_PARTITIONS, DEFAULT_TTL, Settings


class Deployment:
    """One tracker installation: client, prefix, partitions, TTL.

    ``client`` is a ``redis.Redis`` or, on a Redis Cluster, a ``RedisCluster``
    (``tracker.store.cluster.ClusterClient``); services send the same commands to both.
    """

    def __init__(self, client: Any, settings: Settings, partitions: int,
                 ttl: Optional[int] = None):
        self.client = client
        self.settings = settings
        self.prefix = settings.prefix
        self.partitions = partitions
        self.ttl = ttl or settings.ttl or DEFAULT_TTL
        self.ttl_ms = self.ttl * 1000
        self.grace_ms = settings.grace * 1000

    @classmethod
    def open(cls, settings: Optional[Settings] = None, client: Any = None,
             check_version: bool = True, **overrides: Any) -> Deployment:
        settings = settings or Settings.from_env(**overrides)
        with redis_errors(settings):  # a cluster client connects as it is made
            client = client or create_client(settings)
            if check_version:
                version = client.info("server").get("redis_version", "0")
                if tuple(int(x) for x in re.findall(r"\d+", str(version))[:2]) < (6, 2):
                    raise ConfigError(f"Redis {version} at {settings.where()} is too old: "
                                      "tracker needs 6.2 or newer")
            partitions, ttl = cls._agree(client, settings)
        return cls(client, settings, partitions, ttl)

    @staticmethod
    def _agree(client: Any, settings: Settings) -> tuple[int, int]:
        """Partition count and TTL, fixed in the config hash by the first process, so every
        projector, replay and verify folds alike (one round trip when already set).
        A new deployment on a cluster gets more partitions, so they spread over the
        masters (see the README)."""
        key = keys.config(settings.prefix)
        stored = client.hmget(key, "partitions", "ttl")
        if None in stored:
            default = DEFAULT_CLUSTER_PARTITIONS if cluster.is_cluster(client) else \
                DEFAULT_PARTITIONS
            pipe = client.pipeline(transaction=False)
            pipe.hsetnx(key, "partitions", settings.partitions or default)
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

    @property
    def cluster(self) -> bool:
        """True on a Redis Cluster."""
        return cluster.is_cluster(self.client)

    def node_of(self, partition: int) -> Optional[str]:
        """``host:port`` of the master serving the partition (None on single Redis)."""
        return cluster.node_name(self.client, keys.stream(self.prefix, partition))

    def errors(self):
        """``with d.errors(): ...``: Redis errors become TrackerErrors (see boundary)."""
        return redis_errors(self.settings)

    def partition(self, jid: str) -> int:
        return keys.partition_of(jid, self.partitions)

    def stream(self, jid: str) -> str:
        return keys.stream(self.prefix, self.partition(jid))

    def partition_list(self, partition: Optional[int] = None) -> list[int]:
        """Every partition, or just ``partition`` after checking it exists."""
        if partition is None:
            return list(range(self.partitions))
        if not 0 <= partition < self.partitions:
            raise ValidationError("partition", f"expected 0..{self.partitions - 1}, "
                                               f"got {partition}")
        return [partition]

    def close(self) -> None:
        self.client.close()
