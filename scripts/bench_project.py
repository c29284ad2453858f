"""The projector against the naive tracker (speed and memory), and end-to-end lag.

    python scripts/bench_project.py [--redis-url URL] [--quick] [--rounds N]

Rows (issue 15's format; ``scripts/bench.py`` imports ``rows``):

- projector_jobs_per_s: one ``Projector.drain()`` in this process folding a published
  job mix, jobs/s, against the naive tracker (_benchlib.NAIVE) writing the same mix
  directly; each round runs the naive tracker, then publishes the mix to a fresh
  deployment (untimed) and drains it (timed). Target >= 2x.
- memory_per_tracked_job: used_memory growth while draining, per tracked job (every
  key the deployment adds for it), against the naive tracker's used_memory growth per
  job, both from rest (keyspace tables shrunk back, background frees done). <= 0.5x.
- memory_usage_per_tracked_job: the same from MEMORY USAGE of every key of the
  deployment but its logs (by key family in the figures), against MEMORY USAGE of the
  naive hashes; no target.
- memory_per_logged_event: used_memory growth while publishing, per event, against the
  payload (field names + values) per event. Target <= 60 B.
- lag_p99_ms / lag_p50_ms: 10,000 events/s offered by a publisher thread here, with
  ``tracker project`` running as its own process and a poller process reading probe
  tracks with ``Tracker.get`` (read=stale, so the poller never folds); every 5 ms a
  probe TRACK SET rides in a batch; lag is from just before that publish call until
  the poller sees the probe (it reads every 1 ms: its resolution). Baseline in the same rounds: raw delivery, the same
  publisher pipelining XADD to one stream and a reader process in XREAD BLOCK that
  stamps each probe when it arrives. Target p99 <= 10 ms (on the figure).
"""

from __future__ import annotations

import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _benchlib as B  # noqa: E402
import redis  # noqa: E402

from projections import track as fold_mod  # noqa: E402
from tracker import answer, events  # noqa: E402
from tracker.projector import Projector  # noqa: E402
from tracker.publisher import Publisher  # noqa: E402
from tracker.query import Tracker  # noqa: E402
from tracker.store import keys  # noqa: E402

SIZES = {True: {"events": 15_000, "lag_secs": 1.0}, False: {"events": 200_000, "lag_secs": 5.0}}
LAG_RATE = 10_000
PROBES = 16  # probe jobs, spread over the partitions
PROBE_EVERY = 0.005  # seconds between probes
POLL = 0.001  # seconds between the poller's reads: each is a get.lua call, which competes
# with the projector's scripts in Redis, so polling faster would inflate the lag it measures


def short_prefix() -> str:
    return "m" + uuid.uuid4().hex[:6]  # 7 characters, as long as the default "tracker"


def read_log(d) -> list:
    """Every entry of every partition as (time ms, event), partition after partition."""
    out = []
    for part in range(d.partitions):
        stream, last = keys.stream(d.prefix, part), "-"
        while True:
            got = d.client.xrange(stream, min=last, max="+", count=10_000)
            if last != "-":
                got = got[1:]
            if not got:
                break
            out += [(int(eid.split(b"-")[0]), events.decode_entry(f)) for eid, f in got]
            last = got[-1][0]
    return out


def verify(d, jids: list, sample: int = 1000) -> dict:
    """Tracker.get_many of a sample against the Python fold of the whole log."""
    expected = fold_mod.fold(read_log(d), d.ttl_ms)
    pick = random.Random(7).sample(jids, min(sample, len(jids)))
    now = int(time.time() * 1000)
    got = Tracker(d).get_many(pick)
    bad = [j for j, g in zip(pick, got) if g != answer.answer_of(j, expected.get(j), now)]
    return {"checked": len(pick), "mismatches": len(bad), "examples": bad[:3]}


