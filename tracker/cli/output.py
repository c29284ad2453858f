"""What every command prints with: one JSON encoder, one progress reporter."""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

import click
import msgspec

_encoder = msgspec.json.Encoder()


def dumps(obj: Any) -> str:
    """Compact JSON text, as every ``--json`` output and TRACK GET answer prints."""
    return _encoder.encode(obj).decode()


def echo_json(obj: Any) -> None:
    click.echo(dumps(obj))


class Progress:
    """Events done, total when known, rate: click.progressbar on a TTY, a line every
    few seconds on stderr otherwise. Call it with each batch's count."""

    def __init__(self, label: str, total: Optional[int] = None, every: float = 5.0):
        self.label, self.total, self.every = label, total, every
        self.done, self.t0 = 0, time.monotonic()
        self.last = self.t0
        self.bar: Any = None
        if sys.stderr.isatty():
            self.bar = click.progressbar(length=total or 0, label=label, file=sys.stderr,
                                         show_pos=True, show_eta=bool(total),
                                         item_show_func=lambda _: self._rate())
            self.bar.__enter__()

    def _rate(self) -> str:
        secs = max(time.monotonic() - self.t0, 1e-6)
        return f"{self.done / secs:,.0f}/s"

    def __call__(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            if self.total and self.done > self.total:
                self.bar.length = self.done
            self.bar.update(n)
        elif time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            of = f" of ~{self.total}" if self.total else ""
            click.echo(f"{self.label}: {self.done}{of} events ({self._rate()})", err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
