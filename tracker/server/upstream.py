"""The Faktory server behind ``tracker serve --upstream``: its address, connecting to it,
and the start-up check (one control connection that says in the log whether Faktory
answers and whether the proxy's password, if given, is accepted).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import ssl
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import unquote, urlsplit

import msgspec

from tracker.errors import ConfigError
from tracker.server.wire import pwdhash, shown

log = logging.getLogger("tracker.server.proxy")

CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class Upstream:
    """Where the Faktory server is: ``tcp://[:PASSWORD@]HOST:PORT`` or ``tcp+tls://``."""

    url: str
    host: str
    port: int
    password: Optional[str] = None
    tls: bool = False
    ca_file: Optional[str] = None

    @classmethod
    def parse(cls, url: str, ca_file: Optional[str] = None) -> Upstream:
        shown_url = re.sub(r"(//[^/@]*?:)[^/@]*@", r"\1***@", url)
        try:
            parts = urlsplit(url)
            port = parts.port or 7419
        except ValueError as e:
            raise ConfigError(f"upstream: {e} in {shown_url!r}") from None
        if parts.scheme not in ("tcp", "tcp+tls") or not parts.hostname:
            raise ConfigError("upstream: expected tcp://[:PASSWORD@]HOST:PORT or tcp+tls://..., "
                              f"got {shown_url!r}")
        password = unquote(parts.password) if parts.password is not None else None
        return cls(url, parts.hostname, port, password or None, parts.scheme == "tcp+tls",
                   ca_file)

    def shown(self) -> str:
        """The address, never the password."""
        return f"{'tcp+tls' if self.tls else 'tcp'}://{self.host}:{self.port}"

    def ssl_context(self) -> Optional[ssl.SSLContext]:
        if not self.tls:
            return None
        try:
            return ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"upstream-ca: cannot load {self.ca_file}: {e}") from None

    async def connect(self, factory: Any, ctx: Optional[ssl.SSLContext]) -> Any:
        loop = asyncio.get_running_loop()
        transport, proto = await asyncio.wait_for(
            loop.create_connection(factory, self.host, self.port, ssl=ctx,
                                   server_hostname=self.host if ctx else None),
            CONNECT_TIMEOUT)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        return transport, proto


def reason(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


class Probe(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = b""
        self.waiter: Optional[asyncio.Future] = None
        self.gone = False

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._wake()

    def connection_lost(self, exc) -> None:
        self.gone = True
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if self.gone:
                raise ConnectionError("closed the connection")
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line


async def probe(upstream: Upstream, ctx: Optional[ssl.SSLContext]) -> None:
    """One control connection at start: says in the log whether Faktory answers."""
    where = upstream.shown()
    probe = Probe()
    try:
        transport, _ = await upstream.connect(lambda: probe, ctx)
    except Exception as e:
        log.warning("the Faktory server at %s is not reachable now (%s); clients get -ERR "
                    "until it is", where, reason(e))
        return
    try:
        hi = await asyncio.wait_for(probe.line(), CONNECT_TIMEOUT)
        greeting = msgspec.json.decode(hi[4:]) if hi.startswith(b"+HI ") else None
        if not isinstance(greeting, dict):
            log.warning("the server at %s did not greet as Faktory does: %s", where,
                        shown(hi))
            return
        hello: dict = {"hostname": socket.gethostname(), "pid": os.getpid(), "v": 2}
        if "s" in greeting and upstream.password:
            hello["pwdhash"] = await asyncio.to_thread(
                pwdhash, upstream.password, str(greeting["s"]),
                int(greeting.get("i", 1)))
        transport.write(b"HELLO " + msgspec.json.encode(hello) + b"\r\n")
        answer = await asyncio.wait_for(probe.line(), CONNECT_TIMEOUT)
        if answer == b"+OK":
            log.info("Faktory at %s answers (protocol v%s)", where, greeting.get("v"))
        elif "s" in greeting and not upstream.password:
            log.info("Faktory at %s asks for a password; clients give their own", where)
        else:
            log.warning("Faktory at %s refused the proxy's HELLO: %s", where, shown(answer))
        transport.write(b"END\r\n")
    except (TimeoutError, ConnectionError, msgspec.DecodeError, ValueError) as e:
        log.warning("Faktory at %s: handshake failed: %s", where, reason(e))
    finally:
        transport.close()
