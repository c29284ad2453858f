"""Reading stored values without a script: one MULTI/EXEC, read off one pooled connection.

Why: ``get.lua`` answers every read correctly, but on Redis 6.2 it costs ~44 us of Redis
CPU per call (~5 us to start any script, ~9 to define the value codec, ~15 for TIME,
HMGET and XREVRANGE made from Lua, the rest finding and decoding values), where the same
reads as plain commands in one transaction cost ~3 us; and redis-py's per-command layers
cost more than the round trip they wrap. So a read first tries this:

    MULTI, TIME, then per partition: HMGET meta geo pos, XREVRANGE log + - COUNT 1 (the
    log's tip, unless the read mode is stale), HGET <bucket> <jid> per JID; EXEC

with each JID's bucket computed from the partition's geometry as last seen (cached per
partition). The transaction is atomic, so its replies are one instant of the partition,
as get.lua's are. They are used only when that instant needs nothing get.lua does beyond
reading: the geometry read back is the one the buckets were chosen by (no split or
rebuild switch since it was cached), the folded position has reached the tip, and no
value lives in an overflow string. Otherwise ``read`` answers None (after learning the
new geometry) and the caller asks get.lua, which waits for or folds the lag, follows
stubs and knows every geometry. Values are decoded by ``tracker.store.packed``, the
Python twin of the Lua codec that tests keep equal.

``AsyncDirect`` is the same on a redis.asyncio client (tracker.aio: ``serve`` and ``web``).

Not used on a Redis Cluster (each partition's MULTI would need its own node's connection,
and the fence a half-migrated partition refuses scripts with is a script's check) nor
for a Redis user without MULTI/EXEC (learned once, from its NOPERM).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from typing import Any, NamedTuple, Optional

import redis
import redis.asyncio as aredis

try:
    import hiredis
except ImportError:  # redis-py without its hiredis extra: its own parser reads replies
    hiredis = None  # type: ignore[assignment]

from tracker.store import cluster, keys
from tracker.store.packed import CAP, STUB, Geometry

log = logging.getLogger(__name__)

Values = dict[int, list[Optional[bytes]]]  # partition -> raw values, in the JIDs' order


class _Part(NamedTuple):
    raw: Optional[bytes]  # meta's geo as last read (None: absent, generation 0)
    geo: Geometry
    head: bytes  # HMGET meta geo pos [XREVRANGE log + - COUNT 1], packed
    bucket: str  # the generation's bucket key prefix


def _pack_py(*args: str | int) -> bytes:
    """One command in RESP (what redis-py and hiredis send)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode("utf-8", "surrogatepass") if isinstance(a, str) else b"%d" % a
        out += (b"$%d\r\n" % len(b), b, b"\r\n")
    return b"".join(out)


def _pack(*args: str | int) -> bytes:
    return hiredis.pack_command(args) if hiredis is not None else _pack_py(*args)  # type: ignore[arg-type]


_MULTI_TIME = _pack("MULTI") + _pack("TIME")
_EXEC = _pack("EXEC")


def _new_reader() -> Any:
    return hiredis.Reader(replyError=redis.ResponseError) if hiredis is not None else None


def _id(raw: bytes) -> tuple[int, int]:
    ms, _, seq = raw.partition(b"-")
    return int(ms), int(seq)


