"""Crash test: ``tracker project`` daemons killed with SIGKILL again and again.

Two daemons (subprocesses, real Redis or the Redis Cluster, a unique prefix) fold
while a publisher appends a few thousand events; every few hundred milliseconds one
of them is killed -9 and restarted. At the end a ``tracker project --once`` finishes the
job and the snapshots must equal the Python fold of the log, every valid entry
applied exactly once (the stats counters), and nothing left pending.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
from helpers import expected_snapshots, job_key, read_log, read_snapshots, wipe

from tracker import events
from tracker.projector import Projector
from tracker.publisher import Publisher
from tracker.store import keys
from tracker.store.deployment import Deployment
from tracker.store.settings import Settings

TRACKER = [sys.executable, "-c", "import sys; sys.argv[0] = 'tracker'; "
           "from tracker.cli import main; main()"]
PARTITIONS = 4


@pytest.fixture(params=["real", "cluster"])
def crash_env(request):
    if request.param == "cluster":
        url = request.getfixturevalue("local_cluster").seeds_url
    else:
        url = request.getfixturevalue("real_redis_url")
    prefix = "tcrash" + uuid.uuid4().hex[:10]
    d = Deployment.open(Settings(redis_url=url, prefix=prefix, partitions=PARTITIONS))
    env = {**os.environ, "TRACKER_REDIS_URL": url, "TRACKER_PREFIX": prefix,
           "TRACKER_PARTITIONS": str(PARTITIONS)}
    yield d, env
    wipe(d)
    d.close()


def start(env, consumer, batch=20, claim_idle="0"):
    """A ``tracker project`` daemon; ``proc.ready`` is set once it says it is projecting
    (its signal handlers are in place by then), whatever the machine's load."""
    proc = subprocess.Popen(TRACKER + ["project", "--consumer", consumer, "--batch", str(batch),
                                       "--claim-idle", claim_idle],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    proc.ready = threading.Event()
    proc.err = []

    def read():
        for line in proc.stderr:
            proc.err.append(line)
            if b"projecting" in line:
                proc.ready.set()

    proc.reader = threading.Thread(target=read, daemon=True)
    proc.reader.start()
    return proc


def stderr_of(proc) -> bytes:
    """Everything the (exited) daemon wrote on stderr."""
    proc.reader.join(10)
    return b"".join(proc.err)


def applied(d) -> int:
    return sum(int(d.client.hget(keys.stats(d.prefix, p), "applied") or 0)
               for p in range(d.partitions))


def publish(d, n_events: int, stop: threading.Event, rng: random.Random,
            count: list[int] | None = None) -> None:
    pub = Publisher(d)
    jids = [f"job-{i}" for i in range(150)]
    sent = 0
    while sent < n_events and not stop.is_set():
        chunk = []
        for _ in range(25):
            j = rng.choice(jids)
            kind = rng.random()
            if kind < 0.25:
                chunk.append(events.Enqueued(jid=j, track=rng.random() < 0.8))
            elif kind < 0.4:
                chunk.append(events.Working(jid=j, reserve_for=rng.choice([None, 60, 7200])))
            elif kind < 0.8:
                chunk.append(events.TrackSet(
                    jid=j, percent=rng.choice([None, rng.randint(0, 100)]),
                    desc=rng.choice([None, f"step {rng.randint(0, 99)}"]),
                    reserve_until=rng.choice([None, int(time.time() * 1000) + 3_600_000])))
            else:
                chunk.append(rng.choice([events.Success, events.Failed, events.Dead])(jid=j))
        chunk += chunk[: rng.randint(0, 3)]  # a job server retrying a send: duplicates
        pub.publish_many(chunk)
        if rng.random() < 0.1:  # the odd poison entry
            d.client.xadd(keys.stream(d.prefix, rng.randrange(d.partitions)),
                          {"t": "working", "j": "job-1", "r": "-1"})
        sent += len(chunk)
        if count is not None:
            count[0] = sent
        time.sleep(0.06)  # ~8 s of traffic


@pytest.mark.slow
def test_kill_9_again_and_again(crash_env):
    d, env = crash_env
    rng = random.Random(20240601)
    stop = threading.Event()
    # The publisher goes on until the twelfth kill (and 3,000 events, however fast the
    # daemons start), so every kill meets work in flight.
    sent = [0]
    publisher = threading.Thread(target=publish, args=(d, 20_000, stop, rng, sent))
    procs = [start(env, "crash-a"), start(env, "crash-b")]
    born = [time.monotonic()] * 2
    life = [rng.uniform(0.5, 1.2) for _ in procs]
    kills, progress = 0, []
    publisher.start()
    try:
        deadline = time.monotonic() + 45
        while (kills < 12 or sent[0] < 3000) and time.monotonic() < deadline:
            time.sleep(0.02)
            for i in range(2):
                if not procs[i].ready.is_set():
                    born[i] = time.monotonic()  # its life starts once it is projecting
                    continue
                if time.monotonic() - born[i] < life[i]:
                    continue  # let it fold for a while
                procs[i].send_signal(signal.SIGKILL)
                procs[i].wait(5)
                kills += 1
                progress.append(applied(d))
                # a restarted daemon may reuse the dead one's consumer name, or take a new one
                name = f"crash-{'ab'[i]}" if rng.random() < 0.5 else f"crash-{kills}"
                procs[i] = start(env, name, batch=rng.choice([1, 7, 20, 100]))
                born[i], life[i] = time.monotonic(), rng.uniform(0.5, 1.2)
    finally:
        stop.set()
        publisher.join(30)
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait(5)
    assert kills >= 12
    assert len(set(progress)) > 6, "daemons were killed while folding"

    once = subprocess.run(TRACKER + ["project", "--once"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert once.returncode == 0, once.stderr
    assert "Traceback" not in once.stderr

    entries, poisoned = read_log(d)
    assert len(entries) + len(poisoned) >= 3000
    assert read_snapshots(d) == expected_snapshots(d)
    for p in range(PARTITIONS):
        stream = keys.stream(d.prefix, p)
        assert d.client.xpending(stream, keys.GROUP)["pending"] == 0
    # exactly once: every valid entry applied once, every poison one dead-lettered once
    assert applied(d) == len(entries)
    assert sum(d.client.xlen(keys.dlq(d.prefix, p)) for p in range(PARTITIONS)) == len(poisoned)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_batch_and_exits_0(crash_env, sig):
    d, env = crash_env
    pub = Publisher(d)
    proc = start(env, "graceful", batch=5)
    try:
        for i in range(40):
            pub.enqueued(f"g{i}", custom={"track": 1})
        deadline = time.monotonic() + 15
        while applied(d) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert applied(d) == 40
        for i in range(200):  # keep it busy while the signal arrives
            pub.working(f"g{i % 40}")
        proc.send_signal(sig)
        proc.wait(timeout=20)
        err = stderr_of(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert b"Traceback" not in err
    # what it acknowledged it applied; the rest is still there for the next run
    stream_total = sum(d.client.xlen(keys.stream(d.prefix, p)) for p in range(PARTITIONS))
    assert 40 <= applied(d) <= stream_total
    once = subprocess.run(TRACKER + ["project", "--once"], env=env, capture_output=True,
                          timeout=60)
    assert once.returncode == 0
    assert read_snapshots(d) == expected_snapshots(d)
    assert applied(d) == stream_total
    for p in range(PARTITIONS):  # it left the group cleanly
        consumers = d.client.xinfo_consumers(keys.stream(d.prefix, p), keys.GROUP)
        assert all(c["name"] not in (b"graceful", "graceful") for c in consumers)


def test_a_stopping_daemon_keeps_pending_entries_it_did_not_make(crash_env):
    """Entries left pending under the daemon's name (a half-run script, another reader
    using the same name) must survive its exit, to be folded once idle."""
    d, env = crash_env
    Publisher(d).enqueued("kept", custom={"track": 1})
    part = d.partition("kept")
    stream = keys.stream(d.prefix, part)
    d.client.xgroup_create(stream, keys.GROUP, id="0", mkstream=True)
    d.client.xreadgroup(keys.GROUP, "w1", {stream: ">"})  # delivered, never acknowledged
    proc = start(env, "w1", claim_idle="60000")
    assert proc.ready.wait(60)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert d.client.xpending(stream, keys.GROUP)["pending"] == 1
    run = subprocess.run(TRACKER + ["project", "--once", "--claim-idle", "0"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert d.client.xpending(stream, keys.GROUP)["pending"] == 0
    assert read_snapshots(d)["kept"][b"s"] == b"enqueued"


def test_a_hand_edited_snapshot_does_not_stall_the_partition(crash_env):
    d, _env = crash_env

    pub, proj = Publisher(d), Projector(d, consumer="edit")
    pub.enqueued("edited", custom={"track": 1})
    proj.drain()
    key, field = job_key(d, "edited")
    d.client.hset(key, field, b"\x07p=77")  # not a value tracker wrote: no state, no times
    pub.enqueued("edited", custom={"track": 1})
    pub.success("edited")
    proj.drain()
    assert read_snapshots(d)["edited"][b"s"] == b"success"
