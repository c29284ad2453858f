"""Listing live tracks by state (and queue), newest update first, from the state index
the fold keeps in the same step as the snapshots (tracker/listing.py, list.lua)."""

from __future__ import annotations

import asyncio
import time

import pytest

from tracker import replay, retention
from tracker.aio import AsyncTracker
from tracker.errors import ValidationError
from tracker.projector import Projector
from tracker.query import Tracker
from tracker.store import keys


def _jobs(t: Tracker, n: int, queue="default", state="working", prefix="l"):
    with t.publisher.batch() as b:
        for i in range(n):
            b.enqueued(f"{prefix}-{i}", custom={"track": 1}, queue=queue)
            if state in ("working", "success"):
                b.working(f"{prefix}-{i}")
            if state == "success":
                b.success(f"{prefix}-{i}")


def _all_pages(t: Tracker, state: str, **kw) -> list[dict]:
    out, cursor = [], None
    while True:
        page = t.list_tracks(state, cursor=cursor, **kw)
        out += page.tracks
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor


def test_lists_each_state_newest_first_and_pages_exactly(tracker):
    _jobs(tracker, 120, state="working", prefix="w")
    time.sleep(0.005)
    _jobs(tracker, 7, state="success", prefix="s")
    _jobs(tracker, 3, state="enqueued", prefix="e")
    tracker.publisher.enqueued("untracked")
    working = _all_pages(tracker, "working", limit=25)
    assert sorted(a["jid"] for a in working) == sorted(f"w-{i}" for i in range(120))
    assert all(a["state"] == "working" for a in working)
    stamps = [a["updated_at"] for a in working]
    assert stamps == sorted(stamps, reverse=True)
    assert {a["jid"] for a in tracker.list_tracks("success").tracks} == {f"s-{i}" for i in range(7)}
    assert tracker.list_tracks("success").next_cursor is None
    assert len(tracker.list_tracks("enqueued").tracks) == 3
    assert tracker.list_tracks("dead") == ([], None)
    # each listed track is exactly what TRACK GET answers for it
    assert working[:10] == tracker.get_many([a["jid"] for a in working[:10]])


def test_a_track_moves_between_states(tracker):
    _jobs(tracker, 1, state="enqueued", prefix="m")
    assert [a["jid"] for a in tracker.list_tracks("enqueued").tracks] == ["m-0"]
    tracker.publisher.working("m-0")
    assert tracker.list_tracks("enqueued").tracks == []
    assert [a["jid"] for a in tracker.list_tracks("working").tracks] == ["m-0"]
    tracker.publisher.failed("m-0", errtype="E")
    tracker.publisher.enqueued("m-0", custom={"track": 1})
    assert [a["jid"] for a in tracker.list_tracks("enqueued").tracks] == ["m-0"]
    assert tracker.list_tracks("failed").tracks == []


def test_filter_by_queue(tracker):
    _jobs(tracker, 30, queue="a", prefix="qa")
    _jobs(tracker, 5, queue="b", prefix="qb")
    got = _all_pages(tracker, "working", queue="b", limit=2)
    assert sorted(a["jid"] for a in got) == [f"qb-{i}" for i in range(5)]
    assert tracker.list_tracks("working", queue="nope").tracks == []


def test_equal_update_times_page_without_loss_or_repeat(tracker):
    """Many tracks updated in the same millisecond: the cursor's JID breaks the tie."""
    d = tracker.deployment
    stream = keys.stream(d.prefix, 0)
    ms = int(time.time() * 1000)
    pipe = d.client.pipeline(transaction=False)
    for i in range(60):  # one partition: craft the log with explicit, equal-ms IDs
        jid = f"tie-{i:02d}"
        if d.partition(jid) == 0:
            pipe.xadd(stream, {"t": "enqueued", "j": jid, "k": "1"}, id=f"{ms}-{i}")
    pipe.execute()
    want = sorted(j for j in (f"tie-{i:02d}" for i in range(60)) if d.partition(j) == 0)
    got = _all_pages(tracker, "enqueued", limit=3)
    assert [a["jid"] for a in got] == sorted(want, reverse=True)


def test_expired_tracks_are_not_listed_and_are_swept(backend):
    d = backend(partitions=2, ttl=1)
    t = Tracker(d)
    _jobs(t, 4, state="success", prefix="x")
    assert len(t.list_tracks("success").tracks) == 4
    time.sleep(1.1)
    assert t.list_tracks("success").tracks == []
    swept = sum(r.swept for r in retention.trim(d, 7 * 86_400_000))
    assert swept == 4
    assert not [k for p in range(d.partitions) for k in d.client.scan_iter(
        match=keys.state_index(d.prefix, p, "success") + "*")]


def test_replay_rebuilds_the_index(tracker):
    d = tracker.deployment
    _jobs(tracker, 20, prefix="r")
    Projector(d, consumer="p").drain()
    for p in range(d.partitions):  # its directory and pages
        replay.unlink_prefix(d.client, keys.state_index(d.prefix, p, "working"))
    assert tracker.list_tracks("working").tracks == []
    replay.rebuild(d)
    assert len(_all_pages(tracker, "working")) == 20
    old = [keys.state_index(d.prefix, p, "working") for p in range(d.partitions)]
    assert not [k for o in old for k in d.client.scan_iter(match=o + "*")]  # gen 0's is gone


