"""The stored value of a job and where it lives: the Python twin of ``lua/packed.lua``.

The scripts write and read values in Lua (that file's header has the exact format); this
module decodes and encodes the very same bytes for ``tracker replay --verify``, tests and
diagnostics, and finds a job's bucket as the scripts do. ``tests/test_packed.py`` checks
the two codecs against each other on random values.

Why one packed value per job, many per hash: a Redis key costs ~70-100 bytes before its
data, more than a job's snapshot and history together (~40 bytes packed). Buckets of up
to ~128 fields with values of at most 64 bytes stay listpacks (ziplists on Redis 6.2),
where a field costs its bytes plus 2-3.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple, Optional

from projections.track import STATES, Track
from tracker.store import cluster, keys

CAP = 64  # P.CAP: the longest field or value kept in a bucket
ALPHA = 40  # P.ALPHA: mean fields per bucket before a split
B0 = 1  # P.B0: buckets of a new generation 0
STUB = b"\x80"
SEQ_MAX = 2**32 - 1
_CODE = {s: i for i, s in enumerate(STATES) if i}

Entry = tuple[int, int]  # (ms, seq) of a log entry ID


class Value(NamedTuple):
    track: Optional[Track]  # None: a history-only value
    entries: list[Entry]  # the history index, newest first


def varint(n: int) -> bytes:
    n = max(n, 0)
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _rvar(b: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        c = b[i]
        i += 1
        n |= (c & 0x7F) << shift
        if c < 0x80:
            return n, i
        shift += 7


def head(track: Optional[Track], newest_ms: int = 0) -> bytes:
    """H T [tail] of ``track``, or of a history-only value whose newest entry is at ``newest_ms``."""
    if track is None:
        return b"\0" + (newest_ms % 2**48).to_bytes(6, "big")
    t, r = track, track.reserved_until
    h = _CODE[t.state] | (8 if t.percent is not None else 0) | (16 if t.desc is not None else 0) \
        | (32 if r > 0 else 0) | (64 if t.queue is not None else 0)
    out = bytearray([h]) + (t.updated_at % 2**48).to_bytes(6, "big")
    out += varint(t.expires_at - max(t.updated_at, r))
    if r > 0:
        dr = r - t.updated_at
        out += varint(2 * dr if dr >= 0 else -2 * dr - 1)
    if t.percent is not None:
        out.append(t.percent)
    for text in (t.desc, t.queue):
        if text is not None:
            raw = text.encode("utf-8", "surrogateescape")
            out += varint(len(raw)) + raw
    return bytes(out)


def encode(track: Optional[Track], entries: Sequence[Entry]) -> bytes:
    """A job's value: its snapshot (None: history only, then ``entries`` must not be empty)
    and its history, ``entries`` newest first."""
    out = bytearray(head(track, entries[0][0] if track is None else 0))
    prev = entries[0][0] if track is None else track.updated_at
    for ms, seq in entries:
        out += varint(prev - ms) + varint(min(seq, SEQ_MAX))
        prev = ms
    return bytes(out)


def decode(v: bytes) -> Value:
    """The snapshot and history of a value; ValueError for bytes tracker did not write."""
    try:
        return _decode(v)
    except (IndexError, UnicodeDecodeError) as e:
        raise ValueError(f"not a packed value: {v[:16]!r}") from e


def snapshot(v: bytes) -> Optional[Track]:
    """The snapshot alone (None: a history-only value), skipping the history: what a read
    needs (tracker.store.direct). ValueError for bytes tracker did not write."""
    try:
        return _snapshot(v)[0]
    except (IndexError, UnicodeDecodeError) as e:
        raise ValueError(f"not a packed value: {v[:16]!r}") from e


def _snapshot(v: bytes) -> tuple[Optional[Track], int, int]:
    """(track or None, offset of the history, T)."""
    h = v[0]
    if len(v) < 7 or h >= 128 or h % 8 > 5 or (h % 8 == 0 and h):
        raise ValueError(f"not a packed value: {v[:16]!r}")
    T = int.from_bytes(v[1:7], "big")
    if not h % 8:
        return None, 7, T
    xd, i = _rvar(v, 7)
    r = 0
    if h & 32:
        rd, i = _rvar(v, i)
        r = T + (rd // 2 if rd % 2 == 0 else -(rd + 1) // 2)
    percent = None
    if h & 8:
        percent = v[i]
        i += 1
    texts: list[Optional[str]] = []
    for bit in (16, 64):
        if h & bit:
            n, i = _rvar(v, i)
            if i + n > len(v):
                raise ValueError(f"not a packed value: {v[:16]!r}")
            texts.append(v[i:i + n].decode("utf-8", "surrogateescape"))
            i += n
        else:
            texts.append(None)
    desc, queue = texts
    return Track(state=STATES[h % 8], updated_at=T, expires_at=max(T, r) + xd,
                 reserved_until=r, percent=percent, desc=desc, queue=queue), i, T


def _decode(v: bytes) -> Value:
    track, i, prev = _snapshot(v)
    entries = []
    while i < len(v):
        md, i = _rvar(v, i)
        seq, i = _rvar(v, i)
        prev -= md
        entries.append((prev, seq))
    return Value(track, entries)


def expiry(v: bytes, grace_ms: int, retention_ms: int) -> int:
    """When the value is dead: snapshot expired for good and history past retention."""
    track, entries = decode(v)
    e = track.expires_at + grace_ms if track is not None else 0
    return max(e, entries[0][0] + retention_ms) if entries else e


def entry_id(e: Entry) -> str:
    return f"{e[0]}-{e[1]}"


def parse_id(eid: str) -> Entry:
    ms, seq = eid.split("-")
    return int(ms), min(int(seq), SEQ_MAX)


# ------------------------------------------------------------------------- where


def bucket_hash(jid: str) -> int:
    """The first 32 bits of SHA-1 of the JID (Lua: redis.sha1hex)."""
    return int.from_bytes(hashlib.sha1(jid.encode("utf-8", "surrogatepass")).digest()[:4], "big")


class Geometry(NamedTuple):
    """A generation's buckets: b0 * 2**level of them, the first ``split`` split in two."""

    gen: int = 0
    b0: int = B0
    level: int = 0
    split: int = 0

    @classmethod
    def parse(cls, text: Optional[bytes | str]) -> Geometry:
        if not text:
            return cls()
        raw = text.decode() if isinstance(text, bytes) else text
        return cls(*(int(x) for x in raw.split(":")))

    def text(self) -> str:
        return f"{self.gen}:{self.b0}:{self.level}:{self.split}"

    def buckets(self) -> int:
        return self.b0 * 2**self.level + self.split

    def address(self, jid: str) -> int:
        n = self.b0 * 2**self.level
        h = bucket_hash(jid)
        return h % (2 * n) if h % n < self.split else h % n


