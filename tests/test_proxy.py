"""``tracker serve --upstream``: the Faktory proxy, against a scripted Faktory 1.10.

The upstream is ``tests/fake_faktory.py`` (the exact replies of a real Faktory
1.10.0); the clients are raw sockets, PyPI ``pyfaktory`` (producer and consumer)
and npm ``faktory-worker`` (tests/js/worker.js). Proxies run in-process on their
own loop in a thread, against real Redis. ``test_real_faktory`` uses a real
Faktory server when ``TRACKER_FAKTORY_BIN`` names its binary (CI has none).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest
from fake_faktory import FakeFaktory, pwdhash
from helpers import JS, Running, acl_users, cleanup, missing, read_log
from pyfaktory import Client, Producer
from pyfaktory.models import Job

from tracker import events
from tracker.projector import Projector
from tracker.query import Tracker
from tracker.server.fwp import Limits
from tracker.server.proxy import ProxyServer, Upstream
from tracker.store import keys
from tracker.store.deployment import Deployment
from tracker.store.settings import Settings

PASSWORD = "s3cret pass"


# ----------------------------------------------------------------- harness
class Proxy(Running):
    """A ProxyServer on its own loop in a daemon thread."""

    def __init__(self, d: Deployment, upstream: str, ca_file=None, **limits):
        lim = dict(handshake_timeout=1.0, idle_timeout=None)
        lim.update(limits)
        super().__init__(d, server=ProxyServer(d.settings, d.partitions, Limits(**lim),
                                               Upstream.parse(upstream, ca_file)))

    def settle(self) -> None:
        """Wait until every event the proxy queued is appended."""
        out = self.server.outbox
        deadline = time.monotonic() + 5
        while (out.running or out.ops) and time.monotonic() < deadline:
            time.sleep(0.002)


class Wire:
    """A raw socket speaking the protocol by hand."""

    def __init__(self, port: int, timeout: float = 5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError(self.buf)
        self.buf += chunk

    def raw(self) -> bytes:
        """One reply, exactly as sent (terminator included)."""
        while b"\r\n" not in self.buf:
            self._fill()
        end = self.buf.index(b"\r\n") + 2
        if self.buf.startswith(b"$") and not self.buf.startswith(b"$-"):
            end += int(self.buf[1:end - 2]) + 2
            while len(self.buf) < end:
                self._fill()
        out, self.buf = self.buf[:end], self.buf[end:]
        return out

    def line(self) -> bytes:
        return self.raw()[:-2]

    def reply(self) -> bytes:
        r = self.raw()
        return r[r.index(b"\n") + 1:-2] if r.startswith(b"$") and not r.startswith(b"$-") \
            else r[:-2]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.reply()

    def hello(self, password=None, wid=None) -> bytes:
        hi = json.loads(self.line()[4:])
        payload: dict = {"hostname": "wire", "v": 2}
        if wid:
            payload["wid"] = wid
        if password is not None:
            payload["pwdhash"] = pwdhash(password, hi["s"], hi["i"])
        self.send(b"HELLO " + json.dumps(payload).encode() + b"\r\n")
        return self.line()

    def track(self, jid: str) -> dict:
        return json.loads(self.cmd(b"TRACK GET " + jid.encode()))

    def closed(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
            return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def job(jid: str, track=True, **fields) -> bytes:
    j = {"jid": jid, "jobtype": "Report", "args": [1], "queue": "q", "retry": 3, **fields}
    if track and "custom" not in fields:
        j["custom"] = {"track": 1}
    return json.dumps(j).encode()


def new_jid(tag: str = "j") -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}"


RUNNING: list[Proxy] = []  # the proxies of the test now running


def settle() -> None:
    """Every proxy has appended the events it queued (replies reach the client first)."""
    for p in RUNNING:
        p.settle()


def logged(d: Deployment, jid: str | None = None) -> list[tuple[str, dict]]:
    """The events in the log (of one JID), in order, as (type, fields without jid)."""
    settle()
    entries, _ = read_log(d)
    out = []
    for _at, ev in sorted(entries, key=lambda e: e[0]):
        if jid is None or ev.jid == jid:
            f = events.encode_entry(ev)
            out.append((f.pop("t"), {k: v for k, v in f.items() if k != "j"}))
    return out


def kinds(d: Deployment, jid: str) -> list[str]:
    return [t for t, _ in logged(d, jid)]


def drain(d: Deployment) -> None:
    settle()
    Projector(d, consumer="test-proxy").drain()


@pytest.fixture
def fake():
    f = FakeFaktory(fetch_wait=0.3)
    yield f
    f.close()


@pytest.fixture
def fake_pw():
    f = FakeFaktory(password=PASSWORD, fetch_wait=0.3)
    yield f
    f.close()


@pytest.fixture
def proxied(real_deployment):
    made = []

    def start(upstream: FakeFaktory | str, **limits) -> Proxy:
        url = upstream if isinstance(upstream, str) else f"tcp://127.0.0.1:{upstream.port}"
        p = Proxy(real_deployment, url, **limits)
        made.append(p)
        RUNNING.append(p)
        return p

    yield start
    RUNNING.clear()
    for p in made:
        p.stop()


# ------------------------------------------------------ handshake and auth
def test_greeting_is_relayed_verbatim(fake, fake_pw, proxied):
    for f in (fake, fake_pw):
        c = Wire(proxied(f).port)
        got = c.raw()
        assert got == f.greetings[-1]
        assert got == b'+HI {"v":2}\r\n' if f is fake else re.fullmatch(
            rb'\+HI \{"v":2,"i":\d+,"s":"[0-9a-f]+"\}\r\n', got)


def test_password_is_the_upstreams(fake_pw, proxied, real_deployment):
    port = proxied(fake_pw).port
    c = Wire(port)
    assert c.hello(PASSWORD) == b"+OK"
    assert c.track("someone")["state"] == "unknown"
    bad = Wire(port)
    assert bad.hello("wrong") == b"-ERR Invalid password"
    assert bad.closed()
    nohash = Wire(port)
    assert nohash.hello() == b"-ERR Invalid password"
    assert nohash.closed()
    assert c.track("still-here")["jid"] == "still-here"  # the others go on


def test_track_before_the_upstreams_ok_is_refused(fake, proxied):
    c = Wire(proxied(fake).port)
    c.line()
    c.send(b"TRACK GET x\r\n")
    assert c.line() == b"-ERR expected HELLO, got TRACK"
    assert c.closed()
    assert not [ln for ln in fake.lines if ln.startswith(b"TRACK")]


@pytest.mark.parametrize("hello,forwarded", [
    (b"HELLO notjson\r\n", False), (b"HELLO\r\n", False), (b"HELLO []\r\n", False),
    (b"FOO {}\r\n", False), (b'HELLO  {"v":2}\r\n', True), (b"\x00\xff garbage\n", False),
])
def test_garbage_hello_gets_an_error_and_a_close(fake, proxied, hello, forwarded):
    port = proxied(fake).port
    c = Wire(port)
    c.line()
    c.send(hello)
    reply = c.line()
    if forwarded:  # valid JSON but not Faktory's literal "HELLO {": Faktory closes silently
        assert reply == b"-ERR the Faktory server closed the connection"
        assert hello in fake.lines
    else:
        assert reply.startswith(b"-ERR ") and (b"HELLO" in reply), reply
        assert hello not in fake.lines
    assert c.closed()
    ok = Wire(port)
    assert ok.hello() == b"+OK"


# ------------------------------------------------------------ forwarding
def test_commands_and_replies_pass_byte_for_byte(fake, proxied):
    c = Wire(proxied(fake).port)
    assert c.hello(wid="wid-bytes-1") == b"+OK"
    start = len(fake.lines)
    cmds = [b"PUSH " + job("jid-bytes-01", track=False) + b"\n",
            b'PUSH {"jid":"short","jobtype":"T","args":[]}\r\n',
            b"PUSHB [" + job("jid-bytes-02") + b"," + job("bad") + b"]\r\n",
            b"FETCH nothing q\r\n", b"FETCH empty\r\n", b'ACK {"jid":"never-existed-1"}\r\n',
            b'FAIL {"jid":"never-existed-2","message":"x"}\r\n', b'BEAT {"wid":"wid-bytes-1"}\r\n',
            b'BEAT {"wid":"nobody"}\r\n', b"BATCH NEW {}\r\n", b"push {}\r\n", b"\r\n",
            b"FOO bar baz\n", b'MUTATE {"cmd":"explode","target":"dead"}\r\n']
    c.send(b"".join(cmds))  # pipelined, in one write
    replies = [c.raw() for _ in cmds]
    assert fake.lines[start:] == cmds
    body = json.loads(replies[3][replies[3].index(b"\n") + 1:])
    assert body["jid"] == "jid-bytes-01" and body["queue"] == "q"
    assert replies[:3] == [b"+OK\r\n", b"-ERR jobs must have a reasonable jid parameter\r\n",
                           b'$51\r\n{"bad":"jobs must have a reasonable jid parameter"}\r\n']
    assert replies[4:] == [
        b"$-1\r\n", b"+OK\r\n", b"-ERR Job not found never-existed-2\r\n", b"+OK\r\n",
        b"-ERR unknown worker nobody\r\n",
        b"-ERR batch subsystem is only available in Faktory Enterprise\r\n",
        b"-ERR unknown command push\r\n", b"-ERR unknown command \r\n",
        b"-ERR unknown command FOO\r\n", b"-ERR unknown mutate operation\r\n"]


def test_end_closes_without_a_reply(fake, proxied):
    c = Wire(proxied(fake).port)
    c.hello()
    c.send(b"END\r\nINFO\r\n")
    assert c.closed()
    assert c.buf == b""
    assert fake.sent(b"END") and not fake.sent(b"INFO")


def test_track_waits_for_the_replies_before_it(fake, proxied, real_deployment):
    c = Wire(proxied(fake).port)
    c.hello()
    jid = new_jid()
    fake.hold(b"FETCH", 0.3)  # the FETCH's reply comes late; the TRACK must not overtake it
    c.send(b"PUSH " + job(jid) + b"\r\nFETCH q\r\nTRACK GET " + jid.encode() + b"\r\n"
           b'TRACK SET {"jid":"%s","percent":5}\r\nACK {"jid":"%s"}\r\n' % (jid.encode(),
                                                                            jid.encode()))
    assert c.line() == b"+OK"
    assert json.loads(c.reply())["jid"] == jid
    assert json.loads(c.reply())["jid"] == jid  # the TRACK GET, third
    assert c.line() == b"+OK"
    assert c.line() == b"+OK"
    assert kinds(real_deployment, jid) == ["enqueued", "working", "trackset", "success"]


def test_track_get_waits_for_the_events_of_earlier_commands(fake, proxied, real_deployment):
    p = proxied(fake)
    srv = p.server
    seen = []
    original = srv.tracker.get_future

    def spy(jid):  # at the moment the read goes to Redis: is anything still unsent?
        seen.append((srv.outbox.barrier() is None, srv.outbox.appended))
        return original(jid)

    srv.tracker.get_future = spy
    c = Wire(p.port)
    c.hello()
    jid = new_jid()
    c.send(b"PUSH " + job(jid) + b"\r\nTRACK GET " + jid.encode() + b"\r\n")
    assert c.line() == b"+OK"
    got = json.loads(c.reply())
    assert seen == [(True, 1)]  # the enqueued was appended before the read
    assert got["state"] == "enqueued"  # and the read folds the log up to it
    c.send(b"FETCH q\r\nTRACK GET " + jid.encode() + b"\r\n")
    c.reply()
    assert json.loads(c.reply())["state"] == "working"


def test_track_set_through_the_proxy(fake, proxied, real_deployment):
    c = Wire(proxied(fake).port)
    c.hello()
    jid = new_jid()
    assert c.cmd(b"PUSH " + job(jid)) == b"+OK"
    assert c.cmd(b'TRACK SET {"jid":"%s","percent":40,"desc":"forty"}' % jid.encode()) == b"+OK"
    assert c.cmd(b'TRACK SET {"jid":"%s","percent":140}' % jid.encode()).startswith(
        b"-ERR percent: ")
    assert c.cmd(b"TRACK SET") == b"-ERR payload: expected a JSON object after TRACK SET"
    assert c.cmd(b"TRACK DEL x").startswith(b"-ERR TRACK: expected GET or SET")
    assert c.cmd(b"TRACK GET a b").startswith(b"-ERR jid: ")
    drain(real_deployment)
    got = c.track(jid)
    assert (got["state"], got["percent"], got["desc"]) == ("enqueued", 40, "forty")
    assert kinds(real_deployment, jid) == ["enqueued", "trackset"]
    assert not fake.sent(b"TRACK")


# ----------------------------------------------------------------- events
def test_a_tracked_jobs_life_is_published(fake, proxied, real_deployment):
    d = real_deployment
    c = Wire(proxied(fake).port)
    c.hello()
    jid = new_jid()
    assert c.cmd(b"PUSH " + job(jid, reserve_for=600, jobtype="Mail")) == b"+OK"
    assert json.loads(c.cmd(b"FETCH q"))["jid"] == jid
    assert c.cmd(b'ACK {"jid":"%s"}' % jid.encode()) == b"+OK"
    drain(d)
    assert c.track(jid)["state"] == "success"
    assert logged(d, jid) == [("enqueued", {"k": 1, "q": "q", "y": "Mail", "r": 600}),
                              ("working", {"r": 600}), ("success", {})]


def test_untracked_and_refused_commands_publish_nothing(fake, proxied, real_deployment):
    c = Wire(proxied(fake).port)
    c.hello()
    plain = new_jid()
    for line, reply in [
        (b"PUSH " + job(plain, track=False), b"+OK"),
        (b"FETCH q", None),
        (b'ACK {"jid":"%s"}' % plain.encode(), b"+OK"),
        (b"PUSH " + job("short"), b"-ERR jobs must have a reasonable jid parameter"),
        (b'PUSH {"jid":"jid-notype-1","args":[],"custom":{"track":1}}',
         b"-ERR jobs must have a jobtype parameter"),
        (b"PUSH " + job("jid-toolong-1", reserve_for=90000),
         b"-ERR jobs cannot be reserved for more than one day"),
        (b"PUSH " + job("jid-bad-at-1", at="tomorrow"), None),
        (b"PUSH " + job("jid-custom-0", custom={"track": 0}), b"+OK"),
        (b"PUSH " + job("jid-custom-s", custom={"track": "1"}), b"+OK"),
        (b"PUSHB [{", b"-ERR invalid JSON: unexpected end of JSON input"),
        (b'FAIL {"jid":"never-fetched-1","message":"x"}', b"-ERR Job not found never-fetched-1"),
        (b'ACK {"jid":"never-fetched-2"}', b"+OK"),
        (b"FETCH empty", b"$-1"),
    ]:
        got = c.cmd(line)
        if reply is not None:
            assert got == reply, line
    settle()
    assert [(ev.jid, type(ev).__name__) for _, ev in read_log(real_deployment)[0]] == []


def test_pushb_publishes_only_the_accepted_jobs(fake, proxied, real_deployment):
    c = Wire(proxied(fake).port)
    c.hello()
    good, untracked = new_jid("good"), new_jid("plain")
    batch = [job(good, queue="qb"), job(untracked, track=False), job("short"),
             job("jid-b-notype", jobtype=None), job("jid-b-toolong", reserve_for=100000)]
    reply = c.cmd(b"PUSHB [" + b",".join(batch) + b"]")
    assert json.loads(reply) == {
        "jid-b-notype": "jobs must have a jobtype parameter",
        "jid-b-toolong": "jobs cannot be reserved for more than one day",
        "short": "jobs must have a reasonable jid parameter"}
    assert c.cmd(b"PUSHB []") == b"{}"
    assert c.cmd(b"PUSHB {}").startswith(b"-ERR invalid JSON: json: cannot unmarshal object")
    settle()
    assert [(ev.jid, type(ev).__name__) for _, ev in read_log(real_deployment)[0]] == \
        [(good, "Enqueued")]


def fail_once(c: Wire, jid: str) -> None:
    assert json.loads(c.cmd(b"FETCH q"))["jid"] == jid
    assert c.cmd(b'FAIL {"jid":"%s","errtype":"IOError","message":"disk full"}'
                 % jid.encode()) == b"+OK"


def requeue(c: Wire, jid: str) -> None:
    assert c.cmd(b'MUTATE {"cmd":"requeue","target":"retries","filter":{"jids":["%s"]}}'
                 % jid.encode()) == b"+OK"


@pytest.mark.parametrize("retry,states", [
    (None, ["failed", "failed", "failed"]),  # absent: 25
    (25, ["failed", "failed", "failed"]),
    (2, ["failed", "failed", "dead"]),
    (1, ["failed", "dead"]),
    (0, ["dead"]),  # Faktory discards it: never runs again
    (-1, ["dead"]),  # straight to the dead set
])
def test_fail_is_failed_or_dead_by_faktorys_retry_rule(fake, proxied, real_deployment, retry,
                                                       states):
    d = real_deployment
    c = Wire(proxied(fake).port)
    c.hello()
    jid = new_jid()
    fields = {} if retry is None else {"retry": retry}
    body = json.loads(job(jid, **fields))
    if retry is None:
        del body["retry"]
    assert c.cmd(b"PUSH " + json.dumps(body).encode()) == b"+OK"
    got = []
    for i, _ in enumerate(states):
        if i:
            requeue(c, jid)
        fail_once(c, jid)
        drain(d)
        got.append(c.track(jid)["state"])
    assert got == states
    where = fake.dead if states[-1] == "dead" and retry != 0 else fake.retries
    assert jid in where or retry == 0
    failures = [f for t, f in logged(d, jid) if t in ("failed", "dead")]
    assert failures[-1] == {"e": "IOError", "m": "disk full"}
    assert kinds(d, jid)[:3] == ["enqueued", "working", states[0]]
    if len(states) > 1:  # the requeued job's FETCH carries `failure`: enqueued, then working
        assert kinds(d, jid)[3:6] == ["enqueued", "working", states[1]]


def test_fail_payload_is_stored_as_faktory_stores_it(fake, proxied, real_deployment):
    c = Wire(proxied(fake).port)
    c.hello()
    jid = new_jid()
    c.cmd(b"PUSH " + job(jid))
    c.cmd(b"FETCH q")
    assert c.cmd(b'FAIL {"jid":"%s","errtype":"  ","message":"%s"}'
                 % (jid.encode(), b"m" * 1500)) == b"+OK"
    settle()
    (t, f), = [e for e in logged(real_deployment, jid) if e[0] == "failed"]
    assert f == {"e": "unknown", "m": "m" * 1000}


def test_ack_and_fail_on_other_connections_and_other_proxies(fake, proxied, real_deployment):
    d = real_deployment
    one, two = proxied(fake), proxied(fake)
    a, b, x = Wire(one.port), Wire(one.port), Wire(two.port)
    for c in (a, b, x):
        c.hello()
    j1, j2, j3 = new_jid("x1"), new_jid("x2"), new_jid("x3")
    for jid in (j1, j2, j3):
        a.cmd(b"PUSH " + job(jid, reserve_for=120))
        a.cmd(b"FETCH q")
    one.settle()
    key = keys.fetched(d.prefix, d.partition(j1), j1)
    assert d.client.get(key) == b"3 0"  # retry 3, count 0 at its first failure
    assert 120 < d.client.pttl(key) / 1000 <= 135  # the reservation (+ the reaper's 15 s)
    assert b.cmd(b'ACK {"jid":"%s"}' % j1.encode()) == b"+OK"  # same proxy, other connection
    assert x.cmd(b'ACK {"jid":"%s"}' % j2.encode()) == b"+OK"  # another proxy: from Redis
    assert x.cmd(b'FAIL {"jid":"%s","message":"x"}' % j3.encode()) == b"+OK"
    assert x.cmd(b'ACK {"jid":"%s"}' % j2.encode()) == b"+OK"  # twice: published once
    settle()
    assert d.client.get(key) is None
    assert kinds(d, j1) == ["enqueued", "working", "success"]
    assert kinds(d, j2) == ["enqueued", "working", "success"]
    assert kinds(d, j3) == ["enqueued", "working", "failed"]


def test_fetch_seen_before_its_push_reply_keeps_the_order(fake, proxied, real_deployment):
    p = proxied(fake)
    producer, worker = Wire(p.port), Wire(p.port)
    producer.hello()
    worker.hello()
    jid = new_jid()
    fake.hold(b"PUSH", 0.4)  # the PUSH is done, its +OK is late: the FETCH sees it first
    producer.send(b"PUSH " + job(jid) + b"\r\n")
    settle()
    assert json.loads(worker.cmd(b"FETCH q"))["jid"] == jid
    assert producer.line() == b"+OK"
    assert kinds(real_deployment, jid) == ["enqueued", "working"]


def test_a_scheduled_job_is_enqueued_then_working_when_fetched(fake, proxied, real_deployment):
    c = Wire(proxied(fake).port)
    c.hello()
    jid = new_jid()
    soon = time.strftime("%Y-%m-%dT%H:%M:%S.900000Z", time.gmtime(time.time() + 1))
    assert c.cmd(b"PUSH " + job(jid, at=soon)) == b"+OK"
    drain(real_deployment)
    assert c.track(jid)["state"] == "enqueued"
    deadline = time.monotonic() + 5
    while c.cmd(b"FETCH q") == b"$-1" and time.monotonic() < deadline:
        pass
    drain(real_deployment)
    assert c.track(jid)["state"] == "working"
    assert kinds(real_deployment, jid) == ["enqueued", "enqueued", "working"]


def test_client_gone_before_the_reply_still_publishes(fake, proxied, real_deployment):
    p = proxied(fake)
    c = Wire(p.port)
    c.hello()
    jid = new_jid()
    c.cmd(b"PUSH " + job(jid))
    c.cmd(b"FETCH q")
    fake.hold(b"ACK", 0.3)
    c.send(b'ACK {"jid":"%s"}\r\n' % jid.encode())
    c.close()  # before the +OK
    time.sleep(0.6)
    assert kinds(real_deployment, jid) == ["enqueued", "working", "success"]


# ---------------------------------------------------------- hostile input
def test_line_over_the_limit_closes_both_sides(fake, proxied, real_deployment):
    port = proxied(fake, max_line=1024).port
    for data in (b"PUSH " + job(new_jid(), args=["a" * 2000]) + b"\r\n", b"INFO " + b"x" * 5000):
        c = Wire(port)
        c.hello()
        c.send(data)
        assert c.line() == b"-ERR line too long (max 1024 bytes)"
        assert c.closed()
    assert not fake.sent(b"PUSH")
    ok = Wire(port)
    ok.hello()
    assert ok.cmd(b"PUSH " + job(new_jid())) == b"+OK"


def test_a_long_line_within_the_limit_is_forwarded_whole(fake, proxied, real_deployment):
    c = Wire(proxied(fake).port)  # --max-line 1 MiB; the proxy buffers 256 KiB before pausing
    c.hello()
    jid = new_jid()
    line = b"PUSH " + job(jid, args=["y" * 900_000])
    for i in range(0, len(line), 100_000):  # dribbled in, as a slow link delivers it
        c.send(line[i:i + 100_000])
        time.sleep(0.01)
    c.send(b"\r\n")
    assert c.line() == b"+OK"
    assert fake.sent(b"PUSH") == [line + b"\r\n"]
    assert kinds(real_deployment, jid) == ["enqueued"]


def test_upstream_down_at_start_then_back(fake, proxied, real_deployment):
    fake.down()
    p = proxied(fake)
    c = Wire(p.port)
    assert c.line() == (b"-ERR tracker cannot reach the Faktory server at tcp://127.0.0.1:%d: "
                        b"connection refused" % fake.port)
    assert c.closed()
    fake.up()  # same port: the next client gets a fresh upstream connection
    ok = Wire(p.port)
    assert ok.hello() == b"+OK"
    assert ok.cmd(b"PUSH " + job(new_jid())) == b"+OK"


def test_upstream_closing_mid_reply(fake, proxied, real_deployment):
    p = proxied(fake)
    bystander = Wire(p.port)
    bystander.hello()
    c = Wire(p.port)
    c.hello()
    jid = new_jid()
    assert c.cmd(b"PUSH " + job(jid)) == b"+OK"
    fake.cut(b"FETCH")  # half the job's bytes, then a close
    c.send(b"FETCH q\r\nTRACK GET " + jid.encode() + b"\r\n")
    assert c.raw() == b"-ERR the Faktory server closed the connection\r\n"
    assert c.closed()
    fake.drop(b"PUSH")  # and a PUSH that gets no reply at all
    d = Wire(p.port)
    d.hello()
    lost = new_jid()
    assert d.cmd(b"PUSH " + job(lost)) == b"-ERR the Faktory server closed the connection"
    assert d.closed()
    assert bystander.cmd(b'ACK {"jid":"x-bystander"}') == b"+OK"
    assert kinds(real_deployment, jid) == ["enqueued"]  # no working: its FETCH never completed
    assert kinds(real_deployment, lost) == []


def test_upstream_sending_garbage(proxied, real_deployment):
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def serve():
        while True:  # the proxy's start-up probe first, then the client's connection
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.sendall(b'+HI {"v":2}\r\n')
            conn.recv(1000)
            conn.sendall(b"*1\r\n$4\r\nPING\r\n")  # RESP, not Faktory

    threading.Thread(target=serve, daemon=True).start()
    c = Wire(proxied(f"tcp://127.0.0.1:{port}").port)
    c.line()
    c.send(b"HELLO {}\r\n")
    assert c.line() == b"-ERR tracker got an invalid reply from the Faktory server"
    assert c.closed()
    srv.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    openssl = shutil.which("openssl")
    if not openssl:
        missing("openssl is not installed")
    d = tmp_path_factory.mktemp("proxy-tls")
    run = lambda *a: subprocess.run(a, cwd=d, check=True, capture_output=True)  # noqa: E731
    run(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
        "/CN=tracker-proxy-test-ca", "-keyout", "ca.key", "-out", "ca.crt")
    run(openssl, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", "server.key", "-out", "server.csr")
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run(openssl, "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-extfile", "ext", "-out", "server.crt")
    return d


def test_tls_upstream(certs, real_deployment):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs / "server.crt", certs / "server.key")
    f = FakeFaktory(password=PASSWORD, fetch_wait=0.3, tls=ctx)
    made = []
    try:
        url = f"tcp+tls://:x@127.0.0.1:{f.port}"
        good = Proxy(real_deployment, url, ca_file=str(certs / "ca.crt"))
        made.append(good)
        c = Wire(good.port)
        assert c.hello(PASSWORD) == b"+OK"
        assert c.cmd(b"PUSH " + job(new_jid())) == b"+OK"
        untrusted = Proxy(real_deployment, url)  # the system's CAs do not know this one
        made.append(untrusted)
        bad = Wire(untrusted.port)
        assert bad.line().startswith(
            b"-ERR tracker cannot reach the Faktory server at tcp+tls://127.0.0.1:%d: " % f.port)
        assert bad.closed()
    finally:
        for p in made:
            p.stop()
        f.close()


def test_max_connections(fake, proxied):
    port = proxied(fake, max_connections=2).port
    held = [Wire(port) for _ in range(2)]
    for c in held:
        assert c.hello() == b"+OK"
    extra = Wire(port)
    assert extra.line() == b"-ERR too many connections"
    assert extra.closed()


def test_backpressure_a_client_that_does_not_read(fake, proxied):
    p = proxied(fake, handshake_timeout=30)
    c = Wire(p.port)
    c.hello()
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.sock.settimeout(2)
    big = b"PUSH " + job(new_jid(), track=False, args=["x" * 800_000]) + b"\r\nFETCH q\r\n"
    try:
        c.send(big * 12)  # ~10 MB of FETCH replies that nobody reads
    except (TimeoutError, OSError):
        pass
    deadline = time.monotonic() + 30
    stalled = False
    while not stalled and time.monotonic() < deadline:
        time.sleep(0.05)
        stalled = any(conn.up is not None and not conn.up.transport.is_reading()
                      for conn in list(p.server.conns))
    assert stalled  # the proxy stopped reading Faktory for the client that does not read
    other = Wire(p.port, timeout=30)
    assert other.hello() == b"+OK"
    assert other.cmd(b"FETCH empty") == b"$-1"
    c.close()


# ------------------------------------------------------------------ CLI
def test_cli_serve_upstream_hides_the_password_and_stops_on_sigterm(fake_pw, real_redis_url,
                                                                    prefix):
    url = f"tcp://:{PASSWORD.replace(' ', '%20')}@127.0.0.1:{fake_pw.port}"
    base = [sys.executable, "-c", "from tracker.cli import main; main()", "--redis-url",
            real_redis_url, "--prefix", prefix, "serve", "--port", "0"]
    proc = subprocess.Popen(base + ["--upstream", url], stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stderr.readline(), proc.stderr.readline()]
        m = re.search(r"serving Faktory protocol on 127\.0\.0\.1:(\d+), forwarding to Faktory at "
                      r"tcp://127\.0\.0\.1:(\d+)", "".join(lines))
        assert m and int(m.group(2)) == fake_pw.port, lines
        assert f"Faktory at tcp://127.0.0.1:{fake_pw.port} answers" in lines[0]
        c = Wire(int(m.group(1)))
        assert c.hello(PASSWORD) == b"+OK"
        proc.send_signal(signal.SIGTERM)
        assert c.closed(5)
        assert proc.wait(10) == 0
        rest = proc.stderr.read()
        assert "stopped" in rest and "Traceback" not in rest
        assert "s3cret" not in "".join(lines) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
    for bad, why in [(["--upstream", "http://:s3cret@h:1"], "upstream: expected tcp://"),
                     (["--upstream", "tcp://:s3cret@h:99999"], "upstream: "),
                     (["--upstream", url, "--password", "x"], "password: not used with")]:
        done = subprocess.run(base + bad, capture_output=True, text=True, timeout=30)
        assert done.returncode == 2, done
        assert why in done.stderr and "s3cret" not in done.stderr + done.stdout
        assert len(done.stderr.strip().splitlines()) == 1
    d = Deployment.open(Settings(redis_url=real_redis_url, prefix=prefix))
    cleanup(d.client, prefix)
    d.close()


# ---------------------------------------------------------- real clients
@pytest.mark.parametrize("password", [None, PASSWORD], ids=["open", "password"])
def test_pyfaktory_producer_and_consumer(password, proxied, real_deployment):
    d = real_deployment
    f = FakeFaktory(password=password, fetch_wait=0.3)
    try:
        port = proxied(f).port
        url = f"tcp://{':' + password + '@' if password else ''}127.0.0.1:{port}"
        ok, boom = new_jid("py-ok"), new_jid("py-boom")
        with Client(faktory_url=url, role="producer") as pc:
            producer = Producer(client=pc)
            assert producer.push(Job(jid=ok, jobtype="Add", args=[1, 2], queue="py",
                                     custom={"track": 1}))
            assert producer.push(Job(jid=boom, jobtype="Boom", args=[], queue="py", retry=-1,
                                     custom={"track": True}))
        with Client(faktory_url=url, role="consumer", worker_id="py-worker-1",
                    beat_period=1) as cc:
            for _ in range(2):
                j = cc._fetch(["py"])
                if j["jobtype"] == "Add":
                    reply = cc._send_and_receive(
                        "TRACK SET " + json.dumps({"jid": j["jid"], "percent": 60,
                                                   "desc": "adding"}) + "\r\n")
                    assert reply == "+OK"
                    cc._ack(j["jid"])
                else:
                    cc._fail(j["jid"], "ZeroDivisionError", "division by zero", ["a.py:1"])
            drain(d)
            _, body = cc._send_and_receive(f"TRACK GET {ok}\r\n").split("\r\n")
            got = json.loads(body)
        assert (got["state"], got["percent"], got["desc"]) == ("success", 60, "adding")
        assert kinds(d, ok) == ["enqueued", "working", "trackset", "success"]
        assert logged(d, boom)[-1] == ("dead", {"e": "ZeroDivisionError",
                                                "m": "division by zero"})
    finally:
        f.close()


@pytest.mark.parametrize("password", [None, PASSWORD], ids=["open", "password"])
def test_node_worker_processes_jobs_through_the_proxy(node, password, proxied, real_deployment):
    d = real_deployment
    f = FakeFaktory(password=password, fetch_wait=0.3)
    try:
        port = proxied(f).port
        ok, boom = new_jid("node-ok"), new_jid("node-boom")
        done = subprocess.run([node, str(JS / "worker.js"), str(port), password or "-",
                               "nodeq", ok, boom], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        f.close()
    assert out["ran"] == sorted([ok, boom])
    assert out["failed"] == {"jid": boom, "error": "boom from node"}
    assert out["during"]["jid"] == ok
    drain(d)
    got = Tracker(d).get(ok)
    assert (got["state"], got["percent"], got["desc"]) == ("success", 50, "half way")
    assert kinds(d, ok) == ["enqueued", "working", "trackset", "success"]
    assert Tracker(d).get(boom)["state"] == "failed"  # retry 1: one retry left
    # faktory-worker sends errtype `${e.code}`: "undefined" for a plain Error
    assert logged(d, boom)[-1] == ("failed", {"e": "undefined", "m": "boom from node"})
    assert out["after_push"]["state"] == "enqueued"  # read-your-writes through the proxy
    assert (out["during"]["state"], out["during"]["percent"]) == ("working", 50)
    assert out["after"]["state"] == "success"


# -------------------------------------------------------- a real Faktory
@pytest.fixture
def real_faktory():
    binary = os.environ.get("TRACKER_FAKTORY_BIN")
    if not binary:
        pytest.skip("TRACKER_FAKTORY_BIN is not set (a Faktory binary; CI has none)")
    if not shutil.which("redis-server"):
        missing("Faktory needs redis-server on PATH")
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "FAKTORY_PASSWORD"}
        env["FAKTORY_PASSWORD"] = PASSWORD
        proc = subprocess.Popen([binary, "-b", f"127.0.0.1:{ports[0]}", "-w",
                                 f"127.0.0.1:{ports[1]}", "-e", "development", "-d",
                                 f"{tmp}/db", "-c", f"{tmp}/conf"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", ports[0]), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.05)
            yield ports[0]
        finally:
            proc.terminate()
            proc.wait(10)


def test_real_faktory(real_faktory, proxied, real_deployment):
    """One tracked job's life through the proxy in front of a real Faktory 1.10."""
    d = real_deployment
    c = Wire(proxied(f"tcp://127.0.0.1:{real_faktory}").port)
    assert c.hello(PASSWORD) == b"+OK"
    jid = new_jid("real")
    states = []

    def step(line: bytes) -> bytes:
        reply = c.cmd(line)
        drain(d)
        states.append(c.track(jid)["state"])
        return reply

    assert step(b"PUSH " + job(jid, retry=2)) == b"+OK"
    assert json.loads(step(b"FETCH q"))["jid"] == jid
    assert step(b'TRACK SET {"jid":"%s","percent":40,"desc":"forty"}' % jid.encode()) == b"+OK"
    assert step(b'FAIL {"jid":"%s","errtype":"E","message":"first"}' % jid.encode()) == b"+OK"
    requeue(c, jid)
    fetched = json.loads(step(b"FETCH q"))
    assert fetched["failure"]["retry_count"] == 0
    assert step(b'ACK {"jid":"%s"}' % jid.encode()) == b"+OK"
    assert states == ["enqueued", "working", "working", "failed", "working", "success"]
    got = c.track(jid)
    assert (got["percent"], got["desc"]) == (40, "forty")
    assert c.cmd(b"TRACK GET") == b"-ERR jid: must not be empty"
    assert c.cmd(b"BATCH STATUS b-1") == \
        b"-ERR batch subsystem is only available in Faktory Enterprise"


