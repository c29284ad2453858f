"""Least privilege: three Redis ACL users, each enough for its role and no more.

Against the suite's real Redis (TRACKER_REDIS_URL, else the embedded one); users are
named after the test's prefix and deleted at the end. For each role: it works with
exactly the listed rules; it fails cleanly (TrackerError: one line, exit code 1,
no password) with any one rule taken away; it cannot do what other roles do.
The README's least-privilege section lists the same rules.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid

import pytest
import redis
from helpers import Raw, Running, acl_roles, acl_users, cleanup

from tracker import retention
from tracker.errors import TrackerError
from tracker.history import history
from tracker.projector import Projector
from tracker.query import Tracker
from tracker.store.deployment import Deployment
from tracker.store.scripts import source
from tracker.store.settings import Settings

URL = ""  # the suite's real Redis (conftest's real_redis_url), set by the fixture below


@pytest.fixture(scope="module", autouse=True)
def _real_url(real_redis_url):
    """Every test here talks to the suite's real Redis: TRACKER_REDIS_URL, else the embedded
    one (a unix socket), as a new user's `pytest` gets."""
    global URL
    URL = real_redis_url


def roles(p: str) -> dict[str, list[str]]:
    return acl_roles(p)


@pytest.fixture(scope="module")
def env(_real_url):
    admin = redis.Redis.from_url(URL)
    p = "tacl" + uuid.uuid4().hex[:8]
    # An admin creates the deployment (config hash, groups) before the roles use it.
    d = Deployment.open(Settings(redis_url=URL, prefix=p, partitions=2))
    Projector(d, consumer="admin").drain()
    with acl_users(URL, p) as user:
        yield p, user, user.password, admin
    cleanup(d.client, p)
    d.close()
    admin.close()


def open_as(url: str, p: str) -> Deployment:
    return Deployment.open(Settings(redis_url=url, prefix=p))


def produce(url, p, jid="J1"):
    d = open_as(url, p)
    try:
        Tracker(d).publisher.enqueued(jid, custom={"track": 1})
        # A desc this long puts the job's value in an overflow string (GET, SET).
        Tracker(d).set(jid, percent=40, desc="half way there, " * 4)
    finally:
        d.close()


def project(url, p):
    d = open_as(url, p)
    try:
        # claim_idle 0: a step that failed half-way left its entries pending (a script
        # error does not roll back XREADGROUP); take them back at once.
        Projector(d, consumer="acl", claim_idle_ms=0).drain()
        retention.trim(d, 7 * 86_400_000)
        retention.sweep_all(d)  # the projector's Keeper does both
    finally:
        d.close()


def read(url, p):
    d = open_as(url, p)
    try:
        got = Tracker(d).get("J1")
        h = history(d, "J1")
        listed = Tracker(d).list_tracks("enqueued").tracks
        assert [a["jid"] for a in listed] == ["J1"]
        return got, h
    finally:
        d.close()


ACTIONS = {"producer": produce, "projector": project, "reader": read}


def test_each_role_works_with_exactly_its_rules(env):
    p, user, _, admin = env
    r = roles(p)
    produce(user("producer", r["producer"]), p)
    project(user("projector", r["projector"]), p)
    admin.script_flush()  # the reader must cope with an empty script cache
    got, h = read(user("reader", r["reader"]), p)
    assert got["state"] == "enqueued" and got["percent"] == 40
    assert len(h.entries if hasattr(h, "entries") else h.events) >= 2


@pytest.mark.parametrize("role", ["producer", "projector", "reader"])
def test_each_role_fails_cleanly_with_any_rule_less(env, role):
    p, user, password, admin = env
    admin_d = Deployment.open(Settings(redis_url=URL, prefix=p))
    stale = Tracker(Deployment.open(Settings(redis_url=URL, prefix=p, read="stale")))
    full = roles(p)[role]
    for i, rule in enumerate(full):
        if rule == "+hello":
            continue  # redis-py falls back when HELLO is refused: not a right it needs
        if role == "projector" and rule in ("+xautoclaim", "+xgroup|delconsumer",
                                            "+script|exists", "+xread", "+hdel", "+del",
                                            "+pexpireat", "+pexpire", "+zrevrangebyscore",
                                            "+zrange"):
            continue  # foreign reader, daemon, pipelines, a field or a track dropped, a
            # bucket's expiry (moved once an hour), a bucket or index page split: rare paths
        if role == "reader" and rule in ("+multi", "+exec"):
            continue  # speed only: reads fall back to get.lua (tests/test_direct.py)
        admin.script_flush()
        pub = Tracker(admin_d).publisher  # fresh work for the projector: the re-enqueue
        pub.enqueued("J1", custom={"track": 1})  # drops the reservation (HDEL) ...
        pub.working("J1")
        # End in another state than the stored one, so its state index entry moves (read
        # stale: a folding read would fold what a failed round left pending).
        if stale.get("J1")["state"] != "success":
            pub.success("J1")
        admin.xadd(f"{{{p}:0}}:log", {"t": "bogus"})  # ... and a dead letter to write
        if role == "reader":  # a reader cannot fold: with the log folded, it need not wait
            Projector(admin_d, consumer="acl-admin").drain()
        url = user(role, full[:i] + full[i + 1:])
        try:
            ACTIONS[role](url, p)
        except TrackerError as e:
            info = pytest.ExceptionInfo.from_exception(e)
        else:
            pytest.fail(f"{role} still works without {rule}")
        text = str(info.value)
        assert getattr(info.value, "exit_code", 1) == 1, (rule, text)
        assert "\n" not in text and password not in text, (rule, text)
        assert any(w in text for w in ("permission", "can't run", "can't access")), (rule, text)


