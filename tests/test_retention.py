"""Retention: trim by age, never an unacknowledged or undelivered entry."""

from __future__ import annotations

import time

import pytest
from click.testing import CliRunner
from helpers import index_members, job_key, read_history, read_values

from tracker import events, retention
from tracker.cli import cli
from tracker.errors import ValidationError
from tracker.history import history
from tracker.projector import Projector
from tracker.publisher import Publisher
from tracker.query import Tracker
from tracker.store import keys, packed


def old_entries(d, n, hours_ago=3):
    """n valid entries, hours old (explicit IDs), all in partition 0."""
    stream = keys.stream(d.prefix, 0)
    start = int(time.time() * 1000) - hours_ago * 3_600_000
    return [d.client.xadd(stream, {"t": "enqueued", "j": f"o{i}", "k": 1}, id=f"{start + i}-0")
            .decode() for i in range(n)]


def test_parse_duration():
    assert retention.parse_duration("7d") == 7 * 86_400_000
    assert retention.parse_duration("90m") == 5_400_000
    assert retention.parse_duration("3600") == 3_600_000
    for bad in ("7 days", "-1d", "10s"):
        with pytest.raises(ValidationError, match="^retention: "):
            retention.parse_duration(bad)


def test_no_group_no_trim(deployment):
    old_entries(deployment, 5)
    [row] = retention.trim(deployment, 3_600_000, partition=0)
    assert row.removed == 0 and row.limited_by == "no consumer group yet"


def test_trim_never_removes_a_pending_entry(deployment):
    d = deployment
    ids = old_entries(d, 50)
    stream = keys.stream(d.prefix, 0)
    Projector(d, consumer="c").ensure_group(0)
    # A foreign consumer reads 10 entries and dies without acknowledging them.
    d.client.xreadgroup(keys.GROUP, "dead-worker", {stream: ">"}, count=10)
    [dry] = retention.trim(d, 3_600_000, partition=0, dry_run=True)
    [row] = retention.trim(d, 3_600_000, partition=0)
    assert (dry.removed, row.removed, row.limited_by) == (0, 0, f"pending in group {keys.GROUP}")
    assert d.client.xlen(stream) == 50
    # They stay claimable: the projector folds them, then trimming goes on.
    proj = Projector(d, consumer="c", claim_idle_ms=0, batch=20)
    proj.step(0)
    proj.step(0)  # claimed 10, then 20 more delivered: last-delivered is ids[29]
    assert d.client.xpending(stream, keys.GROUP)["pending"] == 0
    [dry] = retention.trim(d, 3_600_000, partition=0, dry_run=True)
    [row] = retention.trim(d, 3_600_000, partition=0)
    assert (dry.removed, row.removed, row.minid) == (29, 29, ids[29])
    assert row.limited_by == f"last-delivered of group {keys.GROUP}"
    assert [e[0].decode() for e in d.client.xrange(stream)] == ids[29:]


def test_trim_by_age_and_rebuild_position(deployment):
    d = deployment
    old = old_entries(d, 20)
    pub = Publisher(d)
    jid = next(j for j in (f"fresh{i}" for i in range(100)) if d.partition(j) == 0)
    fresh = [pub.enqueued(jid, {"track": 1}) for _ in range(3)]
    Projector(d, consumer="c").drain()
    d.client.hset(keys.replay_state(d.prefix, 0), "pos", old[4])  # a rebuild is at old[4]
    [row] = retention.trim(d, 3_600_000, partition=0)
    assert (row.removed, row.limited_by) == (4, "rebuild in progress")
    d.client.delete(keys.replay_state(d.prefix, 0))
    rows = retention.trim(d, 3_600_000)
    assert sum(r.removed for r in rows) == 16 and rows[0].limited_by == "age"
    assert [e[0].decode() for e in d.client.xrange(keys.stream(d.prefix, 0))] == fresh
    assert d.client.hget(keys.config(d.prefix), "retention") == b"3600000"


def test_history_index_expires_with_the_window(backend):
    d = backend(partitions=2)
    retention.trim(d, 2 * 3_600_000)  # stores the window for the projector's scripts
    pub = Publisher(d)
    last = pub.enqueued("w", {"track": 1})
    Projector(d, consumer="c").drain()
    # The job's bucket outlives its newest entry by the window (rounded up to the hour).
    ttl = d.client.pttl(job_key(d, "w")[0])
    dead = int(last.split("-")[0]) + 2 * 3_600_000 - int(time.time() * 1000)
    assert dead + 3_600_000 - 5_000 < ttl < dead + 2 * 3_600_000 + 5_000
    # Past retention the entries go; the index says so instead of inventing them.
    stream = keys.stream(d.prefix, d.partition("w"))
    d.client.xtrim(stream, minid="99999999999999-0", approximate=False)
    h = history(d, "w")
    assert h.entries == [] and h.trimmed == [last]
    # Past the window the index itself answers as gone, swept or not.
    retention.trim(d, 500)
    time.sleep(0.6)
    assert history(d, "w").trimmed == [] and read_history(d, "w") == [last]


