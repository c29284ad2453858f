"""Read-your-writes: a read answers the fold of the log as it stands when it starts.

The log is the truth and the snapshots trail it by however far the projector lags.
``get.lua`` tells, per partition, whether the fold has reached the entry a read needs
(the stream's newest entry when the read began). When it has not, the reader brings it
there itself, by one of three modes (``Settings.read``, ``TRACKER_READ``):

- ``fold`` (default): the reader runs ``project.lua``, the projector's own atomic,
  exactly-once step, on that partition until the fold has reached the entry, then
  reads. Readers are simply more projectors; nothing can be applied twice. A Redis
  user without the rights to fold (the README's least-privilege reader) falls back to
  ``wait``, once, with a log line.
- ``wait``: never write; poll until the projector has passed the entry.
- ``stale``: no check at all: the snapshots as they are (the fastest read).

A read gives up once the fold has not moved for ``Settings.read_timeout`` seconds, with
a ``TrackerError`` that says what to do. With no lag the check costs one XREVRANGE and one HMGET inside the
read script, no extra round trip.
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import redis

from tracker.errors import TrackerError
from tracker.projector import Step
from tracker.store.boundary import check
from tracker.store.settings import Settings

log = logging.getLogger("tracker.freshness")

FOLD, WAIT, STALE = "fold", "wait", "stale"
READER = "reader"  # the consumer name readers fold under (their steps leave nothing pending)
STEP = 2000  # entries per catch-up step
POLL = 0.005  # seconds between checks while waiting for the projector


class Freshness:
    """One client's read mode and its deadline; shared by the sync and asyncio readers."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.mode = settings.read
        self.timeout = settings.read_timeout

    @property
    def need(self) -> str:
        """get.lua's ARGV[2] for a first read: '' (the log's tip) or '0-0' (no check)."""
        return "0-0" if self.mode == STALE else ""

    @property
    def folds(self) -> bool:
        return self.mode == FOLD

    def deadline(self) -> float:
        return time.monotonic() + self.timeout

    def fold_refused(self, err: BaseException) -> bool:
        """True when ``err`` says this Redis user may not fold: from now on, wait."""
        if isinstance(err, redis.exceptions.NoPermissionError) or str(err).startswith("NOPERM"):
            if self.mode == FOLD:
                log.info("this Redis user cannot fold the log (%s); reads wait for the "
                         "projector instead", str(err).split(".")[0])
            self.mode = WAIT
            return True
        return False

    def pause_after(self, reply: object) -> bool:
        """Whether a reader should pause before reading again, after a project.lua reply:
        it may not fold (now it waits), or another reader holds entries pending (they
        age until they can be claimed). Any other error is raised."""
        if isinstance(reply, Exception) and self.fold_refused(reply):
            return True
        return Step.of(check(self.settings, reply)).waiting

    @staticmethod
    def progressed(replies: list) -> bool:
        """Whether project.lua replies folded anything: a slow catch-up that moves is not
        stuck, so the reader's deadline starts again (only a stalled fold times out)."""
        return any(not isinstance(r, Exception) and Step.of(r).entries for r in replies)

    def check(self, deadline: float, part: int, need: str) -> None:
        """Raise once the deadline has passed with partition ``part`` still behind ``need``."""
        if time.monotonic() < deadline:
            return
        hint = ("is `tracker project` running?" if self.mode == WAIT else
                "another reader of the consumer group holds entries pending; see "
                "`tracker status`")
        raise TrackerError(f"partition {part}: the fold has not reached entry {need} within "
                           f"{self.timeout:g}s; {hint} (or read with TRACKER_READ=stale)")


def behind(reply: list) -> Optional[str]:
    """The entry a get.lua reply is still waiting for, or None when it has rows."""
    need = reply[1]
    need = need.decode() if isinstance(need, bytes) else need
    return need or None
