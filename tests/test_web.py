"""``tracker web``: the HTTP API on fakeredis and real Redis, SSE over a live server,
metrics and health, the OpenAPI document checked by schemathesis, the command line.

Plain requests go through Litestar's test client; streams need a real server
(``LiveServer``: uvicorn in a thread, as ``tracker web`` runs it). Folding is
done by ``Projector.drain()`` where a test wants a known state, by a projector
thread where it watches a stream.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Optional

import fakeredis
import httpx
import pytest
import redis
from helpers import acl_users, missing, open_deployment, wipe
from litestar import testing as litestar_testing  # the test extra brings the web extra

from tracker import history
from tracker.aio import AsyncTracker
from tracker.projector import Projector
from tracker.publisher import Publisher
from tracker.query import Tracker
from tracker.server.web import app as web_app
from tracker.server.web import serve as web_serve
from tracker.server.web import sse as web_sse
from tracker.server.web.config import WebConfig
from tracker.store import keys
from tracker.store.deployment import Deployment
from tracker.store.settings import Settings

TOKEN = "t0ken-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


# ------------------------------------------------------------------ apps and servers

def fake_server(d: Deployment) -> Any:
    conn = d.client.connection_pool.get_connection()
    try:
        return conn._server
    finally:
        d.client.connection_pool.release(conn)


def connect_for(d: Deployment, kind: str):
    """The app's ``connect``: the production one on real Redis; on fakeredis an asyncio
    client of the deployment's own fake server (created inside the server's loop)."""
    if kind == "real":
        return web_app.connector(d.settings)
    server = fake_server(d)

    async def connect() -> web_app.Backend:
        client = fakeredis.FakeAsyncRedis(server=server)
        t = AsyncTracker(client, d.settings, d.partitions, d.ttl)
        await t.load_scripts()
        return web_app.Backend(t, client, block_ms=100)  # fakeredis ends a cancelled block late

    return connect


def make_app(d: Deployment, kind: str, **config: Any):
    return web_app.create_app(d.settings, WebConfig(**config), connect_for(d, kind))


class LiveServer:
    """The app under uvicorn in a thread, on a free port."""

    def __init__(self, app: Any):
        self.server = web_serve.Server(web_serve.uvicorn_config(app, "127.0.0.1", 0),
                                       announce=False)
        self.thread = threading.Thread(target=web_serve.run_in_thread_loop, args=(self.server,),
                                       daemon=True)
        self.url = ""

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.server.port}"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.stop()
        self.thread.join(15)
        assert not self.thread.is_alive(), "server did not stop"


@contextlib.contextmanager
def projecting(d: Deployment) -> Iterator[Projector]:
    """A projector thread, as `tracker project` runs, stopped at the end."""
    proj = Projector(d, consumer="web-test", block_ms=200)
    t = threading.Thread(target=proj.run, kwargs={"report_every": 0.5}, daemon=True)
    t.start()
    try:
        yield proj
    finally:
        proj.stop()
        t.join(20)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def log_length(d: Deployment) -> int:
    return sum(d.client.xlen(keys.stream(d.prefix, p)) for p in range(d.partitions))


def tracked_job(d: Deployment, jid: str, percent: Optional[int] = None, desc: Optional[str] = None,
                queue: str = "default") -> None:
    pub = Publisher(d)
    pub.enqueued(jid, custom={"track": 1}, queue=queue, jobtype="ReportJob")
    pub.working(jid, reserve_for=600)
    if percent is not None or desc is not None:
        Tracker(d).set(jid, percent=percent, desc=desc)


@pytest.fixture
def web(backend):
    """(deployment, kind): the backend's deployment for a web app."""
    return backend(partitions=4, ttl=1800), backend.kind


@pytest.fixture
def client(web):
    d, kind = web
    with litestar_testing.TestClient(make_app(d, kind, token=TOKEN)) as c:
        yield c


# ------------------------------------------------------------------ TRACK GET

def test_get_is_the_tracker_get_answer(web, client):
    d, _ = web
    tracked_job(d, "job-web-1", 12, "Calculating...")
    Projector(d).drain()
    r = client.get("/v1/tracks/job-web-1")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    want = Tracker(d).get("job-web-1")
    assert want["percent"] == 12 and want["state"] == "working"
    assert r.content == dumps(want)
    r = client.get("/v1/tracks/never-seen")
    assert r.json() == {"jid": "never-seen", "state": "unknown", "updated_at": ""}


