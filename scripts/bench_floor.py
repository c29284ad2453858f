"""Ceilings: the least work a fold must do, against the baselines of issue 15's 2x targets.

    python scripts/bench_floor.py [--redis-url URL] [--quick] [--rounds N]

projector_jobs_per_s and replay_events_per_s must reach 2x their baselines (the naive
tracker, pipelined XADD). These rows measure, in the same interleaved rounds as those
baselines, folds that do strictly less than the real ones: they read and fold the same
log with the same code but store nothing (no snapshot loaded or written, no history, no
state index, no expiry). Whatever the real projector or rebuild does on top costs more,
so a floor below 2x shows the target out of reach on this machine for that design.

- floor_project_lua_read: ``scripts/lua/floor.lua`` group-read: XREADGROUP batches of 500
  and XACK them, in Redis (project.lua's read and acknowledgement alone).
- floor_project_lua_fold: the same plus Fold.decode and Fold.apply of every entry (the
  fold project.lua runs), still storing nothing.
- floor_project_python_fold: the client-side alternative: XRANGE batches of 500 through
  redis-py (hiredis), ``events.decode_entry`` and ``projections.track.apply`` per entry,
  no writes; ``cpu_us_per_event`` is this process's CPU alone. A client-side projector
  also has to read the jobs' values and write them back (under a compare-and-set), so
  its rate is at most this, and at most the Redis side's rate too.
- floor_replay_lua_read / _lua_fold: floor.lua range modes, XRANGE chunks of 5000
  (replay.lua's chunk), against pipelined XADD of the same entries.
- floor_replay_python_fold / _python2_fold: the Python floor in one process, and split
  over two processes (partitions halved; 2 is this machine's core count, and Redis needs
  one of them too), against pipelined XADD.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _benchlib as B  # noqa: E402
import redis  # noqa: E402

from projections import track as fold_mod  # noqa: E402
from tracker import events  # noqa: E402
from tracker.projector import Projector  # noqa: E402
from tracker.publisher import Publisher  # noqa: E402
from tracker.store import keys, scripts  # noqa: E402
from tracker.store.scripts import LIMITS  # noqa: E402

SIZES = {True: 20_000, False: 200_000}
PROJECT_BATCH = 500  # Projector's default batch
REPLAY_CHUNK = 5000  # tracker.replay.CHUNK


def floor_source() -> str:
    """floor.lua with the fold and the ID parser the real scripts run, prepended."""
    return scripts.compose("fold", "ids", "packed", Path(__file__).parent / "lua" / "floor.lua")


def lua_floor(c: redis.Redis, sha: str, streams: list, mode: str, ttl: int) -> int:
    """Run floor.lua over every stream to its end; returns the entries read."""
    count = PROJECT_BATCH if mode.startswith("group") else REPLAY_CHUNK
    n = 0
    for s in streams:
        after = "0-0"
        while True:
            got, last = c.evalsha(sha, 1, s, mode, keys.GROUP, "floor", count, after, ttl,
                                  *LIMITS)
            if not got:
                break
            n += got
            after = last.decode()
    return n


def python_floor(c: redis.Redis, streams: list, count: int, ttl: int) -> int:
    """XRANGE every stream in pages of ``count``, decode and fold each entry; no writes."""
    n = 0
    decode, apply = events.decode_entry, fold_mod.apply
    for s in streams:
        tracks: dict = {}
        lo = "-"
        while True:
            got = c.xrange(s, min=lo, max="+", count=count)
            if not got:
                break
            for eid, fields in got:
                try:
                    ev = decode(fields)
                except events.PoisonEntry:
                    continue
                at = int(eid.split(b"-", 1)[0])
                t = apply(tracks.get(ev.jid), ev, at, ttl)
                if t is None:
                    tracks.pop(ev.jid, None)
                else:
                    tracks[ev.jid] = t
            n += len(got)
            lo = "(" + got[-1][0].decode()
    return n


def _child(url: str, streams: list, ttl: int, ready, go, done) -> None:
    c = redis.Redis.from_url(url)
    c.ping()
    ready.put(True)
    go.wait()
    done.put(python_floor(c, streams, REPLAY_CHUNK, ttl))


def python_floor_parallel(url: str, streams: list, ttl: int, procs: int = 2) -> tuple[int, float]:
    """python_floor over ``procs`` forked processes, the streams dealt out between them;
    (entries, seconds from the start signal until the last one finished)."""
    ctx = multiprocessing.get_context("fork")
    ready, go, done = ctx.Queue(), ctx.Event(), ctx.Queue()
    kids = [ctx.Process(target=_child, args=(url, streams[i::procs], ttl, ready, go, done),
                        daemon=True) for i in range(procs)]
    for k in kids:
        k.start()
    for _ in kids:
        ready.get(timeout=30)  # each has connected
    t0 = time.perf_counter()
    go.set()
    n = sum(done.get(timeout=300) for _ in kids)
    secs = time.perf_counter() - t0
    for k in kids:
        k.join(10)
    return n, secs


def rows(quick: bool = False, rounds: int = 5, redis_url: str = "", log=print, **ctx) -> list:
    url = redis_url
    c = redis.Redis.from_url(url)
    sha = c.script_load(floor_source())
    prefix = B.new_prefix("benchfloor")
    raw = B.new_prefix("benchfloorraw")
    ns = None
    d = B.open_deployment(url, prefix)
    try:
        mix, _ = B.job_mix(SIZES[quick], seed=1, tag="f")
        keep = set(B.tracked(mix))
        proj = Projector(d, consumer="floor")
        for part in range(d.partitions):
            proj.ensure_group(part)
        pub = Publisher(d)
        for chunk in B.chunks(mix, 1000):
            pub.publish_many(chunk)
        streams = [keys.stream(prefix, p) for p in range(d.partitions)]
        total = sum(c.xlen(s) for s in streams)
        ttl = d.ttl_ms
        entries = [(f"{raw}:{keys.partition_of(e.jid, d.partitions)}", events.encode_entry(e))
                   for e in mix]

        def rewind() -> None:
            for s in streams:
                c.xgroup_setid(s, keys.GROUP, "0")

        def naive(i: int) -> dict:
            nonlocal ns
            ns = B.naive_namespace()
            secs = B.naive_write(c, ns, mix, keep)
            B.cleanup(c, ns)
            return {"per_s": len(mix) / secs}

        def timed(fn) -> tuple[float, float]:
            t0, p0 = time.perf_counter(), time.process_time()
            n = fn()
            secs, cpu = time.perf_counter() - t0, time.process_time() - p0
            if n != total:
                raise RuntimeError(f"floor read {n} entries of {total}")
            return n / secs, cpu / n * 1e6

        def project_floors(i: int) -> dict:
            out = {}
            for mode in ("group-read", "group-fold"):
                rewind()
                out[mode], _ = timed(lambda m=mode: lua_floor(c, sha, streams, m, ttl))
            out["python"], out["python_cpu_us"] = timed(
                lambda: python_floor(c, streams, PROJECT_BATCH, ttl))
            rewind()
            log(f"  round {i + 1}: naive {P.base[-1]['per_s']:,.0f} events/s; floors: Lua read "
                f"{out['group-read']:,.0f}, Lua fold {out['group-fold']:,.0f}, Python fold "
                f"{out['python']:,.0f} ({out['python_cpu_us']:.1f} us CPU/event)")
            return out

        def xadd(i: int) -> dict:
            rate = len(entries) / B.xadd_entries(c, entries)
            B.cleanup(c, raw)
            return {"per_s": rate}

        def replay_floors(i: int) -> dict:
            out = {}
            for mode in ("range-read", "range-fold"):
                out[mode], _ = timed(lambda m=mode: lua_floor(c, sha, streams, m, ttl))
            out["python"], out["python_cpu_us"] = timed(
                lambda: python_floor(c, streams, REPLAY_CHUNK, ttl))
            n, secs = python_floor_parallel(url, streams, ttl)
            out["python2"] = n / secs
            log(f"  round {i + 1}: XADD {R.base[-1]['per_s']:,.0f} events/s; floors: Lua read "
                f"{out['range-read']:,.0f}, Lua fold {out['range-fold']:,.0f}, Python fold "
                f"{out['python']:,.0f}, two processes {out['python2']:,.0f}")
            return out

        P = B.Rounds()
        P.run(rounds, naive, project_floors)
        R = B.Rounds()
        R.run(rounds, xadd, replay_floors)
    finally:
        B.cleanup(c, prefix)
        B.cleanup(c, raw)
        if ns:
            B.cleanup(c, ns)
        d.close()
        c.close()
    naive_name, xadd_name = "naive direct-write tracker (events/s)", "pipelined XADD"
    cpu = P.s("python_cpu_us")
    return [
        B.row("floor_project_lua_read", "events/s", P.s("group-read"), P.b("per_s"), naive_name,
              note="XREADGROUP + XACK in a script, nothing folded or stored"),
        B.row("floor_project_lua_fold", "events/s", P.s("group-fold"), P.b("per_s"), naive_name,
              note="the same + project.lua's decode and fold, nothing stored"),
        B.row("floor_project_python_fold", "events/s", P.s("python"), P.b("per_s"), naive_name,
              detail={"cpu_us_per_event": cpu},
              note=f"XRANGE + decode + fold in Python, nothing stored; "
                   f"{sorted(cpu)[len(cpu) // 2]:.1f} us of client CPU per event"),
        B.row("floor_replay_lua_read", "events/s", R.s("range-read"), R.b("per_s"), xadd_name,
              note="XRANGE chunks in a script, nothing folded or stored"),
        B.row("floor_replay_lua_fold", "events/s", R.s("range-fold"), R.b("per_s"), xadd_name,
              note="the same + replay.lua's decode and fold, nothing stored"),
        B.row("floor_replay_python_fold", "events/s", R.s("python"), R.b("per_s"), xadd_name,
              note="XRANGE + decode + fold in one Python process, nothing stored"),
        B.row("floor_replay_python2_fold", "events/s", R.s("python2"), R.b("per_s"), xadd_name,
              note="the same over two processes (the machine's cores), nothing stored"),
    ]


def main(argv=None) -> int:
    return B.module_main(rows, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
