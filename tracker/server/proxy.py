"""``tracker serve --upstream``: a transparent Faktory proxy that answers TRACK itself.

Workers and producers point ``FAKTORY_URL`` here. Each client connection gets its
own upstream connection to the real (open-source) Faktory server:

- the upstream's ``+HI`` (with its salt and iterations) is relayed verbatim and the
  client's ``HELLO`` forwarded, so authentication is the upstream's own; the
  connection is accepted only once the upstream answered ``+OK``;
- every other command except TRACK is forwarded byte for byte and every reply
  relayed byte for byte, in order (clients pipeline); ``wire.Replies`` frames the
  upstream's replies, so each is paired with the command it answers;
- ``TRACK GET`` / ``TRACK SET`` are answered here, in order with the forwarded
  replies: a TRACK waits for the replies of the commands before it, then for the
  events they caused to be appended (``Outbox.barrier``: read-your-writes);
- ``observe.Observer`` turns confirmed replies into lifecycle events.

If the upstream cannot be reached, or closes in the middle of a reply, the client
gets ``-ERR`` and a closed connection; others are not affected, and the next client
gets a fresh upstream connection. Backpressure runs both ways: a client that does
not read stops the reading of its upstream, and the reverse.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Optional

import msgspec

from tracker import events
from tracker.errors import RedisUnavailable, TrackerError, ValidationError
from tracker.server import fwp
from tracker.server.observe import Observer
from tracker.server.outbox import Outbox
from tracker.server.upstream import Upstream, probe, reason
from tracker.server.wire import OK, ProtocolError, Replies, bulk, err_line, shown
from tracker.store.settings import Settings

log = logging.getLogger("tracker.server.proxy")

PAUSE_AT = 256 * 1024  # unparsed client bytes held while a TRACK waits
HELLO = b"HELLO"
UNOBSERVED = (None, None)
OBSERVED = frozenset((b"PUSH", b"PUSHB", b"FETCH", b"ACK", b"FAIL"))


class UpstreamSide(asyncio.Protocol):
    """The proxy's connection to Faktory, on behalf of one client."""

    def __init__(self, client: ClientSide):
        self.client = client
        self.transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.client.up = self

    def data_received(self, data: bytes) -> None:
        c = self.client
        if c.awaiting and c.awaiting[0] is UNOBSERVED and not c.replies.buf \
                and data[:1] in (b"+", b"-") and data.find(b"\n") == len(data) - 1 \
                and not c.closed and c.local is None and not c.buf:
            c.awaiting.popleft()  # the common case: one status reply, nothing to observe
            c.transport.write(data)
            if c.closing:
                c._finish()
            return
        c.upstream_data(data)

    def connection_lost(self, exc) -> None:
        self.client.upstream_lost()

    def pause_writing(self) -> None:  # Faktory is not reading: stop reading the client
        self.client.reading(up_full=True)

    def resume_writing(self) -> None:
        self.client.reading(up_full=False)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class ClientSide(asyncio.Protocol):
    """A client connection (the attributes ``fwp.Server``'s sweeper reads match ``Connection``)."""

    transport: asyncio.Transport

    def __init__(self, server: ProxyServer):
        self.server = server
        self.obs = server.observer
        self.buf = bytearray()
        self.replies = Replies()
        self.up: Optional[UpstreamSide] = None
        self.awaiting: collections.deque = collections.deque()  # (verb, ctx) per forwarded command
        self.local: Optional[bytes] = None  # a TRACK command waiting for its turn or its answer
        self._local_task: Optional[asyncio.Future] = None
        self.connecting: Optional[asyncio.Future] = None
        self.greeted = self.authed = self.ended = False
        self.closing = self.closed = self.eof = False
        self.up_full = self.buf_full = self.paused = False
        now = time.monotonic()
        self.started = self.active = self.closing_since = now

    @property
    def busy(self) -> bool:
        return bool(self.awaiting) or self.local is not None or self.connecting is not None

    # -- the client's socket ------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        if not self.server.admit(self, transport):
            self.closed = True
            return
        self.connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        srv = self.server
        try:
            await srv.upstream.connect(lambda: UpstreamSide(self), srv.ssl)
        except Exception as e:
            log.warning("cannot reach the Faktory server at %s: %s", srv.upstream.shown(),
                        reason(e))
            self.fail(f"tracker cannot reach the Faktory server at {srv.upstream.shown()}: "
                      f"{reason(e)}")
        finally:
            self.connecting = None
        if self.closed and self.up is not None:
            self.up.close()  # the client left while we were connecting

    def connection_lost(self, exc) -> None:
        self.closed = self.closing = True
        self.buf.clear()
        srv = self.server
        srv.conns.discard(self)
        srv.lost.set()
        if self.up is not None:
            if self.awaiting:  # let the replies in flight arrive, so their events are seen
                asyncio.get_running_loop().call_later(fwp.CLOSE_GRACE, self.up.close)
            else:
                self.up.close()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.active = time.monotonic()
        if not self.buf and self.authed and self.local is None and not self.ended \
                and self.up is not None and data.find(b"\n") == len(data) - 1 \
                and len(data) <= self.server.limits.max_line:
            # The common case, one whole command per read: no buffering.
            verb, _, rest = data.partition(b" ")
            if verb in OBSERVED:
                end = -2 if rest.endswith(b"\r\n") else -1
                self._forward(verb, rest[:end])
                self.up.transport.write(data)  # type: ignore[union-attr]
                return
            if verb != b"TRACK" and not verb.startswith((b"END", b"TRACK")):
                self.awaiting.append(UNOBSERVED)
                self.up.transport.write(data)  # type: ignore[union-attr]
                return
        self.buf += data
        self.process()

    def _forward(self, verb: bytes, rest: bytes) -> None:
        ctx = self.obs.forward(verb, rest)
        if ctx is None and verb in (b"PUSH", b"PUSHB"):
            self.awaiting.append(UNOBSERVED)  # no tracked job in it: nothing to see in its reply
        else:
            self.awaiting.append((verb, ctx))

    def eof_received(self) -> bool:
        self.eof = True
        self.process()
        return True

    def pause_writing(self) -> None:  # the client is not reading: stop reading Faktory
        if self.up is not None and self.up.transport is not None:
            self.up.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.resume_reading()

    def reading(self, up_full: Optional[bool] = None, buf_full: Optional[bool] = None) -> None:
        if up_full is not None:
            self.up_full = up_full
        if buf_full is not None:
            self.buf_full = buf_full
        want = not (self.up_full or self.buf_full)
        if self.closing:
            return
        if want and self.paused:
            self.paused = False
            self.transport.resume_reading()
            self.process()
        elif not want and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    # -- lines from the client ------------------------------------------------------
    def process(self) -> None:
        """Forward what can go upstream now; stop at a TRACK, or before the handshake."""
        if self.up is None or not self.greeted or self.closing:
            return
        buf = self.buf
        limit = self.server.limits.max_line
        send = []
        while self.local is None and not self.closing and not self.ended \
                and (self.authed or not self.awaiting):
            end = buf.find(b"\n", 0, limit + 2)
            if end < 0:
                if len(buf) > limit:
                    self.fail(f"line too long (max {limit} bytes)")
                elif self.eof:
                    self.close()
                break
            raw = bytes(buf[:end + 1])
            del buf[:end + 1]
            line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            if len(line) > limit:
                self.fail(f"line too long (max {limit} bytes)")
                break
            verb, _, rest = line.partition(b" ")
            if not self.authed:
                if not line:
                    continue  # blank lines before HELLO are ignored, as by `tracker serve`
                problem = check_hello(verb, rest)
                if problem:
                    self.fail(problem)
                    break
                send.append(raw)
                self.awaiting.append((HELLO, None))
            elif verb == b"TRACK":
                self.local = rest
            else:
                if verb == b"END":
                    self.ended = True  # Faktory closes without a reply; later lines are ignored
                    buf.clear()
                    send.append(raw)
                    break
                send.append(raw)
                if verb in OBSERVED:
                    self._forward(verb, rest)
                else:
                    self.awaiting.append(UNOBSERVED)
        if send and self.up is not None and self.up.transport is not None:
            self.up.transport.write(send[0] if len(send) == 1 else b"".join(send))
        if self.local is not None and not self.awaiting:
            self._run_local()
        # Stop reading only while lines wait on us (a TRACK, the handshake), never in the
        # middle of a long line, which must be read whole.
        full = len(buf) > PAUSE_AT and (self.local is not None or not self.authed)
        if full != self.buf_full:
            self.reading(buf_full=full)

    # -- replies from Faktory ---------------------------------------------------------
    def upstream_data(self, data: bytes) -> None:
        try:
            replies = self.replies.feed(data)
        except ProtocolError as e:
            log.warning("the Faktory server at %s sent an invalid reply: %s",
                        self.server.upstream.shown(), e)
            return self._broken("tracker got an invalid reply from the Faktory server")
        out = []
        for r in replies:
            if not self.greeted:
                self.greeted = True  # +HI, relayed as it is (salt and iterations included)
            elif self.awaiting:
                verb, ctx = self.awaiting.popleft()
                if verb is HELLO:
                    if r == OK:
                        self.authed = True
                elif verb is not None:
                    try:
                        self.obs.reply(verb, ctx, r)
                    except Exception as e:  # never let a bug cost the client its reply
                        log.error("internal error observing %s", verb.decode(), exc_info=e)
            out.append(r)
        if out and not self.closed:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        if self.closing:
            self._finish()
        elif self.local is not None and not self.awaiting:
            self._run_local()
        elif self.buf or self.eof:
            self.process()  # lines held back by a handshake or a TRACK

    def upstream_lost(self) -> None:
        self.up = None
        cut = bool(self.awaiting) or self.replies.pending() or not self.greeted
        self._abandon()
        if cut and not self.ended:
            self.write(err_line("the Faktory server closed the connection"))
        self.close()

    def _abandon(self) -> None:
        """The commands in flight will get no reply: nothing is published for them, and
        a TRACK queued behind them is dropped with them (one running now may finish)."""
        for verb, ctx in self.awaiting:
            if verb is not None and verb is not HELLO:
                self.obs.abandon(verb, ctx)
        self.awaiting.clear()
        if self._local_task is None:
            self.local = None

    def _broken(self, message: str) -> None:
        self._abandon()
        self.fail(message)
        if self.up is not None:
            self.up.close()

    # -- TRACK, answered here ------------------------------------------------------
    def _run_local(self) -> None:
        rest = self.local
        if rest is None or self._local_task is not None:
            return
        sub, _, arg = rest.partition(b" ")
        self.server.inflight += 1
        self._local_task = asyncio.ensure_future(self._track(sub, arg))
        self._local_task.add_done_callback(self._local_done)

    async def _track(self, sub: bytes, arg: bytes) -> bytes:
        srv = self.server
        if sub == b"GET":
            events.check_jid(arg.decode("utf-8", "replace"))
            await Outbox.wait(srv.outbox.barrier())
            return bulk(await srv.tracker.get_future(arg.decode()))
        if sub == b"SET":
            if not arg:
                raise ValidationError("payload", "expected a JSON object after TRACK SET")
            await Outbox.wait(srv.outbox.event(events.decode_trackset_json(arg)))
            return OK
        raise ValidationError("TRACK", f"expected GET or SET, got {shown(sub, 20)!r}")

    def _local_done(self, task: asyncio.Task) -> None:
        self._local_task = None
        self.local = None
        self.server.inflight -= 1
        if task.cancelled():
            return self.close()
        exc = task.exception()
        if exc is None:
            reply = task.result()
        elif isinstance(exc, RedisUnavailable):
            log.warning("%s", exc)
            reply = b"-ERR tracker cannot reach its Redis; try again\r\n"
        elif isinstance(exc, TrackerError):
            reply = err_line(str(exc))
        else:
            log.error("internal error", exc_info=exc)
            reply = b"-ERR internal error\r\n"
        self.write(reply)
        if self.closing or self.server.stopping:
            return self.close()
        self.process()

    # -- replies and closing ------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def fail(self, message: str) -> None:
        """An error that ends the connection (handshake, limits, upstream trouble)."""
        self.write(err_line(message))
        self.close()

    def close(self) -> None:
        """Close once the replies in flight (if any) are written."""
        if not self.closing:
            self.closing = True
            self.closing_since = time.monotonic()
        self.buf.clear()
        self._finish()

    def _finish(self) -> None:
        if self.awaiting or self.local is not None:
            return
        if not self.transport.is_closing():
            self.transport.close()
        if self.up is not None:
            self.up.close()


