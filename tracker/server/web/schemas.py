"""Response shapes, for the OpenAPI document only: handlers send the very dicts the
command line prints (already encoded), so these describe them and never build them."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

import msgspec
from litestar.openapi.datastructures import ResponseSpec

Percent = Annotated[int, msgspec.Meta(ge=0, le=100)]


class Track(msgspec.Struct):
    """TRACK GET's object. `percent` and `desc` appear once a TRACK SET gave them."""

    jid: str
    state: Literal["unknown", "enqueued", "working", "success", "failed", "dead"]
    updated_at: Annotated[str, msgspec.Meta(description="RFC 3339 UTC, or '' when unknown")]
    percent: Optional[Percent] = None
    desc: Optional[str] = None


class Appended(msgspec.Struct):
    """A TRACK SET taken: the ID of its entry in the log."""

    ok: bool
    id: str


class TrackPage(msgspec.Struct):
    tracks: list[Track]
    next_cursor: Optional[str]


class HistoryEntry(msgspec.Struct):
    """One event of the job, as `tracker history --json` prints it."""

    id: str
    time: str
    ms: int
    event: str
    fields: dict[str, Any]


class Ready(msgspec.Struct):
    ok: bool
    lag_seconds: Optional[float] = None
    lag_entries: Optional[int] = None
    max_lag_seconds: Optional[float] = None
    error: Optional[str] = None


class Error(msgspec.Struct):
    """Every 4xx and 5xx: what is wrong, and the field it is about (when there is one)."""

    error: str
    field: Optional[str]


def errors(*codes: int) -> dict[int, ResponseSpec]:
    """OpenAPI responses for these error statuses, all with the ``Error`` body."""
    text = {400: "Bad input (the field is named)", 401: "Missing or wrong bearer token",
            403: "Writes are off (no token configured)", 404: "No such route",
            413: "Request body too large", 501: "Not available in this build",
            503: "Redis unavailable"}
    return {c: ResponseSpec(data_container=Error, description=text[c], generate_examples=False)
            for c in codes}
