"""tracker replay: a live rebuild never answers wrong; --verify finds what differs."""

from __future__ import annotations

import io
import threading
import time
import uuid
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner
from helpers import job_key, open_deployment, open_real, read_snapshots, wipe

from projections import track as fold_mod
from tracker import answer as answer_mod
from tracker import archive, events, replay
from tracker.answer import answer_of as answer
from tracker.cli import cli
from tracker.errors import TrackerError
from tracker.history import history, track_at
from tracker.projector import Projector
from tracker.publisher import Publisher
from tracker.query import Tracker
from tracker.store import keys, packed, scripts


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
    return packed.geometry(d.client, d.prefix, part).gen


def test_lua_key_rules_match_keys_py(deployment):
    lua = Path(scripts.__file__).parent / "lua"
    src = "".join((lua / f"{part}.lua").read_text() for part in ("ids", "packed", "snapshot"))
    script = deployment.client.register_script(src + """
local out = {}
for _, gen in ipairs({0, 7}) do
  local S = Snap.store(ARGV[1], P.geometry(gen .. ':3:2:1'))
  for _, k in ipairs({S.meta, S.bpre, S.vpre, S.idx}) do out[#out + 1] = k end
  out[#out + 1] = S.bpre .. P.addr(P.hash(ARGV[2]), S.g)
end
return out""")
    p = deployment.prefix
    got = [x.decode() for x in script(args=[keys.snapshot_prefix(p, 3), "some-jid"])]
    want = []
    for gen in (0, 7):
        geo = packed.Geometry(gen, 3, 2, 1)
        want += [keys.meta(p, 3), keys.bucket_prefix(p, 3, gen), keys.overflow_prefix(p, 3, gen),
                 keys.state_index_prefix(p, 3, gen),
                 keys.bucket(p, 3, gen, geo.address("some-jid"))]
    assert got == want
    assert keys.snapshot_prefix(p, 3) == keys.bucket_prefix(p, 3, 0)


def test_rebuild_restores_lost_snapshots_and_switches_generation(deployment, tracker, projector):
    pub = Publisher(deployment)
    jids = [f"j{i}" for i in range(30)]
    for i, jid in enumerate(jids):
        job(pub, jid, i, finish=i % 2 == 0)
    pub.enqueued("untracked")
    deployment.client.xadd(keys.stream(deployment.prefix, 0), {"t": "bogus"})  # poison
    projector.drain()
    before = tracker.get_many(jids)
    past = {j: history(deployment, j).entries for j in jids}
    assert all(len(h) == (4 if i % 2 == 0 else 3) for i, h in enumerate(past.values()))
    for p in range(deployment.partitions):  # lose every bucket (eviction, failover)
        replay.unlink_prefix(deployment.client, keys.bucket_prefix(deployment.prefix, p))
    assert all(a["state"] == "unknown" for a in tracker.get_many(jids))
    assert not any(history(deployment, j).entries for j in jids)
    done = replay.rebuild(deployment)
    assert tracker.get_many(jids) == before
    assert {j: history(deployment, j).entries for j in jids} == past
    assert sum(r.folded for r in done) == 30 * 4 - 15 + 1 and sum(r.poisoned for r in done) == 1
    assert all(gen(deployment, p) == 1 for p in range(deployment.partitions))
    # The live projector now writes generation 1; gen-0 keys are gone.
    pub.failed("j1", "E", "boom")
    projector.drain()
    assert tracker.get("j1")["state"] == "failed"
    assert not [k for p in range(deployment.partitions) for k in deployment.client.scan_iter(
        match=keys.bucket_prefix(deployment.prefix, p) + "*")]
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
    assert "old" in read_snapshots(d)  # the grace keeps it for the fold
    replay.rebuild(d)
    assert t.get("old")["state"] == "unknown" and t.get("new")["state"] == "working"
    assert "old" not in read_snapshots(d) and "new" in read_snapshots(d)
    assert len(history(d, "old").entries) == 4  # its history outlives it
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
    key, field = job_key(d, same[0])
    value = packed.decode(d.client.hget(key, field))
    tampered = packed.encode(msgspec.structs.replace(value.track, percent=99), value.entries)
    d.client.hset(key, field, tampered)
    d.client.hdel(*job_key(d, same[1]))  # lost
    res = replay.verify(d, partition=part)
    assert res.summary() == {"checked": 7, "equal": 4, "different": 2, "cannot_verify": 1}
    diffs = {x.jid: x.fields for x in res.different}
    assert diffs[same[0]] == {"percent": ("99", "0")}
    assert diffs[same[1]]["state"] == (None, "success")
    lost, logged = diffs[same[1]]["history"]  # the entry IDs: none live, four in the log
    assert lost == [] and len(logged) == 4
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


