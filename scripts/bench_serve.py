"""Benchmark ``tracker serve``: TRACK GET requests/s and p99 latency, 1 and 50 connections.

The server runs as its own process (``tracker serve --port 0``, as users run it);
the load generator is this process, asyncio raw sockets, each connection a
closed loop (send one TRACK GET, wait for the reply, repeat), like
``redis-benchmark`` without pipelining. In the same run ``redis-benchmark -t get``
measures raw Redis GET with the same connection counts, so the figures are
reported as ratios too. ``scripts/bench.py`` imports ``run``.

    python scripts/bench_serve.py [--redis-url URL] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

import redis

from tracker.projector import Projector
from tracker.publisher import Publisher
from tracker.store.deployment import Deployment
from tracker.store.settings import Settings

JIDS = 1000


class _Load(asyncio.Protocol):
    """One client connection: handshake, then TRACK GET in a closed loop."""

    def __init__(self, jids: list[bytes], lat: list, stop_at: float, done: asyncio.Future):
        self.jids, self.lat, self.stop_at, self.done = jids, lat, stop_at, done
        self.buf = bytearray()
        self.state = "hi"
        self.i = 0
        self.sent = 0.0

    def connection_made(self, transport):
        self.t = transport

    def _send(self):
        self.i += 1
        self.sent = time.perf_counter()
        self.t.write(b"TRACK GET %s\r\n" % self.jids[self.i % len(self.jids)])

    def data_received(self, data):
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n")
            if end < 0:
                return
            if self.state == "hi":
                del self.buf[:end + 2]
                self.state = "hello"
                self.t.write(b'HELLO {"v":2,"hostname":"bench"}\r\n')
            elif self.state == "hello":
                del self.buf[:end + 2]
                self.state = "run"
                self._send()
            else:
                if self.buf[0:1] != b"$":
                    if not self.done.done():
                        self.done.set_exception(RuntimeError(bytes(self.buf[:200]).decode()))
                    self.t.close()
                    return
                n = int(self.buf[1:end])
                if len(self.buf) < end + 2 + n + 2:
                    return
                del self.buf[:end + 2 + n + 2]
                now = time.perf_counter()
                self.lat.append(now - self.sent)
                if now >= self.stop_at:
                    self.t.write(b"END\r\n")
                    self.t.close()
                    if not self.done.done():
                        self.done.set_result(None)
                    return
                self._send()

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_exception(exc or RuntimeError("server closed the connection"))


async def _load(port: int, conns: int, seconds: float, jids: list[bytes]) -> dict:
    loop = asyncio.get_running_loop()
    lat: list[float] = []
    # a short warm-up with the same connections' count, not measured
    for measured in (False, True):
        sample: list[float] = []
        start = time.perf_counter()
        stop_at = start + (seconds if measured else min(0.5, seconds / 4))
        futs = []
        for c in range(conns):
            fut = loop.create_future()
            await loop.create_connection(lambda: _Load(jids[c::conns] or jids, sample, stop_at, fut),  # noqa: B023 (called at once)
                                         "127.0.0.1", port)
            futs.append(fut)
        await asyncio.gather(*futs)
        elapsed = time.perf_counter() - start
        lat = sample
    lat.sort()
    return {"connections": conns, "requests": len(lat), "seconds": round(elapsed, 2),
            "rps": round(len(lat) / elapsed),
            "p50_ms": round(lat[len(lat) // 2] * 1000, 3),
            "p99_ms": round(lat[int(len(lat) * 0.99)] * 1000, 3)}


def _redis_benchmark(url: str, conns: int, n: int) -> dict | None:
    exe = shutil.which("redis-benchmark")
    if not exe:
        return None
    u = redis.connection.parse_url(url)
    if "path" in u:
        target = ["-s", u["path"]]
    else:
        target = ["-h", u.get("host", "127.0.0.1"), "-p", str(u.get("port", 6379))]
    if u.get("password"):
        target += ["-a", u["password"]]
    cmd = [exe, *target, "-t", "get", "-c", str(conns), "-n", str(n), "-q"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    m = re.findall(r"GET: ([\d.]+) requests per second", out.replace("\r", "\n"))
    shown = " ".join("***" if u.get("password") and a == u["password"] else a for a in cmd)
    return {"command": shown, "rps": round(float(m[-1])) if m else None}


# A do-nothing asyncio server speaking the same replies: the ceiling any pure-Python
# asyncio server reaches with this load generator on this machine, right now.
_FLOOR = r"""
import asyncio
J = b'{"jid":"bench-0","state":"unknown","updated_at":""}'
BODY = b"$%d\r\n%s\r\n" % (len(J), J)
class P(asyncio.Protocol):
    def connection_made(self, t):
        self.t = t
        t.write(b'+HI {"v":2}\r\n')
    def data_received(self, d):
        n = d.count(b"\n")
        if d.startswith(b"HELLO"):
            self.t.write(b"+OK\r\n")
            n -= 1
        if n > 0:
            self.t.write(BODY * n)