def projector_rows(url: str, quick: bool, rounds: int, log=print) -> list[dict]:
    c = redis.Redis.from_url(url)
    mix, jobs = B.job_mix(SIZES[quick]["events"], seed=1, tag="p")
    jids = B.tracked(mix)
    keep = set(jids)
    payload = B.payload_bytes(mix)
    sample = random.Random(3).sample(jids, min(2000, len(jids)))
    extra: dict = {"events": len(mix), "jobs": jobs, "tracked": len(jids),
                   "payload_bytes_per_event": payload}

    def naive(i: int) -> dict:
        ns = B.naive_namespace()
        B.settle(c)
        m0 = B.used_memory(c)
        secs = B.naive_write(c, ns, mix, keep)
        m1 = B.used_memory(c)
        pipe = c.pipeline(transaction=False)
        for j in sample:
            pipe.memory_usage(B.naive_key(ns, j), samples=0)
        usage = statistics.mean(int(x or 0) for x in pipe.execute())
        B.cleanup(c, ns)
        return {"jobs_per_s": jobs / secs, "events_per_s": len(mix) / secs,
                "bytes_per_job": (m1 - m0) / len(jids), "usage_per_job": usage}

    def tracker(i: int) -> dict:
        prefix = short_prefix()
        d = B.open_deployment(url, prefix)
        try:
            proj = Projector(d, consumer="bench")
            for part in range(d.partitions):  # streams and groups exist before m0
                proj.ensure_group(part)
            B.settle(c)
            m0 = B.used_memory(c)
            pub = Publisher(d)
            for chunk in B.chunks(mix, 1000):
                pub.publish_many(chunk)
            m1 = B.used_memory(c)
            cs0 = B.commandstats(c)
            t0 = time.perf_counter()
            n = proj.drain()
            secs = time.perf_counter() - t0
            cs = B.stats_delta(cs0, B.commandstats(c))
            m2 = B.used_memory(c)
            logs = {keys.stream(prefix, p).encode() for p in range(d.partitions)}
            fam = B.memory_usage(c, f"{{{prefix}:*", skip=logs.__contains__)
            out = {"jobs_per_s": jobs / secs, "events_per_s": n / secs,
                   "bytes_per_job": (m2 - m1) / len(jids), "bytes_per_event": (m1 - m0) / len(mix),
                   "usage_per_job": sum(fam.values()) / len(jids),
                   "usage_by_family": {k: round(v / len(jids), 1) for k, v in sorted(fam.items())},
                   "lua_us_per_event": sum(v["usec"] for k, v in cs.items()
                                           if k.startswith("eval")) / max(1, n)}
            if i == 0:
                extra["verify"] = verify(d, jids)
                if extra["verify"]["mismatches"]:
                    raise RuntimeError(f"projector verify failed: {extra['verify']}")
            log(f"  round {i + 1}: naive {R.base[-1]['jobs_per_s']:,.0f} jobs/s, projector "
                f"{out['jobs_per_s']:,.0f} jobs/s; {out['bytes_per_job']:.0f} B/job vs naive "
                f"{R.base[-1]['bytes_per_job']:.0f}")
            return out
        finally:
            B.cleanup(c, prefix)
            d.close()

    R = B.Rounds()
    R.run(rounds, naive, tracker)
    c.close()
    extra["usage_by_family_per_job"] = R.subj[-1]["usage_by_family"]
    extra["lua_us_per_event"] = R.s("lua_us_per_event")
    extra["naive_events_per_s"] = R.b("events_per_s")
    extra["projector_events_per_s"] = R.s("events_per_s")
    fams = ", ".join(f"{k} {v:.0f}" for k, v in R.subj[-1]["usage_by_family"].items())
    return [
        B.row("projector_jobs_per_s", "jobs/s", R.s("jobs_per_s"), R.b("jobs_per_s"),
              "naive direct-write tracker", ">= 2x", detail=extra,
              note=f"{statistics.median(R.s('events_per_s')):,.0f} events/s; Lua "
                   f"{statistics.median(extra['lua_us_per_event']):.1f} us/event in Redis"),
        B.row("memory_per_tracked_job", "B", R.s("bytes_per_job"), R.b("bytes_per_job"),
              "naive hash tracker (used_memory)", "<= 0.5x"),
        B.row("memory_usage_per_tracked_job", "B", R.s("usage_per_job"), R.b("usage_per_job"),
              "naive hash (MEMORY USAGE)", note=f"by key family: {fams}"),
        B.row("memory_per_logged_event", "B", R.s("bytes_per_event"),
              [payload] * rounds, "payload bytes per event", "<= 60 B"),
    ]


