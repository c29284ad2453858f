"""``tracker serve``: the Faktory Work Protocol, for TRACK GET and TRACK SET.

Unmodified Faktory clients (Go, Ruby, Node, Python) point a connection here and
send the Enterprise tracking commands through their raw-command path. The
protocol is line based: the server greets ``+HI {...}``, the client answers
``HELLO {json}``, then one command per line (``\\r\\n`` or a bare ``\\n``), one
reply per command, in order.

Built on ``asyncio.Protocol`` rather than streams: one object per connection,
no task per connection, so thousands of idle sockets cost little and every
limit (line length, idle and handshake time, connection count, unread output)
is enforced in one place. Redis work goes through ``tracker.aio`` and never
blocks the loop; concurrent TRACK GETs share round trips there.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import time
from dataclasses import dataclass
from typing import Any, Optional

import msgspec

from tracker import events
from tracker.aio import AsyncTracker
from tracker.errors import RedisUnavailable, TrackerError, ValidationError
from tracker.server import workers as workers_mod
from tracker.server.wire import bulk, check_password, err_line, pwdhash, shown
from tracker.store.deployment import Deployment
from tracker.store.settings import Settings

__all__ = ["Connection", "Hello", "Limits", "Server", "pwdhash", "run"]

uvloop: Any
try:  # optional: a faster event loop for socket-heavy work (pip install 'tracker[fast]')
    import uvloop
except ImportError:  # pragma: no cover - depends on the environment
    uvloop = None

log = logging.getLogger("tracker.server")

PROTOCOL_VERSION = 2
CLOSE_GRACE = 5.0  # seconds a closing connection may take to read its last reply
SHUTDOWN_GRACE = 10.0  # seconds SIGTERM waits for in-flight commands
PAUSE_AT = 256 * 1024  # unparsed bytes buffered while busy before we stop reading


@dataclass(frozen=True)
class Limits:
    max_line: int = 1024 * 1024
    idle_timeout: Optional[float] = 300.0  # None: never (the proxy's default, as Faktory)
    max_connections: int = 1000
    handshake_timeout: float = 5.0


class Hello(msgspec.Struct):
    """HELLO's JSON. Unknown fields are ignored (clients add their own)."""

    hostname: Optional[str] = None
    v: Optional[int] = None
    wid: Optional[str] = None
    pid: Optional[int] = None
    labels: Optional[list[str]] = None
    pwdhash: Optional[str] = None


_hello = msgspec.json.Decoder(Hello)