def geometry(client, prefix: str, part: int) -> Geometry:
    """The live generation of a partition and its geometry."""
    return Geometry.parse(client.hget(keys.meta(prefix, part), "geo"))


def read_value(client, prefix: str, part: int, jid: str,
               geo: Optional[Geometry] = None) -> Optional[bytes]:
    """One job's raw value in the live generation (or ``geo``'s), as the scripts find it."""
    g = geo or geometry(client, prefix, part)
    if len(jid.encode()) <= CAP:
        v = client.hget(keys.bucket(prefix, part, g.gen, g.address(jid)), jid)
        if v != STUB:
            return v
    return client.get(keys.overflow(prefix, part, g.gen, jid))


def _scan(client, prefix: str) -> Iterator[bytes]:
    """The keys starting with ``prefix`` (one partition's: on a cluster, one node's)."""
    pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
    return cluster.scan_keys(client, pattern, prefix)


def read_all(client, prefix: str, part: int,
             geo: Optional[Geometry] = None) -> tuple[Geometry, dict[str, bytes]]:
    """Every job's raw value of a partition's live generation (or ``geo``'s), by JID: the
    buckets' fields with stubs followed, and the overflow strings of long JIDs."""
    g = geo or geometry(client, prefix, part)
    out: dict[str, bytes] = {}
    stubs = []
    bpre = keys.bucket_prefix(prefix, part, g.gen)
    for key in _scan(client, bpre):
        if not key[len(bpre):].isdigit():
            continue
        for f, v in client.hgetall(key).items():
            jid = f.decode("utf-8", "surrogateescape")
            if v == STUB:
                stubs.append(jid)
            else:
                out[jid] = v
    vpre = keys.overflow_prefix(prefix, part, g.gen)
    for key in _scan(client, vpre):
        jid = key[len(vpre):].decode("utf-8", "surrogateescape")
        if len(jid.encode()) > CAP:
            v = client.get(key)
            if v is not None:
                out[jid] = v
    for jid in stubs:
        v = client.get(keys.overflow(prefix, part, g.gen, jid))
        if v is not None:
            out[jid] = v
    return g, out