# ------------------------------------------------------------ least privilege
def test_the_proxy_works_with_the_proxy_role(fake, real_redis_url, real_deployment):
    """The README's proxy user: PUSH, FETCH, TRACK SET and GET through a proxy that
    connects as it, and the ACK through another (which learns from Redis what the first
    saw fetched); the events reach the log and TRACK GET answers the fold."""
    d = real_deployment
    with acl_users(real_redis_url, d.prefix) as user:
        acl = Deployment.open(Settings(redis_url=user("proxy"), prefix=d.prefix))
        one, two = (Proxy(acl, f"tcp://127.0.0.1:{fake.port}") for _ in range(2))
        RUNNING.extend((one, two))
        try:
            c, other = Wire(one.port), Wire(two.port)
            assert c.hello() == b"+OK" and other.hello() == b"+OK"
            jid = new_jid("acl")
            assert c.cmd(b"PUSH " + job(jid)) == b"+OK"
            fetched = c.cmd(b"FETCH q")
            assert json.loads(fetched)["jid"] == jid, fetched
            assert c.cmd(b'TRACK SET {"jid":"%s","percent":30,"desc":"acl"}' % jid.encode()) \
                == b"+OK"
            drain(d)  # the proxy user cannot fold: a read waits for the projector
            assert c.track(jid)["percent"] == 30
            assert other.cmd(b'ACK {"jid":"%s"}' % jid.encode()) == b"+OK"
            drain(d)
            assert kinds(d, jid) == ["enqueued", "working", "trackset", "success"]
            done = other.track(jid)
            assert done["state"] == "success" and done["percent"] == 30, done
        finally:
            for p in (one, two):
                RUNNING.remove(p)
                p.stop()
            acl.close()
