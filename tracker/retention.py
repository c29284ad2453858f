"""Retention: trim the log by age without losing an entry a consumer still needs.

The rule (``tracker/store/lua/trim.lua``, one atomic step per partition): remove entries
older than now - retention, but never at or after any group's oldest pending entry
(a dead consumer's entries stay claimable), never after its last-delivered ID
(never-read entries), and never past a running rebuild's position. The retention
in force is stored (config hash and each partition's meta hash) when a trim sets
it, so the projector's periodic trim and the history indexes' expiry
(``snapshot.lua``) follow the same window.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

from tracker import events, times
from tracker.store import keys, scripts, streams
from tracker.store.deployment import Deployment

log = logging.getLogger("tracker.retention")

DEFAULT_MS = 7 * 86_400_000  # snapshot.lua Snap.DEFAULT_RETENTION
MIN_MS = 60_000


def parse_duration(text: str, field: str = "retention") -> int:
    """'7d', '36h', '90m', '3600s' or plain seconds -> milliseconds, at least a minute."""
    return times.parse_duration(text, field, MIN_MS)


def resolve(d: Deployment, override: Optional[str] = None) -> int:
    """Retention in ms: explicit, else TRACKER_RETENTION, else stored, else 7 days."""
    text = override if override is not None else os.environ.get("TRACKER_RETENTION")
    if text:
        return parse_duration(text)
    with d.errors():
        stored = d.client.hget(keys.config(d.prefix), "retention")
    return int(stored) if stored else DEFAULT_MS


@dataclass
class Trimmed:
    partition: int
    minid: str  # entries before this ID go ('' = none)
    limited_by: str
    removed: int  # exact when trimmed; counted when a dry run
    dry_run: bool
    swept: int = 0  # state index entries of tracks past their expiry, removed


def _count_before(d: Deployment, stream: str, minid: str) -> int:
    return sum(len(page) for page in streams.pages(d.client, stream, "-", "(" + minid, 10_000))


def trim(d: Deployment, retention_ms: int, partition: Optional[int] = None,
         dry_run: bool = False) -> list[Trimmed]:
    out = []
    with d.errors():
        if not dry_run and d.client.hget(keys.config(d.prefix), "retention") != \
                str(retention_ms).encode():
            d.client.hset(keys.config(d.prefix), "retention", retention_ms)
        for p in d.partition_list(partition):
            stream = keys.stream(d.prefix, p)
            minid, why, removed, swept = scripts.call(
                d.client, "trim",
                [stream, keys.meta(d.prefix, p), keys.replay_state(d.prefix, p),
                 keys.fence(d.prefix, p)],
                [retention_ms, "1" if dry_run else "0", d.ttl_ms, keys.snapshot_prefix(d.prefix, p),
                 events.RESERVE_MAX * 1000])
            minid, why = minid.decode(), why.decode()
            if dry_run:
                removed = _count_before(d, stream, minid) if minid not in ("", "0-0") else 0
            out.append(Trimmed(p, minid, why, int(removed), dry_run, int(swept)))
    return out


class Keeper:
    """Called from the projector's main loop: trims every ``every`` seconds."""

    def __init__(self, d: Deployment, every: float = 60.0):
        self.d, self.every, self.next = d, every, time.monotonic() + min(every, 5.0)

    def tick(self) -> None:
        if time.monotonic() < self.next:
            return
        self.next = time.monotonic() + self.every
        try:
            ms = resolve(self.d)
            removed = sum(t.removed for t in trim(self.d, ms))
            if removed:
                log.info("retention %.1fh: trimmed %d entries", ms / 3_600_000, removed)
        except Exception as e:  # never let housekeeping stop the projector
            log.warning("retention trim failed: %s", e)