def test_get_matches_the_cli_byte_for_byte(real_deployment):
    d = real_deployment
    tracked_job(d, "job-cli-1", 40, "étape 2/5 — \"quoted\"")
    Projector(d).drain()
    env = {**os.environ, "TRACKER_REDIS_URL": d.settings.redis_url, "TRACKER_PREFIX": d.prefix}
    out = subprocess.run(["tracker", "get", "job-cli-1", "nope-1"], env=env, capture_output=True,
                         check=True).stdout.splitlines()
    hist = subprocess.run(["tracker", "history", "job-cli-1", "--json"], env=env,
                          capture_output=True, check=True).stdout.splitlines()
    with litestar_testing.TestClient(make_app(d, "real")) as c:
        assert c.get("/v1/tracks/job-cli-1").content == out[0]
        assert c.get("/v1/tracks/nope-1").content == out[1]
        assert c.get("/v1/tracks?jid=job-cli-1&jid=nope-1").json() == [json.loads(x) for x in out]
        assert c.get("/v1/tracks/job-cli-1/history").json() == [json.loads(x) for x in hist]


def test_get_many_in_the_order_asked(web, client):
    d, _ = web
    jids = [f"many-{i}" for i in range(12)]
    for j in jids[::2]:
        tracked_job(d, j, 7)
    Projector(d).drain()
    order = jids[::-1] + ["a/b"]
    r = client.get("/v1/tracks", params=[("jid", j) for j in order])
    assert r.status_code == 200
    assert r.json() == Tracker(d).get_many(order)


@pytest.mark.parametrize("query, field", [
    ("", "jid"), ("?jid=", "jid"), ("?jid=has%20space", "jid"), ("?jid=" + "x" * 129, "jid")])
def test_get_many_bad_input(client, query, field):
    r = client.get("/v1/tracks" + query)
    assert r.status_code == 400
    assert r.json()["field"] == field and r.json()["error"].startswith(field + ":")


def test_get_many_caps_the_jids(web):
    d, kind = web
    with litestar_testing.TestClient(make_app(d, kind, max_jids=3)) as c:
        r = c.get("/v1/tracks", params=[("jid", f"j{i}") for i in range(4)])
    assert r.status_code == 400 and r.json()["field"] == "jid"


@pytest.mark.parametrize("path", ["/v1/tracks/has%20space", "/v1/tracks/" + "x" * 129,
                                  "/v1/tracks/%C3%A9t%C3%A9", "/v1/tracks/a%7Fb/history"])
def test_get_bad_jid(client, path):
    r = client.get(path)
    assert r.status_code == 400 and r.json()["field"] == "jid"


# ------------------------------------------------------------------ TRACK SET

def test_post_sets_the_track(web, client):
    d, _ = web
    tracked_job(d, "job-set-1")
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
    before = log_length(d)
    r = client.post("/v1/tracks/job-set-1", headers=AUTH,
                    content=dumps({"percent": 55, "desc": "halfway", "reserve_until": until}))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ok"] is True and re.fullmatch(r"\d+-\d+", body["id"])
    assert log_length(d) == before + 1
    r = client.post("/v1/tracks/job-set-1", headers=AUTH, content=b'{"percent":null,"desc":"more"}')
    assert r.status_code == 200
    Projector(d).drain()
    got = client.get("/v1/tracks/job-set-1").json()
    assert got["percent"] == 55 and got["desc"] == "more" and got["state"] == "working"
    assert Tracker(d).reserved_until("job-set-1").timestamp() == pytest.approx(
        time.time() + 3600, abs=5)


def test_a_jid_with_a_slash_works_in_paths(web, client):
    d, _ = web
    tracked_job(d, "dir/sub/job-1", 9, "slashed")
    Projector(d).drain()
    want = Tracker(d).get("dir/sub/job-1")
    assert client.get("/v1/tracks/dir%2Fsub%2Fjob-1").json() == want
    assert client.get("/v1/tracks/dir%2fsub%2Fjob-1/history").json()[0]["event"] == "enqueued"
    r = client.post("/v1/tracks/dir%2Fsub%2Fjob-1", headers=AUTH, content=b'{"percent":10}')
    assert r.status_code == 200
    assert client.get("/v1/tracks/dir/sub/job-1").status_code == 404  # unencoded: other path
    r = client.get("/v1/tracks/a%00b")
    assert r.status_code == 400 and r.json()["field"] == "jid"  # a NUL is no slash
    assert client.get("/jobs/dir%2Fsub%2Fjob-1").status_code == 200


