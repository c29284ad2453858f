"""Publishing from inside a job library without ever breaking a job.

``SafePublisher`` wraps a ``Tracker`` for the integrations' hooks:

* it connects lazily, in the process that publishes (a worker after its fork),
  from ``Tracker.connect(url)`` or the ``TRACKER_*`` environment, and waits at
  most a moment for that connection: the attempt goes on in a thread;
* the Tracker it makes itself gets short timeouts (connect 0.5 s, reply 1 s, one
  immediate retry) so an unreachable tracker costs a job milliseconds, not the
  redis-py defaults' seconds;
* when publishing fails it logs one warning for the outage, counts every event it
  could not publish (``dropped``) and stops trying for a while (1 s, doubling up to
  30 s), so a job under an outage pays nothing; the next success logs the end of
  the outage with the count;
* an event the tracker refuses (a job ID with a space, say) is counted as
  ``invalid`` and logged once per field, and the job goes on.

Only errors of the tracker's own making are caught (``TrackerError``, Redis and
socket errors): a job library's timeout exception raised while we publish still
reaches the library.
"""

from __future__ import annotations

import atexit
import collections
import inspect
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Optional

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tracker import events
from tracker.errors import TrackerError, ValidationError
from tracker.query import Tracker

log = logging.getLogger("tracker.integrations")

CONNECT_TIMEOUT = 0.5  # seconds, for a socket connect to the tracker's Redis
SOCKET_TIMEOUT = 1.0  # seconds, for a reply
FIRST_WAIT = 2.0  # seconds a job waits for the first connection of its process
PROBE_WAIT = 0.5  # ... and for a reconnection during an outage
PROBE_MIN, PROBE_MAX = 1.0, 30.0  # seconds between attempts during an outage
MAX_PENDING = 10_000  # deferred events waiting for the sender; beyond, they are dropped
FLUSH_TIMEOUT = 5.0  # seconds flush() waits for them at most
BATCH_WINDOW = 0.005  # seconds the sender lets deferred events gather into one round trip
BATCH_MAX = 500  # ... or until this many are waiting

_CAUGHT = (TrackerError, redis.RedisError, OSError)
_instances: weakref.WeakSet[SafePublisher] = weakref.WeakSet()


def connect(url: Optional[str] = None, connect_timeout: float = CONNECT_TIMEOUT,
            socket_timeout: float = SOCKET_TIMEOUT, **settings):
    """``Tracker.connect(url, **settings)`` with the short timeouts the integrations use.

    Pass the result as ``tracker=`` to keep a job quick when this tracker is down.
    """
    t = Tracker.connect(url, **settings)
    shorten_timeouts(t, connect_timeout, socket_timeout)
    return t


def shorten_timeouts(tracker, connect_timeout: float = CONNECT_TIMEOUT,
                     socket_timeout: float = SOCKET_TIMEOUT) -> None:
    """Give the Tracker's Redis client short timeouts and a single immediate retry."""
    try:
        client = tracker.deployment.client
        pool = client.connection_pool
        kw = pool.connection_kwargs
        kw.update(socket_connect_timeout=connect_timeout, socket_timeout=socket_timeout)
        for name, value in (("orig_socket_connect_timeout", connect_timeout),
                            ("orig_socket_timeout", socket_timeout)):
            if name in kw:  # what redis-py restores after a maintenance event
                kw[name] = value
        # No CLIENT SETINFO round trips on each new connection (a forked work horse makes one).
        params = inspect.signature(pool.connection_class.__init__).parameters
        if "driver_info" in params:
            kw["driver_info"] = None
        elif "lib_name" in params:
            kw.update(lib_name=None, lib_version=None)
        retry = Retry(NoBackoff(), 1)
        if hasattr(client, "set_retry"):
            client.set_retry(retry)
        else:  # older redis-py: the retry policy is a connection argument
            pool.connection_kwargs["retry"] = retry
        pool.disconnect()
        pool.reset()  # connections are made anew, with the settings above
    except Exception as e:  # keep the defaults; the outage breaker still bounds the cost
        log.debug("tracker: could not shorten the Redis timeouts: %r", e)


