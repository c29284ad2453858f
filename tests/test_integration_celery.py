"""Celery tasks feed the tracker: a real ``celery worker`` (prefork) on RabbitMQ and on Redis.

Each broker gets one worker process for the module (concurrency 1, so a second job
stays ``enqueued`` while the first blocks on its gate). The tasks live in a module
written to a temporary directory, imported by the worker and by this process (the
producer side, whose ``before_task_publish`` publishes ``enqueued``).
"""

from __future__ import annotations

import importlib
import sys
import uuid

import pytest
from integration_support import (
    AMQP_URL,
    BROKER_REDIS,
    JOB_HELPERS,
    RFC3339,
    Run,
    WorkerProcess,
    bin_path,
    need_amqp,
    need_module,
    need_redis,
    wait_for,
    write_module,
)

celery = need_module("celery")
kombu = need_module("kombu")

APP = JOB_HELPERS + '''
from celery import Celery
from tracker.integrations.celery import install

app = Celery("itest", broker=os.environ["ITEST_CELERY_BROKER"])
app.conf.update(task_default_queue=os.environ["ITEST_QUEUE"], worker_prefetch_multiplier=1,
                broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)
if app.conf.broker_url.startswith("redis"):
    app.conf.broker_transport_options = {"global_keyprefix": TOKEN + ":"}
TRACKING = install(app)


@app.task(bind=True, track=True)
def progress_job(self):
    tracker.progress(40, "half")
    gate()
    mark_done()


@app.task(bind=True, track=True, max_retries=1)
def flaky(self):
    if attempt() == 1:
        tracker.progress(10, "try 1")
        try:
            raise ValueError("first attempt")
        except ValueError as e:
            raise self.retry(exc=e, countdown=0)
    gate()
    mark_done()


@app.task(bind=True, track=True, autoretry_for=(RuntimeError,), max_retries=1,
          default_retry_delay=0, retry_backoff=False, retry_jitter=False)
def doomed(self):
    attempt()
    raise RuntimeError("always fails")


@app.task
def plain():
    mark_done()
'''

@pytest.fixture(scope="module", params=["amqp", "redis"])
def celery_world(request, tmp_path_factory):
    if request.param == "amqp":
        need_amqp(kombu)
        need_redis()  # the jobs' gates and the tracker
        broker = AMQP_URL
    else:
        need_redis()
        broker = BROKER_REDIS
    run = Run(f"c{request.param[0]}")
    queue = f"{run.token}-q"
    directory = tmp_path_factory.mktemp(f"celery-{request.param}")
    modname = f"itest_celery_{run.token}"
    write_module(directory, modname, APP)
    env = run.env(ITEST_CELERY_BROKER=broker, ITEST_QUEUE=queue, PYTHONPATH=directory)
    mp = pytest.MonkeyPatch()
    for k in ("TRACKER_REDIS_URL", "TRACKER_PREFIX", "ITEST_TOKEN", "ITEST_BROKER_REDIS",
              "ITEST_CELERY_BROKER", "ITEST_QUEUE"):
        mp.setenv(k, env[k])
    sys.path.insert(0, str(directory))
    mod = importlib.import_module(modname)
    worker = WorkerProcess(
        [bin_path("celery"), "-A", modname, "worker", "-P", "prefork", "-c", "1", "-Q", queue,
         "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "info",
         "-n", f"{run.token}@%h"], env, directory, "worker")
    try:
        ping = mod.plain.delay()
        run.jids.append(ping.id)
        wait_for("the worker to run a first task", lambda: run.done(ping.id), worker=worker)
        yield run, mod, worker
        assert not worker.tracker_warnings(), worker.tracker_warnings()
    finally:
        worker.stop()
        if request.param == "amqp":
            with mod.app.connection_for_write() as conn:
                ch = conn.default_channel
                ch.queue_delete(queue)
                ch.exchange_delete(queue)
        mod.TRACKING.disconnect()
        sys.path.remove(str(directory))
        sys.modules.pop(modname, None)
        mp.undo()
        run.cleanup()


