"""Answering TRACK GET and taking TRACK SET, for Python callers.

Reads judge expiry by Redis's clock, the clock that stamped the events the fold
computed it from. A read is first one MULTI/EXEC of plain commands
(``tracker.store.direct``: no script, one round trip for every partition asked); when
that cannot answer (the fold is behind the log, a bucket split or a rebuild switched
since, a long value, a cluster) it goes through ``get.lua``, one script call per
partition in a single pipeline, which waits for or folds the lag.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable
from typing import Any, Optional

from projections.track import Track
from tracker import answer, events, history
from tracker.freshness import POLL, READER, STEP, Freshness, behind
from tracker.listing import Merge, Query, TrackPage, count_call, totals
from tracker.projector import Projector
from tracker.publisher import Publisher
from tracker.store import keys, packed, scripts
from tracker.store.boundary import check
from tracker.store.deployment import Deployment
from tracker.store.direct import Direct
from tracker.store.settings import Settings


def get_call(prefix: str, part: int, jids: list[str], need: str = "") -> scripts.Call:
    """KEYS and ARGV of get.lua for some JIDs of one partition (sync and asyncio callers):
    ``need`` is the entry the fold must have reached ('' for the log's tip now)."""
    return ([keys.stream(prefix, part), keys.meta(prefix, part), keys.fence(prefix, part)],
            [keys.snapshot_prefix(prefix, part), need, *jids])


def plan(partitions: int, jids: list[str]) -> dict[int, list[int]]:
    """Partition -> indexes into ``jids``, so replies can be put back in order."""
    groups: dict[int, list[int]] = {}
    for i, jid in enumerate(jids):
        events.check_jid(jid)
        groups.setdefault(keys.partition_of(jid, partitions), []).append(i)
    return groups


def stored_track(v: bytes) -> Optional[Track]:
    """A stored value's track; None for bytes tracker did not write (get.lua's pcall)."""
    try:
        return packed.snapshot(v)
    except ValueError:
        return None


class Tracker:
    """Query and update tracks. ``Tracker.connect()`` with no URL uses the embedded Redis."""

    def __init__(self, deployment: Deployment):
        self.deployment = deployment
        self.publisher = Publisher(deployment)
        self.fresh = Freshness(deployment.settings)
        self._folder = Projector(deployment, consumer=READER, batch=STEP)
        self.direct = Direct(deployment.client, deployment.prefix,
                             check_tip=self.fresh.need == "")

    @classmethod
    def connect(cls, redis_url: Optional[str] = None, **settings: Any) -> Tracker:
        return cls(Deployment.open(Settings.from_env(redis_url=redis_url, **settings)))

    def close(self) -> None:
        self.deployment.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _tracks(self, jids: list[str]) -> tuple[list[Optional[Track]], int]:
        """The stored tracks of ``jids`` (None: none stored) and Redis's clock: one round
        trip when the fold is not behind."""
        groups = plan(self.deployment.partitions, jids)
        got = self.direct.read({p: [jids[i] for i in idx] for p, idx in groups.items()})
        if got is None:
            rows, now = self._read(groups, jids)
            return [answer.row_track(r) for r in rows], now
        now, values = got
        tracks: list[Optional[Track]] = [None] * len(jids)
        for part, idx in groups.items():
            for i, v in zip(idx, values[part]):
                if v is not None:
                    tracks[i] = stored_track(v)
        return tracks, now

    def settle(self, parts: Iterable[int]) -> None:
        """Bring the fold of ``parts`` to the log's tip now (what every read does first)."""
        self._read({p: [] for p in parts}, [])

    def _read(self, groups: dict[int, list[int]], jids: list[str]) -> tuple[list, int]:
        d = self.deployment
        replies = self._fresh("get", list(groups), lambda part, need: get_call(
            d.prefix, part, [jids[i] for i in groups[part]], need))
        rows: list = [None] * len(jids)
        now = 0
        for part, reply in replies.items():
            now = int(reply[0])
            for i, row in zip(groups[part], reply[2:]):
                rows[i] = row
        return rows, now

    def _fresh(self, script: str, parts: list[int],
               call: Callable[[int, str], scripts.Call]) -> dict[int, list]:
        """Run a read script (get.lua, list.lua) on ``parts``, once the fold of each has
        reached the log's tip: ``call(part, need)`` builds its KEYS and ARGV."""
        d = self.deployment
        needs = {part: self.fresh.need for part in parts}
        done: dict[int, list] = {}
        deadline = 0.0
        while needs:
            order = list(needs)
            with d.errors():
                replies = scripts.run(d.client, script, [call(p, needs[p]) for p in order])
            waiting = {}
            for part, reply in zip(order, replies):
                need = behind(check(d.settings, reply))
                if need:
                    waiting[part] = need
                else:
                    done[part] = reply
            if waiting:
                deadline = deadline or self.fresh.deadline()
                for part, need in waiting.items():
                    self.fresh.check(deadline, part, need)
                if self._advance(list(waiting)):
                    deadline = self.fresh.deadline()
            needs = waiting
        return done

    def count_tracks(self) -> dict[str, int]:
        """Tracks per state, from the state index: those updated within the TTL (a gauge:
        a working job kept alive only by a long reservation is left out)."""
        d = self.deployment
        with d.errors():
            replies = scripts.run(d.client, "count", [count_call(d.prefix, p, d.ttl_ms)
                                                      for p in range(d.partitions)])
        return totals([check(d.settings, r) for r in replies])

    def list_tracks(self, state: str, queue: Optional[str] = None, limit: int = 50,
                    cursor: Optional[str] = None) -> TrackPage:
        """Live tracks in ``state`` (and ``queue``), newest update first, a page at a time:
        pass ``next_cursor`` back for the next page. From the state index, never a scan."""
        q = Query.of(state, queue, limit, cursor)
        merge = Merge(q, list(range(self.deployment.partitions)))
        while pending := merge.pending():
            replies = self._fresh("list", pending, lambda part, need: merge.call(
                self.deployment.prefix, part, need))
            for part, reply in replies.items():
                merge.add(part, reply)
        return merge.page()

    def _advance(self, parts: list[int]) -> bool:
        """Bring the fold of ``parts`` closer to the log's tip (see tracker.freshness);
        whether it folded anything."""
        d = self.deployment
        if not self.fresh.folds:
            time.sleep(POLL)
            return False
        with d.errors():
            replies = scripts.run(d.client, "project", [self._folder.call(p) for p in parts])
            for part, reply in zip(parts, replies):
                if isinstance(reply, Exception) and "NOGROUP" in str(reply):
                    self._folder.ensure_group(part)
                elif self.fresh.pause_after(reply):
                    time.sleep(POLL)
        return self.fresh.progressed(replies)

    def get(self, jid: str) -> dict:
        """TRACK GET: the contract's JSON object for one JID (never None)."""
        tracks, now = self._tracks([jid])
        return answer.answer_of(jid, tracks[0], now)

    def get_many(self, jids: Iterable[str]) -> list[dict]:
        """TRACK GET for many JIDs in one round trip, in the order given."""
        jids = list(jids)
        if not jids:
            return []
        tracks, now = self._tracks(jids)
        return [answer.answer_of(j, t, now) for j, t in zip(jids, tracks)]

    def get_at(self, jid: str, at: Any) -> dict:
        """TRACK GET as of a past time (epoch ms, aware datetime, RFC 3339 or '-10m')."""
        if isinstance(at, dt.datetime):
            at = int(at.timestamp() * 1000)
        elif isinstance(at, str):
            at = history.parse_at(self.deployment, at)
        self.settle([self.deployment.partition(events.check_jid(jid))])
        return history.track_at(self.deployment, jid, int(at))

    def history(self, jid: str) -> history.History:
        """The job's events in log order, with everything in the log folded first."""
        self.settle([self.deployment.partition(events.check_jid(jid))])
        return history.history(self.deployment, jid)

    def reserved_until(self, jid: str) -> Optional[dt.datetime]:
        """The job's effective reservation (extended by reserve_until), or None.

        A job server checks this before reaping a job whose own reservation ran out.
        """
        tracks, now = self._tracks([jid])
        return answer.reservation(tracks[0], now)

    def set(self, jid: str, percent: Optional[int] = None, desc: Optional[str] = None,
            reserve_until: Any = None) -> str:
        """TRACK SET from a worker. Validates, appends, returns the entry ID."""
        return self.publisher.publish(events.make_trackset(jid, percent, desc, reserve_until))[0]

    def set_json(self, payload: bytes | str) -> str:
        """TRACK SET with Faktory's JSON payload."""
        return self.publisher.publish(events.decode_trackset_json(payload))[0]
