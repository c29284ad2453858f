"""``tracker serve`` against clients nobody here wrote, raw sockets and hostile input.

The real clients are PyPI ``pyfaktory`` and ``faktory`` and the npm package
``faktory-worker`` (through tests/js/track.js; ``npm ci --prefix tests/js``).
Servers run in-process on a free port, each on its own event loop in a thread,
against real Redis; one test runs ``tracker serve`` as a subprocess for the CLI
wiring, the start-up log line and SIGTERM.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import signal
import socket
import subprocess
import sys
import time
import uuid

import faktory
import pytest
import redis.asyncio as aredis
from faktory.exceptions import FaktoryAuthenticationError
from helpers import JS, Raw, Running, cleanup
from pyfaktory import Client
from pyfaktory.util.exceptions import FaktroyWorkProtocolError
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tracker.aio import AsyncTracker
from tracker.projector import Projector
from tracker.publisher import Publisher
from tracker.query import Tracker
from tracker.server.fwp import pwdhash
from tracker.store.deployment import Deployment
from tracker.store.direct import AsyncDirect
from tracker.store.settings import Settings

PASSWORD = "s3cret pass"  # a space, as real passwords have


def serving(port: int, password=None) -> None:
    """A fresh client still gets through the handshake and a TRACK GET."""
    c = Raw(port)
    try:
        assert c.hello(password) == b"+OK"
        c.send(b"TRACK GET still-serving\r\n")
        assert json.loads(c.reply()) == {"jid": "still-serving", "state": "unknown",
                                         "updated_at": ""}
    finally:
        c.close()


@pytest.fixture
def served(real_deployment):
    """Factory: start a server for this test's deployment (stopped at teardown)."""
    made = []

    def start(password=None, **limits) -> Running:
        r = Running(real_deployment, password, **limits)
        made.append(r)
        return r

    yield start
    for r in made:
        r.stop()


def tracked(d: Deployment, jid: str) -> None:
    Publisher(d).enqueued(jid, {"track": 1}, queue="default", jobtype="Thing")


def drain(d: Deployment) -> None:
    Projector(d, consumer="test-server").drain()


# ------------------------------------------------------------ handshake
def test_greeting_without_password_is_exact(served):
    c = Raw(served().port)
    assert c.sock.recv(100) == b'+HI {"v":2}\r\n'


def test_greeting_with_password_has_iterations_and_salt_without_spaces(served):
    c = Raw(served(PASSWORD).port)
    greeting = c.line()
    assert re.fullmatch(rb'\+HI \{"v":2,"i":\d+,"s":"[0-9a-f]{16}"\}', greeting), greeting
    hi = json.loads(greeting[4:])
    assert hi["i"] >= 4096
    c.send(b'HELLO {"v":2,"pwdhash":"%s"}\r\n' % pwdhash(PASSWORD, hi["s"], hi["i"]).encode())
    assert c.line() == b"+OK"


def test_pwdhash_is_sha256_iterated_i_times():
    h = hashlib.sha256(b"pw" + b"salt").digest()
    for _ in range(2):
        h = hashlib.sha256(h).digest()
    assert pwdhash("pw", "salt", 3) == h.hex()
    assert pwdhash("pw", "salt", 1) == hashlib.sha256(b"pwsalt").hexdigest()


def test_each_connection_gets_a_fresh_salt(served):
    port = served(PASSWORD).port
    salts = {json.loads(Raw(port).line()[4:])["s"] for _ in range(3)}
    assert len(salts) == 3