class Connection(asyncio.Protocol):
    transport: asyncio.Transport  # set by connection_made, before any other callback

    def __init__(self, server: Server):
        self.server = server
        self.buf = bytearray()
        self.authed = False
        self.busy = False  # a command is in flight; later lines wait in buf
        self.closing = False
        self.closed = False
        self.paused = False  # we stopped reading (busy with a full buffer, or peer not reading)
        self.writable = True
        self.eof = False
        self.render = None
        self.salt = ""
        self.iterations = 0
        now = time.monotonic()
        self.started = self.active = self.closing_since = now

    # -- asyncio callbacks -----------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        srv = self.server
        if not srv.admit(self, transport):
            self.closed = True
            return
        if srv.password:
            self.salt = secrets.token_hex(8)
            self.iterations = 4096 + secrets.randbelow(4096)  # Faktory's range
            transport.write(b'+HI {"v":2,"i":%d,"s":"%s"}\r\n'
                            % (self.iterations, self.salt.encode()))
        else:
            transport.write(b'+HI {"v":2}\r\n')

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server.conns.discard(self)
        self.server.lost.set()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.active = time.monotonic()
        self.buf += data
        self.process()

    def eof_received(self) -> bool:
        """A half-close: answer what was sent (in flight or buffered), then close."""
        self.eof = True
        self.process()
        return True

    def pause_writing(self) -> None:  # the peer is not reading its replies
        self.writable = False
        self._pause()

    def resume_writing(self) -> None:
        self.writable = True
        if not self.busy:
            self._resume()
            self.process()

    # -- line handling -----------------------------------------------------------
    def process(self) -> None:
        buf = self.buf
        limit = self.server.limits.max_line
        while not self.busy and not self.closing and self.writable:
            end = buf.find(b"\n", 0, limit + 2)
            if end < 0:
                if len(buf) > limit:
                    self.fail(f"line too long (max {limit} bytes)")
                elif self.eof:
                    self.close()  # the peer finished sending and every command is answered
                return
            line = bytes(buf[:end])
            del buf[:end + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > limit:
                self.fail(f"line too long (max {limit} bytes)")
                return
            if line:
                self.command(line)
        if self.busy and len(buf) > PAUSE_AT:
            self._pause()

    def command(self, line: bytes) -> None:
        verb, _, rest = line.partition(b" ")
        if not self.authed:
            if verb != b"HELLO":
                self.fail(f"expected HELLO, got {shown(verb, 20)}")
            else:
                self.hello(rest)
            return
        if verb == b"TRACK":
            sub, _, arg = rest.partition(b" ")
            if sub == b"GET":  # the hot path: a future, no task
                try:
                    fut = self.server.tracker.get_future(arg.decode("utf-8", "replace"))
                except ValidationError as e:
                    return self.error(str(e))
                self.run_async(fut, bulk)
            elif sub == b"SET":
                self.run_async(self.track_set(arg))
            else:
                self.error(f"TRACK: expected GET or SET, got {shown(sub, 20)!r}")
        elif verb == b"END":
            self.close()
        elif verb == b"BEAT":  # worker heartbeats (pyfaktory consumers send them at once)
            self.write(b"+OK\r\n")
        elif verb == b"HELLO":
            self.error("HELLO already received")
        else:
            self.error(f"unknown command {shown(verb, 40)}")

    def hello(self, raw: bytes) -> None:
        try:
            hello = _hello.decode(raw)
        except msgspec.ValidationError as e:
            field, problem = events.split_error(e, {})
            return self.fail(f"Invalid HELLO: {field}: {problem}")
        except msgspec.DecodeError:
            return self.fail("Invalid HELLO: expected a JSON object")
        if hello.v is not None and hello.v < PROTOCOL_VERSION:
            return self.fail(f"Invalid HELLO: protocol version {hello.v}, tracker speaks 2")
        if not self.server.password:
            self.authed = True
            self.write(b"+OK\r\n")
            return
        if not hello.pwdhash:
            return self.fail("Invalid password")
        self.run_async(self.check(hello.pwdhash))

    async def check(self, given: str) -> bytes:
        ok = await asyncio.to_thread(check_password, self.server.password or "", self.salt,
                                     self.iterations, given)  # ~10 ms of hashing: off the loop
        if not ok:
            log.info("wrong password from %s", self.peer())
            self.close()  # takes effect once the reply below is written
            return b"-ERR Invalid password\r\n"
        self.authed = True
        return b"+OK\r\n"

    async def track_set(self, payload: bytes) -> bytes:
        if not payload:
            raise ValidationError("payload", "expected a JSON object after TRACK SET")
        await self.server.tracker.set_json(payload)
        return b"+OK\r\n"

    # -- running a command -------------------------------------------------------
    def run_async(self, aw, render=None) -> None:
        """Run a coroutine or future; its result (through ``render``) is the reply."""
        self.busy = True
        self.render = render
        self.server.inflight += 1
        asyncio.ensure_future(aw).add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.server.inflight -= 1
        self.busy = False
        if task.cancelled():
            return self.close()
        exc = task.exception()
        if exc is None:
            reply = task.result() if self.render is None else self.render(task.result())
        elif isinstance(exc, RedisUnavailable):  # details (redacted) go to the log only
            log.warning("%s", exc)
            reply = b"-ERR tracker cannot reach its Redis; try again\r\n"
        elif isinstance(exc, TrackerError):  # ValidationError: "field: problem"
            reply = self.err_line(str(exc))
        else:
            log.error("internal error", exc_info=exc)
            reply = b"-ERR internal error\r\n"
        self.write(reply)
        if self.closing or self.server.stopping:
            return self.close()
        self._resume()
        self.process()

    # -- replies and closing ------------------------------------------------------
    err_line = staticmethod(err_line)

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    def error(self, message: str) -> None:
        self.write(self.err_line(message))

    def fail(self, message: str) -> None:
        """An error that ends the connection (handshake, limits)."""
        self.error(message)
        self.close()

    def close(self) -> None:
        """Close once the reply in flight (if any) has been written."""
        if not self.closing:
            self.closing = True
            self.closing_since = time.monotonic()
        self.buf.clear()
        if not self.busy and self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _pause(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self.paused and self.writable and not self.closed and not self.closing:
            self.paused = False
            self.transport.resume_reading()

    def peer(self) -> str:
        info = self.transport.get_extra_info("peername") if self.transport else None
        return f"{info[0]}:{info[1]}" if isinstance(info, tuple) else "?"


class Server:
    """The listening socket, its connections and the sweeper enforcing time limits."""

    tracker: AsyncTracker  # opened on the loop in serve(), as are the two events
    lost: asyncio.Event  # set whenever a connection closes

    def __init__(self, settings: Settings, partitions: int, password: Optional[str],
                 limits: Limits):
        self.settings = settings
        self.partitions = partitions
        self.password = password or None
        self.limits = limits
        self.conns: set[Any] = set()  # Connection, or the proxy's client side
        self.inflight = 0
        self.stopping = False
        self.port: Optional[int] = None
        self._server: Optional[asyncio.base_events.Server] = None
        self._stop: Optional[asyncio.Event] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None

    async def serve(self, host: str, port: int, ready: Any = None,
                    reuse_port: bool = False) -> None:
        """Listen and serve until stop(); ``ready.set()`` once listening (a threading.Event,
        or a worker's ``workers.Ready``); ``reuse_port``: one of several workers on the
        port (tracker.server.workers)."""
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.lost = asyncio.Event()
        self.tracker = await AsyncTracker.open(self.settings, self.partitions)
        try:
            await self.opened()
            self._server = await self.loop.create_server(self.protocol, host, port,
                                                         backlog=1024, reuse_address=True,
                                                         reuse_port=reuse_port or None)
            sock = self._server.sockets[0].getsockname()
            self.port = sock[1]
            log.info("serving Faktory protocol on %s:%d%s", host, self.port, self.describe())
            if ready is not None:
                ready.set()
            sweeper = asyncio.ensure_future(self._sweep())
            await self._stop.wait()
            log.info("stopping: no new connections, finishing %d in-flight command(s)",
                     self.inflight)
            self._server.close()
            self.stopping = True
            for c in list(self.conns):
                c.close()
            deadline = time.monotonic() + SHUTDOWN_GRACE
            while self.conns and time.monotonic() < deadline:
                self.lost.clear()
                try:
                    await asyncio.wait_for(self.lost.wait(), 0.1)
                except TimeoutError:
                    pass
            for c in list(self.conns):
                c.transport.abort()
            sweeper.cancel()
            await self._server.wait_closed()
        finally:
            try:
                await self.closing()
            finally:
                await self.tracker.close()
            if self._server is not None:  # it listened (a failed bind says why, once)
                log.info("stopped")

    # Hooks for a server that does more on the same socket handling (proxy.ProxyServer).
    def protocol(self) -> asyncio.Protocol:
        """A new connection's protocol object."""
        return Connection(self)

    def describe(self) -> str:
        """Appended to the start-up log line."""
        return ""

    async def opened(self) -> None:
        """Runs on the loop before the socket listens."""

    async def closing(self) -> None:
        """Runs once every connection is gone, before the Redis client closes."""

    def admit(self, conn: Any, transport: Any) -> bool:
        """Take a new connection in, or refuse it (too many, or shutting down): the
        client gets one -ERR line and the socket closes."""
        if len(self.conns) >= self.limits.max_connections or self.stopping:
            transport.write(b"-ERR too many connections\r\n" if not self.stopping
                            else b"-ERR shutting down\r\n")
            transport.close()
            return False
        self.conns.add(conn)
        return True

    def stop(self) -> None:
        """Thread-safe: begin a graceful shutdown."""
        if self.loop is not None and self._stop is not None:
            try:
                self.loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:
                pass  # the loop has already finished

    async def _sweep(self) -> None:
        lim = self.limits
        idle = lim.idle_timeout
        tick = max(0.02, min(1.0, (idle or 4.0) / 4, lim.handshake_timeout / 4))
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for c in list(self.conns):
                if c.closing:
                    if now - c.closing_since > CLOSE_GRACE and c.transport is not None:
                        c.transport.abort()  # the peer does not read its last reply
                elif c.busy:
                    continue
                elif not c.authed and now - c.started > lim.handshake_timeout:
                    c.fail("handshake timeout")
                elif idle and now - c.active > idle:
                    c.fail("idle timeout")


def run(settings: Settings, host: str, port: int, password: Optional[str], max_line: int,
        idle_timeout: Optional[float], max_connections: int, handshake_timeout: float,
        fast_loop: bool = True, workers: int = 1) -> None:
    """Serve until SIGINT/SIGTERM. Redis problems at start raise TrackerError (exit 1)."""
    partitions = partitions_of(settings)
    server = Server(settings, partitions, password,
                    Limits(max_line, 300.0 if idle_timeout is None else idle_timeout,
                           max_connections, handshake_timeout))
    run_server(server, host, port, loop_factory(fast_loop), workers)


def loop_factory(fast: bool) -> Any:
    """uvloop's event loop when installed and wanted (socket-heavy servers gain most)."""
    return uvloop.new_event_loop if fast and uvloop is not None else None


def partitions_of(settings: Settings) -> int:
    """Open the deployment once (version check, partition agreement, clean errors)."""
    d = Deployment.open(settings)
    partitions = d.partitions
    d.close()
    return partitions


def run_server(server: Server, host: str, port: int, loop_factory: Any = None,
               workers: int = 1) -> None:
    """Run ``server`` until SIGINT/SIGTERM, on ``loop_factory()``'s loop if given; with
    ``workers`` > 1, in that many forked processes on the one port."""
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)  # a daemon says where it listens and when it stops
    if workers <= 1:
        _run_loop(server, host, port, loop_factory)
        return

    def one(port: int, ready: workers_mod.Ready) -> None:
        _run_loop(server, host, port, loop_factory, ready, reuse_port=True)

    workers_mod.run(workers, host, port, one)


def _run_loop(server: Server, host: str, port: int, loop_factory: Any,
              ready: Any = None, reuse_port: bool = False) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, server.stop)
            except (ValueError, RuntimeError, NotImplementedError):
                pass  # not the main thread: the caller stops us with server.stop()
        await server.serve(host, port, ready, reuse_port)

    try:
        if loop_factory is None:
            asyncio.run(main())
        else:
            loop = loop_factory()
            try:
                loop.run_until_complete(main())
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()
    except OSError as e:
        raise workers_mod.listen_error(host, port, e) from None
