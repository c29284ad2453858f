"""Rebuild every snapshot from the log (``tracker replay``) and audit them (``--verify``).

Rebuild, per partition, while projectors and producers run (``tracker/store/lua/replay.lua``
holds the argument): fold the log inside Redis, with the fold and snapshot code the
live projector uses, into snapshot keys of a new generation; follow the live
projector's position; then fold the last few entries and flip ``{p}:meta gen`` in one
script. Readers and the projector read the generation inside their own scripts, so
they see the old or the new generation, never a mix or a gap. Old-generation keys
are unlinked after the switch (they would expire anyway, but a fold change can
leave them up to a day). Only one rebuild per partition runs at a time (a lock
with a TTL in ``{p}:replay``; trimming waits behind its position).

Verify folds the log in Python (``projections.track``) and compares it with the live
snapshots read in the same script call as the applied position, so a projector
running meanwhile causes no false alarms.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import redis

from projections import track as fold_mod
from tracker import answer, events, retention
from tracker.errors import TrackerError
from tracker.history import unpack_ids
from tracker.store import cluster, keys, scripts, streams
from tracker.store.deployment import Deployment
from tracker.store.scripts import LIMITS
from tracker.times import id_key, id_ms

HOLD_MS = 600_000  # a partition's rebuild must switch within this (see replay.lua)
LOCK_MS = 600_000  # a rebuild that made no progress this long loses its lock
CHUNK = 5000

Progress = Optional[Callable[[int], None]]


@dataclass
class Rebuilt:
    partition: int
    old_gen: int
    new_gen: int
    folded: int = 0
    poisoned: int = 0
    kept: int = 0  # JIDs whose beginning was trimmed: live snapshot kept as it was
    unlinked: int = 0
    seconds: float = 0.0


def _call(d: Deployment, part: int, mode: str, gen="", check="", jids=(), chunk=CHUNK):
    p = d.prefix
    k = [keys.stream(p, part), keys.meta(p, part), keys.replay_state(p, part),
         keys.replay_held(p, part), keys.replay_partial(p, part), keys.fence(p, part)]
    a = [mode, keys.snapshot_prefix(p, part), keys.GROUP, chunk, d.ttl_ms, d.grace_ms, HOLD_MS,
         LOCK_MS, gen, check, *LIMITS, *jids]
    with d.errors():
        try:
            return scripts.call(d.client, "replay", k, a)
        except redis.ResponseError as e:
            raise TrackerError(f"replay of partition {part}: {e}") from None


def never_trimmed(client: redis.Redis, stream: str) -> bool:
    """True when Redis (7+) can tell that the stream never lost an entry."""
    try:
        info = client.xinfo_stream(stream)
    except redis.ResponseError:
        return True  # no stream
    added = info.get("entries-added")  # Redis 7: every entry ever added; 6.2: unknown
    return added is not None and int(added) == int(info.get("length", -1))


def unlink_prefix(client: redis.Redis, prefix: str) -> int:
    """UNLINK every key starting with ``prefix`` (one partition's, by its hash tag: on a
    cluster the scan asks only the node serving that partition)."""
    pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
    n, batch = 0, []
    for key in cluster.scan_keys(client, pattern, prefix):
        batch.append(key)
        if len(batch) >= 500:
            n += client.unlink(*batch)
            batch = []
    if batch:
        n += client.unlink(*batch)
    return n


def unlink_generation(d: Deployment, part: int, gen: int) -> int:
    """UNLINK a snapshot generation of one partition: its snapshots and state indexes."""
    return (unlink_prefix(d.client, keys.snapshot_prefix_gen(d.prefix, part, gen))
            + unlink_prefix(d.client, keys.state_index_prefix(d.prefix, part, gen)))


def _check_retention(d: Deployment, part: int) -> None:
    """Refuse a rebuild that could drop live tracks: with a retention shorter than the
    longest a track can live (a day's reservation + TTL + grace), a live job's every
    event, and its history index, may be gone, and the fold would not know the job."""
    longest = events.RESERVE_MAX * 1000 + d.ttl_ms + d.grace_ms
    kept = retention.resolve(d)
    if kept < longest and not never_trimmed(d.client, keys.stream(d.prefix, part)):
        raise TrackerError(
            f"replay of partition {part}: the log was trimmed with a retention of "
            f"{kept // 1000}s, shorter than a track can live ({longest // 1000}s), so a "
            f"rebuild could drop live tracks; use a longer retention or --force")


def rebuild_partition(d: Deployment, part: int, progress: Progress = None, chunk: int = CHUNK,
                      unlink_old: bool = True, force: bool = False) -> Rebuilt:
    if not force:
        _check_retention(d, part)
    t0 = time.perf_counter()
    new_gen, old_gen, first = _call(d, part, "begin")
    gen = str(new_gen)
    out = Rebuilt(part, int(old_gen), int(new_gen))
    try:
        # Keys left by an aborted rebuild that used the same generation number.
        unlink_generation(d, part, out.new_gen)
        stream = keys.stream(d.prefix, part)
        check = "" if never_trimmed(d.client, stream) else (first.decode() if first else "")
        while True:
            folded, poisoned, _pos, caught_up = _call(d, part, "chunk", gen, check, chunk=chunk)
            out.folded += folded
            out.poisoned += poisoned
            if progress and folded + poisoned:
                progress(folded + poisoned)
            if caught_up:
                break
        folded, poisoned, _pos, kept, _old = _call(d, part, "switch", gen, check, chunk=chunk)
    except BaseException:
        _abort(d, part, gen)
        raise
    out.folded += folded
    out.poisoned += poisoned
    out.kept = int(kept)
    if progress and folded + poisoned:
        progress(folded + poisoned)
    if unlink_old:
        out.unlinked = unlink_generation(d, part, out.old_gen)
    out.seconds = time.perf_counter() - t0
    return out


def _abort(d: Deployment, part: int, gen: str) -> None:
    """Give the lock back and drop the half-built generation (best effort)."""
    try:
        state = keys.replay_state(d.prefix, part)
        if d.client.hget(state, "gen") == gen.encode():
            d.client.delete(state, keys.replay_held(d.prefix, part),
                            keys.replay_partial(d.prefix, part))
            unlink_generation(d, part, int(gen))
    except redis.RedisError:
        pass


def rebuild(d: Deployment, partition: Optional[int] = None, progress: Progress = None,
            chunk: int = CHUNK, unlink_old: bool = True, force: bool = False) -> list[Rebuilt]:
    with d.errors():
        return [rebuild_partition(d, p, progress, chunk, unlink_old, force)
                for p in d.partition_list(partition)]


def log_length(d: Deployment, partition: Optional[int] = None) -> int:
    pipe = d.client.pipeline(transaction=False)
    for p in d.partition_list(partition):
        pipe.xlen(keys.stream(d.prefix, p))
    with d.errors():
        return sum(pipe.execute())


# ------------------------------------------------------------------ verify
@dataclass
class Difference:
    jid: str
    partition: int
    fields: dict  # long field name -> (live, from the log)


@dataclass
class Verified:
    checked: int = 0
    equal: int = 0
    different: list = field(default_factory=list)
    cannot_verify: list = field(default_factory=list)  # (jid, why)

    @property
    def ok(self) -> bool:
        return not self.different

    def summary(self) -> dict:
        return {"checked": self.checked, "equal": self.equal, "different": len(self.different),
                "cannot_verify": len(self.cannot_verify)}


class _Folder:
    """Folds one partition's log forward to a given (growing) position."""

    def __init__(self, d: Deployment, part: int, progress: Progress):
        self.d, self.stream, self.progress = d, keys.stream(d.prefix, part), progress
        self.pos: Optional[str] = None
        self.tracks: dict[str, fold_mod.Track] = {}
        self.starts: dict[str, bool] = {}  # jid -> its first entry here is a tracked enqueued

    def advance(self, to: str) -> None:
        if not to:
            return
        lo = "-" if self.pos is None else "(" + self.pos
        for got in streams.pages(self.d.client, self.stream, lo, to, CHUNK):
            for eid, fields in got:
                try:
                    ev = events.decode_entry(fields)
                except events.PoisonEntry:
                    continue
                if ev.jid not in self.starts:
                    self.starts[ev.jid] = isinstance(ev, events.Enqueued) and ev.track
                new = fold_mod.apply(self.tracks.get(ev.jid), ev, id_ms(eid), self.d.ttl_ms)
                if new is None:
                    self.tracks.pop(ev.jid, None)
                else:
                    self.tracks[ev.jid] = new
            self.pos = got[-1][0].decode()
            if self.progress:
                self.progress(len(got))


def verify_partition(d: Deployment, part: int, out: Verified, progress: Progress = None) -> None:
    head = _call(d, part, "read")
    gen, fin = head[1].decode(), head[2].decode()
    trimmed = not never_trimmed(d.client, keys.stream(d.prefix, part))
    folder = _Folder(d, part, progress)
    folder.advance(fin)
    snaps = keys.snapshot_prefix_gen(d.prefix, part, int(gen))
    live = {k.decode()[len(snaps):] for k in cluster.scan_keys(d.client, snaps + "*", snaps)}
    jids = sorted(live | set(folder.tracks))
    for i in range(0, len(jids), 500):
        batch = jids[i:i + 500]
        reply = _call(d, part, "read", jids=batch)
        now, g, fin, first = int(reply[0]), reply[1].decode(), reply[2].decode(), reply[3].decode()
        if g != gen:
            raise TrackerError(f"partition {part}: a rebuild switched generations during "
                               "--verify; run it again")
        folder.advance(fin)  # the projector moved on: fold up to where these rows stand
        for j, jid in enumerate(batch):
            row = [v.decode() if v is not None else None for v in reply[4 + 2 * j]]
            index_head = reply[5 + 2 * j]
            alive = row[0] is not None and row[5] is not None and int(row[5]) > now
            have = dict(zip("spdurxq", row)) if alive else None
            track = folder.tracks.get(jid)
            want = answer.stored_fields(track if track is not None and track.expires_at > now else None)
            if have is None and want is None:
                continue
            out.checked += 1
            if len(index_head) == 10 and first and id_key(unpack_ids(index_head)[0]) < id_key(first):
                out.cannot_verify.append((jid, "its first events were trimmed from the log"))
            elif trimmed and len(index_head) < 10 and not folder.starts.get(jid):
                out.cannot_verify.append((jid, "no history index and the log does not hold "
                                               "its beginning"))
            elif have == want:
                out.equal += 1
            else:
                have, want = have or {}, want or {}
                diff = {answer.FIELD_NAMES[f]: (have.get(f), want.get(f)) for f in "spdurxq"
                        if have.get(f) != want.get(f)}
                out.different.append(Difference(jid, part, diff))


def verify(d: Deployment, partition: Optional[int] = None, progress: Progress = None) -> Verified:
    out = Verified()
    with d.errors():
        for p in d.partition_list(partition):
            verify_partition(d, p, out, progress)
    return out
