"""Every Redis key tracker uses is built here, and only here.

All keys of partition ``p`` start with the hash tag ``{<prefix>:<p>}``, so a
Redis Cluster keeps a partition's stream, snapshots, dead letters and stats in
one slot and a Lua script may touch them together. No command ever names keys
of two partitions. The only key outside a partition is the deployment's config
hash, read and written on its own.
"""

from __future__ import annotations

import zlib

GROUP = "projector"  # the consumer group every projector process joins


def config(prefix: str) -> str:
    """Hash holding settings all processes must agree on (partition count)."""
    return f"{prefix}:config"


def tag(prefix: str, partition: int) -> str:
    return f"{{{prefix}:{partition}}}"


def stream(prefix: str, partition: int) -> str:
    """The partition's event log (the source of truth)."""
    return f"{tag(prefix, partition)}:log"


def dlq(prefix: str, partition: int) -> str:
    """Entries the fold refused, each with its reason and original fields."""
    return f"{tag(prefix, partition)}:dlq"


def stats(prefix: str, partition: int) -> str:
    """Counters the projector keeps per partition (applied, dead-lettered)."""
    return f"{tag(prefix, partition)}:stats"


def snapshot_prefix(prefix: str, partition: int) -> str:
    """Snapshot keys are this prefix plus the JID (Lua builds them from it)."""
    return f"{tag(prefix, partition)}:t:"


def snapshot(prefix: str, partition: int, jid: str) -> str:
    return snapshot_prefix(prefix, partition) + jid


def partition_of(jid: str, partitions: int) -> int:
    """Stable across processes, languages and Python versions (CRC-32)."""
    if partitions == 1:
        return 0
    return zlib.crc32(jid.encode()) % partitions
