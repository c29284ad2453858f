"""TRACK GET and TRACK SET on redis.asyncio, for ``tracker serve``.

The async twin of ``tracker.query.Tracker``: the same key names, the same reads
(``tracker.store.direct``'s transaction first, else ``get.lua``), the same validation
and the same answer-building helpers (``query.plan``, ``answer``,
``events.decode_trackset_json``), so the two cannot drift apart. Only the transport
differs.

``get`` coalesces: every GET asked for in one turn of the event loop goes to
Redis together, in one transaction for every partition (or one ``get.lua`` call per
partition in one pipeline), exactly as ``Tracker.get_many`` does, with at most
``MAX_INFLIGHT`` batches out at once.
With many connections the server then pays one round trip per batch instead
of one per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Optional

import redis
import redis.asyncio as aredis

from tracker import answer, events
from tracker.freshness import POLL, READER, STEP, Freshness, behind
from tracker.listing import Merge, Query, TrackPage, count_call, totals
from tracker.projector import project_call
from tracker.publisher import append_async
from tracker.query import get_call, plan, stored_track
from tracker.store import keys, scripts
from tracker.store.boundary import check, redis_errors
from tracker.store.connection import create_async_client
from tracker.store.deployment import Deployment
from tracker.store.direct import AsyncDirect
from tracker.store.settings import Settings

# Batches of GETs in flight at once. While one is out, new GETs queue and go together:
# bigger batches, fewer round trips, less CPU per request under load. One measured best
# (scripts/bench.py --only web serve: 0.81x the hello route's requests/s against 0.68x
# with two; serve's p99 3.8 ms against 7.7-10.8); a lone reader never waits for it.
MAX_INFLIGHT = 1


class AsyncTracker:
    """TRACK GET / TRACK SET for one deployment, on an asyncio Redis client.

    Build it with ``await AsyncTracker.open(settings)``.
    """

    def __init__(self, client: aredis.Redis, settings: Settings, partitions: int, ttl: int):
        self.client = client
        self.settings = settings
        self.prefix = settings.prefix
        self.partitions = partitions
        self.ttl_ms = ttl * 1000
        self.fresh = Freshness(settings)
        self._waiting: dict[int, list[tuple[str, asyncio.Future]]] = {}
        self._scheduled = False
        self._inflight = 0
        self.direct = AsyncDirect(client, self.prefix, check_tip=self.fresh.need == "")

    @classmethod
    async def open(cls, settings: Settings, partitions: Optional[int] = None,
                   max_connections: int = 32) -> AsyncTracker:
        """Connect; the partition count and TTL come from Redis via the sync
        ``Deployment.open`` (same version check, same agreement rule)."""
        d = await asyncio.to_thread(Deployment.open, settings)
        if partitions is not None and partitions != d.partitions:
            d.close()
            raise ValueError(f"partitions: the deployment has {d.partitions}, not {partitions}")
        partitions, ttl = d.partitions, d.ttl
        d.close()
        t = cls(create_async_client(settings, max_connections), settings, partitions, ttl)
        await t.load_scripts()
        return t

    async def load_scripts(self) -> None:
        """Load get.lua now, so a Redis problem shows at start rather than on first use."""
        with redis_errors(self.settings):
            await self.client.script_load(scripts.source("get"))

    async def close(self) -> None:
        await self.client.aclose()

    def partition(self, jid: str) -> int:
        return keys.partition_of(jid, self.partitions)

    # ------------------------------------------------------------------ GET
    async def get(self, jid: str) -> dict:
        """TRACK GET: the contract's object (never None). Raises ValidationError for a bad JID."""
        return await self.get_future(jid)

    def get_future(self, jid: str) -> asyncio.Future:
        """``get`` without a coroutine: validates now (raising ValidationError), answers later.

        The server's hot path uses this, so a request costs no task of its own.
        """
        (part, _), = plan(self.partitions, [jid]).items()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiting.setdefault(part, []).append((jid, fut))
        if not self._scheduled and self._inflight < MAX_INFLIGHT:
            self._scheduled = True
            loop.call_soon(self._flush)
        return fut

    async def get_many(self, jids: list[str]) -> list[dict]:
        """TRACK GET for many JIDs, in order (they share the coalesced round trips)."""
        futs = [self.get_future(j) for j in jids]
        return list(await asyncio.gather(*futs))

    def _flush(self) -> None:
        self._scheduled = False
        if not self._waiting or self._inflight >= MAX_INFLIGHT:
            return  # a finishing batch flushes again
        batch, self._waiting = self._waiting, {}
        self._inflight += 1
        asyncio.ensure_future(self._fetch(batch))

    async def _fetch(self, batch: dict[int, list[tuple[str, asyncio.Future]]]) -> None:
        try:
            got = await self.direct.read({p: [jid for jid, _ in g] for p, g in batch.items()})
            if got is not None:
                now, values = got
                for part, group in batch.items():
                    for (jid, fut), v in zip(group, values[part]):
                        if not fut.done():
                            fut.set_result(answer.answer_of(
                                jid, None if v is None else stored_track(v), now))
                return
            replies = await self._rows(batch)
        except BaseException as e:  # every waiter hears about it, nothing hangs
            for group in batch.values():
                for _jid, fut in group:
                    if not fut.done():
                        fut.set_exception(e)
            if not isinstance(e, Exception):
                raise
        else:
            for group, reply in zip(batch.values(), replies):
                now = int(reply[0])
                for (jid, fut), row in zip(group, reply[2:]):
                    if not fut.done():
                        fut.set_result(answer.track_answer(jid, row, now))
        finally:
            self._inflight -= 1
            if self._waiting:
                self._flush()  # what queued up meanwhile goes now, as one batch

    async def _rows(self, batch: dict[int, list[tuple[str, asyncio.Future]]]) -> list:
        """get.lua's reply per partition of ``batch`` (the twin of ``Tracker._read``)."""
        replies = await self._fresh("get", list(batch), lambda part, need: get_call(
            self.prefix, part, [jid for jid, _ in batch[part]], need))
        return [replies[p] for p in batch]

    async def _fresh(self, script: str, parts: list[int],
                     call: Callable[[int, str], scripts.Call]) -> dict[int, list]:
        """A read script on ``parts`` once their fold has reached the log's tip (the twin
        of ``Tracker._fresh``; see tracker.freshness)."""
        needs = {part: self.fresh.need for part in parts}
        done: dict[int, list] = {}
        deadline = 0.0
        while needs:
            order = list(needs)
            with redis_errors(self.settings):
                replies = await scripts.arun(self.client, script,
                                             [call(p, needs[p]) for p in order])
            waiting = {}
            for part, reply in zip(order, replies):
                need = behind(check(self.settings, reply))
                if need:
                    waiting[part] = need
                else:
                    done[part] = reply
            if waiting:
                deadline = deadline or self.fresh.deadline()
                for part, need in waiting.items():
                    self.fresh.check(deadline, part, need)
                if await self._advance(list(waiting)):
                    deadline = self.fresh.deadline()
            needs = waiting
        return done

    async def count_tracks(self) -> dict[str, int]:
        """``Tracker.count_tracks`` on asyncio: tracks per state (a gauge)."""
        with redis_errors(self.settings):
            replies = await scripts.arun(self.client, "count", [
                count_call(self.prefix, p, self.ttl_ms) for p in range(self.partitions)])
        return totals([check(self.settings, r) for r in replies])

    async def list_tracks(self, state: str, queue: Optional[str] = None, limit: int = 50,
                          cursor: Optional[str] = None) -> TrackPage:
        """``Tracker.list_tracks`` on asyncio: live tracks by state, newest update first."""
        q = Query.of(state, queue, limit, cursor)
        merge = Merge(q, list(range(self.partitions)))
        while pending := merge.pending():
            replies = await self._fresh("list", pending, lambda part, need: merge.call(
                self.prefix, part, need))
            for part, reply in replies.items():
                merge.add(part, reply)
        return merge.page()

    async def _advance(self, parts: list[int]) -> bool:
        """Fold ``parts`` towards the log's tip with project.lua, or wait (freshness);
        whether it folded anything."""
        if not self.fresh.folds:
            await asyncio.sleep(POLL)
            return False
        calls = [project_call(self.prefix, p, READER, STEP, self.ttl_ms,
                              self.settings.grace * 1000) for p in parts]
        with redis_errors(self.settings):
            replies = await scripts.arun(self.client, "project", calls)
            for part, reply in zip(parts, replies):
                if isinstance(reply, Exception) and "NOGROUP" in str(reply):
                    await self._create_group(part)
                elif self.fresh.pause_after(reply):
                    await asyncio.sleep(POLL)
        return self.fresh.progressed(replies)

    async def _create_group(self, part: int) -> None:
        try:
            await self.client.xgroup_create(keys.stream(self.prefix, part), keys.GROUP, id="0",
                                            mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    # ------------------------------------------------------------------ SET
    async def set_json(self, payload: bytes | str) -> str:
        """TRACK SET with Faktory's JSON payload: validate, append; returns the entry ID."""
        ev = events.decode_trackset_json(payload)
        with redis_errors(self.settings):
            return await append_async(self.client, self.settings,
                                      keys.stream(self.prefix, self.partition(ev.jid)),
                                      events.encode_entry(ev))
