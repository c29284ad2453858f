"""Benchmarks against raw Redis and the naive tracker, as same-run interleaved ratios (issue 15).

    python scripts/bench.py [--quick] [--rounds N] [--json PATH] [--redis-url URL | --redis-server PATH]
                            [--only GROUP ...] [--faktory-bin PATH] [--cluster URL]

Every ratio comes from N >= 5 interleaved rounds (baseline, subject, baseline,
subject, ...): the row shows the median of the per-round ratios and their spread
(min..max), and how many rounds alone met the target, so one run on the shared
2-core machine gives the same verdict as the next. --quick (about 1-2 minutes) runs
smaller samples with the same rows and targets as the full run. Without --redis-url a
private redis-server (no persistence) runs on a free port and stops at the end; with
one, every key lives under fresh prefixes and is deleted after.

Metric names (stable; --json PATH writes them as "rows", plus raw "figures", the
"machine" and the naive tracker's definition):

  publish_one_p50_us        Publisher.working(), one call, p50  vs an XADD round trip   <= 1.2x
  publish_one_p99_us        the same, p99                       vs XADD round trip p99
  bulk_publish_events_per_s publish_many, batches of 1000       vs pipelined XADD       >= 1x
  projector_jobs_per_s      Projector.drain(), one process      vs the naive tracker     >= 2x
  memory_per_tracked_job    used_memory per tracked job         vs the naive tracker     <= 0.5x
  memory_usage_per_tracked_job  MEMORY USAGE of all its keys    vs the naive hash
  memory_per_logged_event   used_memory per logged event        vs payload bytes         <= 60 B
  lag_p99_ms, lag_p50_ms    at 10k events/s, `tracker project` as its own process
                                                      vs raw XADD -> XREAD delivery    <= 10 ms
  tracker_get_p50_us        Tracker.get, p50                    vs an HGETALL round trip <= 1.1x
  tracker_get_p99_us        the same, p99                       vs HGETALL p99
  get_many_jids_per_s       get_many, batches of 100            vs pipelined HGETALL     >= 1x
  read_after_<N>_unfolded_us  Tracker.get right after N unfolded events in its partition,
                            no projector running (N = 1, 100, 10000) vs Tracker.get, no lag
  replay_events_per_s       tracker.replay.rebuild              vs pipelined XADD        >= 2x
  history_p50_ms            Tracker.history among many events   vs HGETALL round trip    <= 5 ms
  list_working_p50_ms       Tracker.list_tracks("working"), many tracks vs 50 pipelined HGETALL
  state_index_bytes_per_track  MEMORY USAGE of the state index per listed track
  floor_project_*, floor_replay_*  folds that store nothing (scripts/bench_floor.py): the
                            ceilings of projector_jobs_per_s and replay_events_per_s, vs
                            their baselines in the same rounds
  serve_track_get_per_s_50conn TRACK GET over `tracker serve`   vs redis-benchmark -t get -c 50  >= 0.6x
  serve_2workers_track_get_per_s_50conn  the same over `tracker serve --workers 2`, same rounds
  loadgen_redis_get_per_s_50conn  the bench's load generator on Redis GET vs redis-benchmark
  serve_track_get_p50_ms_1conn    one connection, p50           vs the same generator on Redis GET

The naive tracker (the yardstick of projector_jobs_per_s and memory_per_tracked_job) is
defined once, in scripts/_benchlib.py (NAIVE): per event one HSET of the track's fields
plus one PEXPIREAT, pipelined in batches of 1000 events, direct from one redis-py client,
no log. Optional scenario modules (scripts/bench_integrations.py, bench_proxy.py,
bench_web.py, bench_cluster.py) are run when present: each exposes ``rows(quick, **ctx)``
with ctx = rounds, redis_url, faktory_bin, cluster, log. bench_proxy.py adds
haproxy_floor_push_throughput_50c / haproxy_floor_ack_throughput_50c (no target) when
haproxy is on PATH: the same load through a C relay that parses nothing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _benchlib as B  # noqa: E402
import bench_floor  # noqa: E402
import bench_project  # noqa: E402
import bench_replay  # noqa: E402
import bench_serve  # noqa: E402
import redis  # noqa: E402

from tracker import events  # noqa: E402
from tracker.errors import TrackerError  # noqa: E402
from tracker.projector import Projector  # noqa: E402
from tracker.publisher import Publisher  # noqa: E402
from tracker.query import Tracker  # noqa: E402
from tracker.store import keys  # noqa: E402

SIZES = {True: {"one": 300, "bulk": 20_000, "query_events": 20_000, "gets": 300, "many": 30,
                "lag_samples": {1: 20, 100: 10, 10_000: 1}},
         False: {"one": 2000, "bulk": 100_000, "query_events": 60_000, "gets": 2000, "many": 200,
                 "lag_samples": {1: 60, 100: 20, 10_000: 2}}}
OPTIONAL = ("integrations", "proxy", "web", "cluster")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ publish


def publish_rows(quick: bool, rounds: int, redis_url: str, **_) -> list[dict]:
    n, bulk = SIZES[quick]["one"], SIZES[quick]["bulk"]
    c = redis.Redis.from_url(redis_url)
    raw = B.new_prefix("benchraw")
    prefix = B.new_prefix("benchpub")
    d = B.open_deployment(redis_url, prefix)
    pub = Publisher(d)
    one_fields = events.encode_entry(events.make_working("w0000000", 600))
    mix, _ = B.job_mix(bulk, seed=2, tag="b")
    parts = d.partitions
    entries = [(f"{raw}:{keys.partition_of(e.jid, parts)}", events.encode_entry(e)) for e in mix]
    try:
        def one_round(i: int) -> tuple[dict, dict]:
            b, s = B.paired_us(lambda k: c.xadd(f"{raw}:one", one_fields),
                               lambda k: pub.working(f"w{k:07d}", 600), n, i * n)
            return ({"p50": B.pct(b, 50), "p99": B.pct(b, 99)},
                    {"p50": B.pct(s, 50), "p99": B.pct(s, 99)})

        one = B.Rounds().paired(rounds, one_round)
        B.cleanup(c, raw)
        B.cleanup(c, prefix)
        ebatches = list(B.chunks(entries, 1000))
        mbatches = list(B.chunks(mix, 1000))

        def xadd_batch(j: int) -> None:
            pipe = c.pipeline(transaction=False)
            for s, f in ebatches[j]:
                pipe.xadd(s, f)
            pipe.execute()

        def bulk_round(i: int) -> tuple[dict, dict]:
            b, s = B.paired_rate(xadd_batch, lambda j: pub.publish_many(mbatches[j]),
                                 len(mbatches), len(mix))
            B.cleanup(c, raw)
            for part in range(parts):  # empty the logs, keep the deployment
                c.delete(keys.stream(prefix, part))
            B.settle(c)
            return {"per_s": b}, {"per_s": s}

        bulkr = B.Rounds().paired(rounds, bulk_round)
    finally:
        B.cleanup(c, raw)
        B.cleanup(c, prefix)
        d.close()
        c.close()
    return [
        B.row("publish_one_p50_us", "us", one.s("p50"), one.b("p50"), "XADD round trip p50",
              "<= 1.2x"),
        B.row("publish_one_p99_us", "us", one.s("p99"), one.b("p99"), "XADD round trip p99"),
        B.row("bulk_publish_events_per_s", "events/s", bulkr.s("per_s"), bulkr.b("per_s"),
              "redis-py pipelined XADD, batches of 1000", ">= 1x"),
    ]


# -------------------------------------------------------------------------- query


def query_rows(quick: bool, rounds: int, redis_url: str, **_) -> list[dict]:
    cfg = SIZES[quick]
    c = redis.Redis.from_url(redis_url)
    prefix = B.new_prefix("benchq")
    ns = B.naive_namespace()
    d = B.open_deployment(redis_url, prefix)
    try:
        mix, _ = B.job_mix(cfg["query_events"], seed=3, tag="q")
        for chunk in B.chunks(mix, 1000):
            Publisher(d).publish_many(chunk)
        Projector(d, consumer="bench-q").drain()
        B.naive_write(c, ns, mix)  # the naive tracker's hashes of the same jobs
        tr = Tracker(d)
        jids = B.tracked(mix)
        rng = random.Random(5)
        n = cfg["gets"]
        sample = [rng.choice(jids) for _ in range(n * rounds)]
        nkeys = [B.naive_key(ns, j) for j in sample]

        def get_round(i: int) -> tuple[dict, dict]:
            b, s = B.paired_us(lambda k: c.hgetall(nkeys[k]), lambda k: tr.get(sample[k]), n, i * n)
            return ({"p50": B.pct(b, 50), "p99": B.pct(b, 99)},
                    {"p50": B.pct(s, 50), "p99": B.pct(s, 99)})

        one = B.Rounds().paired(rounds, get_round)
        batches = [[rng.choice(jids) for _ in range(100)] for _ in range(cfg["many"])]
        kbatches = [[B.naive_key(ns, j) for j in b] for b in batches]

        def pipelined(j: int) -> None:
            pipe = c.pipeline(transaction=False)
            for k in kbatches[j]:
                pipe.hgetall(k)
            pipe.execute()

        def many_round(i: int) -> tuple[dict, dict]:
            b, s = B.paired_rate(pipelined, lambda j: tr.get_many(batches[j]), len(batches),
                                 100 * len(batches))
            return {"per_s": b}, {"per_s": s}

        manyr = B.Rounds().paired(rounds, many_round)
        out = [
            B.row("tracker_get_p50_us", "us", one.s("p50"), one.b("p50"), "HGETALL round trip p50",
                  "<= 1.1x"),
            B.row("tracker_get_p99_us", "us", one.s("p99"), one.b("p99"), "HGETALL round trip p99"),
            B.row("get_many_jids_per_s", "jids/s", manyr.s("per_s"), manyr.b("per_s"),
                  "pipelined HGETALL, batches of 100", ">= 1x"),
        ]
        out += lagged_read_rows(d, tr, jids, cfg, rounds)
        return out
    finally:
        B.cleanup(c, prefix)
        B.cleanup(c, ns)
        d.close()
        c.close()


def lagged_read_rows(d, tr: Tracker, jids: list, cfg: dict, rounds: int) -> list[dict]:
    """Tracker.get right after N events it has to fold first (no projector runs): the N
    events are TRACK SETs on tracked jobs of the read JID's partition, the last on it."""
    target = jids[0]
    part = d.partition(target)
    mates = [j for j in jids if d.partition(j) == part][:1000]
    out = []
    for n, samples in cfg["lag_samples"].items():
        try:
            out.append(lagged_read_row(tr, Publisher(d), target, mates, n, samples, rounds))
        except TrackerError as e:  # a finding, not a crash of the bench: say it in the row
            out.append(B.skipped(f"read_after_{n}_unfolded_us", f"the read raised {e}"))
            Projector(d, consumer="bench-q").drain()  # fold the backlog for the next N
    return out


