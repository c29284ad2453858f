"""Retention: trim by age, never an unacknowledged or undelivered entry."""

from __future__ import annotations

import time

import pytest
from click.testing import CliRunner

from tracker import retention
from tracker.cli import cli
from tracker.errors import ValidationError
from tracker.history import history
from tracker.projector import Projector
from tracker.publisher import Publisher
from tracker.store import keys


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


def test_history_index_expires_with_the_window(real_deployment):
    d = real_deployment
    retention.trim(d, 2 * 3_600_000)  # stores the window for the projector's scripts
    pub = Publisher(d)
    last = pub.enqueued("w", {"track": 1})
    Projector(d, consumer="c").drain()
    index = keys.history(d.prefix, d.partition("w"), "w")
    ttl = d.client.pttl(index)
    expected = int(last.split("-")[0]) + 2 * 3_600_000 - int(time.time() * 1000)
    assert abs(ttl - expected) < 5_000
    # Past retention the entries go; the index says so instead of inventing them.
    stream = keys.stream(d.prefix, d.partition("w"))
    d.client.xtrim(stream, minid="99999999999999-0", approximate=False)
    h = history(d, "w")
    assert h.entries == [] and h.trimmed == [last]


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
