"""Benchmark ``tracker serve --upstream``: the Faktory proxy against Faktory itself.

One Faktory server (the binary given by ``--faktory-bin`` or TRACKER_FAKTORY_BIN;
without one every row says "not measured"), one ``tracker serve --upstream`` in
front of it (a subprocess, as users run it), one load generator, the same for
both paths: this file's asyncio generator in its own process (``--load fload``
takes any Go-style generator with fload's flags and JSON instead). Rounds are
interleaved (direct, proxied, direct, proxied, ...) and each row reports the
median per-round ratio:

- ``proxy_push_throughput_50c``: PUSH/s over 50 connections, each a closed loop;
- ``proxy_ack_throughput_50c``: ACK/s over 50 connections looping PUSH, FETCH, ACK;
- ``proxy_push_added_p50_1c``: the p50 latency a PUSH gains through the proxy, one
  connection (no queueing, so the figure is the proxy's own time);
- ``proxy_tracked_push_throughput_50c``: as the first, with ``custom.track`` set,
  so the proxy also appends an ``enqueued`` per job (no target).

    python scripts/bench_proxy.py --faktory-bin PATH [--redis-url URL] [--quick] [--workers N]

With ``haproxy`` on PATH, the two throughput rows are also measured through haproxy in
TCP mode (rows ``haproxy_floor_*``, no target): a relay that parses nothing, in C, so
the least any proxy can cost here.

``--workers N`` runs the proxy as ``tracker serve --workers N`` (N processes on one port).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _benchlib as B  # noqa: E402
import redis  # noqa: E402

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None

TARGET_RATIO = 0.8
TARGET_ADDED_US = 150.0
METRICS = [("proxy_push_throughput_50c", "PUSH/s", ">= 0.8x"),
           ("proxy_ack_throughput_50c", "ACK/s", ">= 0.8x"),
           ("proxy_push_added_p50_1c", "us", "<= 150 us"),
           ("proxy_tracked_push_throughput_50c", "PUSH/s", None)]


# ------------------------------------------------------------- load generator
class _Conn(asyncio.Protocol):
    """One closed-loop client: PUSH (then FETCH and ACK in "loop" mode), timed."""

    def __init__(self, n: int, mode: str, track: bool, stats: dict, stop_at: list):
        self.n, self.mode, self.stats, self.stop_at = n, mode, stats, stop_at
        self.custom = ',"custom":{"track":1}' if track else ""
        self.buf = b""
        self.state = "hi"
        self.i = 0
        self.t0 = 0.0
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()

    def connection_made(self, t):
        self.t = t

    def _push(self):
        self.i += 1
        self.state = "PUSH"
        self.t0 = time.perf_counter()
        self.t.write(b'PUSH {"jid":"bench-%d-%d","jobtype":"Bench","queue":"bench-%d",'
                     b'"args":[1],"retry":25%s}\r\n' % (self.n, self.i, self.n,
                                                         self.custom.encode()))

    def _reply(self) -> Optional[bytes]:
        end = self.buf.find(b"\r\n")
        if end < 0:
            return None
        if self.buf[:1] == b"$" and self.buf[1:2] != b"-":
            need = end + 2 + int(self.buf[1:end]) + 2
            if len(self.buf) < need:
                return None
            r, self.buf = self.buf[end + 2:need - 2], self.buf[need:]
            return r
        r, self.buf = self.buf[:end], self.buf[end + 2:]
        return r

    def data_received(self, data):
        self.buf += data
        while True:
            r = self._reply()
            if r is None:
                return
            if self.state == "hi":
                self.state = "hello"
                self.t.write(b'HELLO {"v":2,"hostname":"bench"}\r\n')
                continue
            if r[:1] == b"-":
                self.stats["errors"] += 1
            now = time.perf_counter()
            if self.state != "hello" and self.stop_at[0] and now < self.stop_at[0]:
                self.stats["lat"].setdefault(self.state, []).append(now - self.t0)
            if self.stop_at[1] and now >= self.stop_at[1]:
                self.t.write(b"END\r\n")
                self.t.close()
                if not self.done.done():
                    self.done.set_result(None)
                return
            if self.state in ("hello", "ACK") or self.mode == "push":
                self._push()
            elif self.state == "PUSH":
                self.state, self.t0 = "FETCH", now
                self.t.write(b"FETCH bench-%d\r\n" % self.n)
            elif self.state == "FETCH":
                jid = json.loads(r)["jid"] if r.startswith(b"{") else None
                if jid is None:
                    self._push()
                else:
                    self.state, self.t0 = "ACK", now
                    self.t.write(b'ACK {"jid":"%s"}\r\n' % jid.encode())

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_exception(exc or RuntimeError("closed by the server"))


async def _generate(port: int, conns: int, seconds: float, mode: str, track: bool) -> dict:
    loop = asyncio.get_running_loop()
    stats: dict = {"lat": {}, "errors": 0}
    stop_at = [0.0, 0.0]  # measure until [0]; close at [1]
    protos = []
    for c in range(conns):
        _, p = await loop.create_connection(
            lambda c=c: _Conn(c, mode, track, stats, stop_at), "127.0.0.1", port)
        protos.append(p)
    await asyncio.sleep(0.3)  # warm-up, not measured
    stats["lat"].clear()
    start = time.perf_counter()
    stop_at[0] = start + seconds
    stop_at[1] = start + seconds
    await asyncio.gather(*(p.done for p in protos))
    out = {"errors": stats["errors"]}
    for cmd, lat in stats["lat"].items():
        lat.sort()
        out[cmd] = {"count": len(lat), "ops_s": len(lat) / seconds,
                    "p50_us": lat[len(lat) // 2] * 1e6, "p99_us": lat[int(len(lat) * .99)] * 1e6}
    return out


def _generator_main(argv: list[str]) -> None:
    port, conns, seconds, mode, track = int(argv[0]), int(argv[1]), float(argv[2]), argv[3], \
        argv[4] == "1"
    run = uvloop.run if uvloop is not None else asyncio.run
    print(json.dumps(run(_generate(port, conns, seconds, mode, track))))


def load(port: int, conns: int, seconds: float, mode: str, track: bool = False,
         fload: Optional[str] = None) -> dict:
    """One measurement in a fresh process; {cmd: {count, ops_s, p50_us, p99_us}}."""
    if fload:
        cmd = [fload, "-c", str(conns), "-d", str(seconds), "-q", "bench"]
        cmd += (["-push-only"] if mode == "push" else []) + (["-track"] if track else [])
        env = dict(os.environ, FAKTORY_URL=f"tcp://127.0.0.1:{port}")
        raw = json.loads(subprocess.run(cmd, capture_output=True, text=True, env=env,
                                        timeout=seconds + 60).stdout)
        return {k: {"count": v["count"], "ops_s": v["ops_s"], "p50_us": v["p50_ms"] * 1000,
                    "p99_us": v["p99_ms"] * 1000} for k, v in raw["ops"].items()}
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--generate", str(port),
                           str(conns), str(seconds), mode, "1" if track else "0"],
                          capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr.strip()[-300:]}")
    return json.loads(done.stdout)


# ---------------------------------------------------------------- the servers
class Faktory:
    """A Faktory server of its own (no password), on free ports, in a temporary dir."""

    def __init__(self, binary: str):
        self.dir = tempfile.mkdtemp(prefix="tracker-bench-faktory-")
        self.port, web = B.free_port(), B.free_port()
        env = {k: v for k, v in os.environ.items() if k != "FAKTORY_PASSWORD"}
        self.proc = subprocess.Popen([binary, "-b", f"127.0.0.1:{self.port}", "-w",
                                      f"127.0.0.1:{web}", "-e", "development", "-d",
                                      f"{self.dir}/db", "-c", f"{self.dir}/conf"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, self.proc)

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            f = s.makefile("rwb")
            f.readline()
            f.write(b'HELLO {"v":2}\r\nFLUSH\r\nEND\r\n')
            f.flush()
            f.readline()
            f.readline()

    def stop(self) -> None:
        B.stop_process(self.proc, self.dir)


def _wait_port(port: int, proc: subprocess.Popen, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


class HAProxy:
    """haproxy in TCP mode in front of the same Faktory: a relay in C that parses nothing,
    the least any proxy can cost on this machine (its rows have no target)."""

    def __init__(self, upstream_port: int):
        self.dir = tempfile.mkdtemp(prefix="tracker-bench-haproxy-")
        self.port = B.free_port()
        cfg = os.path.join(self.dir, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(f"global\n  maxconn 4096\n  nbthread 1\ndefaults\n  mode tcp\n"
                    f"  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n"
                    f"frontend f\n  bind 127.0.0.1:{self.port}\n  default_backend b\n"
                    f"backend b\n  server s1 127.0.0.1:{upstream_port}\n")
        self.proc = subprocess.Popen([shutil.which("haproxy") or "haproxy", "-f", cfg],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, self.proc)

    def stop(self) -> None:
        B.stop_process(self.proc, self.dir)


# ------------------------------------------------------------------- the rows
def _row(metric, unit, target, figure=None, base=None, base_name=None, ratio=None, met=None,
         rounds=None, **extra) -> dict:
    row = {"metric": metric, "figure": figure, "unit": unit if figure is not None
           else "not measured", "baseline_name": base_name, "baseline": base, "ratio": ratio,
           "target": target, "met": met, "rounds": rounds or []}
    row.update(extra)
    return row


def not_measured(why: str) -> list[dict]:
    return [_row(m, u, t, note=why) for m, u, t in METRICS]


def rows(quick: bool = False, **ctx) -> list[dict]:
    """The proxy's rows (``scripts/bench.py`` calls this with ``faktory_bin``, ``redis_url``)."""
    binary = ctx.get("faktory_bin") or os.environ.get("TRACKER_FAKTORY_BIN")
    if not binary:
        return not_measured("no Faktory binary (--faktory-bin or TRACKER_FAKTORY_BIN)")
    if not shutil.which("redis-server"):
        return not_measured("Faktory needs redis-server on PATH")
    rounds = ctx.get("rounds") or 5
    secs = 2.0 if quick else 4.0
    fload = ctx.get("fload")
    private = None if ctx.get("redis_url") else B.PrivateRedis()
    url = ctx.get("redis_url") or private.url  # type: ignore[union-attr]
    prefix = B.new_prefix("bench-proxy")
    fk = Faktory(binary)
    proxy = None
    hap = HAProxy(fk.port) if shutil.which("haproxy") else None
    try:
        proxy, pport, _log = B.start_serve(url, prefix, "--upstream",
                                           f"tcp://127.0.0.1:{fk.port}",
                                           workers=ctx.get("workers") or 1)
        scenarios = [("proxy_push_throughput_50c", "push", 50, False, "PUSH"),
                     ("proxy_ack_throughput_50c", "loop", 50, False, "ACK"),
                     ("proxy_push_added_p50_1c", "push", 1, False, "PUSH"),
                     ("proxy_tracked_push_throughput_50c", "push", 50, True, "PUSH")]
        out = []
        for (metric, unit, target), (_, mode, conns, track, cmd) in zip(METRICS, scenarios):
            direct, proxied, floor = [], [], []
            paths = [(fk.port, direct), (pport, proxied)]
            if hap is not None and conns > 1 and not track:
                paths.append((hap.port, floor))
            for _ in range(rounds):
                for port, into in paths:
                    fk.flush()
                    into.append(load(port, conns, secs, mode, track, fload)[cmd])
            if conns == 1:
                added = [p["p50_us"] - d["p50_us"] for d, p in zip(direct, proxied)]
                fig, base = statistics.median(added), statistics.median(
                    d["p50_us"] for d in direct)
                ratios = [p["p50_us"] / d["p50_us"] for d, p in zip(direct, proxied)]
                out.append(_row(metric, unit, target, round(fig, 1), round(base, 1),
                                "direct p50", round(statistics.median(ratios), 3),
                                fig <= TARGET_ADDED_US, [round(a, 1) for a in added],
                                ratio_rounds=[round(r, 3) for r in ratios]))
            else:
                ratios = [p["ops_s"] / d["ops_s"] for d, p in zip(direct, proxied)]
                ratio = statistics.median(ratios)
                out.append(_row(metric, unit, target,
                                round(statistics.median(p["ops_s"] for p in proxied)),
                                round(statistics.median(d["ops_s"] for d in direct)),
                                "direct to Faktory", round(ratio, 3),
                                None if target is None else ratio >= TARGET_RATIO,
                                [round(r, 3) for r in ratios],
                                spread=round(max(ratios) - min(ratios), 3),
                                p50_us={"direct": round(statistics.median(
                                    d["p50_us"] for d in direct)), "proxied": round(
                                    statistics.median(p["p50_us"] for p in proxied))}))
            if floor:
                fr = [h["ops_s"] / d["ops_s"] for d, h in zip(direct, floor)]
                out.append(_row(metric.replace("proxy_", "haproxy_floor_"), unit, None,
                                round(statistics.median(h["ops_s"] for h in floor)),
                                round(statistics.median(d["ops_s"] for d in direct)),
                                "direct to Faktory", round(statistics.median(fr), 3), None,
                                [round(r, 3) for r in fr],
                                note="haproxy (C, TCP mode, parses nothing) in the same rounds: "
                                     "the least any relay costs on this machine"))
        for r in out:
            r["load_generator"] = fload or "scripts/bench_proxy.py (asyncio)"
        return out
    finally:
        if proxy is not None:
            proxy.terminate()
            proxy.wait(15)
        if hap is not None:
            hap.stop()
        fk.stop()
        if private is not None:
            private.stop()
        else:
            B.cleanup(redis.Redis.from_url(url), prefix)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--generate"]:
        _generator_main(sys.argv[2:])
        sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--faktory-bin", default=os.environ.get("TRACKER_FAKTORY_BIN"))
    ap.add_argument("--redis-url", help="Redis for the tracker (default: a private one)")
    ap.add_argument("--load", metavar="FLOAD", help="a Go-style load generator (fload's flags)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=1, help="tracker serve --workers N")
    a = ap.parse_args()
    print(json.dumps(rows(a.quick, faktory_bin=a.faktory_bin, redis_url=a.redis_url,
                          fload=a.load, rounds=a.rounds, workers=a.workers), indent=1))
