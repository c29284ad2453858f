"""tracker replay: a live rebuild never answers wrong; --verify finds what differs."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import open_real

from projections import track as fold_mod
from tracker import events, replay
from tracker.answer import answer_of as answer
from tracker.cli import cli
from tracker.errors import TrackerError
from tracker.projector import Projector
from tracker.publisher import Publisher
from tracker.query import Tracker
from tracker.store import keys, scripts


@pytest.fixture(params=["real", "cluster"])
def real_deployment(request, prefix):
    """This module's real-server tests run on single Redis and on the Redis Cluster."""
    if request.param == "cluster":
        url = request.getfixturevalue("local_cluster").seeds_url
    else:
        url = request.getfixturevalue("real_redis_url")
    yield from open_real(url, prefix, 4)


def fold_log(d):
    """The fold of the whole log, independently of Redis scripts."""
    tracks = {}
    for p in range(d.partitions):
        for eid, fields in d.client.xrange(keys.stream(d.prefix, p)):
            try:
                ev = events.decode_entry(fields)
            except events.PoisonEntry:
                continue
            new = fold_mod.apply(tracks.get(ev.jid), ev, int(eid.split(b"-")[0]), d.ttl_ms)
            if new is None:
                tracks.pop(ev.jid, None)
            else:
                tracks[ev.jid] = new
    return tracks


def job(pub, jid, percent=10, finish=True):
    pub.enqueued(jid, {"track": 1}, queue="q", jobtype="T")
    pub.working(jid)
    pub.publish(events.make_trackset(jid, percent, f"at {percent}"))
    if finish:
        pub.success(jid)


def gen(d, part):
    return int(d.client.hget(keys.meta(d.prefix, part), "gen") or 0)


def test_lua_key_rules_match_keys_py(deployment):
    lua = Path(scripts.__file__).parent / "lua"
    snapshot_lua = (lua / "ids.lua").read_text() + (lua / "snapshot.lua").read_text()
    script = deployment.client.register_script(snapshot_lua + """
local meta, hist = Snap.keys(ARGV[1])
return {meta, hist, Snap.prefix(ARGV[1], false), Snap.prefix(ARGV[1], '0'),
        Snap.prefix(ARGV[1], '7'), Snap.unpack_id(Snap.pack_id(ARGV[2]), 1),
        Snap.index(ARGV[1]), Snap.index(Snap.prefix(ARGV[1], '7'))}""")
    p = deployment.prefix
    got = [x.decode() for x in script(args=[keys.snapshot_prefix(p, 3), "1700000000123-4567"])]
    assert got == [keys.meta(p, 3), keys.history_prefix(p, 3), keys.snapshot_prefix(p, 3),
                   keys.snapshot_prefix(p, 3), keys.snapshot_prefix_gen(p, 3, 7),
                   "1700000000123-4567", keys.state_index_prefix(p, 3),
                   keys.state_index_prefix(p, 3, 7)]


def test_rebuild_restores_lost_snapshots_and_switches_generation(deployment, tracker, projector):
    pub = Publisher(deployment)
    jids = [f"j{i}" for i in range(30)]
    for i, jid in enumerate(jids):
        job(pub, jid, i, finish=i % 2 == 0)
    pub.enqueued("untracked")
    deployment.client.xadd(keys.stream(deployment.prefix, 0), {"t": "bogus"})  # poison
    projector.drain()
    before = tracker.get_many(jids)
    for p in range(deployment.partitions):  # lose every snapshot (eviction, failover)
        replay.unlink_prefix(deployment.client, keys.snapshot_prefix(deployment.prefix, p))
    assert all(a["state"] == "unknown" for a in tracker.get_many(jids))
    done = replay.rebuild(deployment)
    assert tracker.get_many(jids) == before
    assert sum(r.folded for r in done) == 30 * 4 - 15 + 1 and sum(r.poisoned for r in done) == 1
    assert all(gen(deployment, p) == 1 for p in range(deployment.partitions))
    # The live projector now writes generation 1; gen-0 keys are gone.
    pub.failed("j1", "E", "boom")
    projector.drain()
    assert tracker.get("j1")["state"] == "failed"
    assert not deployment.client.exists(keys.snapshot(deployment.prefix,
                                                      deployment.partition("j1"), "j1"))
    assert replay.verify(deployment).summary() == {"checked": 30, "equal": 30, "different": 0,
                                                   "cannot_verify": 0}
    replay.rebuild(deployment, partition=2)
    assert gen(deployment, 2) == 2 and gen(deployment, 1) == 1
    assert tracker.get_many(jids)[2:] == before[2:]


def test_rebuild_does_not_recreate_expired_tracks(backend):
    d = backend(partitions=1, ttl=1)
    pub, t = Publisher(d), Tracker(d)
    job(pub, "old")
    Projector(d, consumer="c").drain()
    time.sleep(1.1)
    job(pub, "new", finish=False)
    Projector(d, consumer="c").drain()
    assert d.client.exists(keys.snapshot(d.prefix, 0, "old"))  # grace keeps the key
    replay.rebuild(d)
    assert t.get("old")["state"] == "unknown" and t.get("new")["state"] == "working"
    assert not d.client.exists(keys.snapshot_prefix_gen(d.prefix, 0, 1) + "old")
    assert not d.client.exists(keys.replay_held(d.prefix, 0), keys.replay_state(d.prefix, 0))


def test_rebuild_with_no_projector_yet_becomes_its_start(deployment, tracker):
    pub = Publisher(deployment)
    for i in range(10):
        job(pub, f"n{i}", i)
    replay.rebuild(deployment)
    assert [a["percent"] for a in tracker.get_many(f"n{i}" for i in range(10))] == list(range(10))
    assert Projector(deployment, consumer="c").drain() == 0  # nothing applied twice
    job(pub, "later")
    assert Projector(deployment, consumer="c").drain() == 4
    assert replay.verify(deployment).ok