def test_post_faktory_json_takes_any_jid(web, client):
    d, _ = web
    tracked_job(d, "dir/job-2")
    r = client.post("/v1/tracks", headers=AUTH, content=b'{"jid":"dir/job-2","percent":5}')
    assert r.status_code == 200, r.text
    Projector(d).drain()
    assert client.get("/v1/tracks?jid=dir/job-2").json()[0]["percent"] == 5


BAD_BODIES = [
    (b'{"percent":150}', "percent"), (b'{"percent":"12"}', "percent"),
    (b'{"percent":true}', "percent"), (b'{"percent":12.5}', "percent"),
    (b'{"percent":-1}', "percent"), (('{"desc":"' + "x" * 1001 + '"}').encode(), "desc"),
    (b'{"desc":5}', "desc"), (b'{"reserve_until":"tomorrow"}', "reserve_until"),
    (b'{"reserve_until":"2020-01-01T00:00:00"}', "reserve_until"),
    (b'{"reserve_until":"2999-01-01T00:00:00Z"}', "reserve_until"),
    (b'{"jid":"job-bad"}', "jid"), (b'{"nope":1}', "nope"), (b"[1]", "body"),
    (b"not json", "body"), (b"", "body"), (b'{"percent":1', "body"),
]


@pytest.mark.parametrize("body, field", BAD_BODIES)
def test_post_bad_input_names_the_field_and_appends_nothing(web, client, body, field):
    d, _ = web
    before = log_length(d)
    r = client.post("/v1/tracks/job-bad", headers=AUTH, content=body)
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field, r.json()
    assert r.json()["error"].startswith(field + ":")
    assert log_length(d) == before


@pytest.mark.parametrize("body, field", [
    (b'{"percent":5}', "jid"), (b'{"jid":"a b","percent":5}', "jid"),
    (b'{"jid":"ok-1","percent":"5"}', "percent"), (b'{"jid":"ok-1","x":1}', "x")])
def test_post_faktory_json_bad_input(web, client, body, field):
    d, _ = web
    before = log_length(d)
    r = client.post("/v1/tracks", headers=AUTH, content=body)
    assert r.status_code == 400 and r.json()["field"] == field
    assert log_length(d) == before


def test_post_needs_the_token(web, client):
    d, kind = web
    before = log_length(d)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}):
        r = client.post("/v1/tracks/job-auth", headers=headers, content=b'{"percent":1}')
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["field"] == "authorization" and TOKEN not in r.text
    with litestar_testing.TestClient(make_app(d, kind)) as open_app:  # no token: writes off
        r = open_app.post("/v1/tracks/job-auth", headers=AUTH, content=b'{"percent":1}')
        assert r.status_code == 403 and "writes are off" in r.json()["error"]
        assert open_app.get("/v1/tracks/job-auth").status_code == 200
    assert log_length(d) == before


def test_reads_can_need_the_token(web):
    d, kind = web
    with litestar_testing.TestClient(make_app(d, kind, token=TOKEN, reads_need_token=True)) as c:
        for path in ("/v1/tracks/j1", "/v1/tracks?jid=j1", "/v1/tracks/j1/history", "/metrics"):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers=AUTH).status_code == 200, path
        for path in ("/", "/jobs/j1", "/static/app.js", "/healthz", "/schema/openapi.json"):
            assert c.get(path).status_code == 200, path


def test_body_is_capped(web):
    d, kind = web
    with litestar_testing.TestClient(make_app(d, kind, token=TOKEN, max_body=256)) as c:
        before = log_length(d)
        r = c.post("/v1/tracks/job-big", headers=AUTH,
                   content=dumps({"desc": "y" * 300}))
        assert r.status_code == 413 and r.json()["error"]
        assert log_length(d) == before


def test_cors_is_off_unless_configured(web, client):
    d, kind = web
    pre = {"Origin": "http://example.test", "Access-Control-Request-Method": "GET"}
    assert "access-control-allow-origin" not in client.get("/v1/tracks/x", headers=pre).headers
    r = client.options("/v1/tracks/x", headers=pre)
    assert "access-control-allow-origin" not in r.headers
    with litestar_testing.TestClient(make_app(d, kind, cors_origins=("http://example.test",))) as c:
        r = c.options("/v1/tracks/x", headers=pre)
        assert r.headers["access-control-allow-origin"] == "http://example.test"
        r = c.get("/v1/tracks/x", headers={"Origin": "http://other.test"})
        assert "access-control-allow-origin" not in r.headers