@pytest.mark.parametrize("hasher", ["other-salt", "wrong-password", "missing", "iterations-1"])
def test_wrong_pwdhash_is_refused_and_closed(served, hasher):
    port = served(PASSWORD).port
    c = Raw(port)
    hi = json.loads(c.line()[4:])
    payload = {"hostname": "h", "v": 2}
    if hasher == "other-salt":
        payload["pwdhash"] = pwdhash(PASSWORD, "0" * 16, hi["i"])
    elif hasher == "wrong-password":
        payload["pwdhash"] = pwdhash("nope", hi["s"], hi["i"])
    elif hasher == "iterations-1":  # one round fewer than asked is not the single-round form
        payload["pwdhash"] = pwdhash(PASSWORD, hi["s"], hi["i"] - 1)
    c.send(b"HELLO " + json.dumps(payload).encode() + b"\r\n")
    assert c.line() == b"-ERR Invalid password"
    assert c.closed()
    serving(port, PASSWORD)


def test_single_round_pwdhash_of_the_pypi_faktory_client_is_accepted(served):
    c = Raw(served(PASSWORD).port)
    hi = json.loads(c.line()[4:])
    c.send(b'HELLO {"pwdhash":"%s"}\n' % pwdhash(PASSWORD, hi["s"], 1).encode())
    assert c.line() == b"+OK"


def test_commands_before_hello_are_refused(served):
    c = Raw(served().port)
    c.line()
    c.send(b"TRACK GET abc\r\n")
    assert c.line() == b"-ERR expected HELLO, got TRACK"
    assert c.closed()


# --------------------------------------------------------- TRACK commands
def test_bare_lf_lines_round_trip_through_the_projector(served, real_deployment):
    port = served().port
    tracked(real_deployment, "lf-1")
    c = Raw(port)
    assert c.hello(eol=b"\n") == b"+OK"
    c.send(b'TRACK SET {"jid":"lf-1","percent":40,"desc":"Ruby sends LF"}\n')
    assert c.line() == b"+OK"
    drain(real_deployment)
    c.send(b"TRACK GET lf-1\n")
    got = json.loads(c.reply())
    assert list(got) == ["jid", "percent", "desc", "state", "updated_at"]
    assert got["percent"] == 40 and got["desc"] == "Ruby sends LF" and got["state"] == "enqueued"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", got["updated_at"])
    c.send(b"TRACK GET lf-1\r\nTRACK GET never-seen\n")  # mixed endings, pipelined
    assert json.loads(c.reply())["percent"] == 40
    assert json.loads(c.reply())["state"] == "unknown"


def test_track_get_is_a_bulk_string_never_null(served):
    c = Raw(served().port)
    c.hello()
    c.send(b"TRACK GET nobody-home\r\n")
    body = b'{"jid":"nobody-home","state":"unknown","updated_at":""}'
    assert c.sock.recv(200) == b"$%d\r\n%s\r\n" % (len(body), body)


def test_track_set_bad_input_names_the_field_and_stores_nothing(served, real_deployment):
    c = Raw(served().port)
    c.hello()
    for payload, field in [(b'{"jid":"x","percent":150}', "percent"),
                           (b'{"jid":"x","percent":"12"}', "percent"),
                           (b'{"jid":"x","reserve_until":"soon"}', "reserve_until"),
                           (b'{"jid":"x","desc":"%s"}' % (b"d" * 1001), "desc"),
                           (b'{"jid":"x","colour":"red"}', "colour"),
                           (b'{"percent":5}', "jid"),
                           (b"not json", "payload")]:
        c.send(b"TRACK SET " + payload + b"\r\n")
        reply = c.line().decode()
        assert reply.startswith(f"-ERR {field}: "), (payload, reply)
    c.send(b"TRACK GET x\r\n")
    assert json.loads(c.reply())["state"] == "unknown"
    assert real_deployment.client.xlen(real_deployment.stream("x")) == 0


def test_unknown_verbs_are_refused_and_the_connection_goes_on(served):
    c = Raw(served().port)
    c.hello()
    for verb in (b"PUSH", b"FETCH", b"FLUSH", b"INFO", b"ACK", b"MUTATE"):
        c.send(verb + b' {"jid":"x"}\r\n')
        assert c.line() == b"-ERR unknown command " + verb
    c.send(b"BEAT {\"wid\":\"w1\"}\r\n")  # pyfaktory consumers heartbeat as soon as they connect
    assert c.line() == b"+OK"
    c.send(b"TRACK GET x\r\n")
    assert json.loads(c.reply())["state"] == "unknown"


