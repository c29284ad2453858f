"""A tracker outage never breaks a job: jobs run, quickly; one warning per outage; every
event that could not be published is counted; publishing resumes by itself.

The jobs run in a real RQ ``SimpleWorker`` (in this process, so the counters can be
read) on the machine's Redis; the tracker's Redis is a port where nothing listens,
a socket that accepts and never answers, or a private ``redis-server`` that starts
late.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import threading
import time

import pytest
from helpers import missing
from integration_support import Run, need_module, need_redis, wait_for

import tracker
from tracker.integrations import base, context
from tracker.integrations.context import NotInJob
from tracker.projector import Projector

tracked_rq = need_module("tracker.integrations.rq")

DOWN = "cannot publish job events"
BACK = "publishing again"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def messages(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "tracker.integrations" and text in r.getMessage()]


def progress_job():
    assert tracker.current_jid() is not None
    tracker.progress(50, "half way")  # returns False while the tracker is down; no raise
    return "ran"


@pytest.fixture
def rq_queue():
    client = need_redis()
    run_token = f"tio{time.time_ns() % 10**9}"
    made: list[str] = []  # job ids: RQ's job and result keys carry the id, not the queue
    yield client, f"{run_token}-q", made
    marks = [run_token.encode(), *(i.encode() for i in made)]
    doomed = [k for k in client.scan_iter(count=1000) if any(m in k for m in marks)]
    if doomed:
        client.delete(*doomed)
    client.srem("rq:queues", f"rq:queue:{run_token}-q")


def run_jobs(client, qname: str, made: list, n: int, monkeypatch, tracker_url: str):
    """Enqueue ``n`` tracked jobs through TrackedQueue and work them off with a burst
    TrackedSimpleWorker, both finding the tracker through the environment."""
    monkeypatch.setenv("TRACKER_REDIS_URL", tracker_url)
    monkeypatch.setenv("TRACKER_PREFIX", f"{qname}-tracker")
    queue = tracked_rq.TrackedQueue(qname, connection=client)
    started = time.monotonic()
    jobs = [queue.enqueue(f"{__name__}.progress_job", meta={"track": 1}) for _ in range(n)]
    made.extend(j.id for j in jobs)
    worker = tracked_rq.TrackedSimpleWorker([queue], connection=client, name=f"{qname}-w")
    worker.work(burst=True)
    elapsed = time.monotonic() - started
    return jobs, worker, elapsed


def test_jobs_run_quickly_while_the_tracker_is_down(rq_queue, monkeypatch, caplog):
    client, qname, made = rq_queue
    caplog.set_level(logging.INFO, logger="tracker.integrations")
    jobs, worker, elapsed = run_jobs(client, qname, made, 20, monkeypatch,
                                     f"redis://127.0.0.1:{free_port()}/0")
    assert [j.get_status(refresh=True) for j in jobs] == ["finished"] * 20
    assert all(j.return_value() == "ran" for j in jobs)
    # connecting fails fast (connection refused); then the breaker skips for a while
    assert elapsed < 5, f"20 jobs took {elapsed:.2f}s with the tracker down"
    stats = worker.tracking.stats()
    # 20 x (enqueued, working, trackset, success), none published, all counted
    assert (stats["published"], stats["dropped"], stats["outages"]) == (0, 80, 1)
    assert len(messages(caplog, DOWN)) == 1, caplog.text


def test_a_tracker_that_never_answers_costs_a_bounded_wait(monkeypatch, caplog):
    """A socket that accepts and never replies (a hung or blackholed Redis)."""
    caplog.set_level(logging.INFO, logger="tracker.integrations")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        pub = base.SafePublisher(url=f"redis://127.0.0.1:{listener.getsockname()[1]}/0")
        started = time.monotonic()
        for i in range(100):
            assert pub.enqueued(f"hung-{i}", queue="q") is False  # what a producer waits for
            pub.working(f"hung-{i}")  # deferred: a worker never waits for it
        elapsed = time.monotonic() - started
        # one wait for the first connection (FIRST_WAIT, 2 s), then the breaker skips
        assert elapsed < base.FIRST_WAIT + 2, f"200 events took {elapsed:.2f}s"
        assert pub.flush()
        assert pub.stats()["dropped"] == 200 and pub.stats()["published"] == 0
        assert len(messages(caplog, DOWN)) == 1
    finally:
        listener.close()


def test_publishing_resumes_when_the_tracker_comes_back(monkeypatch, caplog):
    binary = shutil.which("redis-server")
    if not binary:
        missing("redis-server is not on PATH")
    caplog.set_level(logging.INFO, logger="tracker.integrations")
    monkeypatch.setattr(base, "PROBE_MIN", 0.2)
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    pub = base.SafePublisher(url=url)
    assert pub.enqueued("back-1", queue="q", jobtype="T") is False  # down: dropped
    pub.working("back-1")  # deferred; dropped by the sender (or at once, within the backoff)
    server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        wait_for("the private redis-server", lambda: _answers(port), timeout=10)
        ok = wait_for("publishing to resume",
                      lambda: pub.enqueued("back-2", queue="q", jobtype="T"), every=0.1)
        assert ok and pub.working("back-2") and pub.set("back-2", 30, "resumed")
        assert pub.flush()
        assert len(messages(caplog, DOWN)) == 1
        back = messages(caplog, BACK)
        assert len(back) == 1 and "events were dropped" in back[0], caplog.text
        stats = pub.stats()
        # back-2's three, and back-1's working if the sender got to it after the restart
        assert stats["published"] in (3, 4) and stats["dropped"] >= 1, stats
        assert stats["outages"] == 1
        t = pub.tracker()
        kw = t.deployment.client.connection_pool.connection_kwargs  # the short timeouts
        assert (kw["socket_connect_timeout"], kw["socket_timeout"]) == (base.CONNECT_TIMEOUT,
                                                                        base.SOCKET_TIMEOUT)
        Projector(t.deployment, consumer="itest").drain()
        got = t.get("back-2")
        assert (got["state"], got["percent"], got["desc"]) == ("working", 30, "resumed")
        assert t.get("back-1")["state"] == "unknown"  # its events were dropped
        t.close()
    finally:
        server.terminate()
        server.wait(10)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def test_an_event_the_tracker_refuses_is_counted_and_the_job_goes_on(rq_queue, monkeypatch,
                                                                      caplog):
    """RQ accepts job ids the tracker does not (longer than 128 characters): counted as
    invalid, logged once."""
    client, qname, made = rq_queue
    run = Run("v")
    caplog.set_level(logging.INFO, logger="tracker.integrations")
    jobs = []
    try:
        queue = tracked_rq.TrackedQueue(qname, connection=client, track=True,
                                        tracker=run.tracker)
        jobs = [queue.enqueue(f"{__name__}.progress_job", job_id=f"{qname}-{i}-" + "x" * 130)
                for i in range(3)]  # the ids carry the queue name, so the fixture deletes them
        worker = tracked_rq.TrackedSimpleWorker([queue], connection=client, name=f"{qname}-w",
                                                tracker=run.tracker)
        worker.work(burst=True)
        assert [j.get_status(refresh=True) for j in jobs] == ["finished"] * 3
        assert worker.tracking.stats()["invalid"] == 12  # enqueued, working, trackset, success
        refused = [m for m in messages(caplog, "not published") if "jid" in m]
        assert len(refused) == 1, caplog.text
    finally:
        run.cleanup()


def test_progress_outside_a_job_and_bad_input():
    with pytest.raises(NotInJob, match="no job is running"):
        tracker.progress(10)
    assert tracker.current_jid() is None
    assert issubclass(NotInJob, tracker.TrackerError)
    pub = base.SafePublisher(url=f"redis://127.0.0.1:{free_port()}/0")  # down
    token = context.enter("job-1", True, pub)
    try:
        assert tracker.current_jid() == "job-1"
        with pytest.raises(tracker.ValidationError, match="percent"):
            tracker.progress(150)  # the caller's bug is reported even while the tracker is down
        with pytest.raises(tracker.ValidationError, match="desc"):
            tracker.progress(desc="x" * 2000)
    finally:
        context.leave(token)
    token = context.enter("job-2", False, pub)  # an untracked job: progress does nothing
    try:
        assert tracker.progress(10, "ok") is False
        assert pub.stats()["dropped"] == 0
        seen = []
        threading.Thread(target=lambda: seen.append(tracker.current_jid())).start()
        wait_for("the thread", lambda: seen)
        assert seen == [None]  # a thread the job starts is outside the job
    finally:
        context.leave(token)
    assert tracker.current_jid() is None