def test_unknown_route_and_method_are_json(client):
    r = client.get("/v1/nope")
    assert r.status_code == 404 and r.json() == {"error": "Not Found", "field": None}
    r = client.delete("/v1/tracks/x")
    assert r.status_code == 405 and "GET" in r.headers["allow"]


# ------------------------------------------------------------------ history

def test_history_is_tracker_history_json(web, client):
    d, _ = web
    tracked_job(d, "job-hist", 30, "one")
    Publisher(d).failed("job-hist", errtype="IOError", message="disk full")
    Publisher(d).enqueued("job-hist", custom={"track": 1})
    Publisher(d).success("job-hist")
    Projector(d).drain()
    r = client.get("/v1/tracks/job-hist/history")
    assert r.status_code == 200 and r.headers["x-tracker-trimmed"] == "0"
    want = [e.as_json() for e in history.history(d, "job-hist").entries]
    assert [e["event"] for e in want] == ["enqueued", "working", "trackset", "failed", "enqueued",
                                          "success"]
    assert r.json() == want
    assert client.get("/v1/tracks/nobody/history").json() == []


# ------------------------------------------------------------------ list by state

def test_jobs_by_state_newest_first_and_paged(web, client):
    d, _ = web
    for i in range(5):
        tracked_job(d, f"list-w{i}", i * 10, queue="q1" if i % 2 else "q2")
        time.sleep(0.002)
    tracked_job(d, "list-done")
    Publisher(d).success("list-done")
    Projector(d).drain()
    r = client.get("/v1/jobs", params={"state": "working", "limit": 2})
    assert r.status_code == 200
    page = r.json()
    assert [t["jid"] for t in page["tracks"]] == ["list-w4", "list-w3"]
    assert page["tracks"][0] == Tracker(d).get("list-w4")
    seen = [t["jid"] for t in page["tracks"]]
    while page["next_cursor"]:
        page = client.get("/v1/jobs", params={"state": "working", "limit": 2,
                                              "cursor": page["next_cursor"]}).json()
        seen += [t["jid"] for t in page["tracks"]]
    assert seen == [f"list-w{i}" for i in range(4, -1, -1)]
    q1 = client.get("/v1/jobs", params={"state": "working", "queue": "q1"}).json()
    assert [t["jid"] for t in q1["tracks"]] == ["list-w3", "list-w1"]
    done = client.get("/v1/jobs", params={"state": "success"}).json()
    assert [t["jid"] for t in done["tracks"]] == ["list-done"]
    # A queue no job can have (a control character; 200 characters but more bytes) is
    # within the schema, so it answers an empty page rather than a 400.
    for odd in ("q1\x03", "\u00e9" * 150):
        r = client.get("/v1/jobs", params={"state": "working", "queue": odd})
        assert r.status_code == 200 and r.json() == {"tracks": [], "next_cursor": None}


@pytest.mark.parametrize("query, field", [
    ("", "state"), ("?state=unknown", "state"), ("?state=bogus", "state"),
    ("?state=working&limit=0", "limit"), ("?state=working&limit=1001", "limit"),
    ("?state=working&limit=x", "limit"), ("?state=working&queue=" + "q" * 201, "queue")])
def test_jobs_bad_input(client, query, field):
    r = client.get("/v1/jobs" + query)
    assert r.status_code == 400 and r.json()["field"] == field, r.text


def test_jobs_bad_cursor(client):
    r = client.get("/v1/jobs?state=working&cursor=not-a-cursor")
    assert r.status_code == 400 and r.json()["field"] == "cursor"


def test_cli_list(real_deployment):
    d = real_deployment
    for i in range(3):
        tracked_job(d, f"cli-list-{i}", 10 * i)
        time.sleep(0.002)
    Projector(d).drain()
    env = {**os.environ, "TRACKER_REDIS_URL": d.settings.redis_url, "TRACKER_PREFIX": d.prefix}
    out = subprocess.run(["tracker", "list", "--state", "working", "--json", "--limit", "2"],
                         env=env, capture_output=True, text=True, check=True)
    assert [json.loads(x) for x in out.stdout.splitlines()] == Tracker(d).get_many(
        ["cli-list-2", "cli-list-1"])
    assert "--cursor" in out.stderr
    text = subprocess.run(["tracker", "list", "--state", "working"], env=env,
                          capture_output=True, text=True, check=True).stdout
    assert "cli-list-0" in text and " 20%" in text