def test_end_closes_the_connection(served):
    port = served().port
    c = Raw(port)
    c.hello()
    c.send(b"END\r\n")
    assert c.closed(2)
    serving(port)


def test_line_too_long_errors_and_closes(served):
    port = served(max_line=1024).port
    for data in (b"TRACK GET " + b"a" * 2000 + b"\r\n", b"TRACK SET " + b"b" * 5000):
        c = Raw(port)
        c.hello()
        c.send(data)
        assert c.line() == b"-ERR line too long (max 1024 bytes)"
        assert c.closed()
    serving(port)


def test_idle_connections_are_closed(served):
    port = served(idle_timeout=0.4).port
    c = Raw(port)
    c.hello()
    busy = Raw(port)
    busy.hello()
    start = time.monotonic()
    for _ in range(5):  # a client that keeps talking is not idle
        busy.send(b"TRACK GET x\r\n")
        busy.reply()
        time.sleep(0.15)
    assert c.line() == b"-ERR idle timeout"
    busy.send(b"TRACK GET x\r\n")  # at once: busy was active moments ago, well within 0.4 s
    assert json.loads(busy.reply())["state"] == "unknown"
    assert 0.4 <= time.monotonic() - start < 3
    assert c.closed()


def test_max_connections(served):
    port = served(max_connections=3).port
    held = [Raw(port) for _ in range(3)]
    for c in held:
        assert c.hello() == b"+OK"
    extra = Raw(port)
    assert extra.line() == b"-ERR too many connections"
    assert extra.closed()
    held.pop().close()
    time.sleep(0.1)
    serving(port)


def test_redis_outage_is_a_clean_error(served):
    r = served()
    c = Raw(r.port)
    c.hello()
    tracker = r.server.tracker
    good, good_direct = tracker.client, tracker.direct
    tracker.client = aredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1,
                                  retry=Retry(NoBackoff(), 0))  # a Redis that is not there
    tracker.direct = AsyncDirect(tracker.client, tracker.prefix)  # for both ways of reading
    try:
        c.send(b"TRACK GET x\r\n")
        assert c.line() == b"-ERR tracker cannot reach its Redis; try again"
        c.send(b'TRACK SET {"jid":"x","percent":1}\r\n')
        assert c.line() == b"-ERR tracker cannot reach its Redis; try again"
    finally:
        tracker.client, tracker.direct = good, good_direct
    c.send(b"TRACK GET x\r\n")
    assert json.loads(c.reply())["state"] == "unknown"


def test_stop_finishes_in_flight_commands_and_refuses_new_ones(served, real_deployment):
    r = served()
    c = Raw(r.port)
    c.hello()
    idle = Raw(r.port)
    idle.hello()
    tracker = r.server.tracker
    original = tracker.set_json

    async def slow(payload):
        await asyncio.sleep(0.5)
        return await original(payload)

    tracker.set_json = slow
    c.send(b'TRACK SET {"jid":"inflight","percent":7}\r\n')
    deadline = time.monotonic() + 5
    while r.server.inflight == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    r.server.stop()
    while not r.server.stopping and time.monotonic() < deadline:
        time.sleep(0.005)
    assert idle.closed(2)  # idle connections close at once
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", r.port), timeout=1)
    assert c.line() == b"+OK"  # the command in flight was finished ...
    assert c.closed(2)  # ... then the connection closed
    r.thread.join(5)
    assert not r.thread.is_alive()
    assert real_deployment.client.xlen(real_deployment.stream("inflight")) == 1


