"""TRACK GET and TRACK SET on redis.asyncio, for ``tracker serve``.

The async twin of ``tracker.query.Tracker``: the same key names, the same
``get.lua``, the same validation and the same answer-building helpers
(``query.plan``, ``query.track_answer``, ``events.decode_trackset_json``), so
the two cannot drift apart. Only the transport differs.

``get`` coalesces: every GET asked for in one turn of the event loop goes to
Redis together, one ``get.lua`` call per partition in one pipeline, exactly as
``Tracker.get_many`` does, with at most ``MAX_INFLIGHT`` batches out at once.
With many connections the server then pays one round trip per batch instead
of one per request.
"""

from __future__ import annotations

import asyncio
from typing import Optional

import redis.asyncio as aredis

from tracker import answer, events
from tracker.query import get_call, plan
from tracker.store import keys, scripts
from tracker.store.boundary import check, redis_errors
from tracker.store.connection import create_async_client
from tracker.store.deployment import Deployment
from tracker.store.settings import Settings

# Batches of GETs in flight at once. While they are out, new GETs queue and go
# together: bigger batches, fewer round trips, less CPU per request under load.
MAX_INFLIGHT = 2


class AsyncTracker:
    """TRACK GET / TRACK SET for one deployment, on an asyncio Redis client.

    Build it with ``await AsyncTracker.open(settings)``.
    """

    def __init__(self, client: aredis.Redis, settings: Settings, partitions: int):
        self.client = client
        self.settings = settings
        self.prefix = settings.prefix
        self.partitions = partitions
        self._waiting: dict[int, list[tuple[str, asyncio.Future]]] = {}
        self._scheduled = False
        self._inflight = 0

    @classmethod
    async def open(cls, settings: Settings, partitions: Optional[int] = None,
                   max_connections: int = 32) -> AsyncTracker:
        """Connect; the partition count comes from Redis via the sync ``Deployment.open``
        (same version check, same agreement rule) unless the caller already knows it."""
        if partitions is None:
            d = await asyncio.to_thread(Deployment.open, settings)
            partitions = d.partitions
            d.close()
        t = cls(create_async_client(settings, max_connections), settings, partitions)
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
            calls = [get_call(self.prefix, part, [jid for jid, _ in group])
                     for part, group in batch.items()]
            with redis_errors(self.settings):
                replies = [check(self.settings, r)
                           for r in await scripts.arun(self.client, "get", calls)]
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
                for (jid, fut), row in zip(group, reply[1:]):
                    if not fut.done():
                        fut.set_result(answer.track_answer(jid, row, now))
        finally:
            self._inflight -= 1
            if self._waiting:
                self._flush()  # what queued up meanwhile goes now, as one batch

    # ------------------------------------------------------------------ SET
    async def set_json(self, payload: bytes | str) -> str:
        """TRACK SET with Faktory's JSON payload: validate, append; returns the entry ID."""
        ev = events.decode_trackset_json(payload)
        with redis_errors(self.settings):
            entry = await self.client.xadd(keys.stream(self.prefix, self.partition(ev.jid)),
                                           events.encode_entry(ev))
        return entry.decode()
