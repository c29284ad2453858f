"""The track fold: the one definition of what each event does to a snapshot.

``track.lua`` beside this file is its twin for the live projector (it runs
inside Redis, next to the data). ``tests/test_differential.py`` feeds both the
same random logs and requires identical snapshots, so they cannot drift.

Time comes only from the events (their stream IDs), never from a clock, so
folding the same log always gives the same tracks, expiry included.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import msgspec

from tracker.events import (
    RESERVE_MAX,
    AnyEvent,
    Dead,
    Enqueued,
    Failed,
    Success,
    TrackSet,
    Working,
    clamp_reserve,
)

STATES = ("unknown", "enqueued", "working", "success", "failed", "dead")


class Track(msgspec.Struct, omit_defaults=True):
    """A job's snapshot. Times are epoch milliseconds; 0 means "none"."""

    state: str
    updated_at: int
    expires_at: int
    reserved_until: int = 0
    percent: Optional[int] = None
    desc: Optional[str] = None
    queue: Optional[str] = None  # the queue it was last enqueued on, for listing by queue


_FINISHED = {Success: "success", Failed: "failed", Dead: "dead"}


def apply(track: Optional[Track], event: AnyEvent, at: int, ttl_ms: int) -> Optional[Track]:
    """Return the track after ``event`` happened at time ``at`` (ms).

    ``None`` means no track: never tracked, or expired. The input is not changed.
    """
    if track is not None and track.expires_at <= at:
        track = None  # it expired before this event: the event meets nothing
    if isinstance(event, Enqueued):
        if track is None:
            if not event.track:
                return None
            track = Track(state="enqueued", updated_at=at, expires_at=0, queue=event.queue)
        else:
            # A retry re-enqueues the same job: its reservation is over and
            # percent/desc stay as the worker left them.
            track = msgspec.structs.replace(track, state="enqueued", reserved_until=0,
                                            queue=track.queue if event.queue is None else event.queue)
    elif track is None:
        return None  # untracked, never enqueued or expired: nothing to update
    elif isinstance(event, Working):
        track = msgspec.structs.replace(
            track, state="working", reserved_until=at + clamp_reserve(event.reserve_for) * 1000)
    elif isinstance(event, TrackSet):
        changes: dict[str, Any] = {}
        if event.percent is not None:
            changes["percent"] = event.percent
        if event.desc is not None:
            changes["desc"] = event.desc
        if (event.reserve_until is not None and track.state == "working"
                and track.reserved_until > at):
            # Extends a live reservation, never shortens it, at most one day ahead.
            wanted = min(event.reserve_until, at + RESERVE_MAX * 1000)
            if wanted > track.reserved_until:
                changes["reserved_until"] = wanted
        track = msgspec.structs.replace(track, **changes)
    else:
        track = msgspec.structs.replace(track, state=_FINISHED[type(event)], reserved_until=0)
    track.updated_at = at
    track.expires_at = max(at, track.reserved_until) + ttl_ms
    return track


def visible(track: Optional[Track], now_ms: int) -> Optional[Track]:
    """The track as a reader at ``now_ms`` sees it: expired tracks are gone."""
    if track is None or track.expires_at <= now_ms:
        return None
    return track


def fold(entries: Iterable[tuple[int, AnyEvent]], ttl_ms: int,
         tracks: Optional[dict[str, Track]] = None) -> dict[str, Track]:
    """Fold (time ms, event) pairs, in log order, into tracks by JID."""
    tracks = {} if tracks is None else tracks
    for at, event in entries:
        new = apply(tracks.get(event.jid), event, at, ttl_ms)
        if new is None:
            tracks.pop(event.jid, None)
        else:
            tracks[event.jid] = new
    return tracks