def test_async_list_matches_sync(real_deployment):
    t = Tracker(real_deployment)
    _jobs(t, 12, prefix="as")

    async def main():
        at = await AsyncTracker.open(real_deployment.settings)
        try:
            return await at.list_tracks("working", limit=5)
        finally:
            await at.close()

    page = asyncio.run(main())
    assert page == t.list_tracks("working", limit=5)
    assert len(page.tracks) == 5 and page.next_cursor


@pytest.mark.parametrize("kw, field", [
    (dict(state="unknown"), "state"), (dict(state="WORKING"), "state"),
    (dict(state="working", limit=0), "limit"), (dict(state="working", limit=5000), "limit"),
    (dict(state="working", limit="5"), "limit"), (dict(state="working", cursor="x"), "cursor"),
    (dict(state="working", cursor="12:"), "cursor"), (dict(state="working", cursor="1:a b"), "cursor"),
    (dict(state="working", queue="a\nb"), "queue"), (dict(state="working", queue="q" * 201), "queue"),
])
def test_bad_requests_name_the_field(tracker, kw, field):
    with pytest.raises(ValidationError) as e:
        tracker.list_tracks(**kw)
    assert e.value.field == field


def test_count_tracks_per_state(tracker):
    _jobs(tracker, 6, state="working", prefix="cw")
    _jobs(tracker, 2, state="success", prefix="cs")
    tracker.settle(range(tracker.deployment.partitions))
    assert tracker.count_tracks() == {"enqueued": 0, "working": 6, "success": 2, "failed": 0,
                                      "dead": 0}


def test_index_pages_split_keep_order_and_are_swept(backend):
    """Hundreds of tracks in one state of one partition: the index splits into pages of at
    most 120 (listpacks), on time boundaries; listing across pages keeps the exact order,
    ties included; trimming expired tracks removes whole pages."""
    d = backend(partitions=1, ttl=1800)
    t = Tracker(d)
    stream = keys.stream(d.prefix, 0)
    now = int(time.time() * 1000)
    pipe = d.client.pipeline(transaction=False)
    for i in range(300):  # hours old: expired
        pipe.xadd(stream, {"t": "enqueued", "j": f"old{i}", "k": "1"}, id=f"{now - 7_200_000 + i}-0")
        pipe.xadd(stream, {"t": "success", "j": f"old{i}"}, id=f"{now - 7_200_000 + i}-1")
    want = []
    for i in range(700):  # times now-700ms.., five JIDs per millisecond
        ms, seq = now - 700 + i // 5, i % 5
        pipe.xadd(stream, {"t": "enqueued", "j": f"p{i:03d}", "k": "1"}, id=f"{ms}-{seq}")
        want.append((ms, f"p{i:03d}"))
    pipe.execute()
    Projector(d, consumer="p").drain()
    got = [(a["updated_at"], a["jid"]) for a in _all_pages(t, "enqueued", limit=7)]
    assert [j for _, j in got] == [j for _, j in sorted(want, reverse=True)]
    pages = list(d.client.scan_iter(match=keys.state_index(d.prefix, 0, "enqueued") + ":*"))
    assert len(pages) >= 6
    sizes = [d.client.zcard(p) for p in pages]
    assert sum(sizes) == 700 and max(sizes) <= 120
    if backend.kind == "real":
        assert {d.client.object("encoding", p) for p in pages} <= {b"listpack", b"ziplist"}
    times = [{int(s) for _, s in d.client.zrange(p, 0, -1, withscores=True)} for p in pages]
    assert sum(len(x) for x in times) == len(set().union(*times))  # no ms over two pages
    assert len(list(d.client.scan_iter(match=keys.state_index(d.prefix, 0, "success") + "*"))) > 2
    assert t.list_tracks("success").tracks == []  # expired: never listed
    counts = t.count_tracks()  # whole pages by ZCARD, the old ones not at all
    assert (counts["enqueued"], counts["success"]) == (700, 0)
    assert sum(r.swept for r in retention.trim(d, 7 * 86_400_000)) == 300
    assert not list(d.client.scan_iter(match=keys.state_index(d.prefix, 0, "success") + "*"))
    assert len(_all_pages(t, "enqueued", limit=100)) == 700


def test_a_page_is_exact_when_one_partition_holds_the_newest(backend):
    """The merge asks each partition for its share first: a page whose newest tracks all
    live in one partition still comes out whole and in order, page after page."""
    d = backend(partitions=4, ttl=1800)
    t = Tracker(d)
    stream = {p: keys.stream(d.prefix, p) for p in range(4)}
    jids = {p: [j for j in (f"sk{i}" for i in range(2000)) if d.partition(j) == p] for p in range(4)}
    now = int(time.time() * 1000) - 10_000
    pipe = d.client.pipeline(transaction=False)
    want = []
    for p in range(4):
        n = 120 if p == 2 else 15  # partition 2 has the 120 newest, the others older ones
        for i, jid in enumerate(jids[p][:n]):
            ms = now + (5000 + i if p == 2 else i * 10 + p)
            pipe.xadd(stream[p], {"t": "enqueued", "j": jid, "k": "1"}, id=f"{ms}-0")
            want.append((ms, jid))
    pipe.execute()
    Projector(d, consumer="sk").drain()
    order = [j for _, j in sorted(want, reverse=True)]
    first = t.list_tracks("enqueued", limit=50)
    assert [a["jid"] for a in first.tracks] == order[:50]
    assert [a["jid"] for a in _all_pages(t, "enqueued", limit=50)] == order
    assert [a["jid"] for a in _all_pages(t, "enqueued", limit=7)] == order
