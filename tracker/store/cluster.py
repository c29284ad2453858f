"""Redis Cluster: clients that wait out failovers and slot moves, and per-node pipelines.

``ClusterClient`` / ``AsyncClusterClient`` are redis-py's cluster clients with every
command (and every non-transaction pipeline) retried by ``tracker.store.patience.Patience``.

``send`` / ``asend`` are the cluster's pipelines for tracker's hot paths (script
calls, bulk publish). redis-py's ClusterPipeline refuses ``evalsha`` and costs about
3x more per command; here every command goes to the master of its key's slot, one
packed write per node, all nodes written before any is read (the round trips
overlap), replies returned in the caller's order with errors in place, as
``pipeline.execute(raise_on_error=False)`` does. Per command:

- MOVED: the slot map is updated and the command re-sent to the new owner;
- ASK: re-sent to the named node behind ASKING;
- TRYAGAIN (a partition's fenced scripts during its slot's move), CLUSTERDOWN, a
  lost connection: backoff, the slot map re-read, re-sent, until the deadline.

Re-sending after a lost connection makes writes at-least-once, as the single-Redis
publisher already is; a script call re-sent folds the next batch, never one twice.
With ``wait=(n, ms)`` each node's batch ends with ``WAIT n ms`` on the same
connection (WAIT counts only its own connection's writes); a node whose replicas
fell short marks its replies ``Unreplicated``.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import redis
import redis.asyncio.cluster as acluster
from redis.cluster import RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)

from tracker.store.patience import Patience, retryable

CONNECTION = (redis.ConnectionError, redis.TimeoutError, OSError)
REDIRECTS_BEFORE_PAUSE = 5
Wait = Optional[tuple[int, int]]  # (replicas, timeout ms)


class Unreplicated(redis.RedisError):
    """WAIT answered fewer replicas than asked: a failover now could lose the write."""

    def __init__(self, node: str, acked: int, wanted: int):
        self.node, self.acked, self.wanted = node, acked, wanted
        super().__init__(f"{acked} of {wanted} replicas of {node} acknowledged")


def is_cluster(client: Any) -> bool:
    return isinstance(client, (RedisCluster, acluster.RedisCluster))


class ClusterClient(RedisCluster):
    """RedisCluster whose commands and pipelines are retried by deadline."""

    patience = Patience()

    def execute_command(self, *args, **kwargs):
        return self.patience.call(super().execute_command, *args, **kwargs)

    def pipeline(self, transaction=None, shard_hint=None):
        pipe = super().pipeline(transaction, shard_hint)
        return pipe if transaction else RetryingPipeline(pipe, self.patience)


class RetryingPipeline:
    """A ClusterPipeline whose ``execute`` re-sends the whole batch until the deadline
    (redis-py resets the queue after a failed execute, so it is kept and put back).
    For reads and idempotent writes only, which is all tracker sends through it."""

    def __init__(self, pipe, patience: Patience):
        self._pipe, self._patience = pipe, patience

    def __getattr__(self, name: str):
        return getattr(self._pipe, name)

    def __len__(self) -> int:
        return len(self._pipe)

    def execute(self, raise_on_error: bool = True) -> list:
        holder = getattr(self._pipe, "_execution_strategy", self._pipe)
        attr = "command_queue" if holder is not self._pipe else "command_stack"
        queued = list(getattr(holder, attr))

        def once() -> list:
            setattr(holder, attr, list(queued))
            return self._pipe.execute(raise_on_error)
        return self._patience.call(once)


class AsyncClusterClient(acluster.RedisCluster):
    """The asyncio twin of ``ClusterClient`` (tracker sends no asyncio pipelines)."""

    patience = Patience()

    async def execute_command(self, *args, **kwargs):
        return await self.patience.acall(super().execute_command, *args, **kwargs)


def patience_of(client: Any) -> Patience:
    """The client's retry policy (a RedisCluster built elsewhere gets the default)."""
    return getattr(client, "patience", None) or Patience()


def route_key(cmd: Sequence[Any]) -> Any:
    """The key a command is routed by: EVALSHA's first KEY, else its first argument."""
    return cmd[3] if cmd[0] == "EVALSHA" else cmd[1]


_slots: dict[Any, int] = {}  # routing key -> slot: tracker routes by a few stream keys


def slot_of(client: Any, key: Any) -> int:
    slot = _slots.get(key)
    if slot is None:
        if len(_slots) > 65536:
            _slots.clear()
        slot = _slots[key] = client.keyslot(key)
    return slot


def node_name(client: Any, key: str) -> Optional[str]:
    """``host:port`` of the master serving ``key`` (None on single Redis)."""
    if not is_cluster(client):
        return None
    return client.nodes_manager.get_node_from_slot(client.keyslot(key)).name


