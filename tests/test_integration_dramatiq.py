"""Dramatiq messages feed the tracker: a real ``dramatiq`` worker process on Redis, with the
``Tracking`` middleware beside Dramatiq's default ones (``Retries`` decides failed vs dead).

The actors live in a module written to a temporary directory; this process imports
it too and sends (its ``after_enqueue`` hook publishes ``enqueued``). One worker
process with one thread serves the module, so a second message stays ``enqueued``
while the first blocks on its gate. Retries back off 0.1-0.2 s.
"""

from __future__ import annotations

import importlib
import sys

import pytest
from integration_support import (
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

dramatiq = need_module("dramatiq")

APP = JOB_HELPERS + '''
import dramatiq
from dramatiq.brokers.redis import RedisBroker

from tracker.integrations.dramatiq import Tracking

broker = RedisBroker(url=os.environ["ITEST_BROKER_REDIS"], namespace=TOKEN + "-dq")
TRACKING = Tracking()
broker.add_middleware(TRACKING)
dramatiq.set_broker(broker)
QUEUE = os.environ["ITEST_QUEUE"]
RETRY = dict(max_retries=1, min_backoff=100, max_backoff=200)


@dramatiq.actor(track=True, queue_name=QUEUE, max_retries=0)
def progress_job():
    tracker.progress(40, "half")
    gate()
    mark_done()


@dramatiq.actor(track=True, queue_name=QUEUE, **RETRY)
def flaky():
    if attempt() == 1:
        tracker.progress(10, "try 1")
        raise ValueError("first attempt")
    gate()
    mark_done()


@dramatiq.actor(track=True, queue_name=QUEUE, **RETRY)
def doomed():
    attempt()
    raise RuntimeError("always fails")


@dramatiq.actor(queue_name=QUEUE, max_retries=0)
def plain():
    mark_done()
'''

@pytest.fixture(scope="module")
def dramatiq_world(tmp_path_factory):
    need_redis()
    run = Run("d")
    directory = tmp_path_factory.mktemp("dramatiq")
    modname = f"itest_dramatiq_{run.token}"
    write_module(directory, modname, APP)
    env = run.env(ITEST_QUEUE=f"{run.token}-q", PYTHONPATH=directory)
    mp = pytest.MonkeyPatch()
    for k in ("TRACKER_REDIS_URL", "TRACKER_PREFIX", "ITEST_TOKEN", "ITEST_BROKER_REDIS",
              "ITEST_QUEUE"):
        mp.setenv(k, env[k])
    sys.path.insert(0, str(directory))
    mod = importlib.import_module(modname)
    worker = WorkerProcess([bin_path("dramatiq"), modname, "--processes", "1", "--threads", "1",
                            "--path", str(directory)], env, directory, "worker")
    try:
        ping = mod.plain.send()
        run.jids.append(ping.message_id)
        wait_for("the worker to run a first message", lambda: run.done(ping.message_id),
                 worker=worker)
        yield run, mod, worker
        assert not worker.tracker_warnings(), worker.tracker_warnings()
    finally:
        worker.stop()
        sys.path.remove(str(directory))
        sys.modules.pop(modname, None)
        mp.undo()
        run.cleanup()


def send(run, actor, **options):
    message = actor.send_with_options(**options)
    run.jids.append(message.message_id)
    return message.message_id


def test_progress_then_success(dramatiq_world):
    run, mod, worker = dramatiq_world
    a = send(run, mod.progress_job)
    t = run.wait_state(a, "working", worker, percent=40)
    assert set(t) == {"jid", "percent", "desc", "state", "updated_at"}
    assert (t["jid"], t["desc"]) == (a, "half") and RFC3339.fullmatch(t["updated_at"])
    b = send(run, mod.plain, track=True)  # per-message opt-in; waits behind a
    tb = run.get(b)
    assert tb["state"] == "enqueued" and set(tb) == {"jid", "state", "updated_at"}
    run.release(a)
    done = run.wait_state(a, "success", worker)
    assert (done["percent"], done["desc"]) == (40, "half")
    run.wait_state(b, "success", worker)
    hist = run.history(a)
    assert [e for e, _ in hist] == ["enqueued", "working", "trackset", "success"]
    assert hist[0][1] == {"track": True, "queue": f"{run.token}-q", "jobtype": "progress_job",
                          "reserve_for": 600}  # TimeLimit's default, 10 minutes
    assert run.events(b) == ["enqueued", "working", "success"]


def test_fails_once_then_succeeds_on_retry(dramatiq_world):
    run, mod, worker = dramatiq_world
    c = send(run, mod.flaky)
    wait_for("the second attempt", lambda: run.attempts(c) == 2, worker=worker)
    t = run.wait_state(c, "working", worker, percent=10)  # the retry, blocked on its gate
    assert t["desc"] == "try 1"
    assert run.events(c) == ["enqueued", "working", "trackset", "failed", "enqueued", "working"]
    run.release(c)
    run.wait_state(c, "success", worker)
    hist = run.history(c)
    assert hist[3] == ("failed", {"errtype": "ValueError", "message": "first attempt"})
    assert run.events(c)[-1] == "success"


def test_retries_exhausted_is_dead(dramatiq_world):
    run, mod, worker = dramatiq_world
    d = send(run, mod.doomed)
    run.wait_state(d, "dead", worker)
    hist = run.history(d)
    assert [e for e, _ in hist] == ["enqueued", "working", "failed", "enqueued", "working",
                                    "dead"]
    assert hist[2][1] == hist[5][1] == {"errtype": "RuntimeError", "message": "always fails"}
    # ... and Dramatiq moved it to the dead-letter queue (the only message that goes there)
    xq = f"{run.token}-dq:{run.token}-q.XQ"
    wait_for("the message in the DLQ", lambda: run.broker.zcard(xq) == 1, worker=worker)


def test_untracked_is_unknown(dramatiq_world):
    run, mod, worker = dramatiq_world
    e = send(run, mod.plain)
    wait_for("the untracked message to run", lambda: run.done(e), worker=worker)
    assert run.get(e) == {"jid": e, "state": "unknown", "updated_at": ""}
    assert run.history(e) == []
