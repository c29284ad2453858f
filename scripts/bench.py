"""Benchmarks against raw Redis, in one run (issue 5).

    python scripts/bench.py [--redis-url URL] [--quick] [--json PATH]
    python scripts/bench.py --cluster [--quick] [--json PATH]   (scripts/bench_cluster.py)

Every figure is paired with a raw-Redis baseline measured in the same run and
the ratio between them, because the dev machine is shared and noisy. Without
--redis-url a private redis-server (no persistence) is started on a free port
and stopped at the end; with one, all keys live under a fresh prefix and are
deleted after. --quick finishes in under a minute; the full run in a few.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import multiprocessing
import os
import platform
import queue
import random
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _benchlib as B  # noqa: E402
import bench_project as BP  # noqa: E402
import bench_proxy  # noqa: E402
import redis  # noqa: E402

from tracker import events  # noqa: E402
from tracker.projector import Projector  # noqa: E402
from tracker.publisher import Publisher  # noqa: E402
from tracker.query import Tracker  # noqa: E402
from tracker.replay import rebuild  # noqa: E402
from tracker.store import keys  # noqa: E402

QUICK = dict(rtt=2000, bulk=20_000, project=20_000, lag_secs=2.5, gets=2000, many=100,
             mem_jobs=10_000)
FULL = dict(rtt=10_000, bulk=100_000, project=100_000, lag_secs=8.0, gets=10_000, many=500,
            mem_jobs=100_000)


def log(msg: str) -> None:
    print(msg, flush=True)


class Report:
    """Rows of (metric, figure, baseline, ratio, target, pass) plus every raw figure."""

    def __init__(self):
        self.rows: list[dict] = []
        self.figures: dict = {}

    def row(self, metric, value, unit, base_name=None, base=None, target=None, ok=None,
            ratio=None):
        if ratio is None and base:
            ratio = value / base
        r = {"metric": metric, "value": value, "unit": unit, "baseline": base_name,
             "baseline_value": base, "ratio": ratio, "target": target, "pass": ok}
        self.rows.append(r)
        return r

    def table(self) -> str:
        def num(v):
            if v is None:
                return "-"
            if isinstance(v, str):
                return v
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"

        head = ("metric", "figure", "raw baseline", "ratio", "target", "result")
        lines = []
        for r in self.rows:
            fig = f"{num(r['value'])} {r['unit']}"
            base = "-" if r["baseline"] is None else f"{num(r['baseline_value'])} ({r['baseline']})"
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
            res = {True: "pass", False: "MISS", None: "-"}[r["pass"]]
            lines.append((r["metric"], fig, base, ratio, r["target"] or "-", res))
        w = [max(len(x[i]) for x in lines + [head]) for i in range(6)]
        fmt = " | ".join(f"{{:{n}}}" for n in w)
        out = [fmt.format(*head), "-+-".join("-" * n for n in w)]
        out += [fmt.format(*x) for x in lines]
        return "\n".join(out)


def us(ns: int) -> float:
    return ns / 1000


def latencies(fn, n: int) -> list:
    out = []
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        fn(i)
        out.append(us(clock() - t0))
    return out


def p50_p99(xs: list) -> dict:
    return {"p50": B.pct(xs, 50), "p99": B.pct(xs, 99), "n": len(xs)}


# ------------------------------------------------------------------ raw baselines


def bench_raw(url: str, base: str, cfg: dict) -> dict:
    c = redis.Redis.from_url(url)
    fig: dict = {}
    stream = f"{base}:raw:s"
    # One XADD round trip, with a typical entry (the fields `working` publishes).
    fig["xadd_rtt_us"] = p50_p99(latencies(
        lambda i: c.xadd(stream, {"t": "working", "j": f"r{i}", "r": 600}), cfg["rtt"]))
    c.hset(f"{base}:raw:h", mapping={"s": "working", "p": 50, "d": "step 2 of 3",
                                     "u": 1, "r": 2, "x": 3})
    fig["hgetall_rtt_us"] = p50_p99(latencies(lambda i: c.hgetall(f"{base}:raw:h"), cfg["rtt"]))
    B.cleanup(c, base)
    c.close()
    log(f"raw: XADD rtt p50 {fig['xadd_rtt_us']['p50']:.0f} us, HGETALL rtt p50 "
        f"{fig['hgetall_rtt_us']['p50']:.0f} us")
    return fig


def bench_naive(url: str, base: str, mix: list, jobs: int) -> dict:
    """A direct-write tracker: per event, pipelined HSET of the track fields + PEXPIREAT."""
    c = redis.Redis.from_url(url)
    tracked = {e.jid for e in mix if type(e) is events.Enqueued and e.track}
    now = int(time.time() * 1000)
    ttl = 1800_000
    t0 = time.perf_counter()
    for chunk in B.chunks(mix, 1000):
        pipe = c.pipeline(transaction=False)
        now = int(time.time() * 1000)
        for ev in chunk:
            if ev.jid not in tracked:
                continue  # the job server knows custom.track: nothing to write
            f = B.naive_fields(ev, now)
            key = f"{base}:naive:{ev.jid}"
            pipe.hset(key, mapping=f)
            pipe.pexpireat(key, now + ttl)
        pipe.execute()
    secs = time.perf_counter() - t0
    B.cleanup(c, base)
    c.close()
    out = {"jobs": jobs, "events": len(mix), "seconds": secs, "jobs_per_s": jobs / secs,
           "events_per_s": len(mix) / secs}
    log(f"naive direct-write tracker: {out['jobs_per_s']:,.0f} jobs/s "
        f"({out['events_per_s']:,.0f} events/s)")
    return out


# ------------------------------------------------------------------------ publish


def bench_publish(url: str, cfg: dict, mix: list, base: str, rounds: int = 3) -> dict:
    """One-at-a-time latency, then bulk publish and raw pipelined XADD in alternating
    rounds (best of each), so a burst of load elsewhere hits both alike."""
    prefix = B.new_prefix("benchpub")
    d = B.open_deployment(url, prefix)
    c = redis.Redis.from_url(url)
    # Raw: pipelined XADD, batch 1000, of exactly the entries the Publisher sends.
    entries = [(f"{{{base}:raw:{keys.partition_of(e.jid, 8)}}}:log", events.encode_entry(e))
               for e in mix]
    raw, bulk = [], []
    try:
        pub = Publisher(d)
        one = p50_p99(latencies(lambda i: pub.working(f"w{i}", 600), cfg["rtt"]))
        for _ in range(rounds):
            t0 = time.perf_counter()
            for chunk in B.chunks(entries, 1000):
                pipe = c.pipeline(transaction=False)
                for s, f in chunk:
                    pipe.xadd(s, f)
                pipe.execute()
            raw.append(len(entries) / (time.perf_counter() - t0))
            B.cleanup(c, base)
            t0 = time.perf_counter()
            for chunk in B.chunks(mix, 1000):
                pub.publish_many(chunk)
            bulk.append(len(mix) / (time.perf_counter() - t0))
            B.cleanup(d.client, prefix)
            d = B.open_deployment(url, prefix)
            pub = Publisher(d)
    finally:
        B.cleanup(d.client, prefix)
        B.cleanup(c, base)
        d.close()
        c.close()
    out = {"one_us": one, "bulk_per_s": max(bulk), "bulk_rounds": bulk,
           "xadd_pipelined_per_s": max(raw), "xadd_pipelined_rounds": raw}
    log(f"publish: one p50 {one['p50']:.0f} us p99 {one['p99']:.0f} us; bulk "
        f"{out['bulk_per_s']:,.0f}/s vs raw pipelined XADD {out['xadd_pipelined_per_s']:,.0f}/s "
        f"(best of {rounds} alternating rounds)")
    return out


# -------------------------------------------------------------------- end-to-end lag

PROBES = 16  # probe jobs, spread over the partitions
PROBE_EVERY = 0.005  # seconds between probes


def _projector_child(url: str, prefix: str, stop_evt) -> None:
    d = B.open_deployment(url, prefix)
    proj = Projector(d, consumer="bench-lag")
    threading.Thread(target=lambda: (stop_evt.wait(), proj.stop()), daemon=True).start()
    proj.run(report_every=0.5)


def folded(d) -> int:
    """Entries the projector has taken off the log (its stats hashes)."""
    pipe = d.client.pipeline(transaction=False)
    for part in range(d.partitions):
        pipe.hmget(keys.stats(d.prefix, part), "applied", "dead_lettered")
    return sum(int(x or 0) for row in pipe.execute() for x in row)


def lag_run(url: str, rate, secs: float, tag: str, where: str = "thread") -> dict:
    """Offer ``rate`` events/s (None: as fast as one thread can) with a live Projector.

    The publisher thread mixes, every 5 ms, a TRACK SET on a probe job into the
    stream; the poller reads that job's snapshot hash (HGET d, the field
    ``Tracker.get`` answers desc from) until it shows that probe (or a later
    one) and records the time since the publish returned.
    """
    prefix = B.new_prefix("benchlag")
    d = B.open_deployment(url, prefix)
    tracker = Tracker(B.open_deployment(url, prefix))
    pub = Publisher(d)
    probes = [f"probe{tag}-{i}" for i in range(PROBES)]
    for jid in probes:
        pub.enqueued(jid, {"track": 1})
        pub.working(jid, 3600)
    mix, _ = B.job_mix(int((rate or 40_000) * secs * 1.2) + 1000, seed=hash(tag) & 0xffff,
                       tag=f"l{tag}-")
    if where == "thread":
        proj = Projector(d, consumer="bench-lag")
        pthread = threading.Thread(target=proj.run, kwargs={"report_every": 0.5}, daemon=True)
        pthread.start()
        stop_projector = proj.stop
    else:  # a separate process, as `tracker project` runs in production
        ctx = multiprocessing.get_context("fork")
        evt = ctx.Event()
        pthread = ctx.Process(target=_projector_child, args=(url, prefix, evt), daemon=True)
        pthread.start()
        stop_projector = evt.set
    # Wait until the probes' snapshots exist (the projector is up).
    deadline = time.monotonic() + 10
    while tracker.get(probes[-1])["state"] != "working" and time.monotonic() < deadline:
        time.sleep(0.01)
    # The poller reads the snapshot's desc with HGET (what Tracker.get reads, minus
    # its ~100 us of Python per call, which would steal the GIL from the publisher).
    raw = redis.Redis.from_url(url)
    q: queue.Queue = queue.Queue()
    lags: list = []
    sent = [0]
    stop = threading.Event()

    def publisher():
        start = time.perf_counter()
        next_probe, seq, i = start, 0, 0
        while not stop.is_set():
            now = time.perf_counter()
            if now - start >= secs or i >= len(mix):
                break
            due = len(mix) if rate is None else int((now - start) * rate)
            n = min(due - i, max(1, rate // 200) if rate else 200)  # <= 5 ms worth per trip
            batch = mix[i:i + n]
            probe = None
            if now >= next_probe:
                seq += 1
                probe = (probes[seq % PROBES], seq)
                batch = batch + [events.make_trackset(probe[0], seq % 101, f"probe {seq}")]
                next_probe += PROBE_EVERY
            if batch:
                pub.publish_many(batch)
                if probe:
                    q.put((probe[0], probe[1], time.perf_counter()))
                i += n
                sent[0] += len(batch)
            else:
                time.sleep(0.0005)
        q.put(None)

    def poller():
        while True:
            item = q.get()
            if item is None:
                return
            jid, seq, t_pub = item
            limit = t_pub + 5.0
            key = keys.snapshot(prefix, d.partition(jid), jid)
            while True:
                desc = raw.hget(key, "d")
                if desc and int(desc.split()[1]) >= seq:
                    lags.append((time.perf_counter() - t_pub) * 1000)
                    break
                if time.perf_counter() > limit:
                    lags.append(5000.0)
                    break
                time.sleep(0.0002)  # leave the GIL to the publisher between polls

    stats0 = B.commandstats(d.client)
    threads = [threading.Thread(target=publisher), threading.Thread(target=poller)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    threads[0].join()
    pub_secs = time.perf_counter() - t0
    threads[1].join()
    backlog = sent[0] + 2 * PROBES - folded(d)
    cs = B.stats_delta(stats0, B.commandstats(d.client))
    cs = {k: v for k, v in cs.items() if k in ("evalsha", "xread", "xadd", "hget", "xreadgroup")}
    stop_projector()
    pthread.join(30)
    B.cleanup(d.client, prefix)
    tracker.close()
    raw.close()
    d.close()
    out = {"projector": where, "offered_per_s": rate, "achieved_per_s": sent[0] / pub_secs, "seconds": pub_secs,
           "probes": len(lags), "lag_ms": p50_p99(lags), "backlog_at_end": backlog,
           "max_ms": max(lags) if lags else None, "commandstats": cs,
           "entries_per_fold_call": (cs.get("xreadgroup", {}).get("calls") and
                                     sent[0] / cs["xreadgroup"]["calls"])}
    log(f"lag at {'max' if rate is None else f'{rate:,}/s'} (projector in a {where}): achieved "
        f"{out['achieved_per_s']:,.0f}/s, p50 {out['lag_ms']['p50']:.2f} ms, p99 "
        f"{out['lag_ms']['p99']:.2f} ms over {len(lags)} probes, backlog {backlog}; EVALSHA "
        f"{cs.get('evalsha', {}).get('usec_per_call', 0):.0f} us/call, "
        f"{out['entries_per_fold_call'] or 0:.1f} entries per fold")
    return out


# -------------------------------------------------------------------------- query


def bench_query(url: str, cfg: dict) -> dict:
    prefix = B.new_prefix("benchq")
    d = B.open_deployment(url, prefix)
    try:
        mix, jobs = B.job_mix(20_000, seed=3, tag="q")
        Publisher(d).publish_many(mix)
        Projector(d, consumer="bench-q").drain()
        tr = Tracker(d)
        tracked = sorted({e.jid for e in mix if type(e) is events.Enqueued and e.track})
        rng = random.Random(5)
        sample = [rng.choice(tracked) for _ in range(cfg["gets"])]
        get = p50_p99(latencies(lambda i: tr.get(sample[i]), cfg["gets"]))
        raw = redis.Redis.from_url(url)
        skeys = [keys.snapshot(prefix, d.partition(j), j) for j in sample]
        hga = p50_p99(latencies(lambda i: raw.hgetall(skeys[i]), cfg["gets"]))
        batches = [[rng.choice(tracked) for _ in range(100)] for _ in range(cfg["many"])]
        t0 = time.perf_counter()
        for b in batches:
            tr.get_many(b)
        many = 100 * len(batches) / (time.perf_counter() - t0)
        kb = [[keys.snapshot(prefix, d.partition(j), j) for j in b] for b in batches]
        t0 = time.perf_counter()
        for b in kb:
            pipe = raw.pipeline(transaction=False)
            for k in b:
                pipe.hgetall(k)
            pipe.execute()
        raw_many = 100 * len(batches) / (time.perf_counter() - t0)
        raw.close()
    finally:
        B.cleanup(d.client, prefix)
        d.close()
    out = {"get_us": get, "hgetall_us": hga, "get_many_per_s": many,
           "raw_pipelined_hgetall_per_s": raw_many}
    log(f"query: get p50 {get['p50']:.0f} us (HGETALL {hga['p50']:.0f} us); get_many "
        f"{many:,.0f} jids/s (pipelined HGETALL {raw_many:,.0f}/s)")
    return out


# ------------------------------------------------------------------------- memory


def used(c) -> int:
    return int(c.info("memory")["used_memory"])


def bench_memory(url: str, cfg: dict, base: str) -> dict:
    """used_memory deltas and MEMORY USAGE samples over ``mem_jobs`` jobs."""
    prefix = "m" + B.new_prefix("")[-6:]  # as long as the default prefix "tracker"
    d = B.open_deployment(url, prefix)
    c = d.client
    out: dict = {}
    try:
        mix, jobs = B.job_mix(int(cfg["mem_jobs"] * 6.42), seed=9, tag="m")  # ~6.42 events/job
        payload = sum(len(k) + len(str(v)) for e in mix for k, v in
                      events.encode_entry(e).items()) / len(mix)
        for part in range(d.partitions):  # create streams and groups first: not per event
            Projector(d).ensure_group(part)
        m0 = used(c)
        pub = Publisher(d)
        for chunk in B.chunks(mix, 1000):
            pub.publish_many(chunk)
        m1 = used(c)
        stream_usage = sum(c.memory_usage(keys.stream(prefix, p), samples=0) or 0
                           for p in range(d.partitions))
        t0 = time.perf_counter()
        Projector(d, consumer="bench-mem").drain()
        drain_secs = time.perf_counter() - t0
        m2 = used(c)
        tracked = sorted({e.jid for e in mix if type(e) is events.Enqueued and e.track})
        snaps = sum(1 for _ in c.scan_iter(match=f"{{{prefix}:*}}:t:*", count=5000))
        sample = random.Random(2).sample(tracked, min(2000, len(tracked)))
        usage = [c.memory_usage(keys.snapshot(prefix, d.partition(j), j), samples=0) or 0
                 for j in sample]
        # Baseline: the naive tracker's hash for the same final tracks (long field names).
        rows = []
        for chunk in B.chunks(tracked, 1000):
            p2 = c.pipeline(transaction=False)
            for j in chunk:
                p2.hgetall(keys.snapshot(prefix, d.partition(j), j))
            rows += p2.execute()
        m3 = used(c)
        names = {b"s": "state", b"p": "percent", b"d": "desc", b"u": "updated_at",
                 b"r": "reserved_until", b"x": "expires_at"}
        for chunk in B.chunks(list(zip(tracked, rows)), 1000):
            pipe = c.pipeline(transaction=False)
            for j, h in chunk:
                key = f"{base}:naive:{j}"
                pipe.hset(key, mapping={names[k]: v for k, v in h.items()})
                pipe.pexpireat(key, int(h[b"x"]))
            pipe.execute()
        m4 = used(c)
        naive_usage = [c.memory_usage(f"{base}:naive:{j}", samples=0) or 0 for j in sample]
        # Other per-job keys the projector writes besides the snapshot (a history index).
        hist = getattr(keys, "history", None)
        hist_usage = [c.memory_usage(hist(prefix, d.partition(j), j), samples=0) or 0
                      for j in sample] if hist else [0]
        extra = sum(1 for _ in c.scan_iter(match=f"{{{prefix}:*}}:h:*", count=5000))
        out = {"jobs": jobs, "events": len(mix), "snapshots": snaps, "tracked": len(tracked),
               "used_memory_per_event": (m1 - m0) / len(mix),
               "stream_memory_usage_per_event": stream_usage / len(mix),
               "payload_bytes_per_event": payload,
               "used_memory_per_tracked_job": (m2 - m1) / max(1, snaps),
               "history_keys": extra,
               "history_memory_usage_per_job": sum(hist_usage) / len(hist_usage),
               "memory_usage_per_snapshot": sum(usage) / len(usage),
               "naive_used_memory_per_job": (m4 - m3) / len(tracked),
               "naive_memory_usage_per_job": sum(naive_usage) / len(naive_usage),
               "drain_events_per_s": len(mix) / drain_secs}
    finally:
        B.cleanup(c, prefix)
        B.cleanup(c, base)
        d.close()
    log(f"memory: {out['used_memory_per_event']:.1f} B/event (payload "
        f"{out['payload_bytes_per_event']:.1f}), {out['used_memory_per_tracked_job']:.1f} B/tracked job "
        f"(snapshot MEMORY USAGE {out['memory_usage_per_snapshot']:.1f}, history index "
        f"{out['history_memory_usage_per_job']:.1f}; naive hash "
        f"{out['naive_used_memory_per_job']:.1f})")
    return out


# ------------------------------------------------------------------ replay, serve


def bench_replay(url: str, cfg: dict) -> dict:
    """A full rebuild (``tracker.replay.rebuild``) of a projected log, events/s."""
    prefix = B.new_prefix("benchrep")
    d = B.open_deployment(url, prefix)
    try:
        mix, _ = B.job_mix(cfg["project"], seed=11, tag="rp")
        Publisher(d).publish_many(mix)
        t0 = time.perf_counter()
        rebuild(d)
        secs = time.perf_counter() - t0
        out = {"available": True, "function": "tracker.replay.rebuild(deployment)",
               "events": len(mix), "seconds": secs, "per_s": len(mix) / secs}
        log(f"replay: {out['per_s']:,.0f} events/s")
        return out
    finally:
        B.cleanup(d.client, prefix)
        d.close()


def bench_serve(url: str, quick: bool) -> dict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_serve.py")
    if not os.path.exists(path):
        log("serve: skipped (scripts/bench_serve.py does not exist)")
        return {"skipped": "scripts/bench_serve.py does not exist"}
    try:
        mod = importlib.import_module("bench_serve")
        run = mod.run
    except Exception as e:
        log(f"serve: skipped (importing scripts/bench_serve.py failed: {e!r})")
        return {"skipped": f"import failed: {e!r}"}
    try:
        return run(url, quick)
    except Exception as e:
        log(f"serve: bench_serve.run failed: {e!r}")
        traceback.print_exc()
        return {"skipped": f"run failed: {e!r}"}


def serve_rows(rep: Report, res: dict) -> None:
    """Add bench_serve's figures: its own rows if it gives them, else its numbers."""
    if "skipped" in res:
        rep.row("TRACK GET over Faktory protocol", float("nan"), "", target="skipped: "
                + res["skipped"][:60])
        rep.rows[-1]["value"] = None
        return
    for k in sorted(res):
        v = res[k]
        if k.startswith("serve_") and isinstance(v, dict) and "rps" in v:
            c = k.split("_", 1)[1]
            raw = (res.get(f"redis_benchmark_{c}") or {}).get("rps")
            target = f">= {res['target_rps_50']:,}/s" if c == "50" and "target_rps_50" in res \
                else None
            rep.row(f"TRACK GET over Faktory, {c} conn", v["rps"], "req/s",
                    "redis-benchmark GET" if raw else None, raw or None, target,
                    res.get("meets_target") if target else None)
            rep.row(f"TRACK GET over Faktory, {c} conn, p50/p99",
                    v.get("p50_ms"), f"/ {v.get('p99_ms')} ms")
    if any(k.startswith("serve_") and isinstance(res[k], dict) for k in res):
        return
    rows = res.get("rows")
    if isinstance(rows, list):
        for r in rows:
            if isinstance(r, dict) and "metric" in r:
                rep.rows.append({k: r.get(k) for k in ("metric", "value", "unit", "baseline",
                                                      "baseline_value", "ratio", "target",
                                                      "pass")})
        return
    for k, v in res.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            rep.row(f"serve: {k}", v, "")


