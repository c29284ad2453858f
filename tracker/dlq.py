"""The dead-letter streams: list, retry and purge what the fold refused.

``project.lua`` moves an entry it cannot decode to its partition's ``{prefix:p}:dlq``
with fields ``id`` (the original entry ID), ``reason``, then the original fields in
their order. The original fields may themselves be called ``id`` or ``reason`` (anyone
with XADD rights writes the log), so entries are parsed by position, never as a dict:
the raw XRANGE reply is read with redis-py's dict conversion switched off.

A retry re-appends the original fields to the same partition's log (after the fix
that makes them valid) and deletes the dead letter, both in one MULTI on one hash
slot, so an entry is never in both places or in neither.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Optional

import redis

from tracker import events
from tracker.errors import ValidationError
from tracker.store import cluster, keys, scripts, streams
from tracker.store.deployment import Deployment


@dataclass
class DeadLetter:
    partition: int
    dlq_id: str  # the dead letter's own ID in {prefix:p}:dlq
    original_id: str  # the refused entry's ID in {prefix:p}:log
    reason: str
    fields: list[tuple[bytes, bytes]]  # the original fields, in order

    @property
    def ref(self) -> str:
        """Unique across partitions: ``P/ID``."""
        return f"{self.partition}/{self.dlq_id}"

    def as_dict(self) -> dict:
        return {"partition": self.partition, "id": self.dlq_id, "ref": self.ref,
                "original_id": self.original_id, "reason": self.reason,
                "fields": [[_show(k), _show(v)] for k, v in self.fields]}

    def still_poison(self) -> Optional[str]:
        """The reason it would be refused again today, or None if it now decodes."""
        try:
            events.decode_entry(dict(self.fields))
        except events.PoisonEntry as e:
            return e.reason
        return None


_LUA_FIELD = re.compile(r'"([A-Za-z0-9_]*)": ')


def _reason(text: str) -> str:
    """A dead letter's reason as every command shows it: project.lua names a field by its
    stream key, quoted (``"p": not a non-negative integer``); say ``percent: ...`` as the
    rest of tracker does."""
    m = _LUA_FIELD.match(text)
    if m:
        text = events.FIELD_NAMES.get(m.group(1), m.group(1)) + ": " + text[m.end():]
    return text


def _show(b: bytes) -> str:
    """Bytes for display: UTF-8 where valid, backslash escapes elsewhere, at most 200 chars."""
    text = b.decode("utf-8", "backslashreplace")
    return text if len(text) <= 200 else text[:197] + "..."


def _raw(client: redis.Redis, key: str) -> redis.Redis:
    """A client on the same pool whose XRANGE replies stay flat lists (on a Redis
    Cluster, the pool of the master serving ``key``)."""
    if cluster.is_cluster(client):
        client = client.get_redis_connection(client.get_node_from_key(key))
    raw = redis.Redis(connection_pool=client.connection_pool)
    raw.set_response_callback("XRANGE", lambda r, **kw: r)
    return raw


def _parse(partition: int, entry) -> DeadLetter:
    dlq_id, flat = entry
    pairs = [(flat[i], flat[i + 1]) for i in range(0, len(flat) - 1, 2)]
    meta = {}
    for name in (b"id", b"reason"):  # written first, in this order, by project.lua
        if pairs and pairs[0][0] == name:
            meta[name] = pairs.pop(0)[1]
    return DeadLetter(partition, dlq_id.decode(), meta.get(b"id", b"").decode(errors="replace"),
                      _reason(meta.get(b"reason", b"").decode(errors="replace")), pairs)


def _split(ref: str, d: Deployment) -> tuple[Optional[int], str]:
    """``ID`` or ``P/ID`` (DLQ IDs are per partition, so two partitions may share one)."""
    part, slash, i = ref.rpartition("/")
    head, _, seq = i.partition("-")
    if not (head.isdigit() and (seq == "" or seq.isdigit()) and len(i) <= 41) or (
            slash and not (part.isdigit() and len(part) <= 6)):
        raise ValidationError("id", f"expected a dead letter ID like 1700000000000-0 or "
                                    f"P/1700000000000-0, got {ref[:60]!r}")
    if slash and int(part) >= d.partitions:
        raise ValidationError("id", f"{ref[:60]!r}: partition {int(part)} does not exist (this "
                                    f"deployment has partitions 0..{d.partitions - 1})")
    return (int(part) if slash else None), i


def list_dead(d: Deployment, partition: Optional[int] = None, ids: Iterable[str] = (),
              limit: Optional[int] = None) -> list[DeadLetter]:
    """Dead letters, oldest first per partition; ``ids`` (ID or P/ID) keeps only those."""
    wanted = [_split(r, d) for r in ids]
    out: list[DeadLetter] = []
    with d.errors():
        for p in d.partition_list(partition):
            key = keys.dlq(d.prefix, p)
            raw = _raw(d.client, key)
            if wanted:
                for i in sorted({i for part, i in wanted if part in (None, p)}):
                    out.extend(_parse(p, e) for e in raw.xrange(key, i, i))
                continue
            left = None if limit is None else limit - len(out)
            for page in streams.pages(raw, key, count=1000, limit=left):
                out.extend(_parse(p, e) for e in page)
            if limit is not None and len(out) >= limit:
                return out[:limit]
    return out


@dataclass
class Retried:
    """What ``retry`` did, per dead letter (referred to as P/ID)."""

    retried: list[tuple[str, str]] = field(default_factory=list)  # (P/ID, new log entry ID)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (P/ID, why still refused)
    missing: list[str] = field(default_factory=list)  # IDs not found (or moved by another retry)


def retry(d: Deployment, ids: Iterable[str] = (), partition: Optional[int] = None,
          force: bool = False) -> Retried:
    """Re-append dead letters to their partition's log and delete them from the DLQ.

    With no ``ids``, all of them. An entry that would still be refused stays in the
    DLQ (listed under ``skipped`` with its reason, worded as ``dlq list`` words it)
    unless ``force``.
    """
    ids = list(ids)
    letters = list_dead(d, partition, ids)
    for ref in ids:
        part, i = _split(ref, d)
        where = [dl.partition for dl in letters if dl.dlq_id == i]
        if part is None and len(where) > 1:
            raise ValidationError("id", f"{i} is a dead letter in partitions "
                                        f"{', '.join(map(str, where))}: say which, as P/{i}")
    found = {dl.dlq_id for dl in letters} | {dl.ref for dl in letters}
    result = Retried(missing=[i for i in ids if i not in found])
    with d.errors():
        for dl in letters:
            today = None if force else dl.still_poison()
            if today is not None:
                result.skipped.append((dl.ref, dl.reason or today))
                continue
            # A repeated field collapses to its last value: what both decoders read.
            flat = [x for pair in dict(dl.fields).items() for x in pair]
            new_id = scripts.call(
                d.client, "dlq_retry",
                [keys.stream(d.prefix, dl.partition), keys.dlq(d.prefix, dl.partition),
                 keys.fence(d.prefix, dl.partition)],
                [dl.dlq_id, *flat])
            if new_id is None:  # another retry moved it first
                result.missing.append(dl.ref)
                continue
            result.retried.append((dl.ref, new_id.decode()))
    return result


def purge(d: Deployment, partition: Optional[int] = None) -> int:
    """Delete the dead-letter streams; returns how many dead letters were dropped."""
    dropped = 0
    with d.errors():
        for p in d.partition_list(partition):
            key = keys.dlq(d.prefix, p)
            pipe = d.client.pipeline(transaction=True)
            pipe.xlen(key)
            pipe.delete(key)
            n, _ = pipe.execute()
            dropped += n
    return dropped


def count(d: Deployment) -> int:
    with d.errors():
        pipe = d.client.pipeline(transaction=False)
        for p in range(d.partitions):
            pipe.xlen(keys.dlq(d.prefix, p))
        return sum(pipe.execute())
