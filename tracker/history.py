"""One job's past: ``tracker history`` and ``tracker get --at``.

The projector appends each entry that met or made a track to the job's history
index, kept in the job's stored value beside its snapshot (2-5 bytes per entry,
in the same atomic step as the fold; see ``tracker/store/lua/packed.lua``), so a
job's history costs one script call and one XRANGE per event of that job, however
long the log. The index is visible until retention after the job's newest entry:
history outlives the track itself.
``--at`` folds those entries with ``projections.track``, the one fold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import msgspec

from projections import track as fold_mod
from tracker import answer, events
from tracker.errors import TrackerError
from tracker.store import keys, scripts
from tracker.store.deployment import Deployment
from tracker.times import format_ms, id_ms, parse_when


def redis_now_ms(d: Deployment) -> int:
    """Redis's clock: the one that stamped the entries."""
    with d.errors():
        sec, usec = d.client.time()
    return int(sec) * 1000 + int(usec) // 1000


def parse_at(d: Deployment, text: str, field: str = "at") -> int:
    """A time given on the command line (RFC 3339, 'now', '-10m') against Redis's clock."""
    return parse_when(text, redis_now_ms(d), field)


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


def history_call(prefix: str, part: int, jid: str) -> scripts.Call:
    """history.lua's KEYS and ARGV for one job (the sync and the asyncio face share it)."""
    return ([keys.stream(prefix, part), keys.meta(prefix, part), keys.fence(prefix, part)],
            [keys.snapshot_prefix(prefix, part), jid])


def from_reply(jid: str, reply: list) -> History:
    """history.lua's reply as a History."""
    entries = [to_entry(item[0], dict(zip(item[1][::2], item[1][1::2]))) for item in reply[2:]]
    return History(jid, entries, [i.decode() for i in reply[1]])


def history(d: Deployment, jid: str) -> History:
    """The job's events in log order, from its index: one round trip."""
    events.check_jid(jid)
    with d.errors():
        reply = scripts.call(d.client, "history", *history_call(d.prefix, d.partition(jid), jid))
    return from_reply(jid, reply)


def fold_history(h: History, at_ms: int, ttl_ms: int) -> Optional[fold_mod.Track]:
    """The job's track as it stood at ``at_ms`` (None: unknown then)."""
    if any(id_ms(i) <= at_ms for i in h.trimmed):
        raise TrackerError(f"{h.jid}: the log no longer holds its events before "
                           f"{format_ms(max(id_ms(i) for i in h.trimmed))} (retention); "
                           "cannot fold it as of that time")
    pairs = [(e.at, e.event) for e in h.entries if e.event is not None and e.at <= at_ms]
    return fold_mod.visible(fold_mod.fold(pairs, ttl_ms).get(h.jid), at_ms)


def track_at(d: Deployment, jid: str, at_ms: int) -> dict:
    """``tracker get JID --at TIME``."""
    return answer.answer_of(jid, fold_history(history(d, jid), at_ms, d.ttl_ms), at_ms)