def _jobs(pub, n=12):
    """Jobs with retries, progress and reservations, a few ms apart."""
    jids = [f"ex{i}" for i in range(n)]
    for round_ in range(2):
        for i, jid in enumerate(jids):
            if round_ and i % 3:
                continue
            pub.enqueued(jid, {"track": 1}, queue=f"q{i % 2}", jobtype="T")
            pub.working(jid, reserve_for=120)
            pub.publish(events.make_trackset(jid, 10 * i % 101, f"step {i}"))
            if i % 4 == 0:
                pub.failed(jid, "E", "boom")
            elif i % 4 == 1:
                pub.success(jid)
        time.sleep(0.003)
    return jids


def test_import_of_an_export_then_replay_gives_the_same_past(backend):
    """Issue 10: import + replay gives the same history, get --at and export --jid
    output as the original deployment."""
    d = backend(partitions=3, ttl=1800)
    jids = _jobs(Publisher(d))
    Projector(d, consumer="c").drain()
    dump = io.StringIO()
    archive.export(d, dump)
    other = open_deployment(backend.kind, d.settings.redis_url, "timp" + uuid.uuid4().hex[:10],
                            partitions=3, ttl=1800)
    try:
        archive.import_(other, io.StringIO(dump.getvalue()))
        replay.rebuild(other)
        assert replay.verify(other).summary()["different"] == 0
        for jid in jids:
            mine, theirs = history(d, jid), history(other, jid)
            assert [e.as_json() for e in mine.entries] == [e.as_json() for e in theirs.entries]
            assert len(mine.entries) >= 3 and not theirs.trimmed
            for e in mine.entries:
                for at in (e.at - 1, e.at, e.at + 1):
                    assert track_at(d, jid, at) == track_at(other, jid, at), (jid, at)
            a, b = io.StringIO(), io.StringIO()
            archive.export(d, a, jid=jid)
            archive.export(other, b, jid=jid)
            assert a.getvalue() == b.getvalue() and a.getvalue().count("\n") == len(mine.entries)
        assert Tracker(d).get_many(jids) == Tracker(other).get_many(jids)
    finally:
        wipe(other)
        other.close()


def test_replay_brings_back_a_lost_field_and_a_lost_bucket(backend):
    d = backend(partitions=2, ttl=1800)
    jids = _jobs(Publisher(d), n=60)
    Projector(d, consumer="c").drain()
    t = Tracker(d)
    before = t.get_many(jids)
    past = {j: [e.id for e in history(d, j).entries] for j in jids}
    listed = {s: t.list_tracks(s, limit=100).tracks for s in ("working", "success", "failed")}
    assert all(listed.values())
    d.client.hdel(*job_key(d, "ex1"))  # one job's field
    key, _ = job_key(d, "ex2")
    in_bucket = [f.decode() for f in d.client.hkeys(key)]
    d.client.delete(key)  # a whole bucket: every job in it
    lost = {"ex1", *in_bucket}
    assert len(lost) >= 2
    assert all(t.get(j)["state"] == "unknown" and not history(d, j).entries for j in lost)
    found = replay.verify(d)
    assert {x.jid for x in found.different} == lost
    assert all(x.fields["history"][0] == [] for x in found.different)
    replay.rebuild(d)
    assert t.get_many(jids) == before
    assert {j: [e.id for e in history(d, j).entries] for j in jids} == past
    assert {s: t.list_tracks(s, limit=100).tracks for s in listed} == listed
    assert replay.verify(d).summary() == {"checked": 60, "equal": 60, "different": 0,
                                          "cannot_verify": 0}


def test_upgrade_from_per_job_keys_keeps_what_the_log_cannot_rebuild(real_deployment):
    """The layout before buckets kept a snapshot hash and a history string per job. The
    first rebuild after an upgrade refolds the log and takes over, from those keys, the
    jobs whose beginning retention trimmed away; then it unlinks them."""
    d = real_deployment
    pub = Publisher(d)
    part = d.partition("old")
    ids = [pub.enqueued("old", {"track": 1}, queue="q"), pub.working("old"),
           pub.publish(events.make_trackset("old", 50, "half"))[0]]
    mate = next(j for j in (f"m{i}" for i in range(100)) if d.partition(j) == part)
    job(pub, mate, 20, finish=False)
    track = fold_log(d)["old"]
    tag = keys.tag(d.prefix, part)
    fields = {k: v for k, v in answer_mod.stored_fields(track).items() if v is not None}
    d.client.hset(f"{tag}:t:old", mapping=fields)  # as the old projector wrote them
    d.client.set(f"{tag}:h:old", b"".join(
        int(i.split("-")[0]).to_bytes(6, "big") + int(i.split("-")[1]).to_bytes(4, "big")
        for i in ids))
    d.client.hset(keys.meta(d.prefix, part), "gen", 0)
    d.client.xtrim(keys.stream(d.prefix, part), minid=ids[1], approximate=False)
    [done] = replay.rebuild(d, part)
    assert done.kept == 1
    assert Tracker(d).get("old") == answer("old", track, track.updated_at)
    h = history(d, "old")
    assert [e.id for e in h.entries] == ids[1:] and h.trimmed == ids[:1]
    assert Tracker(d).get(mate)["percent"] == 20
    assert not d.client.exists(f"{tag}:t:old", f"{tag}:h:old")