def test_one_rebuild_per_partition(deployment):
    replay._call(deployment, 0, "begin")
    with pytest.raises(TrackerError, match="already running"):
        replay.rebuild(deployment, partition=0)
    replay.rebuild(deployment, partition=1)  # other partitions are free


def test_verify_tampered_deleted_and_trimmed(real_deployment):
    d = real_deployment
    pub = Publisher(d)
    proj = Projector(d, consumer="c")
    part = d.partition("long")
    pub.enqueued("long", {"track": 1})
    pub.working("long")
    time.sleep(0.005)
    same = [j for j in (f"x{i}" for i in range(200)) if d.partition(j) == part][:6]
    for i, jid in enumerate(same):
        job(pub, jid, i)
    pub.publish(events.make_trackset("long", 70, "still going"))
    proj.drain()
    # Retention dropped the beginning of "long" (and of nothing else).
    first_of_rest = d.client.xrange(keys.stream(d.prefix, part), count=3)[2][0]
    d.client.xtrim(keys.stream(d.prefix, part), minid=first_of_rest, approximate=False)
    snap = keys.snapshot_prefix(d.prefix, part)
    d.client.hset(snap + same[0], "p", "99")  # tampered
    d.client.delete(snap + same[1])  # lost
    res = replay.verify(d, partition=part)
    assert res.summary() == {"checked": 7, "equal": 4, "different": 2, "cannot_verify": 1}
    diffs = {x.jid: x.fields for x in res.different}
    assert diffs[same[0]] == {"percent": ("99", "0")}
    assert diffs[same[1]]["state"] == (None, "success")
    assert res.cannot_verify[0][0] == "long"
    runner = CliRunner()
    base = ["--redis-url", d.settings.redis_url, "--prefix", d.prefix]
    out = runner.invoke(cli, base + ["replay", "--verify", "--partition", str(part)])
    assert out.exit_code == 1, out.output
    assert "2 different, 1 cannot verify" in out.output and f"different {same[0]}: percent" in out.output
    # A rebuild repairs both and keeps the live snapshot of the one it cannot refold.
    done = replay.rebuild(d, partition=part)
    assert done[0].kept == 1
    assert Tracker(d).get("long")["percent"] == 70
    out = runner.invoke(cli, base + ["replay", "--verify", "--partition", str(part)])
    assert out.exit_code == 0 and "0 different" in out.output, out.output


def test_live_rebuild_under_load_never_answers_wrong(real_deployment):
    """A producer and a projector run; a checker polls; the rebuild runs twice."""
    d = real_deployment
    pub, t = Publisher(d), Tracker(d)
    stable = [f"s{i}" for i in range(40)]
    for i, jid in enumerate(stable):
        job(pub, jid, i)
    for i in range(3000):  # history to fold
        job(pub, f"h{i}", i % 100)
    proj = Projector(d, consumer="live", batch=200, block_ms=100)
    proj.drain()
    expected = t.get_many(stable)
    stop = threading.Event()
    wrong: list = []
    moving = [f"m{i}" for i in range(20)]
    seen: dict = {}

    def producer():
        n = 0
        while not stop.is_set():
            for jid in moving:
                pub.publish(events.make_trackset(jid, n % 101, None)) if n else job(pub, jid, 0, False)
            n += 1
            time.sleep(0.002)

    def checker():
        while not stop.is_set():
            got = t.get_many(stable + moving)
            if got[:len(stable)] != expected:
                wrong.append(got)
            for a in got[len(stable):]:
                if a["jid"] in seen and (a["state"] == "unknown" or
                                         a["updated_at"] < seen[a["jid"]]):
                    wrong.append(a)
                if a["state"] != "unknown":
                    seen[a["jid"]] = a["updated_at"]

    threads = [threading.Thread(target=f) for f in (producer, checker)]
    threads.append(threading.Thread(target=proj.run, kwargs={"report_every": 0.5}))
    for th in threads:
        th.start()
    time.sleep(0.3)
    done = replay.rebuild(d, chunk=500) + replay.rebuild(d, chunk=500)
    time.sleep(0.2)
    stop.set()
    proj.stop()
    for th in threads:
        th.join(30)
    Projector(d, consumer="final").drain()  # (a stopped projector drains nothing)
    assert not wrong, wrong[:3]
    assert len(seen) == len(moving)
    assert all(r.new_gen == 2 for r in done[4:])
    final = fold_log(d)
    now = int(time.time() * 1000)
    jids = sorted(final)
    got = t.get_many(jids)
    want = [answer(j, fold_mod.visible(final[j], now), now) for j in jids]
    assert [g for g, w in zip(got, want) if g != w] == [w for g, w in zip(got, want) if g != w]
    assert replay.verify(d).ok
    assert scripts.script("replay") is scripts.script("replay")


def test_rebuild_refuses_when_retention_is_shorter_than_a_track_can_live(real_deployment):
    """A live track whose every event (and history index) was trimmed cannot be rebuilt:
    with a retention that short, replay refuses unless forced."""
    d = real_deployment

    pub = Publisher(d)
    pub.enqueued("long", custom={"track": 1})
    pub.working("long", reserve_for=7200)
    Projector(d, consumer="p").drain()
    part = d.partition("long")
    d.client.hset(keys.config(d.prefix), "retention", 60_000)
    d.client.xtrim(keys.stream(d.prefix, part), maxlen=0)  # as an age trim would, later
    with pytest.raises(TrackerError, match="retention"):
        replay.rebuild(d, part)
    assert Tracker(d).get("long")["state"] == "working"
    replay.rebuild(d, part, force=True)  # the operator's explicit choice
