"""Rebuild everything derived from the log (``tracker replay``) and audit it (``--verify``).

Rebuild, per partition, while projectors and producers run (``tracker/store/lua/replay.lua``
holds the argument): fold the log inside Redis, with the fold and storage code the
live projector uses, into the buckets of a new generation (snapshots, history indexes
and the state index at once); follow the live projector's position; then fold the last
few entries and flip ``{p}:meta geo`` (generation and geometry) in one script.
Readers and the projector read the generation inside their own scripts, so they see
the old or the new generation, never a mix or a gap. Old-generation keys are unlinked
after the switch (their buckets would expire only after the history's retention).
Only one rebuild per partition runs at a time (a lock with a TTL in ``{p}:replay``;
trimming waits behind its position).

Verify folds the log in Python (``projections.track``) and compares it with the live
values (snapshot and history index, decoded by ``tracker.store.packed``) read in the same
script call as the applied position, so a projector running meanwhile causes no false
alarms.
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
from tracker.store import cluster, keys, packed, scripts, streams
from tracker.store.deployment import Deployment
from tracker.store.scripts import LIMITS
from tracker.times import id_key

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


def _pattern(prefix: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"


def unlink_prefix(client: redis.Redis, prefix: str, *more: str) -> int:
    """UNLINK every key starting with ``prefix`` or one of ``more``: one SCAN for the
    longest common start of them all (a partition's keys share its hash tag)."""
    wanted = (prefix, *more)
    common = wanted[0]
    for w in wanted[1:]:
        while not w.startswith(common):
            common = common[:-1]
    raw = tuple(w.encode() for w in wanted)
    n, batch = 0, []
    for key in cluster.scan_keys(client, _pattern(common), common):
        if key.startswith(raw):
            batch.append(key)
        if len(batch) >= 500:
            n += client.unlink(*batch)
            batch = []
    if batch:
        n += client.unlink(*batch)
    return n


def unlink_generation(d: Deployment, part: int, gen: int, legacy: bool = False) -> int:
    """UNLINK a generation of one partition: its buckets, overflow strings and state
    indexes (with ``legacy``, the keys of the layout before buckets too: an upgrade's
    first rebuild took over what it needed of them)."""
    p = d.prefix
    more = keys.legacy_prefixes(p, part, gen) if legacy else ()
    return unlink_prefix(d.client, keys.bucket_prefix(p, part, gen),
                         keys.overflow_prefix(p, part, gen), keys.state_index_prefix(p, part, gen),
                         *more)


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
        out.unlinked = unlink_generation(d, part, out.old_gen, legacy=True)
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
    """Folds one partition's log forward to a given (growing) position: the tracks, and
    the history index each job would have (snapshot.lua's rules: every event that met or
    made a live track; a history restarts after a gap of retention)."""

    def __init__(self, d: Deployment, part: int, progress: Progress, retention_ms: int):
        self.d, self.stream, self.progress = d, keys.stream(d.prefix, part), progress
        self.retention = retention_ms
        self.pos: Optional[str] = None
        self.tracks: dict[str, fold_mod.Track] = {}
        self.history: dict[str, list[packed.Entry]] = {}  # oldest first
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
                entry = packed.parse_id(eid.decode())
                new = fold_mod.apply(self.tracks.get(ev.jid), ev, entry[0], self.d.ttl_ms)
                if new is None:
                    self.tracks.pop(ev.jid, None)
                    continue
                self.tracks[ev.jid] = new
                hist = self.history.setdefault(ev.jid, [])
                if hist and hist[-1][0] + self.retention <= entry[0]:
                    hist.clear()
                hist.append(entry)
            self.pos = got[-1][0].decode()
            if self.progress:
                self.progress(len(got))


def _visible(entries: list[packed.Entry], now: int, retention: int) -> list[str]:
    """A history (oldest first) as readers see it: entry IDs, none once past retention."""
    if not entries or max(e[0] for e in entries) + retention <= now:
        return []
    return [packed.entry_id(e) for e in entries]


def _compare(jid: str, part: int, live, folder: _Folder, now: int, first: str,
             trimmed: bool, out: Verified) -> None:
    """One job: its live value (raw) against the fold of the log."""
    try:
        value = packed.decode(live) if live else packed.Value(None, [])
    except ValueError:
        value = packed.Value(None, [])
    stored = value.track if value.track is not None and value.track.expires_at > now else None
    track = folder.tracks.get(jid)
    have = answer.stored_fields(stored)
    want = answer.stored_fields(track if track is not None and track.expires_at > now else None)
    have_h = _visible(value.entries[::-1], now, folder.retention)
    want_h = _visible(folder.history.get(jid, []), now, folder.retention)
    if have is None and want is None and not have_h and not want_h:
        return
    out.checked += 1
    if value.entries and first and id_key(packed.entry_id(value.entries[-1])) < id_key(first):
        out.cannot_verify.append((jid, "its first events were trimmed from the log"))
    elif trimmed and not value.entries and not folder.starts.get(jid):
        out.cannot_verify.append((jid, "no history index and the log does not hold "
                                       "its beginning"))
    elif have == want and have_h == want_h:
        out.equal += 1
    else:
        have, want = have or {}, want or {}
        diff = {answer.FIELD_NAMES[f]: (have.get(f), want.get(f)) for f in "spdurxq"
                if have.get(f) != want.get(f)}
        if have_h != want_h:
            diff["history"] = (have_h, want_h)
        out.different.append(Difference(jid, part, diff))


def verify_partition(d: Deployment, part: int, out: Verified, progress: Progress = None) -> None:
    head = _call(d, part, "read")
    gen, fin, retention_ms = head[1].decode(), head[2].decode(), int(head[4])
    trimmed = not never_trimmed(d.client, keys.stream(d.prefix, part))
    folder = _Folder(d, part, progress, retention_ms)
    folder.advance(fin)
    _, stored = packed.read_all(d.client, d.prefix, part)
    jids = sorted(set(stored) | set(folder.tracks) | set(folder.history))
    for i in range(0, len(jids), 500):
        batch = jids[i:i + 500]
        reply = _call(d, part, "read", jids=batch)
        now, g, fin, first = int(reply[0]), reply[1].decode(), reply[2].decode(), reply[3].decode()
        if g != gen:
            raise TrackerError(f"partition {part}: a rebuild switched generations during "
                               "--verify; run it again")
        folder.advance(fin)  # the projector moved on: fold up to where these rows stand
        for jid, live in zip(batch, reply[5:]):
            _compare(jid, part, live, folder, now, first, trimmed, out)


def verify(d: Deployment, partition: Optional[int] = None, progress: Progress = None) -> Verified:
    out = Verified()
    with d.errors():
        for p in d.partition_list(partition):
            verify_partition(d, p, out, progress)
    return out