def _seconds(value: Any) -> Optional[int]:
    """A reservation in whole seconds, or None for the tracker's default (1800 s)."""
    try:
        if value is None or isinstance(value, bool) or value <= 0:
            return None
        return int(math.ceil(value))
    except TypeError:
        return None


def _name(value: Any) -> Optional[str]:
    """A queue or job type name the tracker accepts: printable, at most 200 bytes."""
    if value is None:
        return None
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return text.encode("utf-8", "replace")[:200].decode("utf-8", "ignore") or None


def error_fields(exc: Optional[BaseException], default: str = "Error") -> tuple[str, str]:
    """(errtype, message) for a failure event, as Faktory's FAIL carries them."""
    if exc is None:
        return default, ""
    return type(exc).__name__, str(exc)


class SafePublisher:
    """Publishes lifecycle events and progress; never raises for the tracker's sake.

    ``published``, ``dropped`` (not published: the tracker was unreachable, or the
    deferred queue was full) and ``invalid`` (refused by validation) count events;
    ``outages`` counts outages.

    Events whose order only matters within this process (``working``, progress,
    ``success``: what a worker says about the job it runs) are *deferred*: a sender
    thread appends them, in order and several per round trip, so the job does not
    wait for the tracker's Redis. Every other event is published before the call
    returns, after whatever is deferred (so this process's events keep their order):
    ``enqueued`` and a retry's ``failed`` must be in the log before the job library
    makes the job visible to another worker. ``flush()`` waits for the deferred ones
    (the integrations call it before a process exits).
    """

    def __init__(self, tracker=None, *, url: Optional[str] = None,
                 connect_timeout: float = CONNECT_TIMEOUT,
                 socket_timeout: float = SOCKET_TIMEOUT):
        self._tracker = tracker
        self.url = url
        self.connect_timeout = connect_timeout
        self.socket_timeout = socket_timeout
        self.published = self.dropped = self.invalid = self.outages = 0
        self._lock = threading.Lock()
        self._connecting: Optional[threading.Thread] = None
        self._connect_error: Optional[BaseException] = None
        self._ever_connected = tracker is not None
        self._down_since: Optional[float] = None
        self._dropped_before = 0
        self._next_probe = 0.0
        self._probe_every = PROBE_MIN
        self._warned_fields: set[str] = set()
        self.gate: Optional[Callable[[], None]] = None  # called before the next publish
        self._init_sender()
        _instances.add(self)

    def _init_sender(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._pending: collections.deque = collections.deque()
        self._sent_hooks: list = []
        self._sending = False
        self._hurry = False
        self._sender: Optional[threading.Thread] = None

    def stats(self) -> dict:
        return {"published": self.published, "dropped": self.dropped,
                "invalid": self.invalid, "outages": self.outages,
                "down": self._down_since is not None, "pending": len(self._pending)}

    # ------------------------------------------------------------------ connection
    def _connect(self) -> None:
        try:
            t = connect(self.url, self.connect_timeout, self.socket_timeout)
        except BaseException as e:  # noqa: BLE001 - reported by the waiting publisher
            self._connect_error = e
            return
        self._connect_error = None
        self._tracker = t

    def tracker(self, wait: Optional[float] = None):
        """The Tracker, connecting if needed; waits at most ``wait`` seconds for it."""
        t = self._tracker
        if t is not None:
            return t
        with self._lock:
            th = self._connecting
            if self._tracker is None and (th is None or not th.is_alive()):
                self._connect_error = None
                th = threading.Thread(target=self._connect, name="tracker-connect", daemon=True)
                self._connecting = th
                th.start()
        if wait is None:
            wait = PROBE_WAIT if self._ever_connected or self.outages else FIRST_WAIT
        assert th is not None
        th.join(wait)
        t = self._tracker
        if t is None:
            err = self._connect_error
            if err is None:
                raise TrackerError(f"no connection to the tracker's Redis within {wait:g}s")
            if isinstance(err, _CAUGHT):
                raise err
            raise TrackerError(f"cannot connect to the tracker's Redis: {err!r}")
        self._ever_connected = True
        return t

    def warm(self) -> None:
        """Connect now if possible (a worker parent before it forks); never raises."""
        self._publish([])

    # ------------------------------------------------------------------- publishing
    def _breaker_open(self, n: int) -> bool:
        if self._down_since is not None and time.monotonic() < self._next_probe:
            with self._lock:
                self.dropped += n
            return True
        return False

    def _publish(self, evs: list) -> bool:
        """Append ``evs`` ((method, args, kwargs) of the Publisher's batch) in one round
        trip; count the outcome. True when all were appended."""
        n = len(evs)
        now = time.monotonic()
        invalid = 0
        if n and self.gate is not None:
            gate, self.gate = self.gate, None
            gate()
        try:
            t = self.tracker()
            if n == 1:
                name, args, kw = evs[0]
                getattr(t if name == "set" else t.publisher, name)(*args, **kw)
            elif n:
                with t.publisher.batch() as b:
                    for name, args, kw in evs:
                        try:
                            getattr(b, name)(*args, **kw)
                        except ValidationError as e:  # this one is refused, the others go
                            invalid += 1
                            self._refused(e)
        except ValidationError as e:
            self._refused(e)
            return False
        except _CAUGHT as e:
            self._failed(n - invalid, e, now)
            return False
        with self._lock:
            self.published += n - invalid
            if self._down_since is not None:
                lost = self.dropped - self._dropped_before
                log.warning("tracker: publishing again after %.1fs; %d events were dropped "
                            "during the outage", now - self._down_since, lost)
                self._down_since = None
        return not invalid

    def _now(self, *evs) -> bool:
        """Publish before returning, after this process's deferred events."""
        if self._breaker_open(len(evs)):
            return False
        if self._pending or self._sending:
            self.flush()
        return self._publish(list(evs))

    def _later(self, ev, sent: Optional[Callable[[], None]] = None) -> bool:
        """Queue for the sender thread; True when queued. ``sent`` is called once the event
        is published or dropped."""
        if self._breaker_open(1):
            if sent:
                sent()
            return False
        with self._cond:
            if len(self._pending) >= MAX_PENDING:
                with self._lock:
                    self.dropped += 1
                if sent:
                    sent()
                return False
            self._pending.append(ev)
            if sent:
                self._sent_hooks.append(sent)
            if self._sender is None or not self._sender.is_alive():
                self._sender = threading.Thread(target=self._send_loop, daemon=True,
                                                name="tracker-publisher")
                self._sender.start()
            elif len(self._pending) == 1:
                self._cond.notify()  # only the first event wakes the sender
        return True

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                # Let a few more events come (a job's working and success, the next job's
                # working...) so they share a round trip and the job does not share the GIL
                # with a sender woken per event; flush() cuts the wait short.
                deadline = time.monotonic() + BATCH_WINDOW
                while (not self._hurry and len(self._pending) < BATCH_MAX
                       and (left := deadline - time.monotonic()) > 0):
                    self._cond.wait(left)
                evs = list(self._pending)
                self._pending.clear()
                hooks = list(self._sent_hooks)
                self._sent_hooks.clear()
                self._sending = True
            try:
                if not self._breaker_open(len(evs)):
                    self._publish(evs)
            except BaseException:  # noqa: BLE001 - never let the sender die silently
                log.exception("tracker: deferred events lost")
            finally:
                for hook in hooks:
                    hook()
                with self._cond:
                    self._sending = False
                    self._cond.notify_all()

    def flush(self, timeout: float = FLUSH_TIMEOUT) -> bool:
        """Wait (at most ``timeout`` s) until the deferred events are published or dropped."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._hurry = True
            self._cond.notify_all()
            try:
                while self._pending or self._sending:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(left)
            finally:
                self._hurry = False
        return True

    def _failed(self, n: int, err: BaseException, now: float) -> None:
        with self._lock:
            self.dropped += n
            if self._down_since is None:
                self._down_since = now
                self._dropped_before = self.dropped - n
                self.outages += 1
                self._probe_every = PROBE_MIN
                log.warning("tracker: cannot publish job events (%s); jobs go on, and events "
                            "are dropped and counted until the tracker's Redis answers again",
                            str(err).rstrip(".") or type(err).__name__)
            else:
                self._probe_every = min(self._probe_every * 2, PROBE_MAX)
            self._next_probe = now + self._probe_every

    def _refused(self, err: ValidationError) -> None:
        with self._lock:
            self.invalid += 1
            first = err.field not in self._warned_fields
            self._warned_fields.add(err.field)
        if first:
            log.warning("tracker: an event was not published: %s (further events refused for "
                        "this field are only counted)", err)

    # One method per lifecycle event. Each returns True once the event is appended
    # (deferred ones: once queued), False when it was dropped or refused.
    def enqueued(self, jid: str, queue: Any = None, jobtype: Any = None,
                 reserve_for: Any = None, track: Any = 1) -> bool:
        return self._now(("enqueued", (jid,), dict(
            custom={"track": track}, queue=_name(queue), jobtype=_name(jobtype),
            reserve_for=_seconds(reserve_for))))

    def working(self, jid: str, reserve_for: Any = None,
                sent: Optional[Callable[[], None]] = None) -> bool:
        """Deferred; ``sent()`` is called once it is published (or dropped), for another
        process that must publish this job's next events after it."""
        return self._later(("working", (jid,), {"reserve_for": _seconds(reserve_for)}), sent)

    def success(self, jid: str) -> bool:
        return self._later(("success", (jid,), {}))

    def failed(self, jid: str, errtype: str, message: str) -> bool:
        return self._now(("failed", (jid,), {"errtype": errtype, "message": message}))

    def dead(self, jid: str, errtype: str, message: str) -> bool:
        return self._now(("dead", (jid,), {"errtype": errtype, "message": message}))

    def retrying(self, jid: str, errtype: str, message: str, requeued: bool, queue: Any = None,
                 jobtype: Any = None, reserve_for: Any = None, track: Any = 1) -> bool:
        """FAIL with retries left: ``failed``, and when the retry is back in its queue at once,
        ``enqueued`` too (one round trip, in that order)."""
        failed = ("failed", (jid,), {"errtype": errtype, "message": message})
        if not requeued:
            return self._now(failed)
        return self._now(failed, ("enqueued", (jid,), dict(
            custom={"track": track}, queue=_name(queue), jobtype=_name(jobtype),
            reserve_for=_seconds(reserve_for))))

    def set(self, jid: str, percent: Any = None, desc: Any = None, reserve_until: Any = None,
            publish: bool = True) -> bool:
        """TRACK SET (deferred). Bad input raises ``ValidationError`` (the caller's bug,
        reported even while the tracker is down); an unreachable tracker only returns False."""
        events.make_trackset("x", percent, desc, reserve_until)  # the fields; a JID the job
        if not publish:                                          # library chose is no caller bug
            return False
        return self._later(("set", (jid,), {"percent": percent, "desc": desc,
                                            "reserve_until": reserve_until}))


def flush_all(timeout: float = FLUSH_TIMEOUT) -> None:
    """Wait for every publisher's deferred events (at process exit)."""
    for p in list(_instances):
        p.flush(timeout)


atexit.register(flush_all)


def _reinit_after_fork() -> None:
    # A lock held by another thread at fork time would stay held in the child, and the
    # parent's deferred events are the parent's to send.
    for p in list(_instances):
        p._lock = threading.Lock()
        p._connecting = None
        p._init_sender()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reinit_after_fork)


_shared: dict[tuple, SafePublisher] = {}
_by_tracker: weakref.WeakKeyDictionary[Any, SafePublisher] = weakref.WeakKeyDictionary()
_shared_lock = threading.Lock()


def publisher_for(tracker=None) -> SafePublisher:
    """The SafePublisher for ``tracker``: one per Tracker object, and for None one per
    process and environment (``TRACKER_REDIS_URL``, ``TRACKER_PREFIX``, ...), connected
    lazily."""
    if isinstance(tracker, SafePublisher):
        return tracker
    with _shared_lock:
        if tracker is not None:
            p = _by_tracker.get(tracker)
            if p is None:
                p = _by_tracker[tracker] = SafePublisher(tracker)
            return p
        key = tuple(os.environ.get(k) for k in ("TRACKER_REDIS_URL", "TRACKER_PREFIX",
                                                 "TRACKER_DATA_DIR", "TRACKER_PARTITIONS"))
        p = _shared.get(key)
        if p is None:
            p = _shared[key] = SafePublisher()
        return p
