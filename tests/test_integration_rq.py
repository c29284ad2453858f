"""RQ jobs feed the tracker: a real ``rq worker -w tracker.integrations.rq.TrackedWorker``
(forking a work horse per job, ``--with-scheduler`` for interval retries) on Redis.

The producer is this process, enqueueing through ``TrackedQueue`` with an explicit
``tracker=``; the worker finds the tracker through ``TRACKER_REDIS_URL``/``TRACKER_PREFIX``.
One worker serves the module, so a second job stays ``enqueued`` while the first
blocks on its gate.
"""

from __future__ import annotations

import pytest
from integration_support import (
    BROKER_REDIS,
    JOB_HELPERS,
    RFC3339,
    Run,
    WorkerProcess,
    bin_path,
    need_module,
    need_redis,
    wait_for,
    write_module,
)

rq = need_module("rq")
rq_command = need_module("rq.command")
rq_job = need_module("rq.job")
tracked_rq = need_module("tracker.integrations.rq")

APP = JOB_HELPERS + '''
from rq import Retry


def progress_job():
    tracker.progress(40, "half")
    gate()
    mark_done()


def flaky():
    if attempt() == 1:
        tracker.progress(10, "try 1")
        raise ValueError("first attempt")
    gate()
    mark_done()


def doomed():
    attempt()
    raise RuntimeError("always fails")


def asks_for_retry():
    if attempt() == 1:
        return Retry(max=1)
    mark_done()


def plain():
    mark_done()
'''

@pytest.fixture(scope="module")
def rq_world(tmp_path_factory):
    need_redis()
    run = Run("r")
    directory = tmp_path_factory.mktemp("rq")
    mod = f"itest_rq_{run.token}"
    write_module(directory, mod, APP)
    qname = f"{run.token}-q"
    env = run.env(PYTHONPATH=directory)
    worker = WorkerProcess(
        [bin_path("rq"), "worker", "-w", "tracker.integrations.rq.TrackedWorker",
         "--with-scheduler", "-u", BROKER_REDIS, "-n", f"{run.token}-w", qname],
        env, directory, "worker")
    queue = tracked_rq.TrackedQueue(qname, connection=run.broker, tracker=run.tracker)
    track_all = tracked_rq.TrackedQueue(qname, connection=run.broker, track=True,
                                        tracker=run.tracker)
    try:
        ping = rq.Queue(qname, connection=run.broker).enqueue(f"{mod}.plain")
        run.jids.append(ping.id)
        wait_for("the worker to run a first job", lambda: run.done(ping.id), worker=worker)
        yield run, mod, queue, track_all, worker
        assert not worker.tracker_warnings(), worker.tracker_warnings()
    finally:
        worker.stop()
        run.broker.srem("rq:queues", f"rq:queue:{qname}")
        run.cleanup()


def enqueue(run, queue, func, **kw):
    job = queue.enqueue(func, **kw)
    run.jids.append(job.id)
    return job.id


def test_progress_then_success(rq_world):
    run, mod, queue, track_all, worker = rq_world
    a = enqueue(run, queue, f"{mod}.progress_job", meta={"track": 1})
    t = run.wait_state(a, "working", worker, percent=40)
    assert set(t) == {"jid", "percent", "desc", "state", "updated_at"}
    assert (t["jid"], t["desc"]) == (a, "half") and RFC3339.fullmatch(t["updated_at"])
    b = enqueue(run, track_all, f"{mod}.plain")  # TrackedQueue(track=True): every job
    tb = run.get(b)
    assert tb["state"] == "enqueued" and set(tb) == {"jid", "state", "updated_at"}
    run.release(a)
    done = run.wait_state(a, "success", worker)
    assert (done["percent"], done["desc"]) == (40, "half")
    run.wait_state(b, "success", worker)
    hist = run.history(a)
    assert [e for e, _ in hist] == ["enqueued", "working", "trackset", "success"]
    assert hist[0][1] == {"track": True, "queue": f"{run.token}-q",
                          "jobtype": f"{mod}.progress_job", "reserve_for": 180}
    assert hist[1][1] == {"reserve_for": 180}  # RQ's default job timeout
    assert run.events(b) == ["enqueued", "working", "success"]


def test_fails_once_then_succeeds_on_retry(rq_world):
    run, mod, queue, _, worker = rq_world
    c = enqueue(run, queue, f"{mod}.flaky", meta={"track": 1}, retry=rq.Retry(max=1))
    wait_for("the second attempt", lambda: run.attempts(c) == 2, worker=worker)
    t = run.wait_state(c, "working", worker, percent=10)  # the retry, blocked on its gate
    assert t["desc"] == "try 1"
    assert run.events(c) == ["enqueued", "working", "trackset", "failed", "enqueued", "working"]
    run.release(c)
    run.wait_state(c, "success", worker)
    hist = run.history(c)
    assert hist[3] == ("failed", {"errtype": "ValueError", "message": "first attempt"})
    assert run.events(c)[-1] == "success"


def test_interval_retry_waits_as_failed_until_the_scheduler_requeues_it(rq_world):
    run, mod, queue, _, worker = rq_world
    c = enqueue(run, queue, f"{mod}.flaky", meta={"track": 1}, retry=rq.Retry(max=1, interval=2))

    def status():
        return rq_job.Job.fetch(c, connection=run.broker).get_status(refresh=True)
    wait_for("RQ to schedule the retry", lambda: status() == "scheduled", worker=worker)
    seen = run.get(c)
    if status() == "scheduled":  # still in the scheduled registry after we read the track
        assert seen["state"] == "failed" and seen["percent"] == 10
    run.wait_state(c, "working", worker, percent=10)
    run.release(c)
    run.wait_state(c, "success", worker)
    assert run.events(c) == ["enqueued", "working", "trackset", "failed", "enqueued",
                             "working", "success"]


def test_retries_exhausted_is_dead(rq_world):
    run, mod, queue, _, worker = rq_world
    d = enqueue(run, queue, f"{mod}.doomed", meta={"track": 1}, retry=rq.Retry(max=1))
    run.wait_state(d, "dead", worker)
    hist = run.history(d)
    assert [e for e, _ in hist] == ["enqueued", "working", "failed", "enqueued", "working",
                                    "dead"]
    assert hist[2][1] == hist[5][1] == {"errtype": "RuntimeError", "message": "always fails"}


def test_returned_retry_is_failed_then_success(rq_world):
    run, mod, queue, _, worker = rq_world
    r = enqueue(run, queue, f"{mod}.asks_for_retry", meta={"track": 1})
    run.wait_state(r, "success", worker)
    hist = run.history(r)
    assert [e for e, _ in hist] == ["enqueued", "working", "failed", "enqueued", "working",
                                    "success"]
    assert hist[2][1]["errtype"] == "Retry"


def test_untracked_is_unknown(rq_world):
    run, mod, queue, _, worker = rq_world
    e = enqueue(run, queue, f"{mod}.plain")  # a TrackedQueue, but no meta: not tracked
    wait_for("the untracked job to run", lambda: run.done(e), worker=worker)
    assert run.get(e) == {"jid": e, "state": "unknown", "updated_at": ""}
    assert run.history(e) == []


def test_stopped_job_is_dead(rq_world):
    run, mod, queue, _, worker = rq_world
    s = enqueue(run, queue, f"{mod}.progress_job", meta={"track": 1})
    run.wait_state(s, "working", worker, percent=40)
    rq_command.send_stop_job_command(run.broker, s)
    run.wait_state(s, "dead", worker)
    assert run.history(s)[-1][1]["errtype"] == "JobStopped"
