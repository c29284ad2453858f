"""TRACK GET over ``tracker serve`` against ``redis-benchmark -t get``, with a load
generator that is checked not to be the bottleneck.

    python scripts/bench_serve.py [--redis-url URL] [--quick] [--rounds N]

``tracker serve --port 0`` runs as its own process, as users run it, on 1,000 tracked
jobs. The load generator is a forked process of this script: one epoll loop over
plain non-blocking sockets, each connection a closed loop (send one request, wait for
its reply, send the next), as ``redis-benchmark`` runs without ``-P``; the first
0.3 s are not counted. It speaks the Faktory protocol (HI, HELLO, then ``TRACK GET
jid``) to ``serve`` and the inline ``GET key:__rand_int__`` that ``redis-benchmark -t
get`` sends to Redis, so it is measured against Redis too: when it reaches Redis at
about redis-benchmark's rate, it is not what limits ``serve``. Each round runs, in
order: redis-benchmark -c 50, the generator on Redis (50 connections, then 1), and the
generator on ``serve`` (50, then 1). The CPU share of each process in each run
(/proc, INFO cpu, and the generator's own rusage) is in the figures: the process near
100% of a core is the limit.

Rows: serve_track_get_per_s_50conn (vs redis-benchmark -c 50, target >= 0.6x),
loadgen_redis_get_per_s_50conn (the generator on Redis vs redis-benchmark: its
headroom), serve_track_get_p50_ms_1conn (vs the generator's Redis GET p50, 1 conn).
"""

from __future__ import annotations

import multiprocessing
import os
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _benchlib as B  # noqa: E402
import redis  # noqa: E402

from tracker.projector import Projector  # noqa: E402
from tracker.publisher import Publisher  # noqa: E402

JIDS = 1000
WORKERS = 2  # the --workers row: one per core of the machine the figures come from
WARM = 0.3
SECONDS = {True: 0.6, False: 3.0}


# --------------------------------------------------------------- load generator


