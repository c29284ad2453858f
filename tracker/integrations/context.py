"""The job running now, so task code can report progress without knowing its JID.

An integration (Celery, RQ, Dramatiq) enters a job before the task code runs and
leaves it after; in between ``tracker.progress(40, "half")`` is a TRACK SET for
that job and ``tracker.current_jid()`` its ID. The state lives in a contextvar,
so threads and asyncio tasks each see their own job (a thread the task starts
itself sees none, unless it runs in ``contextvars.copy_context()``).

No third-party imports here: ``import tracker`` stays light.
"""

from __future__ import annotations

import contextvars
from typing import Any, NamedTuple, Optional

from tracker.errors import TrackerError


class NotInJob(TrackerError):
    """``tracker.progress()`` was called where no integration is running a job."""

    exit_code = 2


class Running(NamedTuple):
    jid: str
    tracked: bool
    sink: Any  # has ``set(jid, percent, desc, reserve_until, publish=bool) -> bool``


_current: contextvars.ContextVar[Optional[Running]] = contextvars.ContextVar(
    "tracker_current_job", default=None)


def enter(jid: str, tracked: bool, sink: Any) -> contextvars.Token:
    """Mark ``jid`` as the running job (integrations call this); returns the token for ``leave``."""
    return _current.set(Running(jid, tracked, sink))


def leave(token: contextvars.Token) -> None:
    try:
        _current.reset(token)
    except ValueError:  # entered in another context (a hook that ran elsewhere): just clear
        _current.set(None)


def current_jid() -> Optional[str]:
    """The running job's ID in its own system (Celery task id, RQ job id, Dramatiq message
    id), tracked or not; None outside a job."""
    running = _current.get()
    return running.jid if running else None


def progress(percent: Optional[int] = None, desc: Optional[str] = None,
             reserve_until: Any = None) -> bool:
    """TRACK SET for the running job: percent 0..100, desc, reserve_until (RFC 3339 or an
    aware datetime, extending the reservation). Absent fields stay as they were.

    Returns True once the update is appended, False when it is not: the job is not tracked,
    or the tracker's Redis is unreachable (the integration logs that once per outage and
    counts the update as dropped; the job goes on). Bad input raises ``ValidationError``
    naming the field, as ``Tracker.set`` does; outside a job, ``NotInJob``.
    """
    running = _current.get()
    if running is None:
        raise NotInJob("tracker.progress(): no job is running here; call it from task code "
                       "that a tracked Celery, RQ or Dramatiq worker runs (see the README's "
                       "'Python job queues')")
    return running.sink.set(running.jid, percent, desc, reserve_until, publish=running.tracked)
