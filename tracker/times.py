"""Times and durations as tracker reads and prints them.

Stream entry IDs are ``<ms>-<seq>``: their time is Redis's clock, the only clock
the fold uses. Durations (``7d``, ``-10m``) share one unit table.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from tracker import events
from tracker.errors import ValidationError

UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w)?")
_RELATIVE = re.compile(r"([+-])(\d+)(ms|s|m|h|d|w)")


def id_ms(entry_id: Any) -> int:
    """The time (epoch ms) of a stream entry ID."""
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    return int(entry_id.split("-", 1)[0])


def id_key(entry_id: str) -> tuple[int, int]:
    """A stream entry ID as a sortable (ms, seq) pair."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def format_ms(ms: int) -> str:
    """RFC 3339 UTC with milliseconds (events one second apart must stay apart)."""
    when = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def parse_duration(text: str, field: str, min_ms: int = 0) -> int:
    """'7d', '36h', '90m', '3600s', '500ms' or plain seconds -> milliseconds."""
    m = _DURATION.fullmatch(str(text).strip())
    if not m:
        raise ValidationError(field, f"expected a duration like 7d, 36h or 90m, got {text!r}")
    ms = int(m.group(1)) * UNIT_MS[m.group(2) or "s"]
    if ms < min_ms:
        raise ValidationError(field, f"must be at least {min_ms // 1000} seconds")
    return ms


def parse_when(text: str, now_ms: int, field: str = "at") -> int:
    """RFC 3339, 'now', epoch ms, or relative to now like -10m, -2h, +30s -> epoch ms."""
    text = (text or "").strip()
    if text == "now":
        return now_ms
    m = _RELATIVE.fullmatch(text)
    if m:
        delta = int(m.group(2)) * UNIT_MS[m.group(3)]
        return now_ms - delta if m.group(1) == "-" else now_ms + delta
    if re.fullmatch(r"\d{13}", text):  # epoch ms, as `tracker history --json` prints in "ms"
        return int(text)
    try:
        return events.parse_time(text, field)
    except ValidationError as e:
        if e.problem.startswith("timezone missing"):
            raise
        raise ValidationError(field, f"expected an RFC 3339 time with a timezone, 'now' or a "
                                     f"relative time like -10m, got {text!r}") from None
