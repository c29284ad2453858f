"""The Faktory Work Protocol's framing, shared by ``tracker serve`` and its proxy mode.

Lines from clients end in ``\\r\\n`` or a bare ``\\n`` (the Ruby client sends ``\\n``).
Replies are ``+text``, ``-ERR text``, a bulk ``$N\\r\\n<N bytes>\\r\\n`` or the null
bulk ``$-1\\r\\n``. The proxy must know where each upstream reply ends, to relay it
whole and to pair it with the command it answers: ``Replies`` splits a byte stream
into replies without ever copying a large bulk body more than once.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Optional

import msgspec

_json = msgspec.json.Encoder()
OK = b"+OK\r\n"


def pwdhash(password: str, salt: str, iterations: int) -> str:
    """Faktory's hash: sha256(password + salt), then ``iterations - 1`` more rounds."""
    h = hashlib.sha256((password + salt).encode()).digest()
    for _ in range(iterations - 1):
        h = hashlib.sha256(h).digest()
    return h.hex()


def check_password(password: str, salt: str, iterations: int, given: str) -> bool:
    """Constant-time. Also accepts the single-round hash, which the PyPI ``faktory``
    client (1.0.0) sends whatever ``i`` says; the salt is fresh per connection, so
    this opens no replay and makes online guessing no easier."""
    given_b = given.encode("ascii", "replace")
    full = hmac.compare_digest(given_b, pwdhash(password, salt, iterations).encode())
    once = hmac.compare_digest(given_b, pwdhash(password, salt, 1).encode())
    return full | once


def bulk(answer: dict) -> bytes:
    body = _json.encode(answer)
    return b"$%d\r\n%s\r\n" % (len(body), body)


def shown(raw: bytes, limit: int = 60) -> str:
    """A client's bytes, safe to echo on one reply line."""
    text = raw[:limit].decode("utf-8", "replace")
    text = "".join(c if c.isascii() and c.isprintable() else "?" for c in text)
    return text + ("..." if len(raw) > limit else "")


def err_line(message: str) -> bytes:
    """``-ERR message`` on one line, whatever the message holds."""
    text = "".join(c if c.isprintable() else " " for c in message)[:500]
    return b"-ERR %s\r\n" % text.encode("utf-8", "replace")


def bulk_body(reply: bytes) -> Optional[bytes]:
    """The payload of a bulk reply (``None`` for ``$-1`` and for non-bulk replies)."""
    if not reply.startswith(b"$") or reply.startswith(b"$-"):
        return None
    start = reply.index(b"\n") + 1
    return reply[start:-2]


class ProtocolError(Exception):
    """The upstream sent something that is not a Faktory reply."""


class Replies:
    """Splits an upstream byte stream into whole replies, in order.

    ``feed(data)`` returns the replies ``data`` completed (each exactly as received,
    terminator included); a partial reply waits for the next call. A bulk body is
    not searched for line ends: its length says where it stops.
    """

    MAX_HEADER = 64  # "$<digits>\r\n" or a +/- line's first bytes before we expect its end

    def __init__(self) -> None:
        self.buf = bytearray()
        self.need = 0  # bytes the bulk reply at the front needs in all (0: not known yet)

    def pending(self) -> bool:
        """Part of a reply has arrived and the rest has not."""
        return bool(self.buf)

    def feed(self, data: bytes) -> list[bytes]:
        buf = self.buf
        if not buf and data[:1] in (b"+", b"-") and data.endswith(b"\n") \
                and data.count(b"\n") == 1:
            return [data]  # the common case: one short status reply per read
        buf += data
        out = []
        while buf:
            if self.need:
                if len(buf) < self.need:
                    break
                out.append(bytes(buf[:self.need]))
                del buf[:self.need]
                self.need = 0
                continue
            head = buf[:1]
            end = buf.find(b"\n")
            if head in (b"+", b"-"):
                if end < 0:
                    break
                out.append(bytes(buf[:end + 1]))
                del buf[:end + 1]
            elif head == b"$":
                if end < 0:
                    if len(buf) > self.MAX_HEADER:
                        raise ProtocolError("bulk reply header too long")
                    break
                try:
                    n = int(buf[1:end])
                except ValueError:
                    raise ProtocolError(f"bad bulk length {shown(bytes(buf[:end]))}") from None
                if n < 0:
                    out.append(bytes(buf[:end + 1]))
                    del buf[:end + 1]
                else:
                    self.need = end + 1 + n + 2
            else:
                raise ProtocolError(f"unexpected reply {shown(bytes(buf[:20]))}")
        return out
