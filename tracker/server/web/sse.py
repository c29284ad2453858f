"""Live tracks over Server-Sent Events: one hub per server, one tailer per partition.

Each tailer does XREAD BLOCK on its partition's log (consuming nothing: the
projector's group is untouched) from the log's tip at start. For every batch it
collects the JIDs somebody watches, re-reads their tracks (``AsyncTracker.get_many``,
one coalesced round trip) and pushes those whose TRACK GET answer changed. The
event is that answer, its id a digest of it: a client reconnecting with
``Last-Event-ID`` gets the current state at once if it differs from the last one it
saw, so it misses no state it could have read.

A read right after an entry appears answers the folded state once reads fold the
log up to its tip. Until then (a projector folds it a little later), an unchanged
answer is re-read on a short backoff (``RECHECK_MS``), so the change is still
pushed within milliseconds of being folded.

Subscribers never queue more than the newest state per JID: a slow client skips
intermediate states instead of growing a buffer. ``/v1/events`` (every track, for
the page) is bounded too; past ``MAX_PENDING`` JIDs it gets a ``resync`` event and
reloads its lists.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, Optional

import msgspec
import redis
import redis.asyncio as aredis

from tracker import events
from tracker.aio import AsyncTracker
from tracker.errors import TrackerError
from tracker.store import keys

log = logging.getLogger("tracker.web.sse")
Send = Callable[[Any], Awaitable[None]]  # ASGI
Receive = Callable[[], Awaitable[Any]]

TERMINAL = frozenset({"success", "dead"})  # a stream ends after sending one of these
RECHECK_MS = (2, 5, 10, 20, 50, 100, 250, 500, 1000)  # re-reads of an unchanged answer
# True once AsyncTracker.get folds the log up to its tip (read-your-writes in the core):
# then the first read after an entry answers it, and no re-reads are needed.
READS_FOLD_TO_TIP = True
MAX_PENDING = 10_000  # JIDs a /v1/events subscriber may have waiting before a resync
REMEMBERED = 100_000  # JIDs whose last pushed state the hub remembers (LRU)
RETRY = b"retry: 2000\n\n"  # how long EventSource waits before reconnecting
KEEPALIVE = b": keepalive\n\n"
RESYNC = b"event: resync\ndata: {}\n\n"
_JID = re.compile(events.JID_PATTERN.encode())
_encode = msgspec.json.Encoder().encode


def event_id(body: bytes) -> str:
    """The SSE event id of a TRACK GET answer: equal answers, equal ids."""
    return hashlib.blake2b(body, digest_size=8).hexdigest()


class Change(NamedTuple):
    """One state of one track, encoded once for every subscriber."""

    jid: str
    eid: str
    seq: int  # order of the read that produced it
    terminal: bool
    message: bytes  # with the id line: /v1/tracks/{jid}/events
    bare: bytes  # without: /v1/events

    @classmethod
    def of(cls, jid: str, answer: dict, seq: int) -> Change:
        body = _encode(answer)
        eid = event_id(body)
        bare = b"data: " + body + b"\n\n"
        return cls(jid, eid, seq, answer.get("state") in TERMINAL,
                   b"id: " + eid.encode() + b"\n" + bare, bare)


class Subscriber:
    """One open stream: the newest state per JID it has not sent yet.

    Waiting is a bare future, woken by a push, by the hub's keepalive tick or at
    close: no Event under ``wait_for`` and no timer per wait, since one update
    wakes every subscriber of the job.
    """

    __slots__ = ("jid", "pending", "waiter", "sent", "sent_seq", "overflow", "closed")

    def __init__(self, jid: Optional[str]):
        self.jid = jid  # None: every track
        self.pending: dict[str, Change] = {}
        self.waiter: Optional[asyncio.Future] = None
        self.sent: Optional[str] = None
        self.sent_seq = -1
        self.overflow = False
        self.closed = False

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def push(self, change: Change) -> None:
        if len(self.pending) >= MAX_PENDING and change.jid not in self.pending:
            self.overflow = True
        else:
            self.pending[change.jid] = change
        self.wake()

    def close(self) -> None:
        self.closed = True
        self.wake()

    async def take(self) -> list[Change]:
        """What is waiting; empty after a keepalive tick (or at close)."""
        if not self.pending and not self.overflow and not self.closed:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        out = list(self.pending.values())
        self.pending.clear()
        return out


class Hub:
    """The subscribers of one server, and the tailers that feed them."""

    def __init__(self, tracker: AsyncTracker, client: aredis.Redis, block_ms: int = 5000,
                 batch: int = 1000, keepalive: float = 15.0):
        self.tracker = tracker
        self.client = client  # for the blocking XREADs: one connection per partition
        self.block_ms = block_ms
        self.batch = batch
        self.by_jid: dict[str, set[Subscriber]] = {}
        self.everyone: set[Subscriber] = set()
        self.last: OrderedDict[str, tuple[str, int]] = OrderedDict()  # jid -> (eid, seq)
        self.rechecks: dict[str, asyncio.TimerHandle] = {}
        self.seq = 0
        self.sent = 0  # events written to subscribers (a metric)
        self.tasks: list[asyncio.Task] = []
        self.stopping = False
        self.keepalive = keepalive

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.tasks = [asyncio.ensure_future(self._tail(p)) for p in range(self.tracker.partitions)]
        self.tasks.append(asyncio.ensure_future(self._tick()))

    async def _tick(self) -> None:
        """Every ``keepalive`` seconds, wake every stream: a quiet one sends a comment (so
        proxies keep it open and a client that left is noticed)."""
        while not self.stopping:
            await asyncio.sleep(self.keepalive)
            for sub in [*self.everyone, *(s for subs in self.by_jid.values() for s in subs)]:
                sub.wake()

    def close_streams(self) -> None:
        """End every open stream (at shutdown); the clients reconnect elsewhere."""
        for sub in [*self.everyone, *(s for subs in self.by_jid.values() for s in subs)]:
            sub.close()

    async def stop(self) -> None:
        self.close_streams()
        for handle in self.rechecks.values():
            handle.cancel()
        self.stopping = True
        if not self.tasks:
            return
        # Tailers leave when their XREAD returns; with a long block, cancel them (redis-py
        # drops the connection at once; fakeredis never finishes a cancelled block, so
        # tests use a short one and the tailers leave on their own).
        _, pending = await asyncio.wait(self.tasks, timeout=min(self.block_ms, 250) / 1000 + 0.05)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2)

    @property
    def subscribers(self) -> int:
        return len(self.everyone) + sum(len(s) for s in self.by_jid.values())

    def subscribe(self, jid: Optional[str]) -> Subscriber:
        sub = Subscriber(jid)
        if jid is None:
            self.everyone.add(sub)
        else:
            self.by_jid.setdefault(jid, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        if sub.jid is None:
            self.everyone.discard(sub)
            return
        subs = self.by_jid.get(sub.jid)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self.by_jid[sub.jid]

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    # ------------------------------------------------------------ tailing
    async def _tip(self, stream: str) -> bytes:
        """The newest entry ID of a partition's log (0-0 when it has none)."""
        newest = await self.client.xrevrange(stream, "+", "-", count=1)
        return newest[0][0] if newest else b"0-0"

    async def _tail(self, part: int) -> None:
        stream = keys.stream(self.tracker.prefix, part)
        last: Optional[bytes] = None
        backoff = 0.05
        while not self.stopping:
            try:
                if last is None:
                    last = await self._tip(stream)
                reply = await self.client.xread({stream: last}, count=self.batch,
                                                block=self.block_ms)
                backoff = 0.05
            except (redis.RedisError, OSError) as e:
                log.warning("partition %d: cannot tail the log (%s); retrying in %.1fs",
                            part, e.__class__.__name__, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if not reply or self.stopping:
                continue
            entries = reply[0][1]
            last = entries[-1][0]
            watched: dict[str, bool] = {}
            for _id, fields in entries:
                raw = fields.get(b"j")
                if raw is None or not _JID.fullmatch(raw):
                    continue  # a poison entry: the fold dead-letters it
                jid = raw.decode()
                if self.everyone or jid in self.by_jid:
                    creates = fields.get(b"t") == b"enqueued" and fields.get(b"k") == b"1"
                    watched[jid] = watched.get(jid, False) or creates
            if watched:
                await self.refresh(watched)

    async def refresh(self, jids: dict[str, bool], attempt: int = 0) -> None:
        """Re-read these tracks and push the changed ones. ``jids[j]``: an entry of
        ``j`` can create its track (a tracked enqueued), so ``unknown`` may still change."""
        order = list(jids)
        seq = self.next_seq()
        try:
            answers = await self.tracker.get_many(order)
        except TrackerError as e:
            log.warning("cannot read %d tracks for subscribers: %s", len(order), e)
            for jid in order:
                self._recheck(jid, jids[jid], attempt)
            return
        for jid, answer in zip(order, answers):
            self.offer(Change.of(jid, answer, seq), answer["state"], jids[jid], attempt)

    def offer(self, change: Change, state: str, creates: bool = False, attempt: int = 0) -> None:
        """Push ``change`` to its subscribers if it is news; maybe read again soon.

        A read that shows nothing new may have come before the fold: read again on
        ``RECHECK_MS``. So may a first read of a JID the hub has no state for.
        """
        jid = change.jid
        prev = self.last.get(jid)
        if prev is not None and prev[1] > change.seq:
            return  # a read that started later has answered already
        news = prev is None or prev[0] != change.eid
        if news:
            self.note(change)
            handle = self.rechecks.pop(jid, None)
            if handle is not None:
                handle.cancel()
            for sub in self.by_jid.get(jid, ()):
                sub.push(change)
            for sub in self.everyone:
                sub.push(change)
        if not READS_FOLD_TO_TIP and (state != "unknown" or creates) and (prev is None or not news):
            self._recheck(jid, creates, 0 if news else attempt)

    def note(self, change: Change) -> None:
        """Remember ``change`` as the newest state of its JID (unless a later read is)."""
        prev = self.last.get(change.jid)
        if prev is not None and prev[1] > change.seq:
            return
        self.last[change.jid] = (change.eid, change.seq)
        self.last.move_to_end(change.jid)
        if len(self.last) > REMEMBERED:
            self.last.popitem(last=False)

    def _recheck(self, jid: str, creates: bool, attempt: int) -> None:
        if attempt >= len(RECHECK_MS) or jid in self.rechecks:
            return
        if not self.everyone and jid not in self.by_jid:
            return
        loop = asyncio.get_running_loop()

        def again() -> None:
            self.rechecks.pop(jid, None)
            asyncio.ensure_future(self.refresh({jid: creates}, attempt + 1))

        self.rechecks[jid] = loop.call_later(RECHECK_MS[attempt] / 1000, again)

    # ------------------------------------------------------------ streams
    # Both write straight to the ASGI ``send`` of their connection (no generator and
    # no task group per event: one update wakes every subscriber of the job), and
    # watch ``receive`` in a task of their own for the client leaving.

    async def serve_track(self, jid: str, last_event_id: Optional[str], send: Send,
                          receive: Receive) -> None:
        """``GET /v1/tracks/{jid}/events``: the current state (unless the client has
        it), then each change, until success or dead or the client leaves."""
        sub = self.subscribe(jid)
        watcher = asyncio.ensure_future(_until_disconnect(receive, sub))
        try:
            await send(_body(RETRY))
            seq = self.next_seq()
            first = Change.of(jid, await self.tracker.get(jid), seq)
            self.note(first)
            if not READS_FOLD_TO_TIP and not first.terminal:
                self._recheck(jid, True, 0)  # an entry just before we subscribed may fold now
            sub.sent, sub.sent_seq = first.eid, seq
            if first.eid != last_event_id:
                self.sent += 1
                await send(_body(first.message))
            if first.terminal:
                return
            while not sub.closed:
                changes = await sub.take()
                if not changes and not sub.closed:
                    await send(_body(KEEPALIVE))
                for c in changes:
                    if c.eid == sub.sent or c.seq < sub.sent_seq:
                        continue
                    sub.sent, sub.sent_seq = c.eid, c.seq
                    self.sent += 1
                    await send(_body(c.message))
                    if c.terminal:
                        return
        finally:
            watcher.cancel()
            self.unsubscribe(sub)

    async def serve_all(self, send: Send, receive: Receive) -> None:
        """``GET /v1/events``: every change of every track, for the page."""
        sub = self.subscribe(None)
        watcher = asyncio.ensure_future(_until_disconnect(receive, sub))
        try:
            await send(_body(RETRY))
            while not sub.closed:
                changes = await sub.take()
                if sub.overflow:
                    sub.overflow = False
                    await send(_body(RESYNC))
                if not changes and not sub.closed:
                    await send(_body(KEEPALIVE))
                    continue
                if changes:
                    self.sent += len(changes)
                    await send(_body(b"".join(c.bare for c in changes)))
        finally:
            watcher.cancel()
            self.unsubscribe(sub)


def _body(chunk: bytes) -> dict:
    return {"type": "http.response.body", "body": chunk, "more_body": True}


async def _until_disconnect(receive: Receive, sub: Subscriber) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            sub.close()
            return