# ---------------------------------------------------------------- one round
class _Round:
    """Bookkeeping of one attempt: what to re-send, and whether to pause first."""

    def __init__(self, results: list, wait: Wait):
        self.results, self.wait = results, wait
        self.retry: dict[int, Optional[str]] = {}  # index -> ASK target (or None)
        self.errors: dict[int, BaseException] = {}
        self.pause = self.refresh = False

    def lost(self, idx: Sequence[int], err: BaseException) -> None:
        """A node could not be used (or its replies not read): re-send all of it."""
        for i in idx:
            self.retry[i], self.errors[i] = None, err
        self.pause = self.refresh = True

    def replies(self, name: str, idx: Sequence[int], replies: list, acked: Any) -> list:
        """Sort a node's replies; returns the MOVED errors (the caller updates its map)."""
        moved = []
        short = self.wait is not None and isinstance(acked, int) and acked < self.wait[0]
        for i, r in zip(idx, replies):
            if isinstance(r, MovedError):
                moved.append(r)
                self.retry[i], self.errors[i] = None, r
            elif isinstance(r, AskError):
                self.retry[i], self.errors[i] = f"{r.host}:{r.port}", r
            elif isinstance(r, (TryAgainError, ClusterDownError)):
                self.retry[i], self.errors[i] = None, r
                self.pause = True
                self.refresh = self.refresh or isinstance(r, ClusterDownError)
            elif short and not isinstance(r, Exception):
                self.results[i] = Unreplicated(name, acked, self.wait[0])  # type: ignore[index]
            else:
                self.results[i] = r
        return moved


def _groups(client: Any, slots: list[int], todo: dict[int, Optional[str]],
            rnd: _Round) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, ask in todo.items():
        try:
            name = ask or client.nodes_manager.get_node_from_slot(slots[i]).name
        except RedisClusterException as e:  # slot not covered: the map is being rebuilt
            rnd.lost([i], e)
            continue
        groups.setdefault(name, []).append(i)
    return groups


def _batch(cmds: Sequence[Sequence[Any]], idx: list[int], todo: dict[int, Optional[str]],
           wait: Wait) -> list:
    out: list = []
    for i in idx:
        if todo[i]:
            out.append(("ASKING",))
        out.append(cmds[i])
    if wait:
        out.append(("WAIT", *wait))
    return out


def _settle(rnd: _Round, todo: dict[int, Optional[str]], delays: Iterator[float],
            redirects: int) -> Optional[float]:
    """After a round: None to stop (done, or the deadline passed: errors put in place),
    else the seconds to sleep before the next round."""
    if not rnd.retry:
        return None
    if rnd.pause or redirects > REDIRECTS_BEFORE_PAUSE:
        delay = next(delays, None)
        if delay is None:
            for i in rnd.retry:
                rnd.results[i] = rnd.errors[i]
            return None
        return delay
    return 0.0


# ---------------------------------------------------------------- sync
def _read(conn) -> Any:
    try:
        return conn.read_response()
    except ResponseError as e:  # an error reply: in place
        return e


def _one_node(client: RedisCluster, name: str, idx: list[int], batch: list, rnd: _Round):
    node = client.get_node(node_name=name)
    if node is None:  # an ASK to a node we do not know yet
        rnd.lost(idx, redis.ConnectionError(f"unknown cluster node {name}"))
        return None
    pool = client.get_redis_connection(node).connection_pool
    try:
        conn = pool.get_connection()
    except CONNECTION as e:
        rnd.lost(idx, e)
        return None
    try:
        conn.send_packed_command(conn.pack_commands(batch))
    except CONNECTION as e:
        conn.disconnect()
        pool.release(conn)
        rnd.lost(idx, e)
        return None
    except BaseException:
        conn.disconnect()
        pool.release(conn)
        raise
    return conn, pool


