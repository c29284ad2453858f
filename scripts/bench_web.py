"""Benchmark ``tracker web``: TRACK GET over HTTP against a hello-world route, and SSE fan-out.

    python scripts/bench_web.py [--redis-url URL] [--quick]

The server is this file run as ``serve``: ``create_app`` with one extra route,
``GET /bench/hello`` (pre-encoded JSON, like the track route's answer), under the
same uvicorn configuration as ``tracker web`` (uvloop, httptools), as its own
process. So the hello route shares the stack (uvicorn, the metrics and path
wrappers, Litestar) and only the track route's own work differs: the JID check,
the Redis round trip (coalesced by ``AsyncTracker``) and the encoding.

- ``web_get_track_rps``: Debian's ``wrk`` (``apt-get install wrk``; one thread,
  50 connections, keep-alive) drives both routes in interleaved rounds (hello,
  track, hello, track, ...); the ratio is the median of the per-round ratios.
- ``web_sse_fanout_1000_*``: 1,000 SSE subscribers on one job (a child process
  of asyncio sockets), a ``tracker project`` process folding, and a publisher that
  sends a TRACK SET every 200 ms. For each update: when XADD returned, when the
  snapshot showed it (polled with HGET: "folded"), and when each subscriber read it.
- ``jobs_list_p50_1m_tracks``: ``GET /v1/jobs?state=working`` with 1,000,000 tracks;
  it needs the core's list index and reports nothing until it is there.

Without --redis-url a private redis-server is started on a free port (scripts/_benchlib.py).
Rows follow scripts/bench.py's format (``rows(quick, **ctx)``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _benchlib as B  # noqa: E402

try:  # the web extra brings it; the subscribers' process reads 1,000 sockets faster with it
    import uvloop
except ImportError:
    uvloop = None
import httpx  # noqa: E402
from litestar import Response, get  # noqa: E402

from tracker.publisher import Publisher  # noqa: E402
from tracker.query import Tracker  # noqa: E402
from tracker.server.web.app import create_app  # noqa: E402
from tracker.server.web.config import WebConfig  # noqa: E402
from tracker.server.web.serve import Server, uvicorn_config  # noqa: E402
from tracker.status import partition_status  # noqa: E402
from tracker.store import keys, packed  # noqa: E402
from tracker.store.settings import Settings  # noqa: E402

JID = "bench-web-0001"
HELLO = b'{"hello":"world"}'


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def row(metric: str, figure: Any, unit: str, baseline_name: Optional[str] = None,
        baseline: Any = None, ratio: Optional[float] = None, target: Optional[str] = None,
        met: Optional[bool] = None, rounds: Optional[list] = None) -> dict:
    return {"metric": metric, "figure": figure, "unit": unit, "baseline_name": baseline_name,
            "baseline": baseline, "ratio": ratio, "target": target, "met": met,
            "rounds": rounds or []}


def median(xs: list) -> float:
    return B.pct(xs, 50)


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used (Linux /proc): a figure a busy machine
    inflates far less than wall-clock rates."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------ the server

@get("/bench/hello", include_in_schema=False)
async def hello() -> Response[Any]:
    return Response(content=HELLO, media_type="application/json")


def serve(redis_url: str, prefix: str, port: int) -> None:
    """The benchmark's server process: the web app plus the hello route."""
    settings = Settings(redis_url=redis_url, prefix=prefix)
    app = create_app(settings, WebConfig(port=port), extra_handlers=[hello])
    Server(uvicorn_config(app, "127.0.0.1", port)).run()


