"""The six events of the tracking contract, as they sit in the log.

A stream entry is a flat field/value map with one-letter names (readable with
``redis-cli XRANGE``, compact in a listpack). Its time is the entry ID's time,
never a field: Redis's clock stamps it, so a replay sees the same times.

Two layers of validation live here and nowhere else:

* ``TrackSetRequest`` and the ``make_*`` helpers check what a caller hands us
  (the Faktory JSON names, RFC 3339 times, the contract's limits);
* ``decode_entry`` checks what we read back from a stream, which anyone with
  XADD rights can write. ``projections/track.lua`` mirrors it rule for rule and
  ``tests/test_differential.py`` proves the two agree.
"""

from __future__ import annotations

import datetime as dt
import re
from functools import lru_cache
from typing import Annotated, Any, Optional, Union, get_args

import msgspec

from tracker.errors import ValidationError

# Limits shared by validation, the Lua fold (passed in as ARGV) and the README.
MAX_JID = 128
MAX_DESC = 1000  # bytes of UTF-8
MAX_ERRTYPE = 100  # Faktory caps errtype at 100 characters ...
MAX_MESSAGE = 1000  # ... and message at 1000
MAX_NAME = 200  # queue and jobtype
MAX_INT = 10**15  # any integer field in a stream entry
RESERVE_DEFAULT = 1800
RESERVE_MIN = 60
RESERVE_MAX = 86400  # Faktory caps reservations at one day
JID_PATTERN = r"\A[!-~]{1,128}\Z"  # printable ASCII, no spaces or control chars

Jid = Annotated[str, msgspec.Meta(pattern=JID_PATTERN)]
Percent = Annotated[int, msgspec.Meta(ge=0, le=100)]
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]


def _check_bytes(field: str, value: Optional[str], limit: int) -> None:
    if value is not None and len(value.encode("utf-8", "surrogatepass")) > limit:
        raise ValueError(f"{field}: longer than {limit} bytes")


class Event(msgspec.Struct, tag_field="t", tag=str.lower, forbid_unknown_fields=True,
            omit_defaults=True, frozen=True):
    """Base of the tagged union; ``t`` names the event in the stream."""

    jid: Jid = msgspec.field(name="j")


class Enqueued(Event, frozen=True):
    track: bool = msgspec.field(default=False, name="k")
    queue: Optional[str] = msgspec.field(default=None, name="q")
    jobtype: Optional[str] = msgspec.field(default=None, name="y")
    reserve_for: Optional[Count] = msgspec.field(default=None, name="r")

    def __post_init__(self):
        _check_bytes("queue", self.queue, MAX_NAME)
        _check_bytes("jobtype", self.jobtype, MAX_NAME)


class Working(Event, frozen=True):
    reserve_for: Optional[Count] = msgspec.field(default=None, name="r")


class TrackSet(Event, frozen=True):
    percent: Optional[Percent] = msgspec.field(default=None, name="p")
    desc: Optional[str] = msgspec.field(default=None, name="d")
    reserve_until: Optional[Count] = msgspec.field(default=None, name="u")  # epoch ms

    def __post_init__(self):
        _check_bytes("desc", self.desc, MAX_DESC)


class _Failure(Event, frozen=True):
    errtype: Optional[str] = msgspec.field(default=None, name="e")
    message: Optional[str] = msgspec.field(default=None, name="m")

    def __post_init__(self):
        _check_bytes("errtype", self.errtype, MAX_ERRTYPE)
        _check_bytes("message", self.message, MAX_MESSAGE)


class Success(Event, frozen=True):
    pass


class Failed(_Failure, frozen=True):
    pass


class Dead(_Failure, frozen=True):
    pass


AnyEvent = Union[Enqueued, Working, TrackSet, Success, Failed, Dead]
EVENT_TYPES: dict[str, type] = {c.__struct_config__.tag: c for c in get_args(AnyEvent)}
# Stream field letter -> long name, for error messages and `tracker history`.
FIELD_NAMES = {"t": "type", "j": "jid", "k": "track", "q": "queue", "y": "jobtype",
               "r": "reserve_for", "p": "percent", "d": "desc", "u": "reserve_until",
               "e": "errtype", "m": "message"}
_INT_FIELDS = frozenset("rpu")
_INT_RE = re.compile(r"0|[1-9][0-9]{0,15}")


class PoisonEntry(Exception):
    """A stream entry that is not a valid event; ``reason`` says why."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def split_error(err: msgspec.ValidationError, names: dict[str, str]) -> tuple[str, str]:
    """Split msgspec's message into (field, problem) using long field names."""
    text = str(err)
    m = re.search(r" - at `\$\.(\w+)`", text)
    if m:
        return names.get(m.group(1), m.group(1)), text[: m.start()]
    m = re.match(r"Object contains unknown field `(.*)`", text)
    if m:
        return names.get(m.group(1), m.group(1)), "unknown field"
    m = re.match(r"Object missing required field `(.*)`", text)
    if m:
        return names.get(m.group(1), m.group(1)), "required"
    if ": " in text and text.split(": ", 1)[0] in names.values():
        field, problem = text.split(": ", 1)  # from __post_init__
        return field, problem
    return "event", text


