"""Reads answer the fold of the log: a read that follows a write sees it, with or
without a projector running (tracker.freshness), on every interface."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest
from helpers import Raw, Running, acl_users, open_deployment, wipe

from tracker.aio import AsyncTracker
from tracker.errors import TrackerError
from tracker.projector import Projector
from tracker.query import Tracker
from tracker.store import keys
from tracker.store.deployment import Deployment
from tracker.store.settings import Settings

TRACKER = [sys.executable, "-c", "import sys; sys.argv[0] = 'tracker'; "
           "from tracker.cli import main; main()"]


def test_a_read_folds_what_was_published_before_it(tracker):
    """No projector runs: the read itself folds the log up to its tip."""
    pub = tracker.publisher
    pub.enqueued("rw-1", custom={"track": 1}, queue="q")
    assert tracker.get("rw-1")["state"] == "enqueued"
    pub.working("rw-1")
    tracker.set("rw-1", percent=12, desc="Calculating...")
    got = tracker.get("rw-1")
    assert (got["state"], got["percent"], got["desc"]) == ("working", 12, "Calculating...")
    pub.success("rw-1")
    assert [a["state"] for a in tracker.get_many(["rw-1", "rw-none"])] == ["success", "unknown"]


def test_a_long_backlog_is_folded_in_steps_and_applied_once(tracker):
    d = tracker.deployment
    with tracker.publisher.batch() as b:
        for i in range(5000):
            b.enqueued(f"bl-{i}", custom={"track": 1})
            b.set(f"bl-{i}", percent=i % 101)
    assert tracker.get("bl-4999")["percent"] == 4999 % 101
    part = d.partition("bl-4999")  # a read folds its own partition only
    applied = [int(d.client.hget(keys.stats(d.prefix, p), "applied") or 0)
               for p in range(d.partitions)]
    assert applied[part] == d.client.xlen(keys.stream(d.prefix, part)) > 2000
    assert sum(applied) == applied[part]
    tracker.get_many([f"bl-{i}" for i in range(5000)])
    assert sum(int(d.client.hget(keys.stats(d.prefix, p), "applied") or 0)
               for p in range(d.partitions)) == 10_000  # each entry once, in several steps
    assert tracker.get_many([f"bl-{i}" for i in range(0, 5000, 250)]) == [
        {"jid": f"bl-{i}", "percent": i % 101, "state": "enqueued",
         "updated_at": tracker.get(f"bl-{i}")["updated_at"]} for i in range(0, 5000, 250)]


def test_readers_and_a_running_projector_fold_each_entry_once(real_deployment):
    d = real_deployment
    t, proj = Tracker(d), Projector(d, consumer="daemon", block_ms=50)
    runner = threading.Thread(target=proj.run, kwargs={"report_every": 3600}, daemon=True)
    runner.start()
    try:
        for i in range(300):
            t.publisher.enqueued(f"race-{i}", custom={"track": 1})
            t.set(f"race-{i}", percent=i % 100)
            assert t.get(f"race-{i}")["percent"] == i % 100
    finally:
        proj.stop()
        runner.join(10)
    applied = sum(int(d.client.hget(keys.stats(d.prefix, p), "applied") or 0)
                  for p in range(d.partitions))
    assert applied == 600
    assert all(d.client.xpending(keys.stream(d.prefix, p), keys.GROUP)["pending"] == 0
               for p in range(d.partitions))


def test_history_and_at_fold_first(tracker):
    tracker.publisher.enqueued("h-1", custom={"track": 1})
    tracker.set("h-1", percent=5)
    assert [e.fields["t"] for e in tracker.history("h-1").entries] == ["enqueued", "trackset"]
    assert tracker.get_at("h-1", "now")["percent"] == 5


def test_stale_reads_skip_the_check(backend):
    d = backend(partitions=2, read="stale")
    t = Tracker(d)
    t.publisher.enqueued("st-1", custom={"track": 1})
    assert t.get("st-1")["state"] == "unknown"  # nothing folded it
    Projector(d, consumer="p").drain()
    assert t.get("st-1")["state"] == "enqueued"


def test_wait_mode_waits_for_the_projector_and_says_when_it_does_not_come(backend):
    d = backend(partitions=2, read="wait", read_timeout=0.3)
    t = Tracker(d)
    t.publisher.enqueued("w-1", custom={"track": 1})
    t0 = time.monotonic()
    with pytest.raises(TrackerError, match=r"has not reached entry .* is `tracker project` "
                                           r"running\?"):
        t.get("w-1")
    assert 0.3 <= time.monotonic() - t0 < 3
    assert not d.client.exists(keys.meta(d.prefix, d.partition("w-1")))  # it wrote nothing
    t.fresh.timeout = 5.0
    folding = threading.Timer(0.2, lambda: Projector(d, consumer="late").drain())
    folding.start()
    assert t.get("w-1")["state"] == "enqueued"
    folding.join()


def test_async_tracker_reads_its_own_writes(real_deployment):
    d = real_deployment

    async def main():
        t = await AsyncTracker.open(d.settings)
        try:
            d_pub = Tracker(d).publisher
            d_pub.enqueued("as-1", custom={"track": 1})
            await t.set_json(json.dumps({"jid": "as-1", "percent": 40, "desc": "half"}))
            return await t.get_many(["as-1", "as-2"])
        finally:
            await t.close()

    first, second = asyncio.run(main())
    assert (first["state"], first["percent"], first["desc"]) == ("enqueued", 40, "half")
    assert second["state"] == "unknown"


def test_track_set_then_get_on_one_connection(real_deployment):
    """The Go client's TrackSet + TrackGet on one connection, as raw protocol."""
    Tracker(real_deployment).publisher.enqueued("fwp-1", custom={"track": 1})
    Tracker(real_deployment).publisher.working("fwp-1")
    server = Running(real_deployment)
    c = Raw(server.port)
    try:
        assert c.hello() == b"+OK"
        c.send(b'TRACK SET {"jid":"fwp-1","percent":12,"desc":"Calculating...",'
               b'"reserve_until":null}\r\nTRACK GET fwp-1\r\n')
        assert c.reply() == b"+OK"
        got = json.loads(c.reply())
        assert (got["percent"], got["desc"], got["state"]) == (12, "Calculating...", "working")
    finally:
        c.close()
        server.stop()


