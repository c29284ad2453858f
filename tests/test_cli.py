"""The ``tracker`` command line, end to end, as subprocesses on real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
from helpers import missing, wipe

from tracker import events
from tracker.cli import main
from tracker.projector import Projector
from tracker.publisher import Publisher
from tracker.query import Tracker
from tracker.store import keys
from tracker.store.connection import create_async_client
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
        first = watch.stdout.readline()  # it shows the working job before it ends
        assert "40%" in first and "busy" in first and "working" in first, first
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


# ------------------------------------- a password a server does not check (issue 10)

@contextlib.contextmanager
def private_redis(*args: str):
    """A redis-server of our own on a free port (so its auth config is ours to choose)."""
    binary = shutil.which("redis-server")
    if not binary:
        missing("redis-server not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_password_the_server_does_not_check_is_warned_about_once(env):
    pw = "unchecked-" + uuid.uuid4().hex[:8]
    with private_redis() as port:
        e = {**env, "TRACKER_REDIS_URL": f"redis://:{pw}@127.0.0.1:{port}/0"}
        r = run(e, "emit", "enqueued", "pw1", "--track")
        assert r.returncode == 0 and ENTRY_ID.fullmatch(r.stdout.strip()), r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "no password set" in lines[0], r.stderr
        assert f"127.0.0.1:{port}" in lines[0] and pw not in r.stderr + r.stdout
        # a daemon opens a connection per partition thread: still one warning
        r = run(e, "project", "--once")
        assert r.returncode == 0 and r.stdout.startswith("folded 1 events"), r.stderr
        assert r.stderr.count("no password set") == 1 and pw not in r.stderr
        # no password given: nothing to warn about
        r = run({**env, "TRACKER_REDIS_URL": f"redis://127.0.0.1:{port}/0"}, "get", "pw1")
        assert r.returncode == 0 and r.stderr == "" and '"state":"enqueued"' in r.stdout


def test_a_password_the_server_checks_is_not_warned_about(env):
    pw = "checked-" + uuid.uuid4().hex[:8]
    with private_redis("--requirepass", pw) as port:
        r = run({**env, "TRACKER_REDIS_URL": f"redis://:{pw}@127.0.0.1:{port}/0"},
                "emit", "enqueued", "pw2", "--track")
        assert r.returncode == 0 and r.stderr == "", r.stderr
        r = run({**env, "TRACKER_REDIS_URL": f"redis://:wrong-{pw}@127.0.0.1:{port}/0"},
                "get", "pw2")
        one_line_error(r, 1, "refused the credentials")
        assert pw not in r.stderr + r.stdout


def test_the_asyncio_client_warns_too(caplog):
    pw = "async-" + uuid.uuid4().hex[:8]

    async def ping(url):
        client = create_async_client(Settings(redis_url=url))
        try:
            return await client.ping()
        finally:
            await client.aclose()

    with private_redis() as port:
        with caplog.at_level(logging.WARNING, logger="tracker"):
            assert asyncio.run(ping(f"redis://:{pw}@127.0.0.1:{port}/0"))
    warned = [r.getMessage() for r in caplog.records if "no password set" in r.getMessage()]
    assert len(warned) == 1 and pw not in warned[0]


# ------------------------------------------- set: examples that work, no empty SET (issue 10)

def test_set_with_no_field_is_a_usage_error_naming_the_fields(env, d):
    r = run(env, "set", "J")
    err = one_line_error(r, 2, "--percent", "--desc", "--reserve-until")
    assert "nothing to set" in err and r.stdout == ""
    assert total_xlen(d) == 0


STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def test_the_reserve_until_examples_are_accepted(env, d):
    ok(env, "emit", "enqueued", "ex", "--track")
    ok(env, "emit", "working", "ex", "--reserve-for", "60")
    shown = STAMP.findall(ok(env, "set", "--help"))
    assert len(shown) == 1, "set --help gives one example time"
    assert ok(env, "set", "ex", "--reserve-until", shown[0]) == "OK\n"
    r = run(env, "set", "ex", "--reserve-until", "tomorrow")
    err = one_line_error(r, 2, "reserve_until")
    shown = STAMP.findall(err)
    assert len(shown) == 1, err
    assert ok(env, "set", "ex", "--reserve-until", shown[0]) == "OK\n"


@pytest.mark.parametrize("value", ["2030-01-01T00:00:00", "2030-01-01 00:00:00.5"])
def test_a_time_without_a_timezone_says_so(env, d, value):
    r = run(env, "set", "J", "--reserve-until", value)
    err = one_line_error(r, 2, "reserve_until", "timezone missing")
    assert "Z" in err and total_xlen(d) == 0


# ------------------------------------------------ the daemon's rate lines (issue 10)

REPORT = re.compile(r"folded (\d+) events in ([\d.]+)s \(([\d.,]+)/s\), (\d+) in total; ")


def test_projector_rate_lines_give_each_interval_its_own_rate(d, caplog):
    """A trickle of events (about one per 2 s report): the rate is the interval's,
    with enough digits that 1 event in 2 s reads 0.5/s, never 0/s."""
    proj = Projector(d, consumer="rate")
    pub = Publisher(d)
    daemon = threading.Thread(target=proj.run, kwargs={"report_every": 2.0}, daemon=True)
    with caplog.at_level(logging.INFO, logger="tracker.projector"):
        daemon.start()
        for i in range(2):
            pub.enqueued(f"rate{i}", custom={"track": 1})
            time.sleep(2.2)
        time.sleep(0.5)
        proj.stop()
        daemon.join(timeout=20)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("folded ")]
    assert lines, "no rate line"
    total = 0
    for line in lines:
        m = REPORT.match(line)
        assert m, line
        count, secs, rate, in_total = int(m[1]), float(m[2]), float(m[3].replace(",", "")), int(m[4])
        total += count
        assert in_total == total, line
        assert rate > 0 and abs(rate - count / secs) <= 0.06 * count / secs, line
    assert total == 2 == proj.totals.folded


def test_demo_says_why_jobs_are_unknown_and_why_a_bar_restarts(env):
    demo_prefix = env["TRACKER_PREFIX"] + "-demo"
    try:
        r = run(env, "demo", timeout=120)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        out = r.stdout
        final = [json.loads(x) for x in out.splitlines() if x.startswith("{")][-6:]
        unknown = [a["jid"] for a in final if a["state"] == "unknown"]
        assert len(unknown) == 2 and all(j.startswith(("thumbnail-", "email-")) for j in unknown)
        retried = [a["jid"] for a in final if a["jid"].startswith(("invoice-", "export-"))]
        tail = out[out.index("Final TRACK GET answers"):]
        why_unknown = next(x for x in tail.splitlines() if "'unknown'" in x)
        assert all(j in why_unknown for j in unknown) and '"track": 1' in why_unknown
        why_zero = next(x for x in tail.splitlines() if "0%" in x)
        assert all(j in why_zero for j in retried) and "retr" in why_zero
        # said up front too, and beside each job in the live view
        head = out[: out.index("Final TRACK GET answers")]
        assert "untracked" in head.split("\n\n")[0] and "0%" in head.split("\n\n")[0]
        assert any(unknown[0] in x and "untracked" in x for x in head.splitlines())
        assert any(retried[0] in x and "retry 1 of 1" in x for x in head.splitlines())
    finally:
        c = Deployment.open(Settings(redis_url=env["TRACKER_REDIS_URL"], prefix=demo_prefix))
        wipe(c)
        c.close()