# --------------------------------------------------------------------------- main


def proxy_rows(rep: Report, url: str, quick: bool, faktory_bin) -> None:
    """bench_proxy's rows (issue 15's keys) in this report's table: measured only with a
    Faktory binary (--faktory-bin / TRACKER_FAKTORY_BIN), else "not measured"."""
    try:
        got = bench_proxy.rows(quick, faktory_bin=faktory_bin, redis_url=url)
    except Exception as e:
        log(f"proxy: bench_proxy.rows failed: {e!r}")
        traceback.print_exc()
        got = bench_proxy.not_measured(f"failed: {e!r}"[:80])
    rep.figures["proxy"] = got
    for r in got:
        rep.rows.append({"metric": r["metric"], "value": r["figure"], "unit": r["unit"],
                         "baseline": r["baseline_name"], "baseline_value": r["baseline"],
                         "ratio": r["ratio"], "target": r["target"], "pass": r["met"]})


def run_all(url: str, quick: bool, faktory_bin=None) -> Report:
    cfg = QUICK if quick else FULL
    rep = Report()
    F = rep.figures
    base = B.new_prefix("benchraw")
    mix, jobs = B.job_mix(cfg["bulk"], seed=1, tag="b")
    F["mix"] = {"events": len(mix), "jobs": jobs, "events_per_job": len(mix) / jobs}
    F["raw"] = raw = bench_raw(url, base, cfg)
    F["naive"] = naive = bench_naive(url, base, mix, jobs)
    F["publish"] = pubf = bench_publish(url, cfg, mix, base)
    raw["xadd_pipelined_per_s"] = pubf["xadd_pipelined_per_s"]
    F["projector"] = prj = BP.run(url, cfg["project"], cli=not quick, procs=(2,),
                                  log=lambda m: log("projector: " + m))
    again = bench_naive(url, base, mix, jobs)  # again after the projector: best of two
    naive["jobs_per_s_rounds"] = [naive["jobs_per_s"], again["jobs_per_s"]]
    naive["jobs_per_s"] = max(naive["jobs_per_s_rounds"])
    F["query"] = q = bench_query(url, cfg)
    F["lag"] = lag = {}
    for rate in (1000, 10_000, None):
        lag["max" if rate is None else str(rate)] = lag_run(url, rate, cfg["lag_secs"],
                                                            tag=str(rate))
    for rate in () if quick else (10_000, None):  # the projector as its own process
        lag[("max" if rate is None else str(rate)) + "/process"] = lag_run(
            url, rate, cfg["lag_secs"], tag=f"p{rate}", where="process")
    F["memory"] = mem = bench_memory(url, cfg, base)
    F["replay"] = replay = bench_replay(url, cfg)
    F["serve"] = serve = bench_serve(url, quick)

    xrtt, hrtt = raw["xadd_rtt_us"], raw["hgetall_rtt_us"]
    rep.row("raw: one XADD round trip, p50", xrtt["p50"], "us")
    rep.row("raw: one HGETALL round trip, p50", hrtt["p50"], "us")
    rep.row("raw: pipelined XADD (batch 1000)", raw["xadd_pipelined_per_s"], "ev/s")
    rep.row("raw: naive direct-write tracker", naive["jobs_per_s"], "jobs/s")
    one = pubf["one_us"]
    rep.row("publish one, p50", one["p50"], "us", "XADD rtt", xrtt["p50"], "<= 1.2x",
            one["p50"] <= 1.2 * xrtt["p50"])
    rep.row("publish one, p99", one["p99"], "us", "XADD rtt p99", xrtt["p99"])
    rep.row("bulk publish", pubf["bulk_per_s"], "ev/s", "pipelined XADD",
            raw["xadd_pipelined_per_s"], ">= 1x",
            pubf["bulk_per_s"] >= raw["xadd_pipelined_per_s"])
    n1 = prj["in_process"]
    jobs_s = prj["prepare"]["jobs"] / n1["seconds"]
    rep.row("projector, 1 process (drain)", jobs_s, "jobs/s", "naive tracker",
            naive["jobs_per_s"], ">= 2x", jobs_s >= 2 * naive["jobs_per_s"])
    rep.row("projector, 1 process (drain)", n1["per_second"], "ev/s", "pipelined XADD",
            raw["xadd_pipelined_per_s"])
    if "cli" in prj:
        c = prj["cli"]
        rep.row("tracker project --once", c["per_second"], "ev/s", "pipelined XADD",
                raw["xadd_pipelined_per_s"])
    n2 = prj["processes_2"]
    rep.row("projector, 2 processes", n2["per_second"], "ev/s", "1 process", n1["per_second"])
    ev = n1["commandstats"].get("evalsha", {})
    rep.row("projector: Lua time per event", ev.get("usec", 0) / max(1, n1["entries"]), "us",
            "XADD in Redis", n1["commandstats"].get("xadd", {}).get("usec_per_call")
            or None)
    g = q["get_us"]
    rep.row("Tracker.get, p50", g["p50"], "us", "HGETALL rtt", q["hgetall_us"]["p50"], "<= 1.2x",
            g["p50"] <= 1.2 * q["hgetall_us"]["p50"])
    rep.row("Tracker.get, p99", g["p99"], "us", "HGETALL rtt p99", q["hgetall_us"]["p99"])
    rep.row("get_many (batches of 100)", q["get_many_per_s"], "jids/s", "pipelined HGETALL",
            q["raw_pipelined_hgetall_per_s"], ">= 100k/s", q["get_many_per_s"] >= 100_000)
    for k, r in lag.items():
        rate, _, proc = k.partition("/")
        name = ("max" if rate == "max" else f"{int(rate) // 1000}k/s") + (
            ", projector process" if proc else "")
        target = "p99 <= 10 ms" if rate == "10000" else None
        rep.row(f"lag p50 at {name} (got {r['achieved_per_s']:,.0f}/s)", r["lag_ms"]["p50"],
                "ms", "XADD rtt", xrtt["p50"] / 1000)
        rep.row(f"lag p99 at {name}", r["lag_ms"]["p99"], "ms", "XADD rtt p99",
                xrtt["p99"] / 1000, target, (r["lag_ms"]["p99"] <= 10) if target else None)
    rep.row("memory per tracked job, all keys (used_memory)", mem["used_memory_per_tracked_job"],
            "B", "naive hash", mem["naive_used_memory_per_job"], "<= 120 B",
            mem["used_memory_per_tracked_job"] <= 120)
    rep.row("memory per snapshot hash (MEMORY USAGE)", mem["memory_usage_per_snapshot"], "B",
            "naive hash", mem["naive_memory_usage_per_job"], "<= 120 B",
            mem["memory_usage_per_snapshot"] <= 120)
    if mem["history_keys"]:
        rep.row("memory per history index key (MEMORY USAGE)",
                mem["history_memory_usage_per_job"], "B", "snapshot hash",
                mem["memory_usage_per_snapshot"])
    rep.row("memory per logged event (used_memory)", mem["used_memory_per_event"], "B",
            "payload bytes", mem["payload_bytes_per_event"], "<= 60 B",
            mem["used_memory_per_event"] <= 60)
    rep.row("memory per logged event (MEMORY USAGE)", mem["stream_memory_usage_per_event"], "B",
            "payload bytes", mem["payload_bytes_per_event"])
    if replay.get("available"):
        rep.row("replay", replay["per_s"], "ev/s", "pipelined XADD",
                raw["xadd_pipelined_per_s"], ">= 150k/s", replay["per_s"] >= 150_000)
    else:
        rep.rows.append({"metric": "replay", "value": None, "unit": "not available",
                         "baseline": None, "baseline_value": None, "ratio": None,
                         "target": ">= 150k/s", "pass": None})
    serve_rows(rep, serve)
    proxy_rows(rep, url, quick, faktory_bin)
    return rep


