"""tracker history and get --at: a job's past, from its per-job index."""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner
from helpers import read_history

from tracker import events
from tracker.answer import unknown
from tracker.cli import cli
from tracker.errors import ValidationError
from tracker.history import history, track_at
from tracker.projector import Projector
from tracker.publisher import Publisher
from tracker.query import Tracker
from tracker.store import packed
from tracker.times import format_ms, id_ms, parse_when


def retried_job(pub, jid):
    """enqueued -> working -> set -> failed -> enqueued -> working -> set -> dead, 3 ms apart."""
    steps = [lambda: pub.enqueued(jid, {"track": 1}, queue="q", jobtype="T", reserve_for=600),
             lambda: pub.working(jid, 120),
             lambda: pub.publish(events.make_trackset(jid, 30, "first try"))[0],
             lambda: pub.failed(jid, "IOError", "disk"),
             lambda: pub.enqueued(jid, {"track": 1}, queue="q", jobtype="T"),
             lambda: pub.working(jid),
             lambda: pub.publish(events.make_trackset(jid, 60, None))[0],
             lambda: pub.dead(jid, "IOError", "again")]
    for step in steps:
        yield step()
        time.sleep(0.003)


def test_history_complete_ordered_and_outlives_the_track(backend):
    d = backend(partitions=2, ttl=1)
    pub, t, proj = Publisher(d), Tracker(d), Projector(d, consumer="c")
    ids = []
    for eid in retried_job(pub, "job"):
        ids.append(eid)
        pub.enqueued("other", {"track": 1})  # noise in the same log
    pub.publish(events.make_trackset("ghost", 5, None))  # never tracked: no history
    proj.drain()
    time.sleep(1.1)
    assert t.get("job") == unknown("job")  # the track expired ...
    h = history(d, "job")  # ... its history did not
    assert [e.id for e in h.entries] == ids and not h.trimmed
    assert [e.fields["t"] for e in h.entries] == ["enqueued", "working", "trackset", "failed",
                                                   "enqueued", "working", "trackset", "dead"]
    assert h.entries[3].as_json()["fields"] == {"errtype": "IOError", "message": "disk"}
    assert h.entries[0].as_json()["fields"] == {"track": True, "queue": "q", "jobtype": "T",
                                                "reserve_for": 600}
    assert read_history(d, "job") == ids  # kept in the job's value, beside its snapshot:
    assert len(packed.read_value(d.client, d.prefix, d.partition("job"), "job")) <= packed.CAP
    assert history(d, "ghost").entries == []
    assert packed.read_value(d.client, d.prefix, d.partition("ghost"), "ghost") is None


def test_get_at_every_event_boundary(backend):
    d = backend(partitions=2, ttl=1800)
    pub, t, proj = Publisher(d), Tracker(d), Projector(d, consumer="c")
    live = []  # (event time, the live answer right after it was projected)
    for eid in retried_job(pub, "r"):
        proj.drain()
        live.append((id_ms(eid), t.get("r")))
    assert track_at(d, "r", live[0][0] - 1) == unknown("r")
    for i, (at, answer) in enumerate(live):
        assert track_at(d, "r", at) == answer, i
        if i + 1 < len(live):
            assert track_at(d, "r", live[i + 1][0] - 1) == answer, i
    assert t.get_at("r", live[3][0])["state"] == "failed"
    assert t.get_at("r", "now") == t.get("r")
    # After its expiry the as-of answer is unknown, like a live get would be.
    assert track_at(d, "r", live[-1][0] + 1800 * 1000) == unknown("r")


def test_parse_when():
    now = 1_700_000_000_000
    assert parse_when("-10m", now) == now - 600_000
    assert parse_when("+2h", now) == now + 7_200_000
    assert parse_when("now", now) == now
    assert parse_when("2023-11-14T22:13:20Z", now) == now
    assert parse_when("2023-11-14T23:13:20.5+01:00", now) == now + 500
    with pytest.raises(ValidationError, match="^at: "):
        parse_when("yesterday", now)


def test_cli_history_and_get_at(real_deployment, real_redis_url):
    d = real_deployment
    pub = Publisher(d)
    ids = list(retried_job(pub, "c1"))
    Projector(d, consumer="c").drain()
    base = ["--redis-url", real_redis_url, "--prefix", d.prefix]
    runner = CliRunner()
    out = runner.invoke(cli, base + ["history", "c1", "--json"])
    assert out.exit_code == 0, out.output
    lines = [json.loads(x) for x in out.output.splitlines()]
    assert [x["id"] for x in lines] == ids and lines[2]["event"] == "trackset"
    out = runner.invoke(cli, base + ["history", "c1"])
    assert out.output.splitlines()[3].split()[1:] == ["failed", "errtype=IOError", "message=disk"]
    got = runner.invoke(cli, base + ["get", "c1", "--at", lines[2]["time"]])
    assert json.loads(got.output)["percent"] == 30 and json.loads(got.output)["state"] == "working"
    got = runner.invoke(cli, base + ["get", "c1", "--at", "-1d"])
    assert json.loads(got.output)["state"] == "unknown"
    got = runner.invoke(cli, base + ["get", "c1", "--at", "soon"])
    assert isinstance(got.exception, ValidationError) and got.exception.exit_code == 2


def test_history_latency_one_job_among_many(real_deployment):
    """Not a benchmark (see scripts/bench_replay.py): the cost must not follow the log."""
    d = real_deployment
    pub = Publisher(d)
    with pub.batch() as b:
        for i in range(5000):
            b.enqueued(f"n{i}", {"track": 1})
            b.working(f"n{i}")
    Projector(d, consumer="c").drain()
    history(d, "n42")
    t0 = time.perf_counter()
    for _ in range(50):
        assert len(history(d, "n42").entries) == 2
    assert (time.perf_counter() - t0) / 50 < 0.05


def test_get_at_in_the_future_is_an_error_not_an_empty_answer(real_deployment, real_redis_url):
    d = real_deployment
    list(retried_job(Publisher(d), "f1"))
    Projector(d, consumer="c").drain()
    base = ["--redis-url", real_redis_url, "--prefix", d.prefix]
    runner = CliRunner()
    sec, usec = d.client.time()
    later = format_ms(int(sec) * 1000 + int(usec) // 1000 + 3_600_000)
    for at in ("+1h", "+5s", later):
        got = runner.invoke(cli, base + ["get", "f1", "--at", at])
        assert isinstance(got.exception, ValidationError), (at, got.output)
        assert got.exception.field == "at" and "in the future" in str(got.exception)
        assert got.exception.exit_code == 2 and got.output == ""
    got = runner.invoke(cli, base + ["get", "f1", "--at", "now"])
    assert got.exit_code == 0 and json.loads(got.output)["state"] == "dead"
    got = runner.invoke(cli, base + ["get", "f1", "--at", "2026-01-01T10:00:00"])
    assert isinstance(got.exception, ValidationError) and got.exception.field == "at"
    assert "timezone missing" in str(got.exception)