class Direct:
    """Script-free reads of one deployment's values (see the module's docstring)."""

    def __init__(self, client: Any, prefix: str, check_tip: bool = True):
        self.client = client
        self.prefix = prefix
        self.check_tip = check_tip
        self.usable = isinstance(client, (redis.Redis, aredis.Redis)) and \
            not cluster.is_cluster(client)
        self.parts: dict[int, _Part] = {}
        self._lock = threading.Lock()
        self._conn: Any = None  # a pooled connection kept for these reads
        self._pid = 0
        self._reader = _new_reader()

    def read(self, groups: dict[int, list[str]]) -> Optional[tuple[int, Values]]:
        """(Redis's clock in ms, each partition's raw values) for the JIDs of ``groups``
        (partition -> JIDs), or None: ask get.lua. A geometry that changed is learnt,
        and tried once more."""
        for _ in range(2):
            plan = self._plan(groups) if self.usable else None
            if plan is None:
                return None
            out = self._values(groups, self._exchange(*plan))
            if out is not False:
                return out  # type: ignore[return-value]
        return None

    def _part(self, part: int) -> _Part:
        got = self.parts.get(part)
        if got is None:
            got = self._learn(part, None)
        return got

    def _learn(self, part: int, raw: Optional[bytes]) -> _Part:
        """Cache what reads of ``part`` send under the geometry ``raw`` (meta's geo)."""
        p, g = self.prefix, Geometry.parse(raw)
        head = _pack("HMGET", keys.meta(p, part), "geo", "pos")
        if self.check_tip:
            head += _pack("XREVRANGE", keys.stream(p, part), "+", "-", "COUNT", 1)
        got = self.parts[part] = _Part(raw, g, head, keys.bucket_prefix(p, part, g.gen))
        return got

    def _plan(self, groups: dict[int, list[str]]) -> Optional[tuple[bytes, int]]:
        """The transaction's bytes and its number of commands."""
        out = [_MULTI_TIME]
        n = 3  # MULTI, TIME, EXEC
        for part, jids in groups.items():
            c = self._part(part)
            out.append(c.head)
            for jid in jids:
                if len(jid.encode("utf-8", "surrogatepass")) > CAP:
                    return None  # only an overflow string holds it
                out.append(_pack("HGET", f"{c.bucket}{c.geo.address(jid)}", jid))
            n += len(jids) + (2 if self.check_tip else 1)
        out.append(_EXEC)
        return b"".join(out), n

    def _exchange(self, data: bytes, n: int) -> Optional[list]:
        """EXEC's replies, or None after any trouble (the caller's get.lua retries).

        One connection is kept for these reads (the pool's get and release cost as much
        as the exchange); a thread that finds it busy borrows another from the pool."""
        pool = self.client.connection_pool
        mine = self._lock.acquire(blocking=False)
        conn, reply = None, None
        try:
            if mine:
                if self._conn is None or self._pid != os.getpid():
                    self._conn, self._pid = pool.get_connection(), os.getpid()
                conn = self._conn
            else:
                conn = pool.get_connection()
            reply = _send(conn, data, n, self._reader if mine else _new_reader())
        except (redis.RedisError, OSError) as e:
            self._refused(e)
        finally:
            if conn is not None and reply is None:
                conn.disconnect()  # replies may be left unread on it (and in the reader)
                if mine:
                    self._reader = _new_reader()
            if mine:
                self._lock.release()
            elif conn is not None:
                pool.release(conn)
        return reply

    def _refused(self, err: BaseException) -> None:
        if isinstance(err, redis.exceptions.NoPermissionError):
            log.info("this Redis user may not run MULTI/EXEC (%s); reads use get.lua only",
                     str(err).split(".")[0])
            self.usable = False

    def _values(self, groups: dict[int, list[str]],
                reply: Optional[list]) -> Optional[tuple[int, Values]] | bool:
        """EXEC's reply's values, None when get.lua must answer, False to try once more
        (under the geometry now learnt)."""
        if not isinstance(reply, list) or any(isinstance(r, Exception) for r in reply):
            return None
        secs, micros = reply[0]
        now = int(secs) * 1000 + int(micros) // 1000
        out: Values = {}
        i, again = 1, False
        for part, jids in groups.items():
            geo, pos = reply[i]
            i += 1
            if geo != self.parts[part].raw:
                self._learn(part, geo)
                again = True
            if self.check_tip:
                tip = reply[i]
                i += 1
                if tip and (pos is None or _id(pos) < _id(tip[0][0])):
                    return None  # the fold is behind the log: get.lua waits or folds
            values = reply[i:i + len(jids)]
            i += len(jids)
            if STUB in values:
                return None
            out[part] = values
        return False if again else (now, out)


