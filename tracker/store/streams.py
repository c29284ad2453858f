"""Reading a stream in pages, so a long log is never one reply."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

PAGE = 5000


def pages(client, stream: str, lo: str = "-", hi: str = "+", count: int = PAGE,
          limit: Optional[int] = None) -> Iterator[list[tuple[Any, Any]]]:
    """XRANGE ``stream`` from ``lo`` to ``hi`` (inclusive), ``count`` entries a call.

    Yields each non-empty page; stops after ``limit`` entries when given. Entry IDs
    come back as the client returns them (bytes with redis-py's defaults).
    """
    seen = 0
    while True:
        got = client.xrange(stream, lo, hi, count=count)
        if got:
            if limit is not None and seen + len(got) >= limit:
                yield got[:limit - seen]
                return
            seen += len(got)
            yield got
        if len(got) < count:
            return
        last = got[-1][0]
        lo = "(" + (last.decode() if isinstance(last, bytes) else str(last))


def entries(client, stream: str, lo: str = "-", hi: str = "+",
            count: int = PAGE) -> Iterator[tuple[Any, Any]]:
    """The entries of ``pages``, one by one."""
    for page in pages(client, stream, lo, hi, count):
        yield from page
