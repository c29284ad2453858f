"""Export the log as JSON lines, and import such a file into an empty deployment.

One line per entry, in ID order across partitions (IDs are times, so the file reads
as a timeline): ``{"id", "time", "partition", "fields"}``. Fields are kept exactly
as stored, poison entries included, so an import gives back the same log; values
that are not UTF-8 go to ``fields_b64`` instead. Import XADDs with the original IDs,
so the events keep their times and ``tracker replay`` folds the same tracks.
"""

from __future__ import annotations

import base64
import heapq
import json
from collections.abc import Callable, Iterator
from typing import IO, Any, NamedTuple, Optional

from tracker.errors import TrackerError, ValidationError
from tracker.history import history
from tracker.store import keys, streams
from tracker.store.deployment import Deployment
from tracker.times import format_ms, id_key, id_ms

Progress = Optional[Callable[[int], None]]
MAX_SEQ = 18446744073709551615


class Imported(NamedTuple):
    imported: int  # entries appended
    renumbered: int  # of those, given the next free ID (out of order in their new partition)


def _partition_entries(d: Deployment, part: int, lo: str, hi: str) -> Iterator[tuple]:
    for eid, fields in streams.entries(d.client, keys.stream(d.prefix, part), lo, hi):
        eid = eid.decode()
        yield id_key(eid), eid, part, fields


def _line(eid: str, part: int, fields: dict) -> str:
    rec = {"id": eid, "time": format_ms(id_ms(eid)), "partition": part}
    try:
        rec["fields"] = {k.decode(): v.decode() for k, v in fields.items()}
    except UnicodeDecodeError:
        rec["fields_b64"] = [[base64.b64encode(k).decode(), base64.b64encode(v).decode()]
                             for k, v in fields.items()]
    return json.dumps(rec, ensure_ascii=False, separators=(",", ":"))


def export(d: Deployment, out: IO[str], since_ms: Optional[int] = None,
           until_ms: Optional[int] = None, jid: Optional[str] = None,
           progress: Progress = None) -> int:
    """Write entries with since <= time <= until (ms, inclusive) as JSON lines."""
    lo = "-" if since_ms is None else f"{since_ms}-0"
    hi = "+" if until_ms is None else f"{until_ms}-{MAX_SEQ}"
    n = 0
    with d.errors():
        if jid is not None:  # one job: its history index, not a scan
            part = d.partition(jid)
            rows = [(e.id, part, _raw(d, part, e.id)) for e in history(d, jid).entries
                    if (since_ms is None or e.at >= since_ms) and (until_ms is None or e.at <= until_ms)]
            merged: Iterator = ((None, eid, p, f) for eid, p, f in rows if f is not None)
        else:
            merged = heapq.merge(*(_partition_entries(d, p, lo, hi) for p in range(d.partitions)),
                                 key=lambda t: t[0])
        for _key, eid, part, fields in merged:
            out.write(_line(eid, part, fields) + "\n")
            n += 1
            if progress and n % 1000 == 0:
                progress(1000)
    if progress and n % 1000:
        progress(n % 1000)
    return n


def _raw(d: Deployment, part: int, eid: str) -> Optional[dict]:
    got = d.client.xrange(keys.stream(d.prefix, part), eid, eid)
    return got[0][1] if got else None


def _parse(line: str, lineno: int) -> tuple[str, int, dict]:
    fields: dict[Any, Any]
    try:
        rec = json.loads(line)
        eid = rec["id"]
        id_key(eid)
        if "fields" in rec:
            fields = {str(k): str(v) for k, v in rec["fields"].items()}
        else:
            fields = {base64.b64decode(k): base64.b64decode(v) for k, v in rec["fields_b64"]}
        return eid, int(rec.get("partition", 0)), fields
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValidationError("file", f"line {lineno}: not an exported entry ({e})") from None


def import_(d: Deployment, lines: IO[str], progress: Progress = None) -> Imported:
    """Append an export into an empty deployment, with the original IDs.

    An entry goes to the partition of its JID in this deployment (it may have a
    different partition count). IDs are kept; should two land in one partition
    out of order (only possible with a different partition count) the later gets
    the next free ID and is counted as renumbered.
    """
    with d.errors():
        pipe = d.client.pipeline(transaction=False)
        for p in range(d.partitions):
            pipe.exists(keys.stream(d.prefix, p))
        if any(pipe.execute()):
            raise TrackerError(f"import needs an empty deployment: prefix {d.prefix!r} already "
                               "has a log (use another --prefix)")
        last: dict[int, tuple[int, int]] = {}
        n = renumbered = 0
        pipe = d.client.pipeline(transaction=False)
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            eid, part, fields = _parse(line, lineno)
            j = fields.get("j", fields.get(b"j"))
            jid = j.decode("utf-8", "replace") if isinstance(j, bytes) else j
            part = d.partition(jid) if jid else part % d.partitions
            key = id_key(eid)
            if part in last and key <= last[part]:
                key = (last[part][0], last[part][1] + 1)
                eid = f"{key[0]}-{key[1]}"
                renumbered += 1
            last[part] = key
            pipe.xadd(keys.stream(d.prefix, part), fields, id=eid)
            n += 1
            if n % 1000 == 0:
                pipe.execute()
                if progress:
                    progress(1000)
        pipe.execute()
        if progress and n % 1000:
            progress(n % 1000)
    return Imported(n, renumbered)