def test_sweep_strips_expired_snapshots_then_deletes_dead_jobs(backend):
    d = backend(partitions=1, ttl=1, grace=0)
    pub, t = Publisher(d), Tracker(d)
    jids = [f"s{i}" for i in range(100)]
    with pub.batch() as b:
        for jid in jids:
            b.enqueued(jid, {"track": 1}, queue="q")
            b.add(events.make_trackset(jid, 5, "a desc that takes some bytes"))
    pub.enqueued("x" * 100, {"track": 1})  # a long JID: its overflow string alone
    Projector(d, consumer="c").drain()
    meta = keys.meta(d.prefix, 0)
    assert int(d.client.hget(meta, "n")) == 100
    assert len(index_members(d, 0, "enqueued")) == 101
    before = sum(len(v) for v in packed.read_all(d.client, d.prefix, 0)[1].values())
    time.sleep(1.1)  # every snapshot has expired for good (x + grace), no history has
    done = retention.sweep_all(d)
    assert (done[0].looked, done[0].deleted, done[0].stripped) == (100, 0, 100)
    values = read_values(d)
    assert all(values[j].track is None and len(values[j].entries) == 2 for j in jids)
    assert sum(len(packed.read_all(d.client, d.prefix, 0)[1][j]) for j in jids) < before / 2
    assert list(index_members(d, 0, "enqueued")) == ["x" * 100]  # the long JID's
    assert t.get("s1")["state"] == "unknown" and len(history(d, "s1").entries) == 2
    retention.trim(d, 1000)  # now past the window as well: dead
    done = retention.sweep_all(d)
    assert (done[0].deleted, int(d.client.hget(meta, "n"))) == (100, 0)
    assert set(read_values(d)) == {"x" * 100}
    assert not list(d.client.scan_iter(match=keys.bucket_prefix(d.prefix, 0) + "*"))


def test_sweep_rewrites_a_converted_bucket_as_a_listpack(real_deployment):
    d = real_deployment
    pub = Publisher(d)
    pub.enqueued("conv", {"track": 1})
    Projector(d, consumer="c").drain()
    key, _ = job_key(d, "conv")
    d.client.hset(key, "junk", "x" * 100)  # a hand edit: over the listpack value limit
    d.client.hdel(key, "junk")
    assert d.client.object("encoding", key) == b"hashtable"  # conversion is one-way ...
    done = retention.sweep_all(d, partition=d.partition("conv"))
    assert done[0].healed == 1  # ... until the sweep rewrites it
    assert d.client.object("encoding", key) in (b"listpack", b"ziplist")
    assert d.client.pttl(key) > 0 and Tracker(d).get("conv")["state"] == "enqueued"


def test_sweep_pace(deployment):
    """Each partition is owed buckets in proportion to the time passed: all of them once
    per sweep period."""
    week = 7 * 86_400_000
    assert retention.sweep_period(week) == 600.0 and retention.sweep_period(60_000) == 6.0
    sweeper = retention.Sweeper(deployment)
    assert sweeper.tick(week) == 4  # the first tick learns each partition's size (1 bucket)
    sweeper.last -= 300  # half a period later: half a bucket owed each, no call yet
    assert sweeper.tick(week) == 0
    sweeper.last -= 300
    assert sweeper.tick(week) == 4
    sweeper.last -= 3000  # a long pause owes no more than one whole pass
    assert sweeper.tick(week) == 4


def test_keeper_and_cli(real_deployment, real_redis_url, monkeypatch):
    d = real_deployment
    old_entries(d, 10)
    Projector(d, consumer="c").drain()
    monkeypatch.setenv("TRACKER_RETENTION", "1h")
    keeper = retention.Keeper(d, every=0)
    keeper.next = 0
    keeper.tick()
    assert d.client.xlen(keys.stream(d.prefix, 0)) == 1  # the last-delivered entry stays
    old_entries(d, 5, hours_ago=2)
    Projector(d, consumer="c").drain()
    runner = CliRunner()
    base = ["--redis-url", real_redis_url, "--prefix", d.prefix]
    out = runner.invoke(cli, base + ["trim", "--dry-run", "--retention", "1h"])
    assert out.exit_code == 0 and "would remove 5 entries" in out.output, out.output
    out = runner.invoke(cli, base + ["trim", "--retention", "1h"])
    assert "removed 5 entries" in out.output, out.output