def lagged_read_row(tr: Tracker, pub: Publisher, target: str, mates: list, n: int, samples: int,
                    rounds: int) -> dict:
    evs = [events.make_trackset(mates[k % len(mates)], k % 101, f"lag {k}")
           for k in range(n - 1)] + [events.make_trackset(target, 50, f"lag {n}")]

    def both(i: int) -> tuple[dict, dict]:
        fresh, lagged = [], []
        clock = time.perf_counter_ns
        for _ in range(samples):
            tr.get(target)  # the fold is at the tip
            t0 = clock()
            tr.get(target)
            fresh.append((clock() - t0) / 1000)
            for chunk in B.chunks(evs, 1000):
                pub.publish_many(chunk)
            t0 = clock()
            got = tr.get(target)
            lagged.append((clock() - t0) / 1000)
            if got.get("desc") != f"lag {n}":
                raise RuntimeError(f"a read after {n} events missed the last: {got}")
        return {"p50": statistics.median(fresh)}, {"p50": statistics.median(lagged)}

    r = B.Rounds().paired(rounds, both)
    return B.row(f"read_after_{n}_unfolded_us", "us", r.s("p50"), r.b("p50"),
                 "Tracker.get with the fold at the tip",
                 note=f"{samples} reads per round, each right after publishing {n}")