def test_cli_list_bad_input():
    r = subprocess.run(["tracker", "list", "--state", "bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "state" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(["tracker", "list", "--state", "working", "--limit", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "limit" in r.stderr


# ------------------------------------------------------------------ SSE

class Events:
    """Reads an SSE response: (id, data) pairs, parsed as a browser does."""

    def __init__(self, response: httpx.Response):
        self.lines = response.iter_lines()
        self.retry: Optional[int] = None

    def next(self) -> tuple[Optional[str], dict]:
        eid, data = None, []
        for line in self.lines:
            if line == "":
                if data:
                    return eid, json.loads("\n".join(data))
                eid = None
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "data":
                data.append(value)
            elif name == "id":
                eid = value
            elif name == "retry":
                self.retry = int(value)
        raise EOFError("stream ended")

    def until(self, pred, limit: int = 50) -> tuple[Optional[str], dict]:
        for _ in range(limit):
            eid, ev = self.next()
            if pred(ev):
                return eid, ev
        raise AssertionError("no such event")


@pytest.fixture
def live(web):
    d, kind = web
    with LiveServer(make_app(d, kind, token=TOKEN, keepalive=0.5)) as srv, projecting(d):
        yield d, srv


def test_sse_follows_the_track_until_success(live):
    d, srv = live
    tracked_job(d, "job-sse-1")
    seen = []
    with httpx.Client(base_url=srv.url, timeout=10) as http, \
            http.stream("GET", "/v1/tracks/job-sse-1/events") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        ev = Events(r)
        eid, first = ev.next()
        assert ev.retry == 2000 and eid and first["jid"] == "job-sse-1"
        for p in (10, 50, 90):
            http.post("/v1/tracks/job-sse-1", headers=AUTH, content=dumps({"percent": p}))
            _, got = ev.until(lambda e, p=p: e.get("percent") == p)
            seen.append(got)
        Publisher(d).success("job-sse-1")
        eid, last = ev.until(lambda e: e["state"] == "success")
        with pytest.raises(EOFError):
            ev.next()  # the stream ends after success
    assert [s["percent"] for s in seen] == [10, 50, 90]
    assert all(s["state"] == "working" for s in seen)
    assert last == Tracker(d).get("job-sse-1")
    assert eid == web_sse.event_id(dumps(last))


def test_sse_reconnect_with_last_event_id_misses_nothing(live):
    d, srv = live
    tracked_job(d, "job-sse-2", 20)
    with httpx.Client(base_url=srv.url, timeout=10) as http:
        with http.stream("GET", "/v1/tracks/job-sse-2/events") as r:
            eid, first = Events(r).until(lambda e: e.get("percent") == 20)
        # while the client is away: two changes
        Tracker(d).set("job-sse-2", percent=30)
        Tracker(d).set("job-sse-2", percent=40, desc="away")
        wait_for(lambda: Tracker(d).get("job-sse-2").get("percent") == 40)
        with http.stream("GET", "/v1/tracks/job-sse-2/events",
                         headers={"Last-Event-ID": eid}) as r:
            eid2, now = Events(r).next()
            assert now == Tracker(d).get("job-sse-2") and now["desc"] == "away"
            assert eid2 != eid
        # reconnecting with the current state's id sends nothing until it changes
        with http.stream("GET", "/v1/tracks/job-sse-2/events",
                         headers={"Last-Event-ID": eid2}) as r:
            ev = Events(r)
            Tracker(d).set("job-sse-2", percent=41)
            _, nxt = ev.next()
            assert nxt["percent"] == 41
        Publisher(d).dead("job-sse-2", errtype="E", message="gone")
        wait_for(lambda: Tracker(d).get("job-sse-2")["state"] == "dead")
        with http.stream("GET", "/v1/tracks/job-sse-2/events") as r:
            final_id, final = Events(r).next()
            assert final["state"] == "dead"
        r = http.get("/v1/tracks/job-sse-2/events", headers={"Last-Event-ID": final_id})
        assert r.status_code == 204  # EventSource stops reconnecting


def test_sse_client_leaving_unsubscribes(live):
    d, srv = live
    tracked_job(d, "job-sse-3")
    with httpx.Client(base_url=srv.url, timeout=10) as http:
        streams = [http.stream("GET", "/v1/tracks/job-sse-3/events") for _ in range(3)]
        readers = [Events(s.__enter__()) for s in streams]  # kept: a dropped reader closes
        for ev in readers:
            ev.next()
        assert metric(http, "tracker_sse_subscribers") == 3
        for s in streams:
            s.__exit__(None, None, None)
        wait_for(lambda: metric(http, "tracker_sse_subscribers") == 0)
        assert not srv.server.config.app.services.hub.by_jid


def test_sse_keepalive_and_every_track_feed(live):
    d, srv = live
    with httpx.Client(base_url=srv.url, timeout=10) as http, \
            http.stream("GET", "/v1/events") as r:
        lines = r.iter_lines()
        assert next(lines) == "retry: 2000"
        tracked_job(d, "feed-1", 33, "feeding")
        got = []
        for line in lines:
            got.append(line)
            if line.startswith("data:") and '"percent":33' in line:
                break
        data = [json.loads(x[5:]) for x in got if x.startswith("data:")]
        assert data[-1] == Tracker(d).get("feed-1")
        assert {e["jid"] for e in data} == {"feed-1"}
        assert not any(x.startswith("id:") for x in got)


def test_sse_keepalive_on_a_quiet_stream(live):
    _, srv = live
    with httpx.Client(base_url=srv.url, timeout=10) as http, \
            http.stream("GET", "/v1/tracks/quiet-1/events") as r:
        lines = r.iter_lines()
        t0 = time.monotonic()
        for line in lines:
            if line == ": keepalive":
                break
        assert time.monotonic() - t0 < 3


def test_sse_bad_jid(live):
    _, srv = live
    r = httpx.get(srv.url + "/v1/tracks/bad%20jid/events", timeout=5)
    assert r.status_code == 400 and r.json()["field"] == "jid"


def wait_for(pred, secs: float = 10.0) -> None:
    deadline = time.monotonic() + secs
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def samples(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def metric(http: httpx.Client, key: str) -> float:
    return samples(http.get("/metrics").text)[key]


# ------------------------------------------------------------------ metrics and health

def test_metrics(web, client):
    d, _ = web
    tracked_job(d, "met-1", 5)
    part = d.partition("met-1")
    d.client.xadd(keys.stream(d.prefix, part), {"t": "bogus", "j": "met-poison"})
    Projector(d).drain()
    Publisher(d).success("met-1")
    client.get("/v1/tracks/met-1")  # a read folds what was published before it
    client.get("/v1/tracks/met-1")
    client.get("/v1/tracks/bad%20jid")
    Publisher(d).success("met-1")  # metrics read nothing into the fold: lag 1
    got = samples(client.get("/metrics").text)
    p = f'partition="{part}"'
    assert got[f"tracker_events_published_total{{{p}}}"] == d.client.xlen(
        keys.stream(d.prefix, part))
    assert got[f"tracker_events_applied_total{{{p}}}"] == 4
    assert got[f"tracker_events_dead_lettered_total{{{p}}}"] == 1
    assert got[f"tracker_dlq_depth{{{p}}}"] == 1
    assert got[f"tracker_projector_lag_entries{{{p}}}"] == 1
    assert 0 <= got[f"tracker_projector_lag_seconds{{{p}}}"] < 60
    route = 'method="GET",route="/v1/tracks/{jid}"'
    assert got[f'tracker_http_requests_total{{{route},status="200"}}'] == 2
    assert got[f'tracker_http_requests_total{{{route},status="400"}}'] == 1
    assert got[f"tracker_http_request_duration_seconds_count{{{route}}}"] == 3
    assert not any("met-1" in k for k in got)  # no JID ever becomes a label
    assert got["tracker_sse_subscribers"] == 0


def test_healthz_and_readyz(web):
    d, kind = web
    with litestar_testing.TestClient(make_app(d, kind, ready_max_lag=0.05)) as c:
        assert c.get("/healthz").json() == {"ok": True}
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json()["ok"] is True
        tracked_job(d, "ready-1")  # appended, not folded
        time.sleep(0.1)
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["lag_entries"] == 2
        assert r.json()["lag_seconds"] >= 0.05 and "projector" in r.json()["error"]
        Projector(d).drain()
        assert c.get("/readyz").status_code == 200


def test_redis_down_is_503_without_the_address(tmp_path):
    """Redis goes away under a running app: every Redis route answers 503, one line that
    names neither the server nor its password."""
    binary = shutil.which("redis-server")
    if not binary:
        missing("redis-server is not on PATH")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path),
                               "--requirepass", "pw-secret"], stdout=subprocess.DEVNULL)
    try:
        url = f"redis://:pw-secret@127.0.0.1:{port}/0"
        settings = Settings(redis_url=url, prefix="webdown", read_timeout=0.5)
        for _ in range(100):
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        app = web_app.create_app(settings, WebConfig(token=TOKEN), web_app.connector(settings))
        with litestar_testing.TestClient(app) as c:
            assert c.get("/v1/tracks/x").status_code == 200
            redis.Redis.from_url(url).shutdown(nosave=True)
            server.wait(10)
            assert c.get("/healthz").status_code == 200
            for r in (c.get("/readyz"), c.get("/v1/tracks/x"),
                      c.post("/v1/tracks/x", headers=AUTH, content=b'{"percent":1}')):
                assert r.status_code == 503, r.text
                assert "pw-secret" not in r.text and "127.0.0.1" not in r.text
    finally:
        if server.poll() is None:
            server.kill()


