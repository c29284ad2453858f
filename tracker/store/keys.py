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


def fence(prefix: str, partition: int) -> str:
    """A key no command ever writes, declared by every script call of the partition.

    On Redis Cluster, while the partition's slot migrates, Redis refuses a script whose
    declared keys are partly on each node (or, with one missing, on the source) with
    TRYAGAIN; the fence, always missing, makes that true of every call, so a script
    never runs on half a partition (its undeclared keys, built in Lua, would read as
    absent or land on the wrong node). The caller retries until the slot has moved.
    """
    return f"{tag(prefix, partition)}:fence"


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
    return zlib.crc32(jid.encode("utf-8", "surrogatepass")) % partitions


# ------------------------------------------------------------- replay, history
# Lua derives the first three of these from snapshot_prefix() with the same rules
# (tracker/store/lua/snapshot.lua, Snap.keys); tests/test_replay.py checks they agree.

def meta(prefix: str, partition: int) -> str:
    """Hash of per-partition settings the scripts read: ``gen`` (snapshot
    generation, absent = 0) and ``retention`` (ms, for history index expiry)."""
    return f"{tag(prefix, partition)}:meta"


def snapshot_prefix_gen(prefix: str, partition: int, gen: int) -> str:
    """Snapshot key prefix of generation ``gen``; generation 0 is today's name.

    ``{p}:t:`` and ``{p}:t<g>:`` can never share a key (the character after
    ``t`` differs), whatever the JID holds.
    """
    if gen == 0:
        return snapshot_prefix(prefix, partition)
    return f"{tag(prefix, partition)}:t{gen}:"


def history_prefix(prefix: str, partition: int) -> str:
    """Per-job history index keys are this prefix plus the JID."""
    return f"{tag(prefix, partition)}:h:"


def history(prefix: str, partition: int, jid: str) -> str:
    """String of packed 10-byte entry IDs (6 bytes ms, 4 bytes seq, big-endian)."""
    return history_prefix(prefix, partition) + jid


def replay_state(prefix: str, partition: int) -> str:
    """Hash of a rebuild in progress (new gen, position); its lock, with a TTL."""
    return f"{tag(prefix, partition)}:replay"


def replay_held(prefix: str, partition: int) -> str:
    """Sorted set (score = expires_at) of rebuilt tracks kept alive past expiry
    while the rebuild still folds older entries; settled at the switch."""
    return f"{tag(prefix, partition)}:replay:held"


def replay_partial(prefix: str, partition: int) -> str:
    """Set of JIDs whose first events were trimmed: the rebuild keeps their live snapshot."""
    return f"{tag(prefix, partition)}:replay:partial"


def state_index_prefix(prefix: str, partition: int, gen: int = 0) -> str:
    """State index keys of generation ``gen`` are this prefix plus the state (Lua derives
    it from the snapshot prefix: snapshot.lua Snap.index). ``{p}:s:`` can meet no other
    key: ``{p}:stats`` has no ``:`` after its ``s``."""
    return f"{tag(prefix, partition)}:s{gen or ''}:"


def state_index(prefix: str, partition: int, state: str, gen: int = 0) -> str:
    """Sorted set of the tracks in ``state`` (score: updated_at ms; member: the JID),
    kept by the projector in the same step as the snapshots, for listing by state."""
    return state_index_prefix(prefix, partition, gen) + state


# ------------------------------------------------------------------- proxy
def fetched(prefix: str, partition: int, jid: str) -> str:
    """String ``"<retry> <retry_count at its next failure>"`` that ``tracker serve
    --upstream`` keeps for a tracked job it saw fetched, with the reservation as TTL,
    so an ACK or FAIL on any connection of any proxy process knows what to publish."""
    return f"{tag(prefix, partition)}:f:{jid}"