def test_roles_cannot_do_each_others_work(env):
    p, user, _, _ = env
    r = roles(p)
    prod = redis.Redis.from_url(user("producer", r["producer"]))
    reader = redis.Redis.from_url(user("reader", r["reader"]))
    proj = redis.Redis.from_url(user("projector", r["projector"]))
    denied = [
        lambda: prod.xrange(f"{{{p}:0}}:log"),  # a producer cannot read the log
        lambda: prod.hgetall(f"{{{p}:0}}:b:0"),  # ... nor the snapshots
        lambda: prod.xadd(f"{{{p}:0}}:dlq", {"x": 1}),  # ... nor write anything but logs
        lambda: prod.xadd("{other:0}:log", {"x": 1}),  # ... of its own deployment
        lambda: prod.delete(f"{{{p}:0}}:log"),
        lambda: reader.xadd(f"{{{p}:0}}:log", {"t": "success", "j": "J1"}),
        lambda: reader.hset(f"{{{p}:0}}:b:0", "J1", "dead"),
        lambda: reader.set(f"{{{p}:0}}:v:J1", "dead"),
        lambda: reader.eval("return 1", 0),  # no scripts of its own
        lambda: reader.xreadgroup("projector", "evil", {f"{{{p}:0}}:log": ">"}),
        lambda: proj.hgetall("{other:0}:b:0"),  # another deployment's keys
        lambda: proj.flushdb(),
        lambda: proj.config_get("*"),
        lambda: proj.acl_list(),
        lambda: proj.keys("*"),
    ]
    for _i, call in enumerate(denied):
        with pytest.raises(redis.exceptions.NoPermissionError):
            call()
    # A reader running the projector's script by SHA gets nothing done either.

    sha = proj.script_load(source("project"))
    with pytest.raises(redis.ResponseError, match="permission|can't run"):
        reader.evalsha(sha, 3, f"{{{p}:0}}:log", f"{{{p}:0}}:dlq", f"{{{p}:0}}:stats",
                       "projector", "evil", 10, f"{{{p}:0}}:b:", 1, 1, 1, 1, 1, 1, 1, 1, 1,
                       1, 1, 1, 1, 1, 1)
    for c in (prod, reader, proj):
        c.close()


def _cli(url, p, *args):
    return subprocess.run(["tracker", "--redis-url", url, "--prefix", p, *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_roles_and_clean_failures(env):
    p, user, password, _ = env
    r = roles(p)
    prod, reader = user("producer", r["producer"]), user("reader", r["reader"])
    ok = [_cli(prod, p, "emit", "enqueued", "J2", "--track"),
          _cli(user("projector", r["projector"]), p, "project", "--once"),
          _cli(reader, p, "get", "J2")]
    for res in ok:
        assert res.returncode == 0, res.stderr
    assert '"state":"enqueued"' in ok[2].stdout
    bad = [_cli(reader, p, "emit", "success", "J2"),  # a reader cannot publish
           _cli(prod, p, "get", "J2"),  # a producer cannot read
           _cli(prod, p, "project", "--once"),
           _cli(prod.replace(password, "wrong-" + password[:6]), p, "get", "J2")]
    for res in bad:
        assert res.returncode == 1, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tracker: error:"), res.stderr
        assert "Traceback" not in res.stderr and password not in res.stderr + res.stdout


def test_password_never_printed(env):
    p, user, password, _ = env
    url = user("projector", roles(p)["projector"])
    e = {**os.environ, "TRACKER_REDIS_URL": url, "TRACKER_PREFIX": p}
    for args in (["--help"], ["project", "--help"], ["serve", "--help"], ["get", "J1"],
                 ["--redis-url", url.replace("redis://", "redis+bogus://"), "status"],
                 ["--redis-url", url.replace("6379", "1"), "status"]):
        res = subprocess.run(["tracker", *args], env=e, capture_output=True, text=True,
                             timeout=60)
        assert password not in res.stdout + res.stderr, args
        assert "Traceback" not in res.stderr, args
    # The daemon's log lines, through a connection kill and its reconnect.
    proc = subprocess.Popen(["tracker", "-v", "project", "--claim-idle", "100"], env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(2.5)
    admin = redis.Redis.from_url(URL)
    admin.client_kill_filter(user=url.split("//")[1].split(":")[0])
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert "projecting 2 partitions" in out and "***" in out
    assert password not in out and "Traceback" not in out


def test_status_without_rights_fails_cleanly(env):
    p, user, password, _ = env
    res = _cli(user("producer", roles(p)["producer"]), p, "status")
    assert res.returncode == 1 and "Traceback" not in res.stderr


def test_serve_works_with_the_serve_role(env):
    """The README's plain `tracker serve` user (the reader's rules and XADD): TRACK SET is
    appended, and TRACK GET answers it once the projector has folded it."""
    p, user, _, admin = env
    Tracker(Deployment.open(Settings(redis_url=URL, prefix=p))).publisher.enqueued(
        "S1", custom={"track": 1})
    d = open_as(user("serve"), p)
    server = Running(d)
    c = Raw(server.port)
    try:
        assert c.hello() == b"+OK"
        c.send(b'TRACK SET {"jid":"S1","percent":64,"desc":"acl"}\r\n')
        assert c.reply() == b"+OK"
        Projector(Deployment.open(Settings(redis_url=URL, prefix=p)), consumer="admin").drain()
        got = json.loads(_get(c, b"S1"))
        assert (got["state"], got["percent"], got["desc"]) == ("enqueued", 64, "acl")
    finally:
        c.close()
        server.stop()
        d.close()


def _get(c, jid: bytes) -> bytes:
    c.send(b"TRACK GET " + jid + b"\r\n")
    return c.reply()
