"""The web server's own settings (Redis and the deployment come from ``Settings``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from tracker import events
from tracker.errors import ConfigError

_ORIGIN = re.compile(r"\*|https?://[A-Za-z0-9.-]+(:\d{1,5})?")


@dataclass
class WebConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    # Bearer token for writes (and reads, with reads_need_token). None: writes are off.
    token: Optional[str] = field(default=None, repr=False)
    reads_need_token: bool = False
    cors_origins: tuple[str, ...] = ()  # empty: no CORS headers at all
    max_body: int = events.MAX_REQUEST  # bytes; a larger request body gets 413 unread
    ready_max_lag: float = 60.0  # seconds of projector lag /readyz still calls ready
    keepalive: float = 15.0  # seconds between SSE comments on a quiet stream
    max_jids: int = 1000  # JIDs in one GET /v1/tracks?jid=...

    def validate(self) -> WebConfig:
        if self.token is not None and (not self.token or re.search(r"\s", self.token)):
            raise ConfigError("token: TRACKER_WEB_TOKEN must be non-empty, without whitespace")
        if self.reads_need_token and not self.token:
            raise ConfigError("reads-need-token: set TRACKER_WEB_TOKEN too (the token reads need)")
        for origin in self.cors_origins:
            if not _ORIGIN.fullmatch(origin):
                raise ConfigError(f"cors-origin: expected * or an origin like "
                                  f"https://example.com:8443, got {origin[:80]!r}")
        if not 64 <= self.max_body <= 64 * 1024 * 1024:
            raise ConfigError(f"max-body: expected 64..67108864 bytes, got {self.max_body}")
        if self.ready_max_lag <= 0 or self.keepalive <= 0:
            raise ConfigError("ready-max-lag and keepalive: expected positive seconds")
        return self

    @property
    def writes_enabled(self) -> bool:
        return self.token is not None
