"""Lifecycle events from the Faktory traffic the proxy relays, by Faktory 1.10's rules.

Each forwarded command is seen twice: when it goes upstream (``forward``: a PUSH's
tracked jobs are decoded once, there) and when its reply comes back (``reply``).
Events are queued on the ``Outbox`` only for a reply that confirms the command:

- PUSH ``+OK`` of a job whose ``custom.track`` is 1/true: ``enqueued``. PUSHB: the
  tracked jobs its reply map (the rejected JIDs) does not name.
- FETCH of a tracked job: ``working`` with its ``reserve_for``. When the proxy did
  not see the job become enqueued (it carries ``at``, so the scheduler moved it; or
  ``failure``, so a retry did; or its PUSH's reply is still on its way) an
  ``enqueued`` goes first, which also brings back a track that expired meanwhile.
- ACK ``+OK`` of a JID seen fetched and tracked: ``success``. FAIL ``+OK``:
  ``failed`` or ``dead`` by manager/retry.go: the failure count is 0 at the first
  failure and +1 per failure (``failure.retry_count`` of the fetched job, + 1), and
  the job is retried while count < retry (``retry`` absent: 25). ``retry: 0`` makes
  Faktory discard the job (no retry, no dead set): the track says ``dead``, because
  the job will never run again.

What FAIL and ACK need (tracked? retry, count) is kept per JID in memory and in
Redis (``keys.fetched``, TTL = the reservation), so an ACK or FAIL sent on another
connection, or through another proxy process, still finds it. Untracked JIDs are
remembered in memory only, so their ACKs cost no Redis round trip.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import msgspec

from tracker import events
from tracker.errors import ValidationError
from tracker.server.outbox import Outbox
from tracker.server.wire import OK, bulk_body
from tracker.store import keys

log = logging.getLogger("tracker.server.proxy")

DEFAULT_RETRY = 25  # Faktory's RetryPolicyDefault
REAP_SLACK = 15  # seconds: Faktory's reaper runs every 15 s, so an ACK that late still counts
MAX_REMEMBERED = 100_000  # JIDs held in memory; the oldest are forgotten first (Redis has them)
UNTRACKED = None


class Job(msgspec.Struct):
    """The fields of a Faktory job the proxy reads; any type, checked when used."""

    jid: Any = None
    queue: Any = None
    jobtype: Any = None
    custom: Any = None
    reserve_for: Any = None
    retry: Any = None
    at: Any = None
    failure: Any = None


class Payload(msgspec.Struct):
    """ACK's and FAIL's JSON."""

    jid: Any = None
    errtype: Any = None
    message: Any = None


_job = msgspec.json.Decoder(Job)
_jobs = msgspec.json.Decoder(list[Job])
_payload = msgspec.json.Decoder(Payload)
_rejects = msgspec.json.Decoder(dict[str, Any])


def may_track(raw: bytes) -> bool:
    """False only when the JSON cannot hold ``"track"`` (the fast path for untracked jobs)."""
    return b'"track"' in raw or b"\\u" in raw


def tracked(job: Job) -> bool:
    try:
        return isinstance(job.jid, str) and events.is_tracked(job.custom)
    except ValidationError:
        return False


def reserve_of(job: Job) -> Optional[int]:
    """``reserve_for`` when it is a positive whole number (else Faktory's default)."""
    r = job.reserve_for
    return r if type(r) is int and r > 0 else None


def retry_of(job: Job) -> int:
    r = job.retry
    return r if type(r) is int else DEFAULT_RETRY


def count_at_next_failure(job: Job) -> int:
    """Faktory's ``failure.retry_count`` after the FAIL of this fetched job."""
    f = job.failure
    if isinstance(f, dict):
        n = f.get("retry_count")
        return n + 1 if type(n) is int else 0
    return 0


def failure_state(retry: int, count: int) -> type:
    """manager/retry.go: retry 0 -> discarded (``Dead`` here); count < retry -> retried."""
    if retry == 0:
        return events.Dead
    return events.Failed if count < retry else events.Dead


def cleanse(value: Any) -> str:
    """FAIL's errtype/message as Faktory stores them (trimmed, "unknown" when empty)."""
    text = value.strip() if isinstance(value, str) else ""
    return text or "unknown"


class Pushed:
    """A tracked job on its way upstream in a PUSH or PUSHB."""

    __slots__ = ("job", "published")

    def __init__(self, job: Job):
        self.job = job
        self.published = False  # its FETCH came first and published the enqueued


class Observer:
    def __init__(self, outbox: Outbox):
        self.out = outbox
        self.prefix = outbox.prefix
        self.partitions = outbox.partitions
        self.jobs: dict[str, Any] = {}  # jid -> UNTRACKED or (retry, count, deadline)
        self.pushing: dict[str, list[Pushed]] = {}

    def key(self, jid: str) -> str:
        return keys.fetched(self.prefix, keys.partition_of(jid, self.partitions), jid)

    def _emit(self, make: Any, *args: Any) -> None:
        try:
            self.out.event(make(*args))
        except ValidationError as e:  # Faktory took it, the contract's limits do not
            log.debug("not published for %r: %s", args[0] if args else None, e)

    # ---------------------------------------------------------------- forward
    def forward(self, verb: bytes, payload: bytes) -> Any:
        """Called as a command goes upstream; returns what ``reply`` will need."""
        if verb == b"PUSH" or verb == b"PUSHB":
            if not may_track(payload):
                return None
            try:
                jobs = [_job.decode(payload)] if verb == b"PUSH" else _jobs.decode(payload)
            except msgspec.DecodeError:
                return None  # the upstream will refuse it too
            mine = [Pushed(j) for j in jobs if tracked(j)]
            for p in mine:
                self.pushing.setdefault(p.job.jid, []).append(p)
            return mine or None
        return payload  # ACK, FAIL: decoded only once confirmed

    def abandon(self, verb: bytes, ctx: Any) -> None:
        """The command will get no reply (the upstream went away): forget it."""
        if ctx and verb in (b"PUSH", b"PUSHB"):
            for p in ctx:
                self._unpush(p)

    def _unpush(self, p: Pushed) -> None:
        waiting = self.pushing.get(p.job.jid)
        if waiting:
            try:
                waiting.remove(p)
            except ValueError:
                pass
            if not waiting:
                del self.pushing[p.job.jid]

    # ------------------------------------------------------------------ reply
    def reply(self, verb: bytes, ctx: Any, reply: bytes) -> None:
        if verb == b"FETCH":
            self.fetched(reply)
        elif verb == b"ACK":
            if reply == OK:
                self.acked(ctx)
        elif verb == b"FAIL":
            if reply == OK:
                self.failed(ctx)
        elif ctx:  # PUSH, PUSHB with tracked jobs
            rejected: Any = ()
            ok = reply == OK
            if verb == b"PUSHB" and reply.startswith(b"$"):
                try:
                    rejected = _rejects.decode(bulk_body(reply) or b"")
                    ok = True
                except msgspec.DecodeError:
                    ok = False
            for p in ctx:
                self._unpush(p)
                if ok and not p.published and p.job.jid not in rejected:
                    self.enqueued(p.job)

    def enqueued(self, job: Job) -> None:
        queue = "default" if job.queue is None else job.queue  # as Faktory fills it in
        self._emit(events.make_enqueued, job.jid, job.custom, queue, job.jobtype,
                   reserve_of(job))

    def fetched(self, reply: bytes) -> None:
        body = bulk_body(reply)
        if body is None:
            return  # $-1 (nothing to do) or an error
        try:
            job = _job.decode(body)
        except msgspec.DecodeError:
            return
        jid = job.jid
        if not isinstance(jid, str):
            return
        if not (may_track(body) and tracked(job)):
            self.remember(jid, UNTRACKED)
            return
        try:
            events.check_jid(jid)
        except ValidationError:
            return  # Faktory allows JIDs the contract does not: such a job is not tracked
        waiting = self.pushing.get(jid)
        early = [p for p in waiting if not p.published] if waiting else []
        if early:  # its PUSH's +OK has not arrived yet: the FETCH proves it was taken
            early[0].published = True
            self.enqueued(early[0].job)
        elif job.at is not None or job.failure is not None:
            self.enqueued(job)
        reserve = reserve_of(job)
        self._emit(events.make_working, jid, reserve)
        retry, count = retry_of(job), count_at_next_failure(job)
        ttl = events.clamp_reserve(reserve) + REAP_SLACK
        self.remember(jid, (retry, count, time.monotonic() + ttl))
        self.out.command("SET", self.key(jid), f"{retry} {count}", "PX", ttl * 1000)

    def remember(self, jid: str, what: Any) -> None:
        jobs = self.jobs
        jobs.pop(jid, None)
        jobs[jid] = what
        if len(jobs) > MAX_REMEMBERED:
            del jobs[next(iter(jobs))]

    def _confirmed(self, raw: Any) -> tuple[Optional[Payload], Any]:
        """The ACK/FAIL payload and what is known of its job: a record, UNTRACKED, or
        ``...`` (not in memory: ask Redis)."""
        try:
            p = _payload.decode(raw)
        except msgspec.DecodeError:
            return None, UNTRACKED
        if not isinstance(p.jid, str):
            return None, UNTRACKED
        rec = self.jobs.pop(p.jid, ...)
        if rec is not UNTRACKED and rec is not ... and rec[2] < time.monotonic():
            rec = ...  # the reservation is over in memory; Redis' TTL says the same
        return p, rec

    def acked(self, raw: Any) -> None:
        p, rec = self._confirmed(raw)
        if p is None or rec is UNTRACKED:
            return
        jid = p.jid
        try:
            ev = events.make_success(jid)
        except ValidationError:
            return
        key = self.key(jid)
        if rec is ...:
            self.out.resolve(key, lambda value: ev if value else None)
        else:
            self.out.event(ev)
            self.out.command("DEL", key)

    def failed(self, raw: Any) -> None:
        p, rec = self._confirmed(raw)
        if p is None or rec is UNTRACKED:
            return
        jid, errtype, message = p.jid, cleanse(p.errtype), cleanse(p.message)
        try:
            events.check_jid(jid)
        except ValidationError:
            return
        key = self.key(jid)

        def make(retry: int, count: int) -> events.AnyEvent:
            return events.make_failure(failure_state(retry, count), jid, errtype, message)

        if rec is ...:
            self.out.resolve(key, lambda value: make(*parse_record(value)) if value else None)
        else:
            self.out.event(make(rec[0], rec[1]))
            self.out.command("DEL", key)


def parse_record(value: bytes) -> tuple[int, int]:
    try:
        retry, count = value.split()
        return int(retry), int(count)
    except ValueError:
        return DEFAULT_RETRY, 0
