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


def reservation(row: list, now_ms: int) -> Optional[dt.datetime]:
    """The live reservation of a stored row (a working job), or None."""
    s, _p, _d, _u, r, x = row
    if s != b"working" or r is None or x is None or int(x) <= now_ms or int(r) <= now_ms:
        return None
    return dt.datetime.fromtimestamp(int(r) / 1000, dt.UTC)


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
    """TRACK GET's object for a folded track, exactly as a live read writes it."""
    if track is None:
        return unknown(jid)
    return track_answer(jid, track_row(track), at_ms)