def send(client: RedisCluster, cmds: Sequence[Sequence[Any]], patience: Patience,
         wait: Wait = None) -> list:
    """Every command to its slot's master, one packed write per node; see the module."""
    results: list = [None] * len(cmds)
    slots = [slot_of(client, route_key(c)) for c in cmds]
    todo: dict[int, Optional[str]] = dict.fromkeys(range(len(cmds)))
    delays, redirects = patience.delays(), 0
    while True:
        rnd = _Round(results, wait)
        sent = []
        for name, idx in _groups(client, slots, todo, rnd).items():
            batch = _batch(cmds, idx, todo, wait)
            got = _one_node(client, name, idx, batch, rnd)
            if got:
                sent.append((name, idx, got[0], got[1]))
        for name, idx, conn, pool in sent:
            try:
                replies = []
                for i in idx:
                    if todo[i]:
                        _read(conn)  # ASKING's +OK
                    replies.append(_read(conn))
                acked = _read(conn) if wait else None
            except CONNECTION as e:  # outcome unknown: re-send (at-least-once)
                conn.disconnect()
                rnd.lost(idx, e)
                continue
            except BaseException:
                conn.disconnect()
                raise
            finally:
                pool.release(conn)
            for err in rnd.replies(name, idx, replies, acked):
                client.nodes_manager.move_slot(err)
        redirects = 0 if rnd.pause else redirects + 1
        delay = _settle(rnd, todo, delays, redirects)
        if delay is None:
            return results
        todo = rnd.retry
        if delay:
            patience.sleep(delay)
        if rnd.refresh:
            try:
                client.nodes_manager.initialize()
            except (redis.RedisError, RedisClusterException):
                pass  # the next round tries again


def scan_keys(client: Any, pattern: str, key: str, count: int = 1000) -> Iterator[Any]:
    """SCAN for ``pattern`` on the one node serving ``key``'s slot (a partition's keys
    all share its hash tag), or the whole server on single Redis. A failover mid-scan
    restarts it on the new master, so a key may come twice: callers use sets or
    idempotent commands."""
    if not is_cluster(client):
        yield from client.scan_iter(match=pattern, count=count)
        return
    patience: Patience = getattr(client, "patience", Patience())
    delays = patience.delays()
    while True:
        try:
            node = client.get_node_from_key(key)
            yield from client.scan_iter(match=pattern, count=count, target_nodes=node)
            return
        except (redis.RedisError, RedisClusterException) as e:
            delay = next(delays, None) if retryable(e) else None
            if delay is None:
                raise
            patience.sleep(delay)
            try:
                client.nodes_manager.initialize()
            except (redis.RedisError, RedisClusterException):
                pass


# ---------------------------------------------------------------- asyncio
async def _aread(conn) -> Any:
    try:
        return await conn.read_response()
    except ResponseError as e:
        return e


async def _anode(client: acluster.RedisCluster, name: str, idx: list[int], batch: list,
                 asking: list[bool], wait: Wait, rnd: _Round) -> None:
    node = client.get_node(node_name=name)
    if node is None:
        rnd.lost(idx, redis.ConnectionError(f"unknown cluster node {name}"))
        return
    try:
        conn = node.acquire_connection()
    except CONNECTION as e:  # MaxConnectionsError is a ConnectionError
        rnd.lost(idx, e)
        return
    try:
        await conn.send_packed_command(conn.pack_commands(batch))
        replies = []
        for ask in asking:
            if ask:
                await _aread(conn)
            replies.append(await _aread(conn))
        acked = await _aread(conn) if wait else None
    except CONNECTION as e:
        await conn.disconnect()
        rnd.lost(idx, e)
        return
    except BaseException:  # cancelled mid-reply: never leave unread replies behind
        await conn.disconnect()
        raise
    finally:
        node.release(conn)
    for err in rnd.replies(name, idx, replies, acked):
        moved = client.nodes_manager.move_slot(err)
        if inspect.isawaitable(moved):  # async in redis-py 6+
            await moved


async def asend(client: acluster.RedisCluster, cmds: Sequence[Sequence[Any]],
                patience: Patience, wait: Wait = None) -> list:
    """``send`` on redis.asyncio's cluster client: the nodes are written and read
    concurrently."""
    await client.initialize()  # lazy in redis-py: the slot map on first use
    results: list = [None] * len(cmds)
    slots = [slot_of(client, route_key(c)) for c in cmds]
    todo: dict[int, Optional[str]] = dict.fromkeys(range(len(cmds)))
    delays, redirects = patience.delays(), 0
    while True:
        rnd = _Round(results, wait)
        jobs = [_anode(client, name, idx, _batch(cmds, idx, todo, wait),
                       [bool(todo[i]) for i in idx], wait, rnd)
                for name, idx in _groups(client, slots, todo, rnd).items()]
        await _gather(jobs)
        redirects = 0 if rnd.pause else redirects + 1
        delay = _settle(rnd, todo, delays, redirects)
        if delay is None:
            return results
        todo = rnd.retry
        if delay:
            await patience.asleep(delay)
        if rnd.refresh:
            try:
                await client.nodes_manager.initialize()
            except (redis.RedisError, RedisClusterException):
                pass


async def _gather(jobs: list) -> None:
    """Run the per-node exchanges together; the first error (after all ended) is raised."""
    if len(jobs) == 1:
        await jobs[0]
        return
    for out in await asyncio.gather(*jobs, return_exceptions=True):
        if isinstance(out, BaseException):
            raise out
