"""Celery: ``tracker.integrations.celery.install(app)`` connects Celery's signals.

Opt in per task with ``@app.task(track=True)`` or per call with
``task.apply_async(..., headers={"track": 1})``. The JID is the Celery task id.

Signals, where they fire, and what they publish:

* ``before_task_publish`` (the sending process; for a retry, the worker): ``enqueued``;
  for a retry (``retries`` > 0) ``failed`` then ``enqueued``, before the message exists;
* ``task_prerun`` (the pool process): ``working``, reserved for the hard time limit;
* ``task_success``: ``success``; ``task_retry``: nothing more (the retry's publish
  already said ``failed``);
* ``task_failure`` (pool or main process): ``dead``; Celery sends it only when no
  retry follows;
* ``task_revoked`` (main process): ``dead``, errtype ``TaskRevokedError``, message
  ``revoked``, ``terminated`` or ``expired``.

Why ``failed`` is published from ``before_task_publish``: ``Task.retry()`` sends the
new message first and only then raises ``Retry``, which fires ``task_retry``, so a
free worker can start the retry before ``task_retry`` runs; publishing there would
put ``failed`` after the retry's ``working``.

Why a revoked task is ``dead``: no retry follows and it will not run (or finish), so
it is terminal, as Celery's own ``REVOKED`` state is; readers polling for an end
(``tracker watch``) stop instead of waiting out the track's expiry.

A retry sent with a countdown is published to the broker at once (the worker holds
it until its ETA), so the track shows ``enqueued`` during the countdown.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from celery import signals
from celery.exceptions import Retry

from tracker.integrations import context
from tracker.integrations.base import SafePublisher, error_fields, publisher_for

_installed: dict[int, CeleryTracking] = {}


def _truthy(value: Any) -> bool:
    return value is True or (type(value) is int and value == 1) or value == "1"


class CeleryTracking:
    """The signal handlers for one Celery app (``install`` makes it)."""

    def __init__(self, app, publisher: SafePublisher):
        self.app = app
        self.publisher = publisher
        self._default_limit: Any = False  # app.conf.task_time_limit, read once

    # -------------------------------------------------------------------- helpers
    def _task(self, name: Optional[str]):
        try:
            return self.app.tasks.get(name) if name else None
        except Exception:  # an app that cannot finalize here: judge by the headers alone
            return None

    def _mine(self, task) -> bool:
        return task is None or getattr(task, "app", self.app) is self.app

    @staticmethod
    def _request_tracked(task, request) -> bool:
        if request is not None and _truthy(getattr(request, "track", None)):
            return True
        headers = getattr(request, "headers", None) or {}
        return _truthy(headers.get("track")) or _truthy(getattr(task, "track", False))

    def _time_limit(self, task, request=None) -> Any:
        limits = getattr(request, "timelimit", None) or (None, None)
        if limits[0]:
            return limits[0]
        limit = getattr(task, "time_limit", None)
        if limit is None:
            limit = self._default_limit
            if limit is False:
                limit = self._default_limit = self.app.conf.task_time_limit
        return limit

    # ------------------------------------------------------------------- handlers
    def on_publish(self, sender=None, headers=None, routing_key=None, **_):
        if headers is None or "id" not in headers:
            return  # protocol 1 or not a task message
        task = self._task(sender or headers.get("task"))
        if task is not None and not self._mine(task):
            return
        if not _truthy(headers.get("track")):
            if not _truthy(getattr(task, "track", False)):
                return
            headers["track"] = 1  # the worker and every retry learn it from the message
        jid = headers["id"]
        limits = headers.get("timelimit") or (None, None)
        fields = dict(queue=routing_key or None, jobtype=headers.get("task") or sender,
                      reserve_for=limits[0] or getattr(task, "time_limit", None))
        if (headers.get("retries") or 0) > 0:
            exc = sys.exc_info()[1]  # Task.retry() runs in the task's except block
            if isinstance(exc, Retry):
                exc = exc.exc
            errtype, message = error_fields(exc, "Retry")
            self.publisher.retrying(jid, errtype, message, requeued=True, **fields)
        else:
            self.publisher.enqueued(jid, **fields)

    def on_prerun(self, sender=None, task_id=None, task=None, **_):
        task = task or sender
        if task is None or not self._mine(task):
            return
        request = task.request
        tracked = self._request_tracked(task, request)
        request.tracker_token = context.enter(task_id, tracked, self.publisher)
        if tracked:
            self.publisher.working(task_id, reserve_for=self._time_limit(task, request))

    def on_postrun(self, sender=None, task=None, **_):
        task = task or sender
        token = getattr(getattr(task, "request", None), "tracker_token", None)
        if token is not None:
            context.leave(token)

    def on_success(self, sender=None, **_):
        if sender is None or not self._mine(sender):
            return
        request = sender.request
        if self._request_tracked(sender, request):
            self.publisher.success(request.id)

    def on_failure(self, sender=None, task_id=None, exception=None, **_):
        if sender is None or not self._mine(sender):
            return
        request = sender.request
        # A hard time limit fires this in the main process, outside the task's request:
        # publish then too (the fold ignores a JID that was never tracked).
        if getattr(request, "id", None) != task_id or self._request_tracked(sender, request):
            errtype, message = error_fields(exception)
            self.publisher.dead(task_id, errtype, message)

    def on_revoked(self, sender=None, request=None, terminated=None, expired=None, **_):
        if request is None or (sender is not None and not self._mine(sender)):
            return
        if self._request_tracked(sender, request):
            why = "terminated" if terminated else "expired" if expired else "revoked"
            self.publisher.dead(request.id, "TaskRevokedError", why)

    def on_process_shutdown(self, **_):
        self.publisher.flush()  # a pool process may leave by os._exit: atexit would not run

    def connect(self) -> None:
        uid = f"tracker-{id(self.app)}"
        signals.worker_process_shutdown.connect(self.on_process_shutdown, weak=False,
                                                dispatch_uid=uid)
        signals.before_task_publish.connect(self.on_publish, weak=False, dispatch_uid=uid)
        signals.task_prerun.connect(self.on_prerun, weak=False, dispatch_uid=uid)
        signals.task_postrun.connect(self.on_postrun, weak=False, dispatch_uid=uid)
        signals.task_success.connect(self.on_success, weak=False, dispatch_uid=uid)
        signals.task_failure.connect(self.on_failure, weak=False, dispatch_uid=uid)
        signals.task_revoked.connect(self.on_revoked, weak=False, dispatch_uid=uid)

    def disconnect(self) -> None:
        uid = f"tracker-{id(self.app)}"
        for sig in (signals.before_task_publish, signals.task_prerun, signals.task_postrun,
                    signals.task_success, signals.task_failure, signals.task_revoked,
                    signals.worker_process_shutdown):
            sig.disconnect(dispatch_uid=uid)
        _installed.pop(id(self.app), None)


def install(app, tracker=None) -> CeleryTracking:
    """Publish the lifecycle of the app's tracked tasks. ``tracker``: a ``Tracker``
    (else one connected lazily in each process from ``TRACKER_REDIS_URL`` & co).
    Installing twice replaces the first installation. Returns the handlers; their
    ``publisher`` counts what was published and dropped."""
    old = _installed.get(id(app))
    if old is not None:
        old.disconnect()
    tracking = CeleryTracking(app, publisher_for(tracker))
    tracking.connect()
    _installed[id(app)] = tracking
    return tracking
