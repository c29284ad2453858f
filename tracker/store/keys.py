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
    """The partition's job keys of generation 0 start with this (``{p}:b:``); every script
    takes it and derives the rest (tracker/store/lua/snapshot.lua, Snap.store)."""
    return bucket_prefix(prefix, partition, 0)


def bucket_prefix(prefix: str, partition: int, gen: int = 0) -> str:
    """Bucket hashes of generation ``gen`` are this prefix plus the bucket number. A bucket
    holds many jobs, one field each (the JID), the value being the job's snapshot and
    history index packed (tracker/store/packed.py). ``{p}:b:`` and ``{p}:b<g>:`` can never
    share a key (the character after ``b`` differs) and bucket numbers are decimal."""
    return f"{tag(prefix, partition)}:b{gen or ''}:"


def bucket(prefix: str, partition: int, gen: int, n: int) -> str:
    return f"{bucket_prefix(prefix, partition, gen)}{n}"


def overflow_prefix(prefix: str, partition: int, gen: int = 0) -> str:
    """Overflow strings are this prefix plus the JID: the packed value of a job whose value
    (or JID) is too long for a bucket to stay a listpack; the bucket holds a 1-byte stub."""
    return f"{tag(prefix, partition)}:v{gen or ''}:"


def overflow(prefix: str, partition: int, gen: int, jid: str) -> str:
    return overflow_prefix(prefix, partition, gen) + jid


def legacy_prefixes(prefix: str, partition: int, gen: int) -> tuple[str, ...]:
    """Key prefixes of the layout before buckets (a snapshot hash ``{p}:t<g>:<jid>`` and a
    history string ``{p}:h:<jid>`` per job): a rebuild unlinks them with its old generation."""
    return f"{tag(prefix, partition)}:t{gen or ''}:", f"{tag(prefix, partition)}:h:"


def partition_of(jid: str, partitions: int) -> int:
    """Stable across processes, languages and Python versions (CRC-32)."""
    if partitions == 1:
        return 0
    return zlib.crc32(jid.encode("utf-8", "surrogatepass")) % partitions


# ------------------------------------------------------------- replay, history
# Lua derives these from snapshot_prefix() with the same rules (tracker/store/lua/snapshot.lua,
# Snap.store); tests/test_replay.py checks they agree.

def meta(prefix: str, partition: int) -> str:
    """Hash of per-partition state the scripts read: ``geo`` (the live generation and its
    bucket geometry, ``gen:b0:level:split``; absent = generation 0 with one bucket),
    ``n`` (fields in its buckets), ``pos``
    (the newest entry folded), ``retention`` (ms, for the history's visibility) and ``sw``
    (the sweep's next bucket)."""
    return f"{tag(prefix, partition)}:meta"


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
    it: snapshot.lua Snap.store). ``{p}:s:`` can meet no other key: ``{p}:stats`` has no
    ``:`` after its ``s``."""
    return f"{tag(prefix, partition)}:s{gen or ''}:"


def state_index(prefix: str, partition: int, state: str, gen: int = 0) -> str:
    """The index of the tracks in ``state``, kept by the projector in the same step as the
    snapshots, for listing by state: this key is its directory, a sorted set of pages
    (member and score: the lowest update time a page holds), and ``state_page`` the pages,
    sorted sets of JIDs by updated_at ms (tracker/store/lua/index.lua)."""
    return state_index_prefix(prefix, partition, gen) + state


# ------------------------------------------------------------------- proxy
def fetched(prefix: str, partition: int, jid: str) -> str:
    """String ``"<retry> <retry_count at its next failure>"`` that ``tracker serve
    --upstream`` keeps for a tracked job it saw fetched, with the reservation as TTL,
    so an ACK or FAIL on any connection of any proxy process knows what to publish."""
    return f"{tag(prefix, partition)}:f:{jid}"


def state_page(prefix: str, partition: int, state: str, lo: int, gen: int = 0) -> str:
    return f"{state_index(prefix, partition, state, gen)}:{lo}"