def cluster_rows(a) -> int:
    """``--cluster``: scripts/bench_cluster.py's rows, as a table (and JSON)."""
    mod = importlib.import_module("bench_cluster")
    t0 = time.time()
    rows = mod.rows(a.quick)
    for r in rows:
        ratio = "" if r["ratio"] is None else f"  {r['ratio']:.2f}x {r['spread']}"
        base = "" if r["baseline"] is None else f"  vs {r['baseline']:,.1f} ({r['baseline_name']})"
        print(f"{r['metric']}: {r['figure']:,.1f} {r['unit']}{base}{ratio}"
              f"{'  target ' + r['target'] if r['target'] else ''}")
    print(f"\n({time.time() - t0:.0f} s; ratios: median of per-round cluster / single Redis)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"quick": a.quick, "rows": rows}, f, indent=1)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--redis-url", help="Redis to use (default: a private redis-server)")
    ap.add_argument("--quick", action="store_true", help="smaller samples, under a minute")
    ap.add_argument("--json", metavar="PATH", help="write every figure as JSON")
    ap.add_argument("--faktory-bin", metavar="PATH", default=os.environ.get("TRACKER_FAKTORY_BIN"),
                    help="a Faktory server binary: measure serve --upstream against it")
    ap.add_argument("--cluster", action="store_true",
                    help="the Redis Cluster rows only: 3 masters against one Redis "
                         "(scripts/bench_cluster.py starts both)")
    a = ap.parse_args(argv)
    t0 = time.time()
    if a.cluster:
        return cluster_rows(a)
    server = None if a.redis_url else B.PrivateRedis()
    url = a.redis_url or server.url
    try:
        info = redis.Redis.from_url(url).info("server")
        where = (f"private {server.binary} on port {server.port}" if server
                 else "the Redis given by --redis-url")
        log(f"Redis {info['redis_version']} ({where}); {os.cpu_count()} CPUs, "
            f"{platform.python_implementation()} {platform.python_version()}, "
            f"{'quick' if a.quick else 'full'} run")
        rep = run_all(url, a.quick, a.faktory_bin)
    finally:
        if server:
            server.stop()
    secs = time.time() - t0
    table = rep.table()
    print()
    print(table)
    print(f"\n({secs:.0f} s; ratios are figure / raw baseline measured in this run)")
    if a.json:
        doc = {"quick": a.quick, "seconds": secs, "redis_version": info["redis_version"],
               "cpus": os.cpu_count(), "python": platform.python_version(),
               "rows": rep.rows, "figures": rep.figures, "table": table}
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