# ------------------------------------------------------------------ OpenAPI + schemathesis

def test_openapi_document(client):
    doc = client.get("/schema/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    for path in ("/v1/tracks/{jid}", "/v1/tracks", "/v1/tracks/{jid}/events",
                 "/v1/tracks/{jid}/history", "/v1/jobs", "/metrics", "/healthz", "/readyz"):
        assert path in doc["paths"], path
    assert doc["paths"]["/v1/tracks/{jid}"]["post"]["security"] == [{"bearer": []}]
    assert client.get("/schema").json() == doc
    assert "cdn" not in client.get("/schema").text.lower()


def test_schemathesis_finds_no_failures(web, tmp_path):
    """schemathesis's CLI against the app's own document, every check, on a live server.

    Left out, with the reason: the two SSE operations (endless streams by design:
    the SSE tests above cover them); the check that every schema-valid request is
    accepted, for the POSTs only (reserve_until must lie within a day of now, which
    a schema cannot say); the stateful phase (it feeds JIDs from answers into paths,
    and its HTTP client leaves a "%fa" inside a value unescaped, so the server gets
    another JID: test_a_jid_with_a_slash_works_in_paths covers encoded JIDs); and
    /v1/jobs until the core has the list index (501).
    """
    st = os.path.join(os.path.dirname(sys.executable), "st")
    if not os.path.exists(st):
        missing("schemathesis is not installed (pip install -e '.[test]')")
    d, kind = web
    tracked_job(d, "0", 50, "zero")  # schemathesis likes the JID "0"
    Projector(d).drain()
    exclude = ["--exclude-path-regex", r".*/events$"]
    with LiveServer(make_app(d, kind, token=TOKEN)) as srv:
        base = [st, "run", f"{srv.url}/schema/openapi.json", "--checks", "all",
                "-H", f"Authorization: Bearer {TOKEN}", "--request-timeout", "10",
                "--max-examples", "40", "--seed", "1", "--workers", "1",
                "--suppress-health-check", "all", "--phases", "examples,coverage,fuzzing"]
        reads = subprocess.run(base + exclude + ["--include-method", "GET"], capture_output=True,
                               text=True, timeout=400, cwd=tmp_path)
        writes = subprocess.run(base + ["--include-method", "POST", "--exclude-checks",
                                        "positive_data_acceptance"], capture_output=True,
                                text=True, timeout=400, cwd=tmp_path)
    for run in (reads, writes):
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        assert re.search(r"\d+ passed|No issues found|passed", run.stdout), run.stdout[-3000:]
    assert log_length(d) > 4  # the writes did write


