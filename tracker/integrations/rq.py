"""RQ: enqueue with ``TrackedQueue``, run ``rq worker -w tracker.integrations.rq.TrackedWorker``.

Opt in per job with ``meta={"track": 1}``, or for every job of a queue with
``TrackedQueue(..., track=True)``. The JID is the RQ job id.

What publishes what:

* ``TrackedQueue``: ``enqueued`` on ``enqueue``/``enqueue_at``/... (a deferred job's
  too: that is its PUSH);
* ``TrackedWorker``: ``working`` when the work horse starts (reserved for the job's
  timeout), ``success`` when the job returns, ``dead`` when it raises with no retry
  left, is stopped, or its horse dies;
* ``TrackedWorker``, the job raising with retries left in its ``Retry``: ``failed``,
  then ``enqueued`` at once if the retry has no interval; with an interval the
  worker's scheduler (``--with-scheduler``) publishes ``enqueued`` when it moves the
  job back to its queue;
* the job returning ``rq.Retry(...)``: ``failed`` (+ ``enqueued``) while
  ``retry.max`` allows, else ``dead``.

Every event is published before RQ's own write that makes the next step possible,
so the log keeps the contract's order however fast another worker is.
"""

from __future__ import annotations

import contextlib
import mmap
import re
import threading
import time
from typing import Any, Optional

from rq import Queue
from rq.defaults import DEFAULT_LOGGING_DATE_FORMAT, DEFAULT_LOGGING_FORMAT
from rq.job import Retry
from rq.registry import ScheduledJobRegistry
from rq.scheduler import RQScheduler
from rq.worker import BaseWorker, SimpleWorker, Worker

from tracker.integrations import context
from tracker.integrations.base import SafePublisher, error_fields, publisher_for

_local = threading.local()  # .quiet: the job whose re-enqueue the worker announces itself


def _track_value(job) -> Any:
    try:
        value = (job.meta or {}).get("track")
    except Exception:
        return None
    if value is True or (type(value) is int and value == 1):
        return value
    return None


def _jobtype(job) -> Optional[str]:
    try:
        return job.func_name
    except Exception:  # a job whose data cannot be deserialized
        return None


def _timeout(job) -> Any:
    t = getattr(job, "timeout", None)
    return t if isinstance(t, (int, float)) and t > 0 else None


def _announce(publisher: SafePublisher, job, queue_name: str) -> None:
    track = _track_value(job)
    if track is not None:
        publisher.enqueued(job.id, queue=queue_name, jobtype=_jobtype(job),
                           reserve_for=_timeout(job), track=track)


@contextlib.contextmanager
def _quiet(job):
    before = getattr(_local, "quiet", None)
    _local.quiet = job.id
    try:
        yield
    finally:
        _local.quiet = before