# ------------------------------------------------------------------------- lag


def _tracker_poller(url: str, prefix: str, conn) -> None:
    """Child: for each (jid, seq, t0) probe, poll Tracker.get until it shows seq."""
    tr = Tracker(B.open_deployment(url, prefix, read="stale"))
    lags = []
    while True:
        item = conn.recv()
        if item is None:
            break
        jid, seq, t0 = item
        limit = t0 + 5.0
        while True:
            desc = tr.get(jid).get("desc", "")
            now = time.perf_counter()
            if desc.startswith("probe ") and int(desc.split()[1]) >= seq:
                lags.append((now - t0) * 1000)
                break
            if now > limit:
                lags.append(5000.0)
                break
            time.sleep(POLL)
    conn.send(lags)


def _raw_reader(url: str, stream: str, conn) -> None:
    """Child: XREAD BLOCK the raw stream; stamp every probe entry when it arrives."""
    c = redis.Redis.from_url(url)
    last, lags = "$", []
    conn.send("ready")
    while True:
        got = c.xread({stream: last}, block=1000, count=1000)
        now = time.perf_counter()
        if not got:
            continue
        for eid, f in got[0][1]:
            last = eid
            if b"t0" in f:
                lags.append((now - float(f[b"t0"])) * 1000)
            elif b"end" in f:
                conn.send(lags)
                return