def send(run, task, **options):
    result = task.apply_async(**options)
    run.jids.append(result.id)
    return result.id


def test_progress_then_success(celery_world):
    run, mod, worker = celery_world
    a = send(run, mod.progress_job)
    t = run.wait_state(a, "working", worker, percent=40)
    assert set(t) == {"jid", "percent", "desc", "state", "updated_at"}
    assert (t["jid"], t["desc"]) == (a, "half") and RFC3339.fullmatch(t["updated_at"])
    b = send(run, mod.plain, headers={"track": 1})  # per-call opt-in; waits behind a
    tb = run.get(b)
    assert tb["state"] == "enqueued" and set(tb) == {"jid", "state", "updated_at"}
    run.release(a)
    done = run.wait_state(a, "success", worker)
    assert (done["percent"], done["desc"]) == (40, "half")  # kept after the job finished
    run.wait_state(b, "success", worker)
    hist = run.history(a)
    assert [e for e, _ in hist] == ["enqueued", "working", "trackset", "success"]
    assert hist[0][1] == {"track": True, "queue": f"{run.token}-q",
                          "jobtype": mod.progress_job.name}
    assert hist[2][1] == {"percent": 40, "desc": "half"}
    assert run.events(b) == ["enqueued", "working", "success"]


def test_fails_once_then_succeeds_on_retry(celery_world):
    run, mod, worker = celery_world
    c = send(run, mod.flaky)
    wait_for("the second attempt", lambda: run.attempts(c) == 2, worker=worker)
    t = run.wait_state(c, "working", worker, percent=10)  # the retry runs, blocked on its gate
    assert t["desc"] == "try 1"  # the first attempt's progress stays
    assert run.events(c) == ["enqueued", "working", "trackset", "failed", "enqueued", "working"]
    run.release(c)
    run.wait_state(c, "success", worker)
    hist = run.history(c)
    assert [e for e, _ in hist] == ["enqueued", "working", "trackset", "failed", "enqueued",
                                    "working", "success"]
    assert hist[3][1] == {"errtype": "ValueError", "message": "first attempt"}
    assert hist[4][1]["track"] is True


def test_retries_exhausted_is_dead(celery_world):
    run, mod, worker = celery_world
    d = send(run, mod.doomed)
    run.wait_state(d, "dead", worker)
    hist = run.history(d)
    assert [e for e, _ in hist] == ["enqueued", "working", "failed", "enqueued", "working",
                                    "dead"]
    assert hist[2][1] == hist[5][1] == {"errtype": "RuntimeError", "message": "always fails"}


def test_untracked_is_unknown(celery_world):
    run, mod, worker = celery_world
    e = send(run, mod.plain)
    wait_for("the untracked task to run", lambda: run.done(e), worker=worker)
    assert run.get(e) == {"jid": e, "state": "unknown", "updated_at": ""}
    assert run.history(e) == []  # nothing was published for it


def test_revoked_is_dead(celery_world):
    run, mod, worker = celery_world
    # Revoked while running (terminate): the pool process is killed, no retry follows.
    f = send(run, mod.progress_job)
    run.wait_state(f, "working", worker, percent=40)
    mod.app.control.revoke(f, terminate=True)
    run.wait_state(f, "dead", worker)
    assert run.history(f)[-1] == ("dead", {"errtype": "TaskRevokedError",
                                           "message": "terminated"})
    # Revoked before it ran: the worker discards it on receipt.
    g = str(uuid.uuid4())
    replies = mod.app.control.revoke(g, reply=True, timeout=10, limit=1)
    assert replies, "the worker did not acknowledge the revoke"
    send(run, mod.progress_job, task_id=g)
    run.wait_state(g, "dead", worker)
    assert run.events(g) == ["enqueued", "dead"]
    assert run.history(g)[-1][1] == {"errtype": "TaskRevokedError", "message": "revoked"}