_convert = msgspec.convert


def decode_entry(fields: dict) -> AnyEvent:
    """Validate one stream entry's fields (bytes or str) into an event.

    The rules: every key known for the type, UTF-8 everywhere, integers as plain
    decimals without sign or leading zeros, ``k`` is "0" or "1", the last of a
    repeated field wins. Raises PoisonEntry with a reason otherwise.
    """
    d: dict[str, Any] = {}
    try:
        for k, v in fields.items():
            k = k.decode() if isinstance(k, bytes) else str(k)
            v = v.decode() if isinstance(v, bytes) else str(v)
            if k in _INT_FIELDS:
                if not _INT_RE.fullmatch(v):
                    raise PoisonEntry(f"{FIELD_NAMES[k]}: not a non-negative integer")
                v = int(v)
            elif k == "k":
                if v not in ("0", "1"):
                    raise PoisonEntry("track: must be 0 or 1")
                v = v == "1"
            d[k] = v
    except UnicodeDecodeError:
        raise PoisonEntry("invalid UTF-8") from None
    t = d.get("t")
    if t not in EVENT_TYPES:
        raise PoisonEntry("type: missing" if t is None else f"type: unknown event type {t!r}")
    try:
        return _convert(d, EVENT_TYPES[t])
    except msgspec.ValidationError as e:
        field, problem = split_error(e, FIELD_NAMES)
        raise PoisonEntry(f"{field}: {problem}") from None


def encode_entry(event: AnyEvent) -> dict[str, Any]:
    """The stream fields of an event (the inverse of ``decode_entry``)."""
    d = msgspec.to_builtins(event)
    if "k" in d:
        d["k"] = 1 if d["k"] else 0
    return d


# ---------------------------------------------------------------- caller input

def parse_time(value: Any, field: str = "reserve_until") -> int:
    """RFC 3339 with a timezone (or an aware datetime) -> epoch milliseconds.

    Errors give an example computed now (an hour ahead), so the example itself is
    never one that the day-ahead / day-behind rule would then refuse."""
    if isinstance(value, dt.datetime):
        when = value
    else:
        m = re.fullmatch(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d{1,9})?([Zz]|[+-]\d\d:\d\d)?",
                         value) if isinstance(value, str) else None
        if m is None:
            shown = value if not isinstance(value, str) or len(value) < 60 else value[:57] + "..."
            soon = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
            raise ValidationError(field, f"expected an RFC 3339 time with a timezone, like "
                                         f"{soon:%Y-%m-%dT%H:%M:%SZ} (an hour from now), "
                                         f"got {shown!r}")
        if m.group(2) is None:
            raise ValidationError(field, f"timezone missing in {value!r}: end it with Z (UTC) "
                                         "or an offset like +02:00")
        text = value.replace("z", "Z").replace("Z", "+00:00").replace("t", "T")
        frac = re.search(r"\.(\d+)", text)
        if frac:  # Python < 3.11 accepts only 3 or 6 fraction digits
            text = text.replace(frac.group(0), "." + (frac.group(1) + "000000")[:6])
        try:
            when = dt.datetime.fromisoformat(text)
        except ValueError:
            raise ValidationError(field, f"not a valid time: {value!r}") from None
    if when.tzinfo is None:
        raise ValidationError(field, "timezone missing: use an aware datetime (tzinfo set) "
                                     "or a string ending in Z or +HH:MM")
    return int(when.timestamp() * 1000)


