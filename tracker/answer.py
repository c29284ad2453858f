"""The track codec: stored snapshot rows, fold tracks and TRACK GET answers.

One module so that ``query`` (live reads), ``history`` (``--at``) and ``replay``
(``--verify``) turn a track into the contract's JSON, and a fold track into the
stored row, the very same way.

A stored row is what ``get.lua`` returns per JID: the snapshot fields
``s, p, d, u, r, x`` (bytes or None), as ``projections/track.lua`` names them.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Optional

from projections.track import Track
from tracker import events

ROW_FIELDS = ("s", "p", "d", "u", "r", "x")
FIELD_NAMES = {"s": "state", "p": "percent", "d": "desc", "u": "updated_at",
               "r": "reserved_until", "x": "expires_at", "q": "queue"}


def unknown(jid: str) -> dict:
    """The observed answer for an untracked, never-enqueued or expired JID."""
    return {"jid": jid, "state": "unknown", "updated_at": ""}


def track_answer(jid: str, row: list, now_ms: int) -> dict:
    """TRACK GET's object from a stored row, keys in contract order."""
    s, p, d, u, _r, x = row
    if s is None or x is None or int(x) <= now_ms:
        return unknown(jid)
    out: dict[str, Any] = {"jid": jid}
    if p is not None:
        out["percent"] = int(p)
    if d is not None:
        out["desc"] = d.decode()
    out["state"] = s.decode()
    out["updated_at"] = events.format_time(int(u))
    return out


def stored_fields(track: Optional[Track]) -> Optional[dict]:
    """The snapshot fields (text, by letter) the projector stores for ``track``."""
    if track is None:
        return None
    return {"s": track.state, "p": None if track.percent is None else str(track.percent),
            "d": track.desc, "u": str(track.updated_at),
            "r": str(track.reserved_until) if track.reserved_until > 0 else None,
            "x": str(track.expires_at), "q": track.queue}


def track_row(track: Track) -> list:
    """``track`` as a stored row (bytes), as ``get.lua`` would read it back."""
    f = stored_fields(track) or {}
    return [None if f.get(k) is None else str(f[k]).encode() for k in ROW_FIELDS]


def answer_of(jid: str, track: Optional[Track], at_ms: int) -> dict:
    """TRACK GET's object for a track (folded, or decoded from its stored value) at
    ``at_ms``: the same object ``track_answer`` makes of its stored row."""
    if track is None or track.expires_at <= at_ms:
        return unknown(jid)
    out: dict[str, Any] = {"jid": jid}
    if track.percent is not None:
        out["percent"] = track.percent
    if track.desc is not None:
        out["desc"] = track.desc
    out["state"] = track.state
    out["updated_at"] = events.format_time(track.updated_at)
    return out


def row_track(row: list) -> Optional[Track]:
    """The track of a stored row (None for an absent one); the queue is not in rows."""
    s, p, d, u, r, x = row
    if s is None or x is None:
        return None
    return Track(state=s.decode(), updated_at=int(u), expires_at=int(x),
                 reserved_until=int(r) if r is not None else 0,
                 percent=int(p) if p is not None else None,
                 desc=d.decode() if d is not None else None)


def reservation(track: Optional[Track], now_ms: int) -> Optional[dt.datetime]:
    """The live reservation of a track (a working job), or None."""
    if track is None or track.state != "working" or track.expires_at <= now_ms \
            or track.reserved_until <= now_ms:
        return None
    return dt.datetime.fromtimestamp(track.reserved_until / 1000, dt.UTC)
