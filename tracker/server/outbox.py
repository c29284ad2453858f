"""Asynchronous, ordered, coalesced appends for the proxy (``tracker serve --upstream``).

The proxy relays every reply at once and appends the events it implies later, off
the reply's path. Everything queued during one turn of the event loop goes to
Redis as one pipelined write (XADDs to ``keys.stream``, the small per-JID records
of ``observe``), and only one batch is out at a time, so the log holds events in
exactly the order the proxy saw the replies that caused them: a job's
``enqueued`` can never land after its ``working``.

``barrier()`` is the read-your-writes point: a TRACK GET or SET waits for it, so
it answers after every event the proxy had queued when the command's turn came
(whichever connection caused them). Publishing is at-least-once, as the sync
``Publisher``'s: a batch cut by a lost connection is sent again once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Optional

import redis
import redis.asyncio as aredis

from tracker import events
from tracker.errors import TrackerError
from tracker.store import cluster, keys
from tracker.store.boundary import unavailable
from tracker.store.settings import Settings

log = logging.getLogger("tracker.server.proxy")

MAX_QUEUED = 200_000  # operations held while Redis is slow or away; beyond, new ones are dropped
WARN_EVERY = 10.0  # seconds between two warnings about dropped events

# A resolve: a GETDEL whose value decides the event (or None) that takes its place.
Decide = Callable[[Optional[bytes]], Optional[events.AnyEvent]]


class Outbox:
    def __init__(self, client: aredis.Redis, settings: Settings, partitions: int):
        self.client = client
        self.settings = settings
        self.prefix = settings.prefix
        self.partitions = partitions
        self.ops: list[Any] = []  # a command (list) or a resolve (key, decide)
        self.resolves = 0  # how many of self.ops are resolves
        self.fut: Optional[asyncio.Future] = None  # done when self.ops is appended
        self.inflight: Optional[asyncio.Future] = None  # the batch being sent
        self.running = False  # a _run task exists (scheduled or sending)
        self.appended = 0  # events appended since start (tests and logs)
        self.dropped = 0
        self._warned = 0.0
        self._task: Optional[asyncio.Task] = None

    # ------------------------------------------------------------- queueing
    def event(self, ev: events.AnyEvent) -> asyncio.Future:
        """Queue an append of ``ev``; returns the future of its batch (see ``wait``)."""
        return self._queue(self.xadd(ev))

    def command(self, *cmd: Any) -> asyncio.Future:
        return self._queue(list(cmd))

    def resolve(self, key: str, decide: Decide) -> asyncio.Future:
        """GETDEL ``key``, then append ``decide(value)`` if that is an event, in order."""
        self.resolves += 1
        return self._queue((key, decide))

    def xadd(self, ev: events.AnyEvent) -> list:
        cmd: list = ["XADD", keys.stream(self.prefix, keys.partition_of(ev.jid, self.partitions)),
                     "*"]
        for item in events.encode_entry(ev).items():
            cmd.extend(item)
        return cmd

    def _queue(self, op: Any) -> asyncio.Future:
        if len(self.ops) >= MAX_QUEUED:
            self._drop(1)
            if self.fut is None:
                self.fut = asyncio.get_running_loop().create_future()
            return self.fut
        self.ops.append(op)
        if self.fut is None:
            self.fut = asyncio.get_running_loop().create_future()
        if not self.running:
            self.running = True  # first op of this turn: send at the turn's end, all together
            asyncio.get_running_loop().call_soon(self._start)
        return self.fut

    def barrier(self) -> Optional[asyncio.Future]:
        """The future of the newest batch holding anything queued so far, or None if
        everything is appended already. Batches finish in order, so it covers all."""
        return self.fut or self.inflight

    @staticmethod
    async def wait(fut: Optional[asyncio.Future]) -> None:
        """Wait for a batch; raises the TrackerError that kept it from Redis, if any."""
        if fut is not None:
            err = await asyncio.shield(fut)
            if err is not None:
                raise err

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait until everything queued is appended (or given up), at most ``timeout``."""
        deadline = time.monotonic() + timeout
        while (self.fut or self.inflight) and time.monotonic() < deadline:
            fut = self.barrier()
            if fut is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(fut), deadline - time.monotonic())
                except TimeoutError:
                    break
        if self.fut or self.inflight:
            log.warning("stopping with %d unsent operation(s)", len(self.ops))

    # --------------------------------------------------------------- sending
    def _start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            await self._loop()
        finally:
            self.running = False

    async def _loop(self) -> None:
        while self.ops:
            batch, fut, nres = self.ops, self.fut, self.resolves
            self.ops, self.fut, self.resolves = [], None, 0
            self.inflight = fut
            err: Optional[TrackerError] = None
            try:
                await self._send(batch, nres)
            except TrackerError as e:
                err = e
                self._drop(len(batch), e)
            except Exception as e:  # a bug must not stop the proxy's appends for good
                log.error("internal error appending events", exc_info=e)
                err = TrackerError("internal error appending events")
            self.inflight = None
            if fut is not None and not fut.done():
                fut.set_result(err)
            await asyncio.sleep(0)  # let this turn's callbacks queue more: a bigger batch

    async def _send(self, batch: list, nres: int) -> None:
        if nres:
            gets = [op for op in batch if isinstance(op, tuple)]
            values = await self._pipeline([["GETDEL", key] for key, _ in gets])
            decided = iter(values)
            cmds = []
            for op in batch:
                if isinstance(op, tuple):
                    value = next(decided)
                    ev = op[1](value if isinstance(value, bytes) else None)
                    if ev is not None:
                        cmds.append(self.xadd(ev))
                else:
                    cmds.append(op)
        else:
            cmds = batch
        if cmds:
            replies = await self._pipeline(cmds)
            self.appended += sum(1 for c in cmds if c[0] == "XADD")
            for cmd, reply in zip(cmds, replies):
                if isinstance(reply, redis.ResponseError):
                    log.warning("Redis refused %s: %s", cmd[0], reply)

    async def _pipeline(self, cmds: list[list]) -> list:
        """All commands in one write, replies read back in order (errors in place);
        one retry on a new connection if the connection breaks. On a Redis Cluster,
        one write per master (``cluster.asend``), retried through failovers."""
        if cluster.is_cluster(self.client):
            out = await cluster.asend(self.client, cmds, cluster.patience_of(self.client))
            for reply in out:
                if isinstance(reply, (redis.ConnectionError, redis.TimeoutError)):
                    raise unavailable(self.settings, reply) from reply
            return out
        pool = self.client.connection_pool
        for attempt in (0, 1):
            try:
                conn = await pool.get_connection()
            except (redis.ConnectionError, redis.TimeoutError) as e:
                if attempt:
                    raise unavailable(self.settings, e) from e
                await asyncio.sleep(0.05)
                continue
            try:
                await conn.send_packed_command(conn.pack_commands(cmds))
                out = []
                for _ in cmds:
                    try:
                        out.append(await conn.read_response())
                    except redis.ResponseError as e:  # the reply was read whole: still in step
                        out.append(e)
                return out
            except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
                await conn.disconnect()
                if attempt:
                    raise unavailable(self.settings, e) from e
            except BaseException:
                await conn.disconnect()
                raise
            finally:
                await pool.release(conn)
        raise AssertionError("unreachable")

    def _drop(self, n: int, why: Any = "too many queued") -> None:
        self.dropped += n
        now = time.monotonic()
        if now - self._warned > WARN_EVERY:
            self._warned = now
            log.warning("dropped %d operation(s) so far, lost events (%s)", self.dropped, why)