class AsyncDirect(Direct):
    """``Direct`` on a redis.asyncio client: one connection kept, another borrowed while
    it is busy."""

    def __init__(self, client: Any, prefix: str, check_tip: bool = True):
        super().__init__(client, prefix, check_tip)
        self._busy = False

    async def read(self, groups: dict[int, list[str]]) -> Optional[tuple[int, Values]]:  # type: ignore[override]
        for _ in range(2):
            plan = self._plan(groups) if self.usable else None
            if plan is None:
                return None
            out = self._values(groups, await self._aexchange(*plan))
            if out is not False:
                return out  # type: ignore[return-value]
        return None

    async def _aexchange(self, data: bytes, n: int) -> Optional[list]:
        pool = self.client.connection_pool
        mine = not self._busy
        self._busy = self._busy or mine
        conn, reply = None, None
        try:
            if mine:
                if self._conn is None:
                    self._conn = await pool.get_connection()
                conn = self._conn
            else:
                conn = await pool.get_connection()
            reply = await _asend(conn, data, n, self._reader if mine else _new_reader())
        except (TimeoutError, redis.RedisError, OSError) as e:
            self._refused(e)
        finally:
            if conn is not None and reply is None:
                await conn.disconnect()
                if mine:
                    self._reader = _new_reader()
            if mine:
                self._busy = False
            elif conn is not None:
                await pool.release(conn)
        return reply


def _gets(reader: Any) -> Any:
    """hiredis's next reply (False: more bytes needed); an error reply raised."""
    reply = reader.gets()
    if isinstance(reply, redis.ResponseError):
        text = str(reply)
        raise (redis.exceptions.NoPermissionError if text.startswith("NOPERM")
               else redis.ResponseError)(text)
    return reply


def _drain(reader: Any, left: int, reply: Any) -> tuple[int, Any]:
    """Take the replies hiredis has whole: (replies still to come, the last one taken)."""
    while left:
        got = _gets(reader)
        if got is False:
            break
        reply, left = got, left - 1
    return left, reply


def _feed(reader: Any, chunk: bytes) -> None:
    if not chunk:
        raise redis.ConnectionError("connection closed by the server")
    reader.feed(chunk)


async def _asend(conn: Any, data: bytes, n: int, reader: Any) -> Any:
    """``_send`` on a redis.asyncio connection (its stream reader and writer)."""
    if getattr(conn, "_writer", None) is None:
        await conn.connect()
    stream, writer = getattr(conn, "_reader", None), getattr(conn, "_writer", None)
    if hiredis is None or not isinstance(stream, asyncio.StreamReader) or writer is None:
        await conn.send_packed_command([data], check_health=False)
        for _ in range(n - 1):
            await conn.read_response()
        return await conn.read_response()
    writer.write(data)
    left, reply = n, None
    async with asyncio.timeout(conn.socket_timeout):
        await writer.drain()
        while True:
            left, reply = _drain(reader, left, reply)
            if not left:
                return reply
            _feed(reader, await stream.read(65536))


def _send(conn: Any, data: bytes, n: int, reader: Any) -> Any:
    """Send ``data`` (``n`` commands) and read their replies; EXEC's (the last) is
    returned. On a real socket with hiredis, hiredis parses the replies directly:
    redis-py's layers around each reply cost more than the exchange."""
    if getattr(conn, "_sock", None) is None:
        conn.connect()
    sock = getattr(conn, "_sock", None)
    if hiredis is None or not isinstance(sock, socket.socket):
        conn.send_packed_command([data], check_health=False)
        for _ in range(n - 1):
            conn.read_response()  # +OK to MULTI, +QUEUED to each command
        return conn.read_response()
    sock.sendall(data)
    left, reply = n, None
    while True:
        left, reply = _drain(reader, left, reply)
        if not left:
            return reply
        _feed(reader, sock.recv(65536))