def test_cli_serve_logs_its_address_and_exits_cleanly_on_sigterm(real_redis_url, prefix):
    cmd = [sys.executable, "-c", "from tracker.cli import main; main()", "--redis-url",
           real_redis_url, "--prefix", prefix, "serve", "--port", "0", "--password", PASSWORD]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        m = re.search(r"serving Faktory protocol on 127\.0\.0\.1:(\d+)", line)
        assert m, line
        port = int(m.group(1))
        c = Raw(port)
        assert c.hello(PASSWORD) == b"+OK"
        proc.send_signal(signal.SIGTERM)
        assert c.closed(5)
        assert proc.wait(10) == 0
        rest = proc.stderr.read()
        assert "stopped" in rest and "Traceback" not in rest and PASSWORD not in line + rest
    finally:
        if proc.poll() is None:
            proc.kill()
        d = Deployment.open(Settings(redis_url=real_redis_url, prefix=prefix))
        cleanup(d.client, prefix)
        d.close()


def test_cli_serve_on_a_taken_port_says_so_once(real_redis_url, prefix):
    """A failed bind is one error line and exit 1, not a 'stopped' before it."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        cmd = [sys.executable, "-c", "from tracker.cli import main; main()", "--redis-url",
               real_redis_url, "--prefix", prefix, "serve", "--port", str(taken.getsockname()[1])]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "cannot listen on 127.0.0.1:" in lines[0], lines
    finally:
        taken.close()
        d = Deployment.open(Settings(redis_url=real_redis_url, prefix=prefix))
        cleanup(d.client, prefix)
        d.close()


# ---------------------------------------------------------- real clients
@pytest.mark.parametrize("password", [None, PASSWORD], ids=["open", "password"])
@pytest.mark.parametrize("role", ["producer", "consumer"])
def test_pyfaktory_round_trip(served, real_deployment, password, role):

    port = served(password).port
    auth = f":{password}@" if password else ""
    url = f"tcp://{auth}127.0.0.1:{port}"
    jid = f"py-{role}-{uuid.uuid4().hex[:8]}"
    tracked(real_deployment, jid)
    # a consumer sends BEAT from its own thread at once; the server must answer it
    c = Client(faktory_url=url, role=role, worker_id="worker-12345678", beat_period=5)
    c.connect()
    try:
        ok = c._send_and_receive(f'TRACK SET {json.dumps({"jid": jid, "percent": 55, "desc": "py"})}'
                                 "\r\n")
        assert ok == "+OK"
        bad = c._send_and_receive(f'TRACK SET {json.dumps({"jid": jid, "percent": 150})}\r\n')
        assert bad.startswith("-ERR percent:")
        drain(real_deployment)
        reply = c._send_and_receive(f"TRACK GET {jid}\r\n")
        n, body = reply.split("\r\n")
        got = json.loads(body)
        assert int(n[1:]) == len(body.encode())
        assert (got["jid"], got["percent"], got["desc"], got["state"]) == (jid, 55, "py",
                                                                              "enqueued")
        _, body = c._send_and_receive("TRACK GET py-never-seen\r\n").split("\r\n")
        assert json.loads(body) == {"jid": "py-never-seen", "state": "unknown", "updated_at": ""}
    finally:
        c.disconnect()
    if password:
        wrong = Client(faktory_url=f"tcp://:wrong@127.0.0.1:{port}", role=role,
                       worker_id="worker-12345678")
        with pytest.raises(FaktroyWorkProtocolError, match="Invalid password"):
            wrong.connect()


@pytest.mark.parametrize("password", [None, PASSWORD], ids=["open", "password"])
def test_pypi_faktory_round_trip(served, real_deployment, password):

    port = served(password).port
    auth = f":{password}@" if password else ""
    jid = f"fk-{uuid.uuid4().hex[:8]}"
    tracked(real_deployment, jid)
    with faktory.connection(f"tcp://{auth}127.0.0.1:{port}") as client:
        conn = client.faktory
        conn.reply("TRACK SET", json.dumps({"jid": jid, "percent": 0, "desc": None}))
        assert next(conn.get_message()) == "OK"
        conn.reply("TRACK SET", json.dumps({"jid": jid, "reserve_until": "yesterday"}))
        assert next(conn.get_message()).startswith("ERR reserve_until:")
        drain(real_deployment)
        conn.reply("TRACK GET", jid)
        got = json.loads(next(conn.get_message()))
        assert (got["jid"], got["percent"], got["state"]) == (jid, 0, "enqueued")
        assert "desc" not in got
        conn.reply("TRACK GET", "fk-never-seen")
        assert json.loads(next(conn.get_message()))["state"] == "unknown"
    if password:
        with pytest.raises(FaktoryAuthenticationError):
            faktory.Client(f"tcp://:wrong@127.0.0.1:{port}").connect()


def _node(node, port, password, mode, jid) -> dict:
    done = subprocess.run([node, str(JS / "track.js"), str(port), password or "-", mode, jid],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("password", [None, PASSWORD], ids=["open", "password"])
def test_node_faktory_worker_round_trip(node, served, real_deployment, password):
    port = served(password).port
    jid = f"node-{uuid.uuid4().hex[:8]}"
    tracked(real_deployment, jid)
    out = _node(node, port, password, "set", jid)
    assert out["set"] == "OK"
    assert out["bad"].startswith("ERR percent:"), out
    assert out["unknown"] == {"jid": f"node-never-{jid}", "state": "unknown", "updated_at": ""}
    if password:
        assert "Invalid password" in out["wrong_password"], out
    drain(real_deployment)
    got = _node(node, port, password, "get", jid)["get"]
    assert (got["jid"], got["percent"], got["desc"], got["state"]) == (jid, 33, "from node",
                                                                          "enqueued")


def test_node_faktory_worker_reads_its_own_track_set(node, served, real_deployment):
    """TRACK SET then TRACK GET on one connection answers with the SET (no projector)."""
    port = served().port
    jid = f"node-rw-{uuid.uuid4().hex[:8]}"
    tracked(real_deployment, jid)
    got = _node(node, port, None, "setget", jid)
    assert got["set"] == "OK"
    assert (got["get"]["percent"], got["get"]["desc"], got["get"]["state"]) == (
        12, "Calculating...", "enqueued")


# ---------------------------------------------------------- hostile input
# Each case: server ("open" or "pw"), bytes to send after the greeting (a HELLO
# first when hello=True), the first reply expected (a regex, or None for none),
# and whether the server must close. After each case the server must still serve.
def _big_hello():
    return b'HELLO {"hostname":"' + b"h" * (10 * 1024 * 1024) + b'"}\r\n'


HOSTILE = [
    # before HELLO
    ("junk-line", "open", False, b"GARBAGE\r\n", rb"-ERR expected HELLO, got GARBAGE", True),
    ("track-before-hello", "open", False, b"TRACK GET x\r\n", rb"-ERR expected HELLO", True),
    ("end-before-hello", "open", False, b"END\r\n", rb"-ERR expected HELLO, got END", True),
    ("hello-no-json", "open", False, b"HELLO\r\n", rb"-ERR Invalid HELLO: expected a JSON", True),
    ("hello-not-json", "open", False, b"HELLO hi there\r\n", rb"-ERR Invalid HELLO", True),
    ("hello-array", "open", False, b"HELLO []\r\n", rb"-ERR Invalid HELLO", True),
    ("hello-null", "open", False, b"HELLO null\r\n", rb"-ERR Invalid HELLO", True),
    ("hello-truncated", "open", False, b'HELLO {"v":2\r\n', rb"-ERR Invalid HELLO", True),
    ("hello-v-string", "open", False, b'HELLO {"v":"2"}\r\n', rb"-ERR Invalid HELLO: v: ", True),
    ("hello-v-old", "open", False, b'HELLO {"v":1}\r\n', rb"-ERR Invalid HELLO: protocol", True),
    ("hello-pid-string", "open", False, b'HELLO {"pid":"x"}\r\n', rb"-ERR Invalid HELLO: pid", True),
    ("hello-labels-string", "open", False, b'HELLO {"labels":"a"}\r\n', rb"-ERR Invalid HELLO", True),
    ("hello-10MB", "open", False, _big_hello(), rb"-ERR line too long", True),
    ("binary-before-hello", "open", False, bytes(range(256)) + b"\n", rb"-ERR expected HELLO", True),
    ("nul-before-hello", "open", False, b"\x00\x00\x00\n", rb"-ERR expected HELLO", True),
    ("10MB-no-newline", "open", False, b"x" * (10 * 1024 * 1024), rb"-ERR line too long", True),
    ("nothing-sent", "open", False, b"", rb"-ERR handshake timeout", True),
    ("blank-lines-only", "open", False, b"\r\n\n\r\n", rb"-ERR handshake timeout", True),
    ("partial-hello", "open", False, b'HELLO {"v":', rb"-ERR handshake timeout", True),
    ("lone-cr", "open", False, b"HELLO {}\r", rb"-ERR handshake timeout", True),
    ("tls-client-hello", "open", False, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n",
     rb"-ERR expected HELLO", True),
    ("http-request", "open", False, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", rb"-ERR expected HELLO, got GET", True),
    ("resp-array", "open", False, b"*1\r\n$4\r\nPING\r\n", rb"-ERR expected HELLO", True),
    # password server
    ("pw-no-pwdhash", "pw", False, b'HELLO {"v":2}\r\n', rb"-ERR Invalid password", True),
    ("pw-wrong-pwdhash", "pw", False, b'HELLO {"pwdhash":"' + b"0" * 64 + b'"}\r\n',
     rb"-ERR Invalid password", True),
    ("pw-pwdhash-number", "pw", False, b'HELLO {"pwdhash":12}\r\n', rb"-ERR Invalid HELLO: pwdhash", True),
    ("pw-pwdhash-huge", "pw", False, b'HELLO {"pwdhash":"' + b"a" * 100_000 + b'"}\r\n',
     rb"-ERR Invalid password", True),
    ("pw-pwdhash-unicode", "pw", False, 'HELLO {"pwdhash":"ü☃"}\r\n'.encode(), rb"-ERR Invalid password", True),
    ("pw-plain-password", "pw", False, b'HELLO {"pwdhash":"%s"}\r\n' % PASSWORD.encode(),
     rb"-ERR Invalid password", True),
    # after HELLO: errors that leave the connection usable
    ("hello-twice", "open", True, b'HELLO {"v":2}\r\n', rb"-ERR HELLO already received", False),
    ("lowercase-verb", "open", True, b"track get x\r\n", rb"-ERR unknown command track", False),
    ("binary-verb", "open", True, b"\xff\xfe\x00\x01 x\r\n", rb"-ERR unknown command \?\?\?\?", False),
    ("flush", "open", True, b"FLUSH\r\n", rb"-ERR unknown command FLUSH", False),
    ("track-alone", "open", True, b"TRACK\r\n", rb"-ERR TRACK: expected GET or SET", False),
    ("track-del", "open", True, b"TRACK DEL x\r\n", rb"-ERR TRACK: expected GET or SET", False),
    ("get-no-jid", "open", True, b"TRACK GET\r\n", rb"-ERR jid: must not be empty", False),
    ("get-jid-space", "open", True, b"TRACK GET a b\r\n", rb"-ERR jid: only printable", False),
    ("get-jid-long", "open", True, b"TRACK GET " + b"j" * 200 + b"\r\n", rb"-ERR jid: longer", False),
    ("get-jid-binary", "open", True, b"TRACK GET \xff\xfe\r\n", rb"-ERR jid: ", False),
    ("get-jid-nul", "open", True, b"TRACK GET a\x00b\r\n", rb"-ERR jid: ", False),
    ("set-no-payload", "open", True, b"TRACK SET\r\n", rb"-ERR payload: ", False),
    ("set-not-json", "open", True, b"TRACK SET {nope\r\n", rb"-ERR payload: ", False),
    ("set-array", "open", True, b"TRACK SET []\r\n", rb"-ERR ", False),
    ("set-deep-nesting", "open", True, b"TRACK SET " + b"[" * 50_000 + b"\r\n", rb"-ERR ", False),
    ("set-huge-number", "open", True, b'TRACK SET {"jid":"x","percent":1e400}\r\n', rb"-ERR percent", False),
    ("set-jid-nul", "open", True, b'TRACK SET {"jid":"a\\u0000b"}\r\n', rb"-ERR jid", False),
    ("set-20KB", "open", True, b'TRACK SET {"jid":"x","desc":"' + b"d" * 20_000 + b'"}\r\n',
     rb"-ERR payload: larger than", False),
    ("set-bad-utf8", "open", True, b'TRACK SET {"jid":"x","desc":"\xff"}\r\n', rb"-ERR ", False),
    # after HELLO: limits that end the connection
    ("2MB-line-after-hello", "open", True, b"TRACK GET " + b"a" * (2 * 1024 * 1024) + b"\r\n",
     rb"-ERR line too long", True),
    ("10MB-set-after-hello", "open", True, b"TRACK SET " + b"{" * (10 * 1024 * 1024), rb"-ERR line too long", True),
]


@pytest.fixture(scope="module")
def hostile_servers(real_redis_url):
    prefix = "t" + uuid.uuid4().hex[:12]
    d = Deployment.open(Settings(redis_url=real_redis_url, prefix=prefix, partitions=4))
    servers = {"open": Running(d, max_connections=5000), "pw": Running(d, PASSWORD)}
    bystanders = {}
    for kind, r in servers.items():  # connected before any hostile case, used after each
        b = Raw(r.port)
        assert b.hello(PASSWORD if kind == "pw" else None) == b"+OK"
        bystanders[kind] = b
    yield servers, bystanders
    for r in servers.values():
        r.stop()
    cleanup(d.client, prefix)
    d.close()


def _still_fine(servers, bystanders, kind):
    b = bystanders[kind]
    b.send(b"TRACK GET bystander\r\n")
    assert json.loads(b.reply())["jid"] == "bystander"
    serving(servers[kind].port, PASSWORD if kind == "pw" else None)


@pytest.mark.parametrize("name,kind,hello,data,expect,closes", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input(hostile_servers, name, kind, hello, data, expect, closes):
    servers, bystanders = hostile_servers
    c = Raw(servers[kind].port)
    try:
        if hello:
            assert c.hello() == b"+OK"
        else:
            assert c.line().startswith(b"+HI ")
        try:
            c.send(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may close before a 10 MB write is through
        assert re.match(expect, c.line()), name
        if closes:
            assert c.closed()
        else:  # the same connection goes on
            c.send(b"TRACK GET after-error\r\n")
            assert json.loads(c.reply())["jid"] == "after-error"
    finally:
        c.close()
    _still_fine(servers, bystanders, kind)


def test_hostile_slow_drip_hello_hits_the_handshake_timeout(hostile_servers):
    servers, bystanders = hostile_servers
    c = Raw(servers["open"].port)
    c.line()
    start = time.monotonic()
    reply = None
    for byte in b'HELLO {"hostname":"slow","v":2}':  # never the newline
        try:
            c.send(bytes([byte]))
        except OSError:
            break
        c.sock.settimeout(0.1)
        try:
            reply = c.line()
            break
        except TimeoutError:
            pass
    c.sock.settimeout(5)
    reply = reply or c.line()
    assert reply == b"-ERR handshake timeout" and time.monotonic() - start < 3
    assert c.closed()
    _still_fine(servers, bystanders, "open")


def test_hostile_slow_drip_command_after_hello_is_answered(hostile_servers):
    servers, bystanders = hostile_servers
    c = Raw(servers["open"].port)
    c.hello()
    for byte in b"TRACK GET drip\r\n":
        c.send(bytes([byte]))
        time.sleep(0.01)
    assert json.loads(c.reply())["jid"] == "drip"
    _still_fine(servers, bystanders, "open")


@pytest.mark.parametrize("when", ["before-hello", "after-hello", "mid-line", "with-pipelined"])
def test_hostile_half_open_sockets(hostile_servers, when):
    servers, bystanders = hostile_servers
    c = Raw(servers["open"].port)
    if when == "before-hello":
        c.line()
    else:
        c.hello()
    if when == "mid-line":
        c.send(b"TRACK GET hal")
    if when == "with-pipelined":  # a half-close still gets every answer, then EOF
        c.send(b"TRACK GET h1\r\nTRACK GET h2\nTRACK SET {}\r\n")
    c.sock.shutdown(socket.SHUT_WR)
    if when == "with-pipelined":
        assert json.loads(c.reply())["jid"] == "h1"
        assert json.loads(c.reply())["jid"] == "h2"
        assert c.line().startswith(b"-ERR jid: ")
    assert c.closed(3)
    _still_fine(servers, bystanders, "open")


def test_hostile_reset_and_unread_replies(hostile_servers):
    servers, bystanders = hostile_servers
    port = servers["open"].port
    for _ in range(5):  # connect, then reset at once (SO_LINGER 0)
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    c = Raw(port)  # pipelines thousands of GETs, reads nothing, then vanishes
    c.hello()
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.sock.settimeout(2)
    try:
        c.send(b"TRACK GET unread-reply\r\n" * 20_000)
    except (TimeoutError, OSError):
        pass  # the server stopped reading: backpressure
    _still_fine(servers, bystanders, "open")
    c.close()
    _still_fine(servers, bystanders, "open")


def test_hostile_many_pipelined_commands_answer_in_order(hostile_servers):
    servers, _ = hostile_servers
    c = Raw(servers["open"].port)
    c.hello()
    c.send(b"".join(b"TRACK GET p-%d\r\n" % i for i in range(500)))
    assert [json.loads(c.reply())["jid"] for _ in range(500)] == [f"p-{i}" for i in range(500)]


def test_hostile_many_idle_connections(hostile_servers):
    servers, bystanders = hostile_servers
    port = servers["open"].port
    idle = []
    try:
        for _i in range(2000):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        assert idle[-1].recv(100).startswith(b"+HI ")
        _still_fine(servers, bystanders, "open")
    finally:
        for s in idle:
            s.close()
    time.sleep(0.3)
    serving(port)


# ------------------------------------------------ the async twin of query.py
def test_async_tracker_answers_exactly_as_the_sync_tracker(real_deployment):

    d = real_deployment
    sync = Tracker(d)
    for i in range(6):
        tracked(d, f"twin-{i}")
    sync.set_json(b'{"jid":"twin-1","percent":10,"desc":"sync"}')
    jids = [f"twin-{i}" for i in range(6)] + ["twin-none"]

    async def main():
        t = await AsyncTracker.open(d.settings)
        try:
            assert t.partitions == d.partitions
            await t.set_json(b'{"jid":"twin-2","percent":20,"desc":"async"}')
            drain(d)  # sync, in the loop: fine for a test
            return await t.get_many(jids), await t.get("twin-2")
        finally:
            await t.close()

    many, one = asyncio.run(main())
    assert many == sync.get_many(jids)
    assert one == sync.get("twin-2") and one["desc"] == "async"
    last = {}
    for jid in ("twin-1", "twin-2"):  # both paths appended the same kind of entry
        (_id, fields), = d.client.xrevrange(d.stream(jid), count=1)
        last[jid] = sorted(fields)
    assert last["twin-1"] == last["twin-2"]
