"""The job server's side: append lifecycle events to the log.

Call it where the job server handles PUSH (``enqueued``), FETCH (``working``),
ACK (``success``) and FAIL (``failed``, or ``dead`` once retries are spent).
Events are validated before anything is sent; a bad one raises
``ValidationError`` and nothing of its call (or its batch) is appended.

On a Redis Cluster a batch goes out as one packed write per master (the events
grouped by their partition's slot, ``tracker.store.cluster.send``), through
failovers and slot moves until the retry deadline.

Durable publish (``Settings.durable_replicas``, ``TRACKER_DURABLE_REPLICAS=N``): each
write ends with ``WAIT N timeout`` on the same connection (WAIT counts only the
writes of its own connection), so a call returns only once N replicas hold its
events; fewer raises ``NotDurable``, one line naming the setting. Redis replicates
asynchronously: without it, a master killed before its replica caught up takes
acknowledged events with it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import redis

from tracker import events
from tracker.errors import NotDurable
from tracker.store import cluster, keys
from tracker.store.boundary import check
from tracker.store.deployment import Deployment
from tracker.store.settings import Settings

_encode = events.encode_entry


def wait_of(settings: Settings) -> cluster.Wait:
    """``(replicas, timeout ms)`` for WAIT, or None when publishing is not durable."""
    if not settings.durable_replicas:
        return None
    return settings.durable_replicas, max(1, int(settings.durable_timeout * 1000))


def not_durable(settings: Settings, acked: int, where: str) -> NotDurable:
    wanted = settings.durable_replicas
    return NotDurable(f"durable_replicas: {acked} of {wanted} replica(s) at {where} acknowledged "
                      f"within {settings.durable_timeout:g}s; the events may be in the log "
                      "anyway: publish them again (at-least-once), or lower "
                      "TRACKER_DURABLE_REPLICAS")


def entry_ids(settings: Settings, replies: list) -> list[str]:
    """Entry IDs from per-node replies (``cluster.send``), raising the first error."""
    for r in replies:
        if isinstance(r, cluster.Unreplicated):
            raise not_durable(settings, r.acked, r.node)
        check(settings, r)
    return [r.decode() for r in replies]


async def append_async(client, settings: Settings, stream: str, fields: dict) -> str:
    """One XADD from an asyncio client (``tracker serve``'s TRACK SET), durable when set."""
    wait = wait_of(settings)
    if cluster.is_cluster(client):
        cmd = ["XADD", stream, "*", *[x for kv in fields.items() for x in kv]]
        replies = await cluster.asend(client, [cmd], cluster.patience_of(client), wait)
        return entry_ids(settings, replies)[0]
    if wait is None:
        return (await client.xadd(stream, fields)).decode()
    pipe = client.pipeline(transaction=False)  # one connection: WAIT covers this XADD
    pipe.xadd(stream, fields)
    pipe.execute_command("WAIT", *wait)
    entry, acked = await pipe.execute()
    if acked < wait[0]:
        raise not_durable(settings, acked, settings.where())
    return entry.decode()


class Publisher:
    def __init__(self, deployment: Deployment):
        self.deployment = deployment
        self._client = deployment.client
        self._wait = wait_of(deployment.settings)
        self._cluster = deployment.cluster

    def _stream(self, jid: str) -> str:
        d = self.deployment
        return keys.stream(d.prefix, keys.partition_of(jid, d.partitions))

    def publish(self, *evs: events.AnyEvent) -> list[str]:
        """Append events in one round trip; returns their stream entry IDs."""
        return self.publish_many(evs)

    def publish_many(self, evs: Iterable[events.AnyEvent]) -> list[str]:
        evs = list(evs)
        if not evs:
            return []
        with self.deployment.errors():
            if len(evs) == 1 and self._wait is None and not self._cluster:
                ev = evs[0]
                return [self._client.xadd(self._stream(ev.jid), _encode(ev)).decode()]
            cmds = []
            for ev in evs:
                cmd = ["XADD", self._stream(ev.jid), "*"]
                for item in _encode(ev).items():
                    cmd.extend(item)
                cmds.append(cmd)
            if self._cluster:
                replies = cluster.send(self._client, cmds, cluster.patience_of(self._client),
                                       self._wait)
                return entry_ids(self.deployment.settings, replies)
            return [i.decode() for i in self._send_all(cmds)]

    def _send_all(self, cmds: list[list]) -> list:
        """All commands in one write, replies read back in order: a pipeline without
        redis-py's per-command bookkeeping (1.4x the events/s of ``pipeline()``).
        Durable: ``WAIT`` ends the write, on the same connection.

        On any error the connection is dropped, so no unread reply outlives the call.
        As with any pipeline, a batch cut by a lost connection may be partly appended:
        publishing is at-least-once when the caller retries.
        """
        pool = self._client.connection_pool
        wait = self._wait
        packed = cmds + [("WAIT", *wait)] if wait else cmds
        for attempt in (0, 1):
            conn = pool.get_connection()
            try:
                conn.send_packed_command(conn.pack_commands(packed))
                replies = [conn.read_response() for _ in cmds]
                if wait:
                    acked = conn.read_response()
                    if acked < wait[0]:
                        raise not_durable(self.deployment.settings, acked,
                                          self.deployment.settings.where())
                return replies
            except redis.ConnectionError:
                conn.disconnect()
                if attempt:
                    raise
            except BaseException:
                conn.disconnect()
                raise
            finally:
                pool.release(conn)
        raise AssertionError("unreachable")

    def batch(self) -> Batch:
        """``with publisher.batch() as b: b.enqueued(...)`` publishes on exit, in one trip."""
        return Batch(self)

    # One method per job-server hook. Each returns the entry ID.
    def enqueued(self, jid: str, custom: Optional[dict] = None, queue: Optional[str] = None,
                 jobtype: Optional[str] = None, reserve_for: Optional[int] = None) -> str:
        return self.publish(events.make_enqueued(jid, custom, queue, jobtype, reserve_for))[0]

    def working(self, jid: str, reserve_for: Optional[int] = None) -> str:
        return self.publish(events.make_working(jid, reserve_for))[0]

    def success(self, jid: str) -> str:
        return self.publish(events.make_success(jid))[0]

    def failed(self, jid: str, errtype: Optional[str] = None, message: Optional[str] = None) -> str:
        return self.publish(events.make_failure(events.Failed, jid, errtype, message))[0]

    def dead(self, jid: str, errtype: Optional[str] = None, message: Optional[str] = None) -> str:
        return self.publish(events.make_failure(events.Dead, jid, errtype, message))[0]


class Batch:
    """Collects validated events; appends them all when the block exits cleanly."""

    def __init__(self, publisher: Publisher):
        self.publisher = publisher
        self.events: list[events.AnyEvent] = []
        self.ids: list[str] = []

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.ids = self.publisher.publish_many(self.events)

    def add(self, event: events.AnyEvent) -> None:
        self.events.append(event)

    def enqueued(self, jid, custom=None, queue=None, jobtype=None, reserve_for=None) -> None:
        self.add(events.make_enqueued(jid, custom, queue, jobtype, reserve_for))

    def working(self, jid, reserve_for=None) -> None:
        self.add(events.make_working(jid, reserve_for))

    def success(self, jid) -> None:
        self.add(events.make_success(jid))

    def failed(self, jid, errtype=None, message=None) -> None:
        self.add(events.make_failure(events.Failed, jid, errtype, message))

    def dead(self, jid, errtype=None, message=None) -> None:
        self.add(events.make_failure(events.Dead, jid, errtype, message))

    def set(self, jid, percent=None, desc=None, reserve_until=None) -> None:
        self.add(events.make_trackset(jid, percent, desc, reserve_until))