def _readline(s: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\r\n"):
        got = s.recv(4096)
        if not got:
            raise RuntimeError(f"connection closed during the handshake after {buf!r}")
        buf += got
    return buf


def _load(port: int, conns: int, seconds: float, requests: list[bytes], faktory: bool,
          password: str, out) -> None:
    """Child: closed-loop load; sends (replies, seconds, p50, p99, cpu share) on ``out``."""
    socks = []
    for _ in range(conns):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if faktory:
            _readline(s)  # +HI
            s.sendall(b'HELLO {"v":2,"hostname":"bench"}\r\n')
        elif password:
            s.sendall(b"AUTH %s\r\n" % password.encode())
        if faktory or password:
            line = _readline(s)
            if not line.startswith(b"+OK"):
                raise RuntimeError(f"handshake refused: {line[:100]!r}")
        s.setblocking(False)
        socks.append(s)
    ep = select.epoll()
    by_fd = {}
    nreq = len(requests)
    for i, s in enumerate(socks):
        # per connection: socket, pending bytes, request index, time sent
        by_fd[s.fileno()] = [s, b"", i * 7919 % nreq, 0.0]
        ep.register(s.fileno(), select.EPOLLIN)
    clock = time.perf_counter
    start = clock()
    t_count, t_end = start + WARM, start + WARM + seconds
    lat: list[float] = []
    add = lat.append
    for st in by_fd.values():
        st[3] = clock()
        st[0].send(requests[st[2]])
    r0 = None
    live = len(by_fd)
    while live:
        for fd, _ in ep.poll(1.0):
            st = by_fd[fd]
            data = st[0].recv(65536)
            if not data:
                raise RuntimeError("the server closed a connection")
            buf = st[1] + data if st[1] else data
            end = buf.find(b"\r\n")
            if end < 0 or buf[0] != 36:  # not yet a whole header, or not a bulk string
                if end >= 0:
                    raise RuntimeError(f"unexpected reply {buf[:200]!r}")
                st[1] = buf
                continue
            n = int(buf[1:end])
            total = end + 2 + (n + 2 if n >= 0 else 0)
            if len(buf) < total:
                st[1] = buf
                continue
            st[1] = buf[total:]
            now = clock()
            if now >= t_count:
                if r0 is None:
                    r0 = resource.getrusage(resource.RUSAGE_SELF)
                add(now - st[3])
            if now >= t_end:
                ep.unregister(fd)
                st[0].close()
                live -= 1
                continue
            i = st[2] = (st[2] + 1) % nreq
            st[3] = now
            st[0].send(requests[i])
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    wall = clock() - t_count
    cpu = (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) if r0 else 0.0
    lat.sort()
    out.send({"replies": len(lat), "seconds": wall, "per_s": len(lat) / wall,
              "p50_ms": lat[len(lat) // 2] * 1000 if lat else None,
              "p99_ms": lat[int(len(lat) * 0.99)] * 1000 if lat else None,
              "cpu": round(cpu / wall, 2)})


def load(port: int, conns: int, seconds: float, requests: list[bytes], faktory: bool,
         password: str = "", watch: dict | None = None) -> dict:
    """Run the generator in a forked process; ``watch`` = {name: pid or redis client}
    whose CPU share over the run is added to the result."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    before = {k: _cpu(v) for k, v in (watch or {}).items()}
    t0 = time.perf_counter()
    ticks = B.machine_ticks()
    p = ctx.Process(target=_load, args=(port, conns, seconds, requests, faktory, password,
                                        child), daemon=True)
    p.start()
    if not parent.poll(seconds + 60):
        p.kill()
        raise RuntimeError("the load generator did not finish")
    res = parent.recv()
    p.join(10)
    wall = time.perf_counter() - t0
    res["machine_busy"] = B.busy_share(ticks, B.machine_ticks())
    for k, v in (watch or {}).items():
        after = _cpu(v)
        if before[k] is not None and after is not None:
            res[f"cpu_{k}"] = round((after - before[k]) / wall, 2)
    return res


def _cpu(what) -> float | None:
    """CPU seconds of a pid, of a tuple of pids (a serve's workers), or of a Redis."""
    if isinstance(what, int):
        return B.cpu_seconds(what)
    if isinstance(what, tuple):
        total = 0.0
        for pid in what:
            cpu = B.cpu_seconds(pid)
            if cpu is None:
                return None
            total += cpu
        return total
    return B.redis_cpu(what)


def workers_of(pid: int) -> tuple:
    """The worker processes of ``tracker serve --workers N`` (its children), from /proc."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return tuple(int(x) for x in f.read().split())
    except OSError:
        return ()


def redis_benchmark(url: str, conns: int, n: int) -> dict:
    exe = shutil.which("redis-benchmark")
    if not exe:
        raise B.Skip("redis-benchmark is not on PATH")
    u = redis.connection.parse_url(url)
    target = ["-h", u.get("host", "127.0.0.1"), "-p", str(u.get("port", 6379))]
    if u.get("password"):
        target += ["-a", u["password"], "--no-auth-warning"]
    before = os.times()
    t0 = time.perf_counter()
    out = subprocess.run([exe, *target, "-t", "get", "-c", str(conns), "-n", str(n), "-q"],
                         capture_output=True, text=True, timeout=300).stdout
    wall = time.perf_counter() - t0
    after = os.times()
    m = re.findall(r"GET: ([\d.]+) requests per second", out.replace("\r", "\n"))
    if not m:
        raise RuntimeError(f"redis-benchmark printed no GET figure: {out[-200:]!r}")
    cpu = (after.children_user + after.children_system - before.children_user
           - before.children_system)
    return {"per_s": float(m[-1]), "requests": n, "cpu": round(cpu / wall, 2)}


# -------------------------------------------------------------------- scenario


def rows(quick: bool = False, rounds: int = 5, redis_url: str = "", log=print, **ctx) -> list:
    u = redis.connection.parse_url(redis_url)
    if "path" in u:
        raise B.Skip("the load generator speaks TCP; --redis-url is a unix socket")
    rport, password = int(u.get("port", 6379)), u.get("password") or ""
    secs = SECONDS[quick]
    c = redis.Redis.from_url(redis_url)
    prefix = "bench-serve-" + uuid.uuid4().hex[:8]
    d = B.open_deployment(redis_url, prefix)
    proc = proc2 = None
    try:
        jids = [f"bench-{i}" for i in range(JIDS)]
        with Publisher(d).batch() as b:
            for j in jids:
                b.enqueued(j, {"track": 1})
                b.set(j, percent=42, desc="benchmarking")
        Projector(d, consumer="bench").drain()
        proc, port, logged = B.start_serve(redis_url, prefix)
        proc2, port2, logged2 = B.start_serve(redis_url, prefix, workers=WORKERS)
        track = [b"TRACK GET %s\r\n" % j.encode() for j in jids]
        get = [b"GET key:__rand_int__\r\n"]
        watch = {"serve": proc.pid, "redis": c}
        watch2 = {"serve": workers_of(proc2.pid), "redis": c}
        est = [50_000.0]

        def raw(i: int) -> dict:
            rb = redis_benchmark(redis_url, 50, max(10_000, int(est[0] * secs)))
            est[0] = rb["per_s"]
            g50 = load(rport, 50, secs, get, False, password, {"redis": c})
            g1 = load(rport, 1, secs / 2, get, False, password)
            return {"rb": rb["per_s"], "rb_cpu": rb["cpu"], "gen50": g50["per_s"],
                    "gen50_run": g50, "gen1_p50": g1["p50_ms"]}

        def serve(i: int) -> dict:
            s50 = load(port, 50, secs, track, True, "", watch)
            s1 = load(port, 1, secs / 2, track, True, "", watch)
            log(f"  round {i + 1}: redis-benchmark {R.base[-1]['rb']:,.0f}/s, generator on "
                f"Redis {R.base[-1]['gen50']:,.0f}/s, serve {s50['per_s']:,.0f}/s (CPU: serve "
                f"{s50.get('cpu_serve')}, generator {s50['cpu']}, redis {s50.get('cpu_redis')}; "
                f"machine {s50['machine_busy']} busy)")
            w50 = load(port2, 50, secs, track, True, "", watch2)
            log(f"    serve --workers {WORKERS}: {w50['per_s']:,.0f}/s (CPU: workers "
                f"{w50.get('cpu_serve')}, generator {w50['cpu']}, redis {w50.get('cpu_redis')}; "
                f"machine {w50['machine_busy']} busy)")
            return {"per_s": s50["per_s"], "run": s50, "p50_1": s1["p50_ms"],
                    "workers_per_s": w50["per_s"], "workers_run": w50}

        R = B.Rounds()
        R.run(rounds, raw, serve)
        for p in (proc, proc2):
            p.send_signal(signal.SIGTERM)
        rc, rc2 = proc.wait(timeout=15), proc2.wait(timeout=15)
        warnings = [ln for ln in logged + logged2 if " WARNING " in ln or " ERROR " in ln][:5]
    finally:
        for p in (proc, proc2):
            if p is not None and p.poll() is None:
                p.kill()
        B.cleanup(c, prefix)
        d.close()
        c.close()
    runs = [r["run"] for r in R.subj]
    med = sorted(runs, key=lambda r: r["per_s"])[len(runs) // 2]
    detail = {"serve_50": runs, "generator_redis_50": [r["gen50_run"] for r in R.base],
              "redis_benchmark_50": R.b("rb"), "redis_benchmark_cpu": R.b("rb_cpu"),
              "serve_workers_50": [r["workers_run"] for r in R.subj],
              "serve_exit_code": rc, "serve_workers_exit_code": rc2, "serve_warnings": warnings, "seconds_per_run": secs}
    limit = (f"median round: p99 {med['p99_ms']:.2f} ms; CPU of a core: serve "
             f"{med.get('cpu_serve')}, generator {med['cpu']}, redis {med.get('cpu_redis')}; "
             f"both cores {med['machine_busy']} busy (all processes)")
    return [
        B.row("serve_track_get_per_s_50conn", "req/s", R.s("per_s"), R.b("rb"),
              "redis-benchmark -t get -c 50", ">= 0.6x", note=limit, detail=detail),
        B.row(f"serve_{WORKERS}workers_track_get_per_s_50conn", "req/s", R.s("workers_per_s"),
              R.b("rb"), "redis-benchmark -t get -c 50", ">= 0.6x",
              note=f"tracker serve --workers {WORKERS}: the same load, in the same rounds"),
        B.row("loadgen_redis_get_per_s_50conn", "req/s", R.b("gen50"), R.b("rb"),
              "redis-benchmark -t get -c 50",
              note="the bench's generator on Redis GET: its headroom over serve"),
        B.row("serve_track_get_p50_ms_1conn", "ms", R.s("p50_1"), R.b("gen1_p50"),
              "the generator's Redis GET p50, 1 connection"),
    ]


def main(argv=None) -> int:
    return B.module_main(rows, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