class Processes:
    """The server and a projector as processes of their own; stopped at the end."""

    def __init__(self, url: str, prefix: str):
        self.url, self.prefix = url, prefix  # Redis
        self.port = B.free_port()
        env = {**os.environ, "TRACKER_REDIS_URL": url, "TRACKER_PREFIX": prefix}
        self.procs = [
            subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve", "--redis-url", url,
                              "--prefix", prefix, "--port", str(self.port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True),
            # This interpreter's tracker, whether or not its venv is on PATH.
            subprocess.Popen([sys.executable, "-m", "tracker", "project"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        line = self.procs[0].stderr.readline() if self.procs[0].stderr else ""
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"bench server did not start: {line!r}")
        self.base = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()


# ------------------------------------------------------------------ requests/s

def wrk(url: str, seconds: float, connections: int = 50, pid: Optional[int] = None
        ) -> tuple[float, float]:
    """(requests/s, server CPU microseconds per request) of one wrk run."""
    cpu0 = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", url],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    n = re.search(r"(\d+) requests in", out)
    if not m or not n or re.search(r"Non-2xx", out):
        raise RuntimeError(f"wrk on {url}: {out[-500:]}")
    cpu = (cpu_seconds(pid) - cpu0) if pid else 0.0
    return float(m.group(1)), cpu * 1e6 / max(1, int(n.group(1)))


def bench_rps(srv: Processes, quick: bool) -> list[dict]:
    if not shutil.which("wrk"):
        return [row("web_get_track_rps", None, "req/s", target=">= 0.7x",
                    baseline_name="wrk is not installed (apt-get install wrk)")]
    secs, n = (2, 5) if quick else (5, 7)
    track, base = f"{srv.base}/v1/tracks/{JID}", f"{srv.base}/bench/hello"
    assert httpx.get(track).json()["jid"] == JID and httpx.get(base).content == HELLO
    wrk(base, 1)  # warm-up, not counted
    wrk(track, 1)
    pid = srv.procs[0].pid
    hellos, tracks, ratios, cpu_h, cpu_t, cpu_ratios = [], [], [], [], [], []
    for i in range(n):
        h, ch = wrk(base, secs, pid=pid)
        t, ct = wrk(track, secs, pid=pid)
        hellos.append(h)
        tracks.append(t)
        ratios.append(round(t / h, 3))
        cpu_h.append(ch)
        cpu_t.append(ct)
        cpu_ratios.append(round(ct / ch, 3) if ch else None)
        log(f"round {i + 1}/{n}: hello {h:,.0f}/s ({ch:.0f} us CPU each), GET /v1/tracks/{{jid}} "
            f"{t:,.0f}/s ({ct:.0f} us CPU each): {t / h:.2f}x")
    ratio = median(ratios)
    good = [r for r in cpu_ratios if r]
    return [row("web_get_track_rps", round(median(tracks)), "req/s",
                "hello-world route, same server and stack (wrk -t1 -c50)", round(median(hellos)),
                ratio, ">= 0.7x", ratio >= 0.7, ratios),
            row("web_get_track_server_cpu_per_request", round(median(cpu_t), 1), "us",
                "hello-world route, server CPU per request", round(median(cpu_h), 1),
                median(good) if good else None, None, None, cpu_ratios)]


# ------------------------------------------------------------------ SSE fan-out

class _Client(asyncio.Protocol):
    """One SSE subscriber: records when it first read each percent (a Protocol, not
    streams: 1,000 of them in one process must cost the measurement little)."""

    pattern = re.compile(rb'"percent":(\d+)')

    def __init__(self, i: int, path: str, seen: dict, ready: list):
        self.i, self.path, self.seen, self.ready = i, path, seen, ready
        self.tail = b""
        self.first = True

    def connection_made(self, transport: Any) -> None:
        transport.write(f"GET {self.path} HTTP/1.1\r\nHost: bench\r\n"
                        "Accept: text/event-stream\r\n\r\n".encode())

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buf = self.tail + data
        for m in self.pattern.finditer(buf):
            self.seen.setdefault((self.i, int(m.group(1))), now)
        self.tail = buf[-40:]
        if self.first:
            self.first = False
            self.ready[0] += 1


async def _subscribe(port: int, n: int, path: str, seen: dict, ready: list) -> None:
    """``n`` SSE clients; ``seen[(client, percent)]`` = monotonic time it first read it."""
    loop = asyncio.get_running_loop()
    ready[0] = 0
    for i in range(n):
        await loop.create_connection(lambda i=i: _Client(i, path, seen, ready), "127.0.0.1", port)
    await asyncio.sleep(3600)


def _subscriber_process(port: int, n: int, path: str, conn: Any) -> None:
    """Child process: open the streams, say when all are live, send what they saw at the end."""
    seen: dict = {}
    ready = [0]

    async def main() -> None:
        task = asyncio.ensure_future(_subscribe(port, n, path, seen, ready))
        while ready[0] < n:
            if task.done():
                task.result()
            await asyncio.sleep(0.05)
        conn.send("ready")
        while not conn.poll():
            await asyncio.sleep(0.05)
        conn.recv()
        conn.send(list(seen.items()))
        task.cancel()

    (uvloop.run if uvloop is not None else asyncio.run)(main())


# A bare asyncio fan-out server: tails the same partition with XREAD BLOCK and writes each
# TRACK SET's percent, chunked, to every open connection. No framework, no track read: the
# floor for pushing one update to 1,000 sockets from Python on this machine, right now.
_SSE_FLOOR = r"""
import asyncio, sys
import redis.asyncio as aredis
try:
    import uvloop
except ImportError:
    uvloop = None
url, stream, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"transfer-encoding: chunked\r\n\r\n")
def chunk(b):
    return b"%x\r\n%s\r\n" % (len(b), b)
conns = set()
class P(asyncio.Protocol):
    def connection_made(self, t):
        self.t = t
    def data_received(self, d):
        if b"\r\n\r\n" in d:
            self.t.write(HEAD + chunk(b"retry: 2000\n\n"))
            conns.add(self.t)
    def connection_lost(self, e):
        conns.discard(self.t)
async def main():
    r = aredis.from_url(url, socket_timeout=30)
    top = await r.xrevrange(stream, "+", "-", count=1)
    last = top[0][0] if top else b"0-0"
    await asyncio.get_running_loop().create_server(P, "127.0.0.1", port, backlog=2048)
    print("listening on", port, file=sys.stderr, flush=True)
    while True:
        for _, entries in await r.xread({stream: last}, block=1000) or []:
            for eid, f in entries:
                last = eid
                if b"p" in f:
                    msg = chunk(b'data: {"percent":' + f[b"p"] + b'}\n\n')
                    for t in list(conns):
                        t.write(msg)
(uvloop.run if uvloop else asyncio.run)(main())
"""


def _sse_round(port: int, path: str, d: Any, first: int, updates: int,
               subscribers: int, pid: int) -> tuple[list, list, list, int, float]:
    """One round: ``subscribers`` clients on ``path``, ``updates`` TRACK SETs 200 ms apart.

    Returns per update (ms, all subscribers): from the fold, from the publish; the fold
    times; the count of deliveries never seen; the server's CPU ms per update.
    """
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.get_context("spawn").Process(
        target=_subscriber_process, args=(port, subscribers, path, child), daemon=True)
    proc.start()
    try:
        if not parent.poll(60) or parent.recv() != "ready":
            raise RuntimeError(f"the SSE subscribers did not connect (exit {proc.exitcode})")
        t = Tracker(d)
        part = d.partition(JID)

        def folded_percent() -> int | None:
            raw = packed.read_value(d.client, d.prefix, part, JID)
            track = packed.decode(raw).track if raw else None
            return track.percent if track else None

        pub_at, fold_at = {}, {}
        time.sleep(0.3)
        cpu0 = cpu_seconds(pid)
        for k in range(first, first + updates):
            pct = 1 + k % 99  # distinct within a round and from the state before it
            t.set(JID, percent=pct)
            pub_at[pct] = time.monotonic()
            while folded_percent() != pct:
                pass  # "folded": the snapshot shows it (the projector is its own process)
            fold_at[pct] = time.monotonic()
            time.sleep(0.2)
        time.sleep(0.5)
        cpu = (cpu_seconds(pid) - cpu0) * 1000 / updates
        parent.send("done")
        seen = dict(parent.recv()) if parent.poll(60) else {}
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    from_fold, from_pub, missing = [], [], 0
    for pct in pub_at:
        per_fold, per_pub = [], []
        for i in range(subscribers):
            got = seen.get((i, pct))
            if got is None:
                missing += 1
                continue
            per_fold.append((got - fold_at[pct]) * 1000)
            per_pub.append((got - pub_at[pct]) * 1000)
        from_fold.append(per_fold)
        from_pub.append(per_pub)
    folding = [(fold_at[p] - pub_at[p]) * 1000 for p in pub_at]
    return from_fold, from_pub, folding, missing, cpu


def bench_sse(srv: Processes, d: Any, quick: bool, subscribers: int = 1000) -> list[dict]:
    """Interleaved rounds: the bare fan-out server, then tracker web, then again."""
    rounds, updates = (3, 8) if quick else (5, 15)
    floor_port = B.free_port()
    floor = subprocess.Popen([sys.executable, "-c", _SSE_FLOOR, srv.url,
                              keys.stream(d.prefix, d.partition(JID)), str(floor_port)],
                             stderr=subprocess.PIPE, text=True)
    try:
        if "listening" not in (floor.stderr.readline() if floor.stderr else ""):
            raise RuntimeError("the bare fan-out server did not start")
        mine_fold, mine_pub, floor_pub, folds, ratios, missing = [], [], [], [], [], 0
        cpu_mine: list[float] = []
        cpu_floor: list[float] = []
        pct = 1
        for i in range(rounds):
            if floor.poll() is not None:
                raise RuntimeError("the bare fan-out server stopped: "
                                   + (floor.stderr.read()[-2000:] if floor.stderr else ""))
            _, fp, _, fmiss, fcpu = _sse_round(floor_port, "/", d, pct, updates, subscribers,
                                               floor.pid)
            pct += updates
            mf, mp, fo, mmiss, mcpu = _sse_round(srv.port, f"/v1/tracks/{JID}/events", d, pct,
                                                 updates, subscribers, srv.procs[0].pid)
            cpu_mine.append(mcpu)
            cpu_floor.append(fcpu)
            pct += updates
            flat = lambda xs: [x for per in xs for x in per]  # noqa: E731
            a, b = B.pct(flat(mf), 99), B.pct(flat(fp), 99)
            mine_fold += flat(mf)
            mine_pub += flat(mp)
            floor_pub += flat(fp)
            folds += fo
            missing += mmiss
            ratios.append(round(a / b, 2) if b > 0 else None)
            log(f"sse round {i + 1}/{rounds}: tracker web p99 {a:.1f} ms after the fold, "
                f"{mcpu:.1f} ms CPU per update; bare fan-out p99 {b:.1f} ms after the publish, "
                f"{fcpu:.1f} ms CPU ({fmiss + mmiss} missing)")
    finally:
        floor.kill()
        floor.wait()
    p99_fold, p99_pub, p99_floor = (B.pct(x, 99) for x in (mine_fold, mine_pub, floor_pub))
    log(f"sse: p99 {p99_fold:.1f} ms after the fold, {p99_pub:.1f} ms after the publish, bare "
        f"fan-out {p99_floor:.1f} ms; fold p50 {median(folds):.1f} ms; {missing} missing")
    good = [r for r in ratios if r is not None]
    return [row(f"web_sse_fanout_{subscribers}_p99_from_fold", round(p99_fold, 2), "ms",
                f"bare asyncio fan-out to {subscribers} sockets, p99 from the publish",
                round(p99_floor, 2), median(good) if good else None, "<= 50 ms",
                missing == 0 and p99_fold <= 50, ratios),
            row(f"web_sse_fanout_{subscribers}_p99_from_publish", round(p99_pub, 2), "ms",
                "publish -> folded (projector process), p50", round(median(folds), 2)),
            row(f"web_sse_fanout_{subscribers}_server_cpu_per_update", round(median(cpu_mine), 1),
                "ms", "bare asyncio fan-out server, CPU per update", round(median(cpu_floor), 1),
                round(median(cpu_mine) / median(cpu_floor), 2) if median(cpu_floor) else None,
                rounds=[round(a / b, 2) if b else None for a, b in zip(cpu_mine, cpu_floor)]),
            row(f"web_sse_fanout_{subscribers}_missing", missing, "deliveries", target="0",
                met=missing == 0)]


# ------------------------------------------------------------------ list by state

def jobs_list_p50_1m_tracks(url: str, tracks: int = 1_000_000, requests: int = 1000) -> dict:
    """``GET /v1/jobs?state=working`` p50 with ``tracks`` live tracks (target < 5 ms).

    Needs ``Tracker.list_tracks`` (the core's list index); until it is there the row
    says so. Fills the deployment with bulk publishes and a drain (minutes for 1M).
    """
    metric = "jobs_list_working_p50_1m_tracks"
    if not hasattr(Tracker, "list_tracks"):
        return row(metric, None, "ms", baseline_name="needs the list index (Tracker.list_tracks)",
                   target="< 5 ms")
    prefix = B.new_prefix("benchlist")
    d = B.open_deployment(url, prefix)
    srv = None
    try:
        pub = Publisher(d)
        for start in range(0, tracks, 1000):
            with pub.batch() as b:
                for i in range(start, min(start + 1000, tracks)):
                    b.enqueued(f"list{i:07d}", custom={"track": 1}, queue="default")
                    b.working(f"list{i:07d}", reserve_for=3600)
        srv = Processes(url, prefix)  # its projector folds the lot
        while any(r["lag"] for r in partition_status(d)):
            time.sleep(1)
        lat = []
        with httpx.Client(base_url=srv.base) as http:
            for _ in range(requests):
                t0 = time.perf_counter()
                r = http.get("/v1/jobs", params={"state": "working", "limit": 50})
                lat.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200 and len(r.json()["tracks"]) == 50
        p50 = median(lat)
        return row(metric, round(p50, 3), "ms", target="< 5 ms", met=p50 < 5, rounds=[])
    finally:
        if srv is not None:
            srv.stop()
        B.cleanup(d.client, prefix)
        d.close()


# ------------------------------------------------------------------ rows

def rows(quick: bool, **ctx: Any) -> list[dict]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:  # 1,000 SSE clients and their server each need a socket per stream
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    private = None
    url = ctx.get("redis_url")
    if not url:
        private = B.PrivateRedis()
        url = private.url
    prefix = B.new_prefix("benchweb")
    d = B.open_deployment(url, prefix, partitions=4)
    srv = None
    try:
        pub = Publisher(d)
        pub.enqueued(JID, custom={"track": 1}, queue="default", jobtype="Bench")
        pub.working(JID, reserve_for=3600)
        Tracker(d).set(JID, percent=0, desc="benchmark")
        srv = Processes(url, prefix)
        out = bench_rps(srv, quick) if ctx.get("only") in (None, "rps") else []
        out += bench_sse(srv, d, quick) if ctx.get("only") in (None, "sse") else []
        if ctx.get("list_1m"):
            out.append(jobs_list_p50_1m_tracks(url))
        else:
            out.append(row("jobs_list_working_p50_1m_tracks", None, "ms", target="< 5 ms",
                           baseline_name="run with --list-1m (needs the list index)"))
        return out
    finally:
        if srv is not None:
            srv.stop()
        B.cleanup(d.client, prefix)
        d.close()
        if private is not None:
            private.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", nargs="?", choices=["rows", "serve"], default="rows")
    ap.add_argument("--redis-url")
    ap.add_argument("--prefix")
    ap.add_argument("--port", type=int)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--list-1m", action="store_true", help="Also fill 1M tracks for /v1/jobs.")
    ap.add_argument("--only", choices=["rps", "sse"], help="Run one part.")
    a = ap.parse_args()
    if a.mode == "serve":
        serve(a.redis_url, a.prefix, a.port)
        return
    print(json.dumps(rows(a.quick, redis_url=a.redis_url, list_1m=a.list_1m, only=a.only), indent=2))


if __name__ == "__main__":
    main()