def _offer(secs: float, mix: list, send) -> tuple[int, float]:
    """Publish ``mix`` at LAG_RATE for ``secs`` in trips of <= 5 ms worth, a probe every
    5 ms; ``send(batch, seq or None)``. Returns (events sent, seconds)."""
    start = time.perf_counter()
    next_probe, seq, i = start, 0, 0
    per_trip = max(1, LAG_RATE // 200)
    while True:
        now = time.perf_counter()
        if now - start >= secs or i >= len(mix):
            break
        n = min(int((now - start) * LAG_RATE) - i, per_trip)
        probe = None
        if now >= next_probe:
            seq += 1
            probe = seq
            next_probe += PROBE_EVERY
        if n > 0 or probe:
            send(mix[i:i + max(0, n)], probe)
            i += max(0, n)
        else:
            time.sleep(0.0005)
    return i + seq, time.perf_counter() - start


def lag_rows(url: str, quick: bool, rounds: int, log=print) -> list[dict]:
    secs = SIZES[quick]["lag_secs"]
    ctx = multiprocessing.get_context("fork")
    prefix = B.new_prefix("benchlag")
    raw_ns = B.new_prefix("benchlagraw")
    d = B.open_deployment(url, prefix)
    c = redis.Redis.from_url(url)
    pub = Publisher(d)
    probes = [f"probe-{i}" for i in range(PROBES)]
    for jid in probes:
        pub.enqueued(jid, {"track": 1})
        pub.working(jid, 3600)
    mixes = [B.job_mix(int(LAG_RATE * secs * 1.1), seed=100 + i, tag=f"l{i}-")[0]
             for i in range(rounds)]
    cmd = [sys.executable, "-c", "from tracker.cli import main; main()", "--prefix", prefix,
           "project", "--consumer", "bench-lag"]
    proj = subprocess.Popen(cmd, env=dict(os.environ, TRACKER_REDIS_URL=url),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stale = Tracker(B.open_deployment(url, prefix, read="stale"))
    try:
        deadline = time.monotonic() + 30
        while stale.get(probes[-1])["state"] != "working":
            if time.monotonic() > deadline or proj.poll() is not None:
                raise RuntimeError("tracker project did not start folding")
            time.sleep(0.05)

        def raw(i: int) -> dict:
            stream = f"{raw_ns}:log"
            entries = [events.encode_entry(e) for e in mixes[i]]
            parent, child = ctx.Pipe()
            reader = ctx.Process(target=_raw_reader, args=(url, stream, child), daemon=True)
            reader.start()
            parent.recv()
            time.sleep(0.05)  # the reader is inside XREAD BLOCK

            def send(batch, seq):
                pipe = c.pipeline(transaction=False)
                for k in range(len(batch)):
                    pipe.xadd(stream, entries[k])  # the same sizes of entry
                if seq:
                    pipe.xadd(stream, {"q": seq, "t0": repr(time.perf_counter())})
                pipe.execute()

            n, took = _offer(secs, mixes[i], send)
            c.xadd(stream, {"end": 1})
            lags = parent.recv()
            reader.join(10)
            B.cleanup(c, raw_ns)
            return {"p50": B.pct(lags, 50), "p99": B.pct(lags, 99), "probes": len(lags),
                    "rate": n / took}

        def tracked(i: int) -> dict:
            parent, child = ctx.Pipe()
            poller = ctx.Process(target=_tracker_poller, args=(url, prefix, child), daemon=True)
            poller.start()

            def send(batch, seq):
                if seq:
                    jid = probes[seq % PROBES]
                    batch = batch + [events.make_trackset(jid, seq % 101, f"probe {seq}")]
                    t0 = time.perf_counter()
                    pub.publish_many(batch)
                    parent.send((jid, seq, t0))
                else:
                    pub.publish_many(batch)

            for jid in probes:  # reset the probes' counters
                pub.publish(events.make_trackset(jid, 0, "probe 0"))
            while stale.get(probes[-1]).get("desc") != "probe 0":
                time.sleep(0.01)
            n, took = _offer(secs, mixes[i], send)
            parent.send(None)
            lags = parent.recv()
            poller.join(10)
            out = {"p50": B.pct(lags, 50), "p99": B.pct(lags, 99), "probes": len(lags),
                   "rate": n / took, "max": max(lags)}
            log(f"  round {i + 1}: raw delivery p99 {R.base[-1]['p99']:.2f} ms, tracker p99 "
                f"{out['p99']:.2f} ms (p50 {out['p50']:.2f}) at {out['rate']:,.0f} events/s")
            return out

        R = B.Rounds()
        R.run(rounds, raw, tracked)
    finally:
        proj.terminate()
        try:
            proj.wait(20)
        except subprocess.TimeoutExpired:
            proj.kill()
        B.cleanup(c, prefix)
        B.cleanup(c, raw_ns)
        stale.close()
        d.close()
        c.close()
    detail = {"offered_per_s": LAG_RATE, "seconds_per_round": secs,
              "achieved_per_s": R.s("rate"), "raw_achieved_per_s": R.b("rate"),
              "probes": R.s("probes"), "max_ms": R.s("max"), "raw_p50_ms": R.b("p50")}
    return [
        B.row("lag_p99_ms", "ms", R.s("p99"), R.b("p99"), "raw XADD -> XREAD BLOCK delivery p99",
              "<= 10 ms", detail=detail,
              note=f"10k events/s offered, {statistics.median(R.s('rate')):,.0f}/s achieved; "
                   "projector: `tracker project` process"),
        B.row("lag_p50_ms", "ms", R.s("p50"), R.b("p50"), "raw XADD -> XREAD BLOCK delivery p50"),
    ]


def rows(quick: bool = False, rounds: int = 5, redis_url: str = "", log=print, **ctx) -> list:
    out = projector_rows(redis_url, quick, rounds, log)
    return out + lag_rows(redis_url, quick, rounds, log)


def main(argv=None) -> int:
    return B.module_main(rows, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