# ------------------------------------------------------------------ the command line

def _spawn_web(env: dict, *args: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(["tracker", "web", "--port", "0", *args], env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    line = proc.stderr.readline()
    m = re.search(r"listening on (http://\S+)", line)
    if not m:
        proc.kill()
        raise AssertionError(f"tracker web said {line!r}")
    return proc, m.group(1)


def test_cli_web_serves_and_stops_with_open_streams(real_deployment):
    d = real_deployment
    env = {**os.environ, "TRACKER_REDIS_URL": d.settings.redis_url, "TRACKER_PREFIX": d.prefix,
           "TRACKER_WEB_TOKEN": TOKEN}
    proc, url = _spawn_web(env)
    try:
        with httpx.Client(base_url=url, timeout=10) as http:
            assert http.get("/healthz").json() == {"ok": True}
            assert http.post("/v1/tracks/cli-web-1", headers=AUTH,
                             content=b'{"percent":3}').status_code == 200
            with http.stream("GET", "/v1/tracks/cli-web-1/events") as r:
                ev = Events(r)
                ev.next()
                t0 = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(10) == 0
                assert time.monotonic() - t0 < 3  # open streams do not hold the exit
    finally:
        if proc.poll() is None:
            proc.kill()
    assert TOKEN not in (proc.stderr.read() if proc.stderr else "")


@pytest.mark.parametrize("args, env, field", [
    (["--reads-need-token"], {}, "reads-need-token"),
    (["--cors-origin", "not an origin"], {}, "cors-origin"),
    ([], {"TRACKER_WEB_TOKEN": "has space"}, "token"),
    (["--max-body", "1"], {}, "max-body"),
])
def test_cli_web_bad_settings(args, env, field):
    r = subprocess.run(["tracker", "web", "--port", "0", *args], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=30)
    assert r.returncode == 2, r.stderr
    assert field in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_project_metrics_port(real_deployment):
    d = real_deployment
    tracked_job(d, "pm-1", 1)
    env = {**os.environ, "TRACKER_REDIS_URL": d.settings.redis_url, "TRACKER_PREFIX": d.prefix}
    proc = subprocess.Popen(["tracker", "project", "--metrics-port", "0"], env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        m = re.search(r"metrics on (http://\S+)", proc.stderr.readline())
        assert m
        deadline = time.monotonic() + 10
        while True:
            text = httpx.get(m.group(1), timeout=5).text
            folded = re.search(r"^tracker_projector_folded_total (\S+)$", text, re.M)
            if folded and float(folded.group(1)) >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert folded and float(folded.group(1)) == 3
        assert re.search(r"^tracker_projector_batches_total [1-9]", text, re.M)
        assert "tracker_projector_dead_lettered_total 0.0" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_real_app_opens_its_own_connections(real_redis_url, prefix):
    """The production connect: AsyncTracker.open plus a tailer client of its own."""
    d = open_deployment("real", real_redis_url, prefix, partitions=2)
    app = web_app.create_app(d.settings, WebConfig())
    try:
        with litestar_testing.TestClient(app) as c:
            assert c.get("/v1/tracks/x").json()["state"] == "unknown"
            hub = app.services.hub
            assert hub.client is not hub.tracker.client
            assert len(hub.tasks) == 2 + 1  # a tailer per partition, the keepalive ticker
    finally:
        wipe(d)
        d.close()


# ------------------------------------------------------------------ least privilege

def test_the_app_works_with_the_web_role(real_redis_url, prefix):
    """The README's web user: reads, history, lists, metrics, a POST and a live stream,
    from an app that connects as it (the projector, an admin here, does the folding)."""
    d = Deployment.open(Settings(redis_url=real_redis_url, prefix=prefix, partitions=2))
    try:
        tracked_job(d, "acl-web-1", 20, "acl")
        Projector(d).drain()
        with acl_users(real_redis_url, prefix) as user:
            acl = Settings(redis_url=user("web"), prefix=prefix)
            app = web_app.create_app(acl, WebConfig(token=TOKEN, keepalive=0.5))
            with LiveServer(app) as srv, projecting(d), \
                    httpx.Client(base_url=srv.url, timeout=10) as http:
                assert http.get("/v1/tracks/acl-web-1").json()["percent"] == 20
                with http.stream("GET", "/v1/tracks/acl-web-1/events") as r:
                    ev = Events(r)
                    assert ev.next()[1]["percent"] == 20
                    r2 = http.post("/v1/tracks/acl-web-1", headers=AUTH,
                                   content=dumps({"percent": 60}))
                    assert r2.status_code in (200, 202), r2.text
                    assert ev.until(lambda e: e.get("percent") == 60)[1]["state"] == "working"
                hist = http.get("/v1/tracks/acl-web-1/history").json()
                assert [e["event"] for e in hist][:2] == ["enqueued", "working"]
                listed = http.get("/v1/jobs", params={"state": "working"}).json()
                assert [t["jid"] for t in listed["tracks"]] == ["acl-web-1"]
                metrics = samples(http.get("/metrics").text)
                assert metrics['tracker_tracks{state="working"}'] == 1
                assert metrics[f'tracker_events_applied_total{{partition="'
                               f'{d.partition("acl-web-1")}"}}'] >= 3
    finally:
        wipe(d)
        d.close()
