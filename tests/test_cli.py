"""The ``tracker`` command line, end to end, as subprocesses on real Redis."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid

import pytest
from helpers import wipe

from tracker import events
from tracker.cli import main
from tracker.projector import Projector
from tracker.publisher import Publisher
from tracker.query import Tracker
from tracker.store import keys
from tracker.store.deployment import Deployment
from tracker.store.settings import Settings

TRACKER = [sys.executable, "-c", "import sys; sys.argv[0] = 'tracker'; "
           "from tracker.cli import main; main()"]
SECRET_URL = "redis://user:s3cret@127.0.0.1:1/0"
ENTRY_ID = re.compile(r"\A\d+-\d+\Z")
RFC3339_UTC = re.compile(r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\Z")


@pytest.fixture
def env(real_redis_url):
    prefix = "tcli" + uuid.uuid4().hex[:10]
    e = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    e.update(TRACKER_REDIS_URL=real_redis_url, TRACKER_PREFIX=prefix, TRACKER_PARTITIONS="4")
    yield e
    d = Deployment.open(Settings(redis_url=real_redis_url, prefix=prefix))
    wipe(d)
    d.close()


@pytest.fixture
def d(env):
    dep = Deployment.open(Settings(redis_url=env["TRACKER_REDIS_URL"],
                                   prefix=env["TRACKER_PREFIX"], partitions=4))
    yield dep
    dep.close()


def run(env, *args, timeout=30, **kw):
    return subprocess.run(TRACKER + list(args), env=env, capture_output=True, text=True,
                          timeout=timeout, **kw)


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def inproc(env, capsys, monkeypatch, *args) -> Result:
    """``tracker.cli.main()`` in this process (fast), with the same argv/env contract."""

    for k in [k for k in os.environ if k.startswith("TRACKER_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        if k.startswith("TRACKER_"):
            monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "argv", ["tracker", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return Result(e.value.code, out.out, out.err)


def ok(env, *args) -> str:
    r = run(env, *args)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    return r.stdout


def total_xlen(d) -> int:
    return sum(d.client.xlen(keys.stream(d.prefix, p)) for p in range(d.partitions))


def one_line_error(r, code: int, *words: str) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in r.stderr
    assert err and len(err.splitlines()) == 1 or r.returncode == 2 and "Usage:" in err, err
    for w in words:
        assert w in err, (w, err)
    return err


# ----------------------------------------------------------------- the happy path

def test_emit_set_project_get_round_trip(env, d):
    assert ENTRY_ID.fullmatch(ok(env, "emit", "enqueued", "job1", "--track", "--queue", "q",
                                 "--jobtype", "Report", "--reserve-for", "600").strip())
    assert ENTRY_ID.fullmatch(ok(env, "emit", "enqueued", "job2", "--custom",
                                 '{"track": true, "x": 1}').strip())
    ok(env, "emit", "enqueued", "plain", "--custom", '{"track": 0}')
    ok(env, "emit", "working", "job1", "--reserve-for", "600")
    assert ok(env, "set", "job1", "--percent", "12", "--desc", "Calculating...") == "OK\n"
    assert ok(env, "set", "job2", "--desc", "queued") == "OK\n"
    out = ok(env, "project", "--once")
    assert re.match(r"folded 6 events, dead-lettered 0 in ", out)

    lines = ok(env, "get", "job1", "job2", "plain", "never").splitlines()
    answers = [json.loads(line) for line in lines]
    assert len(answers) == 4
    a1 = answers[0]
    assert list(a1) == ["jid", "percent", "desc", "state", "updated_at"]
    assert a1 | {"updated_at": ""} == {"jid": "job1", "percent": 12, "desc": "Calculating...",
                                       "state": "working", "updated_at": ""}
    assert RFC3339_UTC.fullmatch(a1["updated_at"])
    assert answers[1]["state"] == "enqueued" and answers[1]["desc"] == "queued"
    assert list(answers[1]) == ["jid", "desc", "state", "updated_at"]
    for a, jid in zip(answers[2:], ["plain", "never"]):
        assert a == {"jid": jid, "state": "unknown", "updated_at": ""}
        assert list(a) == ["jid", "state", "updated_at"]

    ok(env, "emit", "failed", "job1", "--errtype", "IOError", "--message", "disk full")
    ok(env, "emit", "enqueued", "job1", "--track")
    ok(env, "emit", "working", "job1")
    ok(env, "emit", "success", "job1")
    ok(env, "emit", "dead", "job2", "--errtype", "E", "--message", "gave up")
    totals = json.loads(ok(env, "project", "--once", "--json"))
    assert totals["folded"] == 5 and totals["dead_lettered"] == 0 and totals["entries"] == 5
    a1, a2 = (json.loads(x) for x in ok(env, "get", "job1", "job2").splitlines())
    assert (a1["state"], a1["percent"], a1["desc"]) == ("success", 12, "Calculating...")
    assert (a2["state"], a2["desc"]) == ("dead", "queued")


def test_set_accepts_rfc3339_reserve_until(env, d):
    ok(env, "emit", "enqueued", "r", "--track")
    ok(env, "emit", "working", "r", "--reserve-for", "60")
    soon = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 7200))
    assert ok(env, "set", "r", "--reserve-until", soon) == "OK\n"
    ok(env, "project", "--once")
    assert Tracker(d).reserved_until("r").strftime("%Y-%m-%dT%H:%M:%SZ") == soon


def test_status(env, d):
    with Publisher(d).batch() as b:
        for i in range(5):
            b.enqueued(f"s{i}", custom={"track": 1})
    st = json.loads(ok(env, "status", "--json"))
    rows = st["partitions"]
    assert len(rows) == 4 and sum(r["length"] for r in rows) == 5
    assert "s3cret" not in json.dumps(st)
    ok(env, "project", "--once")
    st = json.loads(ok(env, "status", "--json"))
    assert all(r["lag"] == 0 and r["pending"] == 0 for r in st["partitions"])
    assert sum(r["folded"] for r in st["partitions"]) == 5
    text = ok(env, "status")
    assert env["TRACKER_PREFIX"] in text and "4 partitions" in text


@pytest.mark.parametrize("end,code", [("success", 0), ("failed", 3), ("dead", 3)])
def test_watch_exits_when_the_job_finishes(env, d, end, code):
    pub = Publisher(d)
    pub.enqueued("w", custom={"track": 1})
    pub.working("w")
    pub.publish(events.make_trackset("w", percent=40, desc="busy"))
    Projector(d).drain()
    watch = subprocess.Popen(TRACKER + ["watch", "w", "--interval", "0.1"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = watch.stdout.readline()  # it has started (~0.5 s idle, seconds when loaded)
        assert watch.poll() is None  # still following a working job
        getattr(pub, end)("w")
        Projector(d).drain()
        out, err = watch.communicate(timeout=15)
        out = first + out
    finally:
        if watch.poll() is None:
            watch.kill()
    assert watch.returncode == code, err
    assert "40%" in out and "busy" in out and "working" in out
    assert out.strip().splitlines()[-1].split()[2] == end
    assert "Traceback" not in err


def test_watch_of_an_unknown_job_exits_4(env):
    r = run(env, "watch", "nobody", "--interval", "0.1")
    assert r.returncode == 4 and "unknown" in r.stdout


# ------------------------------------------------------------------ bad input

BAD = [
    (("set", "j", "--percent", "150"), "percent"),
    (("set", "j", "--percent", "-3"), "percent"),
    (("set", "j", "--percent", "abc"), "percent"),
    (("set", "j", "--desc", "x" * 1001), "desc"),
    (("set", "j", "--reserve-until", "tomorrow"), "reserve_until"),
    (("set", "j", "--reserve-until", "2030-01-01T00:00:00"), "reserve_until"),
    (("set", "a b", "--percent", "1"), "jid"),
    (("set", "", "--percent", "1"), "jid"),
    (("emit", "enqueued", "j", "--custom", "{bad"), "custom"),
    (("emit", "enqueued", "j", "--custom", "[1]"), "custom"),
    (("emit", "enqueued", "j", "--reserve-for", "-1"), "reserve_for"),
    (("emit", "enqueued", "j", "--reserve-for", "soon"), "reserve-for"),
    (("emit", "enqueued", "j" * 129, "--track"), "jid"),
    (("emit", "working", "a b"), "jid"),
    (("emit", "success", "tab\tjid"), "jid"),
    (("emit", "bogus", "j"), "bogus"),
    (("emit", "enqueued"), "JID"),
    (("get", "a b"), "jid"),
    (("get",), "JID"),
    (("set", "j", "--nope", "1"), "--nope"),
    (("--partitions", "0", "get", "j"), "partitions"),
    (("--ttl", "0", "get", "j"), "ttl"),
    (("--prefix", "bad prefix", "get", "j"), "prefix"),
]


@pytest.mark.parametrize("args,field", BAD, ids=[" ".join(a)[:40] for a, _ in BAD])
def test_bad_input_exits_2_naming_the_field_and_appends_nothing(env, d, capsys, monkeypatch,
                                                                args, field):
    r = inproc(env, capsys, monkeypatch, *args)
    one_line_error(r, 2, field)
    assert r.stdout == ""
    assert total_xlen(d) == 0


@pytest.mark.parametrize("args,field", [BAD[0], BAD[8], BAD[17]])
def test_bad_input_exit_status_of_the_process(env, d, args, field):
    r = run(env, *args)
    one_line_error(r, 2, field)
    assert total_xlen(d) == 0


# ---------------------------------------------------------- Redis unreachable

@pytest.mark.parametrize("args", [("get", "j"), ("emit", "enqueued", "j", "--track"),
                                  ("set", "j", "--percent", "5"), ("project", "--once"),
                                  ("status",)])
def test_unreachable_redis_exits_1_naming_the_url_without_password(env, capsys, monkeypatch,
                                                                  args):
    e = {**env, "TRACKER_REDIS_URL": SECRET_URL}
    r = run(e, *args) if args[0] == "get" else inproc(e, capsys, monkeypatch, *args)
    err = one_line_error(r, 1, "127.0.0.1:1")
    assert "s3cret" not in r.stdout + r.stderr
    assert err.startswith("tracker: error:")


def test_unreachable_redis_url_flag(env):
    e = {k: v for k, v in env.items() if k != "TRACKER_REDIS_URL"}
    r = run(e, "--redis-url", SECRET_URL, "get", "j")
    one_line_error(r, 1, "127.0.0.1:1")
    assert "s3cret" not in r.stdout + r.stderr


def test_project_daemon_with_redis_down_at_start_says_so(env):
    r = run({**env, "TRACKER_REDIS_URL": SECRET_URL}, "project")
    one_line_error(r, 1, "127.0.0.1:1")
    assert "s3cret" not in r.stdout + r.stderr


@pytest.mark.parametrize("args", [("--help",), ("project", "--help"), ("get", "--help"),
                                  ("emit", "enqueued", "--help")])
def test_help_never_shows_a_password(env, capsys, monkeypatch, args):
    e = {**env, "TRACKER_REDIS_URL": SECRET_URL}
    r = run(e, *args) if len(args) == 1 else inproc(e, capsys, monkeypatch, *args)
    assert r.returncode == 0
    assert "Usage:" in r.stdout
    assert "s3cret" not in r.stdout + r.stderr


def test_a_bad_url_scheme_is_a_usage_error_without_the_password(env):
    r = run({**env, "TRACKER_REDIS_URL": "http://user:s3cret@127.0.0.1:6379"}, "get", "j")
    one_line_error(r, 2, "redis-url")
    assert "s3cret" not in r.stdout + r.stderr