@pytest.fixture
def cli_env(real_redis_url):
    prefix = "tcons" + uuid.uuid4().hex[:10]
    e = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    e.update(TRACKER_REDIS_URL=real_redis_url, TRACKER_PREFIX=prefix)
    yield e
    d = Deployment.open(Settings(redis_url=real_redis_url, prefix=prefix))
    wipe(d)
    d.close()


def test_emit_then_get_without_a_daemon(cli_env):
    def run(*args):
        r = subprocess.run(TRACKER + list(args), env=cli_env, capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout

    run("emit", "enqueued", "cli-1", "--track", "--queue", "default")
    assert json.loads(run("get", "cli-1"))["state"] == "enqueued"
    run("set", "cli-1", "--percent", "30")
    run("emit", "working", "cli-1")
    got = json.loads(run("get", "cli-1"))
    assert (got["state"], got["percent"]) == ("working", 30)
    assert "trackset" in run("history", "cli-1")


def test_a_reader_without_write_rights_waits_instead_of_folding(real_redis_url, prefix):
    """The least-privilege reader cannot fold: it falls back to waiting, writes nothing."""
    d = open_deployment("real", real_redis_url, prefix, partitions=1)
    rules = ["+hello", "+info", "+hget", "+hmget", "+evalsha", "+script|load", "+time",
             "+xrevrange", "+get", "+xrange", f"~{{{prefix}:*}}:log", f"~{{{prefix}:*}}:meta",
             f"~{{{prefix}:*}}:fence",
             # (~, not Redis 7's %R~, so the 6.2 run has it too: no write command is granted)
             f"~{{{prefix}:*}}:b*", f"~{{{prefix}:*}}:v*", f"~{prefix}:config"]
    try:
        with acl_users(real_redis_url, prefix) as user:  # (also on the embedded socket)
            ro = Deployment.open(Settings(redis_url=user("ro", rules), prefix=prefix,
                                          read_timeout=0.3))
            t = Tracker(ro)
            Tracker(d).publisher.enqueued("ro-1", custom={"track": 1})
            with pytest.raises(TrackerError, match="is `tracker project` running"):
                t.get("ro-1")
            assert t.fresh.mode == "wait"
            Projector(d, consumer="admin").drain()
            assert t.get("ro-1")["state"] == "enqueued"
            ro.close()
    finally:
        wipe(d)
        d.close()