# --------------------------------------------------------------------------- main

GROUPS = {"publish": publish_rows, "query": query_rows, "project": bench_project.rows,
          "replay": bench_replay.rows, "floor": bench_floor.rows, "serve": bench_serve.rows}


def optional(name: str, quick: bool, ctx: dict) -> tuple[list, list]:
    """Rows of scripts/bench_<name>.py when it exists, else a note."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"bench_{name}.py")
    if not os.path.exists(path):
        return [], [f"bench_{name}.py: not present, skipped"]
    try:
        mod = importlib.import_module(f"bench_{name}")
        return list(mod.rows(quick, **ctx)), []
    except (B.Skip, ImportError) as e:
        return [], [f"bench_{name}.py: skipped ({type(e).__name__}: {e})"]


def num(v) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def table(rows: list[dict]) -> str:
    head = ("metric", "figure", "baseline (same rounds)", "ratio [spread]", "target", "verdict")
    lines = []
    for r in rows:
        base = "-" if r.get("baseline") is None else f"{num(r['baseline'])} ({r['baseline_name']})"
        ratio = "-"
        if r.get("ratio") is not None:
            lo, hi = r.get("spread") or (r["ratio"], r["ratio"])
            ratio = f"{r['ratio']:.2f}x [{lo:.2f}..{hi:.2f}]"
        verdict = {True: "pass", False: "MISS", None: "-"}[r.get("met")]
        if r.get("rounds_met"):
            verdict += f" {r['rounds_met']}"
        fig = "-" if r.get("figure") is None else f"{num(r['figure'])} {r.get('unit', '')}"
        lines.append((r["metric"], fig, base, ratio, r.get("target") or "-", verdict))
    w = [max(len(x[i]) for x in lines + [head]) for i in range(6)]
    fmt = " | ".join(f"{{:{n}}}" for n in w)
    out = [fmt.format(*head), "-+-".join("-" * n for n in w)] + [fmt.format(*x) for x in lines]
    notes = [f"  {r['metric']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(out + (["", "notes:"] + notes if notes else []))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    B.add_server_args(ap)
    ap.add_argument("--quick", action="store_true", help="smaller samples, about 1-2 minutes")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per ratio (>= 5)")
    ap.add_argument("--json", metavar="PATH", help="write rows, raw figures and the machine")
    ap.add_argument("--only", nargs="+", metavar="GROUP", choices=[*GROUPS, *OPTIONAL],
                    help="run only these groups")
    ap.add_argument("--faktory-bin", help="a Faktory server binary, for modules that compare")
    ap.add_argument("--cluster", metavar="URL", help="a Redis Cluster, for bench_cluster.py")
    a = ap.parse_args(argv)
    if a.rounds < 5:
        ap.exit(2, "bench.py: error: --rounds: expected at least 5\n")
    t0 = time.time()
    server = B.private_server(a)
    url = a.redis_url or server.url
    rows: list[dict] = []
    notes: list[str] = []
    failed = 0
    timings: dict[str, float] = {}
    try:
        c = redis.Redis.from_url(url)
        mach = B.machine(c)
        mach["redis"] = f"private {server.binary}" if server else "--redis-url"
        log(f"Redis {mach['redis_version']} ({mach['mem_allocator']}; "
            f"{f'private {server.binary}' if server else 'the Redis of --redis-url'}); "
            f"{mach['cpus']} CPUs, load average {mach['load_average']}, {mach['python']}, "
            f"{'quick' if a.quick else 'full'} run, {a.rounds} rounds")
        ctx = {"rounds": a.rounds, "redis_url": url, "faktory_bin": a.faktory_bin,
               "cluster": a.cluster, "log": log}
        for name in a.only or [*GROUPS, *OPTIONAL]:
            log(f"-- {name}")
            started = time.time()
            try:
                if name in GROUPS:
                    got = GROUPS[name](a.quick, **ctx)
                else:
                    got, skip = optional(name, a.quick, ctx)
                    notes += skip
                    for s in skip:
                        log(s)
                rows += got
                for r in got:
                    log(f"   {r['metric']}: {num(r.get('figure'))} {r.get('unit')}"
                        + (f", {r['ratio']:.2f}x {r.get('baseline_name')}" if r.get("ratio") else ""))
            except Exception as e:
                failed += 1
                traceback.print_exc()
                notes.append(f"{name}: failed: {type(e).__name__}: {e}")
            timings[name] = round(time.time() - started, 1)
        mach["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        if server:
            server.stop()
    secs = time.time() - t0
    figures = {r["metric"]: r.pop("detail") for r in rows if "detail" in r}
    text = table(rows)
    print(text)
    for n in notes:
        print("note:", n)
    print(f"\n({secs:.0f} s: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items() if v >= 1)
          + f"; load average {mach['load_average']} at start, "
          f"{mach['load_average_end']} at the end; ratios are medians of per-round ratios)")
    if a.json:
        doc = {"format": 2, "quick": a.quick, "rounds": a.rounds, "seconds": round(secs),
               "machine": mach, "naive_tracker": B.NAIVE, "rows": rows, "figures": figures,
               "notes": notes, "seconds_by_group": timings, "table": text}
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
