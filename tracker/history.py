"""One job's past: ``tracker history`` and ``tracker get --at``.

The projector appends each entry that met or made a track to the job's history
index (``{p}:h:<jid>``, 10 bytes per entry, in the same atomic step as the fold;
see ``tracker/lua/snapshot.lua``), so a job's history costs one script call and
one XRANGE per event of that job, however long the log. The index expires
retention after the job's newest entry: history outlives the track itself.
``--at`` folds those entries with ``projections.track``, the one fold.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any, Optional

import msgspec
import redis

from projections import track as fold_mod
from tracker import events, keys, query, scripts
from tracker.config import Deployment, unavailable
from tracker.errors import TrackerError, ValidationError

def unpack_ids(blob: bytes) -> list[str]:
    """History index bytes -> entry IDs (6 bytes ms + 4 bytes seq, big-endian)."""
    return [f"{int.from_bytes(blob[i:i + 6], 'big')}-{int.from_bytes(blob[i + 6:i + 10], 'big')}"
            for i in range(0, len(blob) - 9, 10)]


def id_ms(entry_id: Any) -> int:
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    return int(entry_id.split("-", 1)[0])


def format_ms(ms: int) -> str:
    """RFC 3339 UTC with milliseconds (events one second apart must stay apart)."""
    when = dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


_REL = re.compile(r"([+-])(\d+)(ms|s|m|h|d|w)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def parse_when(text: str, now_ms: int, field: str = "at") -> int:
    """RFC 3339, 'now', or relative to now like -10m, -2h, +30s, -1d -> epoch ms."""
    text = (text or "").strip()
    if text == "now":
        return now_ms
    m = _REL.fullmatch(text)
    if m:
        delta = int(m.group(2)) * _UNIT_MS[m.group(3)]
        return now_ms - delta if m.group(1) == "-" else now_ms + delta
    if re.fullmatch(r"\d{13}", text):  # epoch ms, as `tracker history --json` prints in "ms"
        return int(text)
    try:
        return events.parse_time(text, field)
    except ValidationError:
        raise ValidationError(field, f"expected RFC 3339 (2020-08-01T11:43:20Z), 'now' or a "
                                     f"relative time like -10m, got {text!r}") from None


def redis_now_ms(d: Deployment) -> int:
    """Redis's clock: the one that stamped the entries."""
    try:
        sec, usec = d.client.time()
    except redis.RedisError as e:
        raise unavailable(d.settings, e) from e
    return int(sec) * 1000 + int(usec) // 1000


@dataclass
class Entry:
    id: str
    at: int  # epoch ms, from the ID
    event: Optional[events.AnyEvent]  # None for an entry the fold refuses
    fields: dict

    def as_json(self) -> dict:
        out: dict[str, Any] = {"id": self.id, "time": format_ms(self.at), "ms": self.at,
                               "event": self.fields.get("t", "?")}
        out["fields"] = describe(self.event) if self.event is not None else self.fields
        return out


def describe(ev: events.AnyEvent) -> dict:
    """An event's fields by their long names, without the JID and unset ones."""
    out = {k: v for k, v in msgspec.structs.asdict(ev).items() if v is not None and k != "jid"}
    if isinstance(ev, events.TrackSet) and ev.reserve_until is not None:
        out["reserve_until"] = events.format_time(ev.reserve_until)
    if isinstance(ev, events.Enqueued) and not ev.track:
        out.pop("track", None)
    return out


def to_entry(entry_id, raw_fields: dict) -> Entry:
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    fields = {(k.decode() if isinstance(k, bytes) else k): (v.decode("utf-8", "replace")
              if isinstance(v, bytes) else v) for k, v in raw_fields.items()}
    try:
        ev = events.decode_entry(raw_fields)
    except events.PoisonEntry:
        ev = None
    return Entry(eid, id_ms(eid), ev, fields)


@dataclass
class History:
    jid: str
    entries: list[Entry]
    trimmed: list[str]  # IDs of the job's entries the index names but retention removed


def history(d: Deployment, jid: str) -> History:
    """The job's events in log order, from its index: one round trip."""
    events.check_jid(jid)
    part = d.partition(jid)
    try:
        reply = scripts.registered(d.client, "history")(keys=[keys.stream(d.prefix, part),
                                               keys.history(d.prefix, part, jid)])
    except redis.RedisError as e:
        raise unavailable(d.settings, e) from e
    entries = []
    for item in reply[2:]:
        eid, flat = item[0], item[1]
        entries.append(to_entry(eid, dict(zip(flat[::2], flat[1::2]))))
    return History(jid, entries, [i.decode() for i in reply[1]])


def fold_history(h: History, at_ms: int, ttl_ms: int) -> Optional[fold_mod.Track]:
    """The job's track as it stood at ``at_ms`` (None: unknown then)."""
    if any(id_ms(i) <= at_ms for i in h.trimmed):
        raise TrackerError(f"{h.jid}: the log no longer holds its events before "
                           f"{format_ms(max(id_ms(i) for i in h.trimmed))} (retention); "
                           "cannot fold it as of that time")
    pairs = [(e.at, e.event) for e in h.entries if e.event is not None and e.at <= at_ms]
    return fold_mod.visible(fold_mod.fold(pairs, ttl_ms).get(h.jid), at_ms)


def answer(jid: str, track: Optional[fold_mod.Track], at_ms: int) -> dict:
    """TRACK GET's object for a folded track, exactly as ``query.track_answer`` writes it."""
    if track is None:
        return query.unknown(jid)
    row = [track.state.encode(), None if track.percent is None else str(track.percent).encode(),
           None if track.desc is None else track.desc.encode(), str(track.updated_at).encode(),
           str(track.reserved_until).encode(), str(track.expires_at).encode()]
    return query.track_answer(jid, row, at_ms)


def track_at(d: Deployment, jid: str, at_ms: int) -> dict:
    """``tracker get JID --at TIME``."""
    return answer(jid, fold_history(history(d, jid), at_ms, d.ttl_ms), at_ms)
