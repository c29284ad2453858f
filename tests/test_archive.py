"""export / import: an archive gives back the same log, in the same order."""

from __future__ import annotations

import io
import json
import uuid

import pytest
from click.testing import CliRunner
from helpers import cleanup

from tracker import archive, replay
from tracker.cli import cli
from tracker.errors import TrackerError, ValidationError
from tracker.projector import Projector
from tracker.publisher import Publisher
from tracker.query import Tracker
from tracker.store import keys
from tracker.store.deployment import Deployment
from tracker.store.settings import Settings
from tracker.times import id_key


def log_of(d):
    return [[(eid, fields) for eid, fields in d.client.xrange(keys.stream(d.prefix, p))]
            for p in range(d.partitions)]


@pytest.fixture
def other(deployment):
    """A second, empty deployment on the same backend."""
    prefix = "t" + uuid.uuid4().hex[:12]
    s = Settings(redis_url=deployment.settings.redis_url, prefix=prefix, partitions=4)
    d = Deployment.open(s, client=deployment.client, check_version=False)
    yield d
    cleanup(d.client, prefix)


def fill(d):
    pub = Publisher(d)
    for i in range(40):
        jid = f"a{i}"
        pub.enqueued(jid, {"track": 1}, queue="q")
        pub.working(jid)
        Tracker(d).set(jid, percent=i, desc="d\u00e9j\u00e0")
        (pub.success if i % 3 else pub.failed)(jid)
    d.client.xadd(keys.stream(d.prefix, 1), {"t": "nope", "x": b"\xff\xfe"})  # poison, not UTF-8


def test_import_export_roundtrip(deployment, other):
    fill(deployment)
    buf = io.StringIO()
    n = archive.export(deployment, buf)
    assert n == 161
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert [x["id"] for x in lines] == sorted((x["id"] for x in lines),
                                              key=id_key)  # one timeline
    buf.seek(0)
    assert archive.import_(other, buf)._asdict() == {"imported": 161, "renumbered": 0}
    assert log_of(other) == log_of(deployment)
    with pytest.raises(TrackerError, match="empty deployment"):
        archive.import_(other, io.StringIO(buf.getvalue()))
    # Folding the restored log gives the same tracks.
    Projector(deployment, consumer="c").drain()
    replay.rebuild(other)
    jids = [f"a{i}" for i in range(40)]
    assert Tracker(other).get_many(jids) == Tracker(deployment).get_many(jids)


def test_export_filters(deployment):
    fill(deployment)
    Projector(deployment, consumer="c").drain()
    buf = io.StringIO()
    assert archive.export(deployment, buf, jid="a7") == 4
    assert [json.loads(x)["fields"]["t"] for x in buf.getvalue().splitlines()] == [
        "enqueued", "working", "trackset", "success"]
    every = [json.loads(x) for x in _export(deployment).splitlines()]
    mid = every[80]["id"]
    ms = int(mid.split("-")[0])
    since = [json.loads(x) for x in _export(deployment, since_ms=ms).splitlines()]
    until = [json.loads(x) for x in _export(deployment, until_ms=ms - 1).splitlines()]
    assert until + since == every


def _export(d, **kw):
    buf = io.StringIO()
    archive.export(d, buf, **kw)
    return buf.getvalue()


def test_cli_export_import(real_deployment, real_redis_url, tmp_path):
    fill(real_deployment)
    path = tmp_path / "log.jsonl"
    runner = CliRunner()
    base = ["--redis-url", real_redis_url]
    out = runner.invoke(cli, base + ["--prefix", real_deployment.prefix, "export", "-o", str(path)])
    assert out.exit_code == 0, out.output
    target = "t" + uuid.uuid4().hex[:12]
    try:
        out = runner.invoke(cli, base + ["--prefix", target, "--partitions", "2", "import", str(path)])
        assert out.exit_code == 0 and "imported 161 entries" in out.output, out.output
        d = Deployment.open(Settings(redis_url=real_redis_url, prefix=target))
        def by_jid(dep):
            out = {}
            for part in log_of(dep):
                for eid, f in part:
                    out.setdefault(f.get(b"j"), []).append((eid.split(b"-")[0], f))
            return out
        # 2 partitions instead of 4: each job's events in the same order, same times (an
        # ID two source partitions shared gets the next sequence number of its ms).
        assert by_jid(d) == by_jid(real_deployment)
    finally:
        cleanup(real_deployment.client, target)


def test_cli_export_since_later_than_until_is_an_error(real_deployment, real_redis_url, tmp_path):
    fill(real_deployment)
    path = tmp_path / "none.jsonl"
    runner = CliRunner()
    base = ["--redis-url", real_redis_url, "--prefix", real_deployment.prefix, "export"]
    got = runner.invoke(cli, base + ["--since", "-1h", "--until", "-2h", "-o", str(path)])
    assert isinstance(got.exception, ValidationError), got.output
    assert got.exception.field == "since" and "later than --until" in str(got.exception)
    assert got.exception.exit_code == 2 and not (path.exists() and path.read_text())
    # an empty window the right way round is not an error, and neither is since == until
    for window in (["--since", "-2h", "--until", "-1h"], ["--since", "now", "--until", "now"]):
        got = runner.invoke(cli, base + window + ["-o", str(path)])
        assert got.exit_code == 0, got.output