def format_time(ms: int) -> str:
    """Epoch ms -> RFC 3339 UTC, second precision, as Faktory prints it."""
    return _format_second(ms // 1000)


@lru_cache(maxsize=4096)  # get_many formats many tracks updated in the same seconds
def _format_second(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class TrackSetRequest(msgspec.Struct, forbid_unknown_fields=True):
    """TRACK SET's JSON, with the Faktory field names. Nulls mean "absent"."""

    jid: Jid
    percent: Optional[Percent] = None
    desc: Optional[str] = None
    reserve_until: Optional[str] = None


_set_decoder = msgspec.json.Decoder(TrackSetRequest)
_REQ_NAMES = {f: f for f in ("jid", "percent", "desc", "reserve_until")}
MAX_REQUEST = 16 * 1024  # a TRACK SET payload larger than this is refused unread


_JID_MATCH = re.compile(JID_PATTERN).fullmatch  # every read checks a JID: compiled once


def check_jid(jid: Any) -> str:
    if not isinstance(jid, str):
        raise ValidationError("jid", f"expected a string, got {type(jid).__name__}")
    if not _JID_MATCH(jid):
        if not jid:
            raise ValidationError("jid", "must not be empty")
        if len(jid) > MAX_JID:
            raise ValidationError("jid", f"longer than {MAX_JID} characters")
        raise ValidationError("jid", "only printable ASCII without spaces is allowed")
    return jid


def make_trackset(jid: Any, percent: Any = None, desc: Any = None, reserve_until: Any = None,
                  *, now_ms: Optional[int] = None) -> TrackSet:
    """Validate a TRACK SET from keyword arguments."""
    check_jid(jid)
    if percent is not None and (type(percent) is not int or not 0 <= percent <= 100):
        raise ValidationError("percent", f"expected an integer 0..100, got {percent!r}"[:120])
    if desc is not None:
        if not isinstance(desc, str):
            raise ValidationError("desc", f"expected a string, got {type(desc).__name__}")
        try:
            size = len(desc.encode("utf-8"))
        except UnicodeEncodeError:
            raise ValidationError("desc", "not valid Unicode text") from None
        if size > MAX_DESC:
            raise ValidationError("desc", f"longer than {MAX_DESC} bytes ({size})")
    until = None
    if reserve_until is not None:
        until = parse_time(reserve_until)
        now_ms = now_ms if now_ms is not None else int(dt.datetime.now().timestamp() * 1000)
        if until > now_ms + RESERVE_MAX * 1000 + 60_000:
            raise ValidationError("reserve_until", "more than one day ahead (Faktory caps "
                                                   "reservations at one day)")
        if until < now_ms - RESERVE_MAX * 1000:
            raise ValidationError("reserve_until", "more than one day in the past")
    return TrackSet(jid=jid, percent=percent, desc=desc, reserve_until=until)


def decode_trackset_json(raw: bytes | str, *, now_ms: Optional[int] = None) -> TrackSet:
    """Validate TRACK SET's JSON payload (as the Faktory command carries it)."""
    if not isinstance(raw, (bytes, bytearray, memoryview, str)):
        raise ValidationError("payload", f"expected JSON text, got {type(raw).__name__}")
    if len(raw) > MAX_REQUEST:
        raise ValidationError("payload", f"larger than {MAX_REQUEST} bytes")
    try:
        req = _set_decoder.decode(raw)
    except msgspec.ValidationError as e:
        field, problem = split_error(e, _REQ_NAMES)  # "event" = the top level: not an object
        raise ValidationError("payload" if field == "event" else field, problem) from None
    except msgspec.DecodeError as e:
        raise ValidationError("payload", f"not a JSON object ({e})") from None
    return make_trackset(req.jid, req.percent, req.desc, req.reserve_until, now_ms=now_ms)


def clamp_reserve(seconds: Optional[int]) -> int:
    """Faktory's rule: unset or 0 means 1800 s, else clamp to 60..86400."""
    if not seconds:
        return RESERVE_DEFAULT
    return max(RESERVE_MIN, min(RESERVE_MAX, seconds))


def _reserve(value: Any) -> Optional[int]:
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise ValidationError("reserve_for", f"expected a whole number of seconds, got {value!r}")
    return clamp_reserve(value)


def is_name(value: Any) -> bool:
    """Whether ``value`` may be a queue or job type: printable, at most MAX_NAME bytes."""
    return (isinstance(value, str) and value.isprintable()
            and len(value.encode("utf-8", "surrogatepass")) <= MAX_NAME)


def _name(field: str, value: Any) -> Optional[str]:
    if value is None:
        return None
    if not is_name(value):
        raise ValidationError(field, f"expected printable text of at most {MAX_NAME} bytes")
    return value


def _cap(value: Any, field: str, limit: int) -> Optional[str]:
    """Faktory truncates errtype and message rather than refusing the FAIL."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(field, f"expected a string, got {type(value).__name__}")
    value = value.encode("utf-8", "replace")[:limit].decode("utf-8", "ignore")
    return value


def is_tracked(custom: Any) -> bool:
    """``custom.track`` is 1 or true; anything else is not tracked."""
    if custom is None:
        return False
    if not isinstance(custom, dict):
        raise ValidationError("custom", "expected a JSON object")
    track = custom.get("track")
    return track is True or (type(track) is int and track == 1)


def make_enqueued(jid, custom=None, queue=None, jobtype=None, reserve_for=None) -> Enqueued:
    return Enqueued(jid=check_jid(jid), track=is_tracked(custom), queue=_name("queue", queue),
                    jobtype=_name("jobtype", jobtype), reserve_for=_reserve(reserve_for))


def make_working(jid, reserve_for=None) -> Working:
    return Working(jid=check_jid(jid), reserve_for=_reserve(reserve_for))


def make_success(jid) -> Success:
    return Success(jid=check_jid(jid))


def make_failure(cls, jid, errtype=None, message=None):
    return cls(jid=check_jid(jid), errtype=_cap(errtype, "errtype", MAX_ERRTYPE),
               message=_cap(message, "message", MAX_MESSAGE))
