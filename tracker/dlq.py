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

from dataclasses import dataclass
from typing import Iterable, Optional

import redis

from tracker import events, keys
from tracker.config import Deployment, unavailable
from tracker.errors import ValidationError
from tracker.replay import partitions
from tracker.scripts import registered


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
        return {"partition": self.partition, "id": self.dlq_id, "ref": self.ref, "original_id": self.original_id,
                "reason": self.reason,
                "fields": [[_show(k), _show(v)] for k, v in self.fields]}

    def still_poison(self) -> Optional[str]:
        """The reason it would be refused again today, or None if it now decodes."""
        try:
            events.decode_entry(dict(self.fields))
        except events.PoisonEntry as e:
            return e.reason
        return None


def _show(b: bytes) -> str:
    """Bytes for display: UTF-8 where valid, backslash escapes elsewhere, at most 200 chars."""
    text = b.decode("utf-8", "backslashreplace")
    return text if len(text) <= 200 else text[:197] + "..."


def _raw(client: redis.Redis) -> redis.Redis:
    """A client on the same pool whose XRANGE replies stay flat lists."""
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
                      meta.get(b"reason", b"").decode(errors="replace"), pairs)


def _split(ref: str, d: Deployment) -> tuple[Optional[int], str]:
    """``ID`` or ``P/ID`` (DLQ IDs are per partition, so two partitions may share one)."""
    part, _, i = ref.rpartition("/")
    head, _, seq = i.partition("-")
    if not (head.isdigit() and (seq == "" or seq.isdigit()) and len(i) <= 41) or (
            part and not (part.isdigit() and int(part) < d.partitions)):
        raise ValidationError("id", f"expected a dead letter ID like 1700000000000-0 or "
                                    f"P/1700000000000-0, got {ref[:60]!r}")
    return (int(part) if part else None), i


def list_dead(d: Deployment, partition: Optional[int] = None, ids: Iterable[str] = (),
              limit: Optional[int] = None) -> list[DeadLetter]:
    """Dead letters, oldest first per partition; ``ids`` (ID or P/ID) keeps only those."""
    wanted = [_split(r, d) for r in ids]
    raw = _raw(d.client)
    out: list[DeadLetter] = []
    try:
        for p in partitions(d, partition):
            key = keys.dlq(d.prefix, p)
            if wanted:
                for i in sorted({i for part, i in wanted if part in (None, p)}):
                    out.extend(_parse(p, e) for e in raw.xrange(key, i, i))
                continue
            start = "-"
            while True:  # page through, so a huge DLQ is not one reply
                page = raw.xrange(key, start, "+", count=1000)
                out.extend(_parse(p, e) for e in page)
                if limit is not None and len(out) >= limit:
                    return out[:limit]
                if len(page) < 1000:
                    break
                start = "(" + page[-1][0].decode()
    except redis.RedisError as e:
        raise unavailable(d.settings, e) from e
    return out


def retry(d: Deployment, ids: Iterable[str] = (), partition: Optional[int] = None,
          force: bool = False) -> dict:
    """Re-append dead letters to their partition's log and delete them from the DLQ.

    With no ``ids``, all of them. An entry that would still be refused stays in the
    DLQ (listed under ``skipped`` with today's reason) unless ``force``.
    Returns {"retried": [(P/ID, new log id)], "skipped": [(P/ID, reason)],
    "missing": [ids not found]}.
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
    result = {"retried": [], "skipped": [], "missing": [i for i in ids if i not in found]}
    try:
        for dl in letters:
            reason = None if force else dl.still_poison()
            if reason is not None:
                result["skipped"].append((dl.ref, reason))
                continue
            # A repeated field collapses to its last value: what both decoders read.
            flat = [x for pair in dict(dl.fields).items() for x in pair]
            new_id = registered(d.client, "dlq_retry")(
                keys=[keys.stream(d.prefix, dl.partition), keys.dlq(d.prefix, dl.partition)],
                args=[dl.dlq_id, *flat])
            if new_id is None:  # another retry moved it first
                result["missing"].append(dl.ref)
                continue
            result["retried"].append((dl.ref, new_id.decode()))
    except redis.RedisError as e:
        raise unavailable(d.settings, e) from e
    return result


def purge(d: Deployment, partition: Optional[int] = None) -> int:
    """Delete the dead-letter streams; returns how many dead letters were dropped."""
    dropped = 0
    try:
        for p in partitions(d, partition):
            key = keys.dlq(d.prefix, p)
            pipe = d.client.pipeline(transaction=True)
            pipe.xlen(key)
            pipe.delete(key)
            n, _ = pipe.execute()
            dropped += n
    except redis.RedisError as e:
        raise unavailable(d.settings, e) from e
    return dropped


def count(d: Deployment) -> int:
    try:
        pipe = d.client.pipeline(transaction=False)
        for p in range(d.partitions):
            pipe.xlen(keys.dlq(d.prefix, p))
        return sum(pipe.execute())
    except redis.RedisError as e:
        raise unavailable(d.settings, e) from e