class TrackedQueue(Queue):
    """An ``rq.Queue`` that publishes ``enqueued`` for its tracked jobs (``meta={"track": 1}``,
    or every job with ``track=True``). ``tracker``: a ``Tracker``, else one from the
    environment, connected on first use."""

    def __init__(self, *args, track: bool = False, tracker=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.track = track
        self.tracking = publisher_for(tracker)

    def _mark(self, job) -> None:
        if self.track and "track" not in (job.meta or {}):
            job.meta["track"] = 1  # saved with the job, so the worker knows it too

    def _is_quiet(self, job) -> bool:
        return getattr(_local, "quiet", None) == job.id

    def enqueue_job(self, job, pipeline=None, at_front: bool = False, unique: bool = False):
        self._mark(job)
        if self._is_quiet(job):
            return super().enqueue_job(job, pipeline=pipeline, at_front=at_front, unique=unique)
        _announce(self.tracking, job, self.name)
        with _quiet(job):  # _enqueue_job below must not announce it again
            return super().enqueue_job(job, pipeline=pipeline, at_front=at_front, unique=unique)

    def _enqueue_job(self, job, pipeline=None, at_front: bool = False, unique: bool = False):
        # Also reached without enqueue_job: enqueue_many, dependents, retries.
        self._mark(job)
        if not self._is_quiet(job):
            _announce(self.tracking, job, self.name)
        return super()._enqueue_job(job, pipeline=pipeline, at_front=at_front, unique=unique)

    def schedule_job(self, job, datetime, pipeline=None, unique: bool = False):
        # enqueue_at / enqueue_in: the PUSH of a scheduled job.
        self._mark(job)
        if not self._is_quiet(job):
            _announce(self.tracking, job, self.name)
        return super().schedule_job(job, datetime, pipeline=pipeline, unique=unique)


class _TrackedRegistry(ScheduledJobRegistry):
    """Announces the tracked jobs the scheduler is about to move into their queue."""

    tracking: SafePublisher

    def get_jobs_to_schedule(self, timestamp=None, chunk_size: int = 1000):
        ids = super().get_jobs_to_schedule(timestamp, chunk_size)
        if ids:
            try:
                jobs = self.job_class.fetch_many(ids, connection=self.connection,
                                                 serializer=self.serializer)
            except Exception:
                jobs = []
            for job in jobs:
                if job is not None:
                    _announce(self.tracking, job, self.name)
        return ids


class TrackedScheduler(RQScheduler):
    tracking: SafePublisher

    def prepare_registries(self, queue_names=None):
        super().prepare_registries(queue_names)
        mine: list[ScheduledJobRegistry] = []
        for reg in self._scheduled_job_registries:
            tracked = _TrackedRegistry(reg.name, connection=self.connection,
                                       serializer=self.serializer)
            tracked.tracking = self.tracking
            mine.append(tracked)
        self._scheduled_job_registries = mine


_EXC_LINE = re.compile(r"([A-Za-z_][\w.]*)(?::\s?(.*))?")


def _from_exc_string(text: str) -> tuple[str, str]:
    """(errtype, message) from RQ's formatted exception (its last line is ``Type: message``)."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    if not lines:
        return "JobFailed", ""
    m = _EXC_LINE.fullmatch(lines[-1])
    if m:
        return m.group(1).rsplit(".", 1)[-1], m.group(2) or ""
    return "JobFailed", lines[-1]


class TrackingMixin(BaseWorker):
    """The hooks, for any ``rq.worker.BaseWorker`` subclass (see ``TrackedWorker``)."""

    def __init__(self, *args, tracker=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tracking = publisher_for(tracker)
        self._tracker_errors: dict[str, tuple[str, str]] = {}

    def work(self, *args, **kwargs):
        self.tracking.warm()  # connect once here, so each forked horse starts connected
        return super().work(*args, **kwargs)

    def _start_scheduler(self, burst: bool = False, logging_level: Optional[str] = "INFO",
                         date_format: str = DEFAULT_LOGGING_DATE_FORMAT,
                         log_format: str = DEFAULT_LOGGING_FORMAT):
        # RQ's own body with TrackedScheduler, so interval retries announce their re-enqueue.
        self.scheduler = TrackedScheduler(
            self.queues, connection=self.connection,
            logging_level=logging_level if logging_level is not None else self.log.level,
            date_format=date_format, log_format=log_format, serializer=self.serializer)
        self.scheduler.tracking = self.tracking
        self.scheduler.acquire_locks()
        if self.scheduler.acquired_locks:
            if burst:
                try:
                    self.scheduler.register_birth()
                    self.scheduler.enqueue_scheduled_jobs()
                finally:
                    self.scheduler.release_locks()
                    self.scheduler.register_death()
            else:
                self.scheduler.start()

    # A forking worker says ``working`` and ``success`` from its long-lived parent, on a
    # warm connection, so a work horse that reports no progress and does not fail never
    # connects to the tracker at all.
    _parent_reports: Optional[str] = None  # the job the parent reports for (seen by the horse)

    # Shared with every horse forked from the parent: [0] 1 once the horse's job
    # succeeded, [1] the sequence number of the last job whose ``working`` is out.
    _outcome: Optional[mmap.mmap] = None
    _seq = 0

    def execute_job(self, job, queue):
        if _track_value(job) is None or isinstance(self, SimpleWorker):
            return super().execute_job(job, queue)
        outcome = self._outcome
        if outcome is None:
            outcome = self._outcome = mmap.mmap(-1, 2)
        self._seq = seq = self._seq % 255 + 1
        outcome[0] = 0

        def sent():
            outcome[1] = seq
        self.tracking.working(job.id, reserve_for=_timeout(job), sent=sent)
        self._parent_reports = job.id
        try:
            super().execute_job(job, queue)
        finally:
            self._parent_reports = None
        if outcome[0] == 1:  # the horse's handle_job_success ran to its end
            self.tracking.success(job.id)

    def _after_parents_working(self) -> None:
        """In a horse, before its first event: the parent's ``working`` goes first."""
        outcome, seq = self._outcome, self._seq
        deadline = time.monotonic() + 5
        while outcome is not None and outcome[1] != seq and time.monotonic() < deadline:
            time.sleep(0.001)

    def perform_job(self, job, queue, execution) -> bool:
        tracked = _track_value(job) is not None
        if tracked and self._parent_reports == job.id:  # a horse; its parent said working
            self.tracking.gate = self._after_parents_working
        elif tracked:
            self.tracking.working(job.id, reserve_for=_timeout(job))
        token = context.enter(job.id, tracked, self.tracking)
        try:
            return super().perform_job(job, queue, execution)
        finally:
            context.leave(token)
            if tracked:
                self.tracking.flush()  # a work horse exits right after (os._exit)

    def handle_job_success(self, job, queue, started_job_registry, execution):
        super().handle_job_success(job, queue, started_job_registry, execution)
        if _track_value(job) is None:
            return
        if self._parent_reports == job.id and self._outcome is not None:
            self._outcome[0] = 1  # the parent publishes it, on its warm connection
        else:
            self.tracking.success(job.id)

    def handle_exception(self, job, *exc_info):
        if _track_value(job) is not None:
            self._tracker_errors[job.id] = error_fields(exc_info[1])
        return super().handle_exception(job, *exc_info)

    def handle_job_failure(self, job, queue, started_job_registry=None, exc_string: str = "",
                           execution=None):
        track = _track_value(job)
        if track is not None:
            err = self._tracker_errors.pop(job.id, None)
            errtype, message = err if err is not None else _from_exc_string(exc_string)
            stopped = getattr(self, "_stopped_job_id", None) == job.id
            if stopped:
                self.tracking.dead(job.id, "JobStopped", exc_string.strip() or "stopped")
            elif job.should_retry:
                now = not job.get_retry_interval()  # else the scheduler re-enqueues it later
                self.tracking.retrying(job.id, errtype, message, requeued=now, queue=job.origin,
                                       jobtype=_jobtype(job), reserve_for=_timeout(job),
                                       track=track)
            else:
                self.tracking.dead(job.id, errtype, message)
        with _quiet(job):  # it announced the re-enqueue itself, above
            return super().handle_job_failure(job, queue, started_job_registry=started_job_registry,
                                              exc_string=exc_string, execution=execution)

    def handle_job_retry(self, job, queue, retry, started_job_registry, execution):
        track = _track_value(job)
        if track is not None:
            done = job.number_of_retries or 0
            if done and done >= retry.max:  # RQ's own test
                self.tracking.dead(job.id, "Retry", f"the job asked for a retry after {done} "
                                                     f"retries (max {retry.max})")
            else:
                now = not Retry.get_interval(done, retry.intervals)
                self.tracking.retrying(job.id, "Retry", "the job asked for a retry",
                                       requeued=now, queue=job.origin, jobtype=_jobtype(job),
                                       reserve_for=_timeout(job), track=track)
        with _quiet(job):  # it announced the re-enqueue itself, above
            return super().handle_job_retry(job, queue, retry, started_job_registry, execution)


class TrackedWorker(TrackingMixin, Worker):
    """``rq.Worker`` (a forked work horse per job) that publishes its tracked jobs' lifecycle.

    ``rq worker -w tracker.integrations.rq.TrackedWorker [--with-scheduler]``; in code,
    ``TrackedWorker(queues, connection=..., tracker=None)``.
    """


class TrackedSimpleWorker(TrackingMixin, SimpleWorker):
    """``rq.SimpleWorker`` (jobs run in the worker process itself), tracked."""