_hello = msgspec.json.Decoder(dict)


def check_hello(verb: bytes, rest: bytes) -> Optional[str]:
    """Why this first line is not a HELLO we forward (None: forward it)."""
    if verb != HELLO:
        return f"expected HELLO, got {shown(verb, 20)}"
    try:
        _hello.decode(rest)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return "Invalid HELLO: expected a JSON object"
    return None


class ProxyServer(fwp.Server):
    """``fwp.Server``'s socket handling, shutdown and limits, with ``ClientSide`` connections."""

    outbox: Outbox
    observer: Observer

    def __init__(self, settings: Settings, partitions: int, limits: fwp.Limits,
                 upstream: Upstream):
        super().__init__(settings, partitions, None, limits)
        self.upstream = upstream
        self.ssl = upstream.ssl_context()

    def protocol(self) -> asyncio.Protocol:
        return ClientSide(self)

    def describe(self) -> str:
        return f", forwarding to Faktory at {self.upstream.shown()}"

    async def opened(self) -> None:
        self.outbox = Outbox(self.tracker.client, self.settings, self.partitions)
        self.observer = Observer(self.outbox)
        await self.probe()

    async def closing(self) -> None:
        await self.outbox.drain()

    async def probe(self) -> None:
        await probe(self.upstream, self.ssl)


def run(settings: Settings, upstream: Upstream, host: str, port: int, max_line: int,
        idle_timeout: Optional[float], max_connections: int, handshake_timeout: float,
        fast_loop: bool = True, workers: int = 1) -> None:
    """Serve the proxy until SIGINT/SIGTERM (Redis problems at start: TrackerError)."""
    server = ProxyServer(settings, fwp.partitions_of(settings),
                         fwp.Limits(max_line, idle_timeout, max_connections, handshake_timeout),
                         upstream)
    fwp.run_server(server, host, port, fwp.loop_factory(fast_loop), workers)
