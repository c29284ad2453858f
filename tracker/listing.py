"""Listing live tracks by state (and queue), newest update first, across partitions.

Each partition keeps a paged index per state (``{p}:s<gen>:<state>`` and its pages, by
update time; index.lua), written by the fold in the same atomic step as the snapshots
(snapshot.lua), so listing never scans keys. ``list.lua`` reads one partition's rows;
this module validates the request and merges partitions: each is read until nothing it
has not examined could still be on the page (``Merge``), so the merged page is exact,
and the cursor (the last track's update time and JID) continues all partitions from the
same point.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

from projections.track import STATES
from tracker import answer, events
from tracker.errors import ValidationError
from tracker.store import keys, scripts

MAX_LIMIT = 1000
CURSOR_PATTERN = r"^[0-9]{1,16}:[!-~]{1,128}$"  # '<update ms>:<JID>' of a page's last track
BUDGET = 2000  # index entries one list.lua call may examine
LISTABLE = tuple(s for s in STATES if s != "unknown")


class TrackPage(NamedTuple):
    tracks: list[dict]  # TRACK GET answers, newest update first
    next_cursor: Optional[str]  # pass it back for the next page; None: this was the last


class Query(NamedTuple):
    state: str
    queue: str  # '' for any
    limit: int
    cursor_ms: str  # '' from the newest
    cursor_jid: str

    @classmethod
    def of(cls, state: str, queue: Optional[str] = None, limit: int = 50,
           cursor: Optional[str] = None) -> Query:
        if state not in LISTABLE:
            raise ValidationError("state", f"expected one of {', '.join(LISTABLE)}, got {state!r}")
        if queue is not None:
            events.make_enqueued("x", queue=queue)  # the queue rules of an enqueued event
        if type(limit) is not int or not 1 <= limit <= MAX_LIMIT:
            raise ValidationError("limit", f"expected 1..{MAX_LIMIT}, got {limit!r}")
        ms, jid = "", ""
        if cursor:
            if not re.fullmatch(CURSOR_PATTERN, cursor):
                raise ValidationError("cursor", "not a cursor from a previous page")
            ms, _, jid = cursor.partition(":")
        return cls(state, queue or "", limit, ms, jid)

    def call(self, prefix: str, part: int, need: str, at: tuple[str, str],
             limit: int) -> scripts.Call:
        """list.lua's KEYS and ARGV for up to ``limit`` tracks of partition ``part`` from
        position ``at``."""
        return ([keys.stream(prefix, part), keys.meta(prefix, part), keys.fence(prefix, part)],
                [keys.snapshot_prefix(prefix, part), need, self.state, self.queue, limit,
                 at[0], at[1], BUDGET])


def count_call(prefix: str, part: int, ttl_ms: int) -> scripts.Call:
    """count.lua's KEYS and ARGV for one partition: tracks per state (a gauge)."""
    return ([keys.meta(prefix, part), keys.fence(prefix, part)],
            [keys.snapshot_prefix(prefix, part), ttl_ms, *LISTABLE])


def totals(replies: list) -> dict[str, int]:
    """count.lua's replies of every partition, summed per state."""
    return {state: sum(int(r[i]) for r in replies) for i, state in enumerate(LISTABLE)}


class Merge:
    """The partitions' pages so far, and what to ask each of them next.

    The first round asks each partition for its share of the page (plus a few), not for
    the whole page: with P partitions that checks about ``limit`` snapshots instead of
    ``P x limit``. A partition is asked again only while what it has not examined yet
    could still be on the page: while the page is not full, or while its position is
    newer than the page's last track so far. So the page stays exact.
    """

    def __init__(self, q: Query, parts: list[int]):
        self.q = q
        self.at = {p: (q.cursor_ms, q.cursor_jid) for p in parts}
        self.found: list[tuple[int, str, list]] = []
        self.done: set[int] = set()
        self.now = 0
        share = q.limit if len(parts) <= 1 else min(q.limit, -(-q.limit // len(parts)) + 4)
        self.want = {p: share for p in parts}
        self.asked: set[int] = set()

    def call(self, prefix: str, part: int, need: str) -> scripts.Call:
        """list.lua's call for ``part``'s next rows."""
        return self.q.call(prefix, part, need, self.at[part], self.want[part])

    def pending(self) -> list[int]:
        """Partitions whose unexamined tracks could still be on the page."""
        open_ = [p for p in self.at if p not in self.done]
        if len(self.found) < self.q.limit:
            todo = open_
        else:
            self.found.sort(key=lambda t: (t[0], t[1]), reverse=True)
            last = self.found[self.q.limit - 1][:2]
            todo = [p for p in open_ if self._position(p) > last]
        for p in todo:
            if p in self.asked:  # its share was not enough: the rest of the page
                self.want[p] = self.q.limit
        self.asked.update(todo)
        return todo

    def _position(self, part: int) -> tuple[float, str]:
        ms, jid = self.at[part]
        return (float(ms) if ms else float("inf"), jid)

    def add(self, part: int, reply: list) -> None:
        """One list.lua reply (rows) of ``part``."""
        self.now = int(reply[0])
        if int(reply[2]):
            self.done.add(part)
        ms, jid = reply[3], reply[4]
        self.at[part] = (ms.decode() if isinstance(ms, bytes) else str(ms),
                         jid.decode() if isinstance(jid, bytes) else str(jid))
        for i in range(5, len(reply) - 1, 2):
            row = reply[i + 1]
            self.found.append((int(row[3]), reply[i].decode(), row))

    def page(self) -> TrackPage:
        self.found.sort(key=lambda t: (t[0], t[1]), reverse=True)
        shown = self.found[: self.q.limit]
        more = len(self.found) > self.q.limit or len(self.done) < len(self.at)
        cursor = f"{shown[-1][0]}:{shown[-1][1]}" if shown and more else None
        return TrackPage([answer.track_answer(jid, row, self.now) for _, jid, row in shown],
                         cursor)
