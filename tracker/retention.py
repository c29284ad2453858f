"""Retention: trim the log by age without losing an entry a consumer still needs.

The rule (``tracker/store/lua/trim.lua``, one atomic step per partition): remove entries
older than now - retention, but never at or after any group's oldest pending entry
(a dead consumer's entries stay claimable), never after its last-delivered ID
(never-read entries), and never past a running rebuild's position. The retention
in force is stored (config hash and each partition's meta hash) when a trim sets
it, so the projector's periodic trim and the history indexes' expiry
(``snapshot.lua``) follow the same window.

The sweep (``tracker/store/lua/sweep.lua``) is the expiry of stored jobs: many jobs share
one bucket hash, so no key expiry can remove one of them. It deletes the fields whose
snapshot and history are both dead, strips expired snapshots down to their history, and
visits every bucket about once per ``min(10 min, retention / 10)``, a few at a time.
Readers and the fold treat what is dead as absent already; the sweep only frees memory.
"""

from __future__ import annotations

import logging
import math
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


@dataclass
class Swept:
    partition: int
    visited: int  # buckets
    looked: int  # fields
    deleted: int  # dead fields removed
    stripped: int  # expired snapshots reduced to their history
    healed: int  # buckets rewritten as listpacks
    buckets: int  # of the live generation


SWEEP_BUCKETS = 16  # at most this many buckets per sweep.lua call ...
SWEEP_FIELDS = 200  # ... and no more once this many fields were looked at (~1 ms)


def sweep(d: Deployment, partition: int, buckets: int = SWEEP_BUCKETS,
          fields: int = SWEEP_FIELDS) -> Swept:
    """One sweep.lua call on one partition, from where the last one stopped."""
    with d.errors():
        reply = scripts.call(d.client, "sweep", [keys.meta(d.prefix, partition),
                                                 keys.fence(d.prefix, partition)],
                             [keys.snapshot_prefix(d.prefix, partition), buckets, fields,
                              d.grace_ms])
    return Swept(partition, *(int(x) for x in reply))


def sweep_all(d: Deployment, partition: Optional[int] = None) -> list[Swept]:
    """Sweep every bucket once (``partition``: of that one only); totals per partition."""
    out = []
    for p in d.partition_list(partition):
        rows = [sweep(d, p)]
        while rows[-1].visited and sum(r.visited for r in rows) < rows[-1].buckets:
            rows.append(sweep(d, p))
        out.append(Swept(p, sum(r.visited for r in rows), sum(r.looked for r in rows),
                         sum(r.deleted for r in rows), sum(r.stripped for r in rows),
                         sum(r.healed for r in rows), rows[-1].buckets))
    return out


def sweep_period(retention_ms: int) -> float:
    """Seconds in which the sweep visits every bucket once."""
    return min(600.0, retention_ms / 10_000)


class Sweeper:
    """Paces the sweep: each partition owes buckets in proportion to the time passed, so
    that every bucket is visited once per ``sweep_period``; a call pays some of that."""

    def __init__(self, d: Deployment):
        self.d = d
        self.last = time.monotonic()
        self.owed = dict.fromkeys(range(d.partitions), 1.0)  # the first tick learns the sizes
        self.size = dict.fromkeys(range(d.partitions), 1)

    def tick(self, retention_ms: int) -> int:
        now = time.monotonic()
        elapsed, self.last = now - self.last, now
        visited = 0
        for p in self.owed:
            owed = self.owed[p] + self.size[p] * elapsed / sweep_period(retention_ms)
            owed = min(owed, float(self.size[p]))  # never more than one whole pass
            while owed >= 1:
                r = sweep(self.d, p, buckets=min(SWEEP_BUCKETS, math.ceil(owed)))
                self.size[p] = max(r.buckets, 1)
                owed = min(owed - max(r.visited, 1), float(self.size[p]))
                visited += r.visited
            self.owed[p] = owed
        return visited


class Keeper:
    """Called from the projector's main loop: trims every ``every`` seconds, and sweeps
    expired jobs at the pace of ``Sweeper`` on every call."""

    def __init__(self, d: Deployment, every: float = 60.0):
        self.d, self.every, self.next = d, every, time.monotonic() + min(every, 5.0)
        self.sweeper = Sweeper(d)
        self.retention_ms = DEFAULT_MS
        self.read_at = 0.0

    def tick(self) -> None:
        try:
            if time.monotonic() - self.read_at > self.every:
                self.read_at = time.monotonic()
                self.retention_ms = resolve(self.d)
            self.sweeper.tick(self.retention_ms)
        except Exception as e:  # never let housekeeping stop the projector
            log.warning("sweep of expired tracks failed: %s", e)
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