async def main():
    srv = await asyncio.get_running_loop().create_server(P, "127.0.0.1", 0)
    print(srv.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(600)
asyncio.run(main())
"""


def _floor(conns: int, seconds: float, jids: list[bytes]) -> dict:
    proc = subprocess.Popen([sys.executable, "-c", _FLOOR], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        return asyncio.run(_load(port, conns, seconds, jids))
    finally:
        proc.kill()
        proc.wait()


def _start_server(url: str, prefix: str) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-c", "from tracker.cli import main; main()", "--redis-url", url,
           "--prefix", prefix, "serve", "--port", "0"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        m = re.search(r"serving Faktory protocol on [^\s]+:(\d+)", line)
        if m:  # keep draining its log, or a chatty server would block on a full pipe
            proc.log = []
            threading.Thread(target=lambda: proc.log.extend(proc.stderr), daemon=True).start()
            return proc, int(m.group(1))
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("tracker serve did not start")


def _cleanup(client: redis.Redis, prefix: str) -> None:
    """Delete this run's keys only (the Redis may be shared)."""
    for pattern in (f"{{{prefix}:*", f"{prefix}:*"):
        found = list(client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(found), 500):
            client.delete(*found[i:i + 500])


def run(redis_url: str, quick: bool) -> dict:
    """Seed tracks, start ``tracker serve``, measure it and raw Redis; returns the figures."""
    prefix = "bench-serve-" + uuid.uuid4().hex[:8]
    d = Deployment.open(Settings(redis_url=redis_url, prefix=prefix, partitions=8))
    proc = None
    try:
        jids = [f"bench-{i}" for i in range(JIDS)]
        with Publisher(d).batch() as b:
            for j in jids:
                b.enqueued(j, {"track": 1})
                b.set(j, percent=42, desc="benchmarking")
        Projector(d, consumer="bench").drain()
        load = os.getloadavg()[0]
        proc, port = _start_server(redis_url, prefix)
        seconds = 1.5 if quick else 5.0
        bj = [j.encode() for j in jids]
        serve = {c: asyncio.run(_load(port, c, seconds, bj)) for c in (1, 50)}
        floor = _floor(50, seconds, bj)
        n = 20_000 if quick else 200_000
        raw = {c: _redis_benchmark(redis_url, c, n if c == 50 else n // 4) for c in (1, 50)}
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=15)
        time.sleep(0.1)
        log = "".join(proc.log)
        out = {"serve_1": serve[1], "serve_50": serve[50], "redis_benchmark_1": raw[1],
               "redis_benchmark_50": raw[50], "serve_exit_code": rc,
               "serve_warnings": [ln for ln in log.splitlines() if " WARNING " in ln
                                  or " ERROR " in ln][:5],
               "load_average": [load, os.getloadavg()[0]],  # other work skews every figure
               "python_asyncio_floor_50": floor,
               "ratio_vs_python_floor_50": round(serve[50]["rps"] / floor["rps"], 3),
               "target_rps_50": 20_000, "meets_target": serve[50]["rps"] >= 20_000}
        for c in (1, 50):
            if raw[c] and raw[c]["rps"]:
                out[f"ratio_vs_redis_{c}"] = round(serve[c]["rps"] / raw[c]["rps"], 3)
        return out
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        _cleanup(d.client, prefix)
        d.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--redis-url", default=os.environ.get("TRACKER_REDIS_URL",
                                                          "redis://127.0.0.1:6379/0"))
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    print(json.dumps(run(a.redis_url, a.quick), indent=2))
