"""Rebuild speed, history among many events, and listing by state with many tracks.

    python scripts/bench_replay.py [--redis-url URL] [--quick] [--rounds N]

Rows (issue 15's format; ``scripts/bench.py`` imports ``rows``):

- replay_events_per_s: ``tracker.replay.rebuild(d)`` of a projected job-mix log,
  events/s, against redis-py pipelined XADD (batches of 1000) of the same entries;
  each round writes the entries to raw streams (timed, then deleted), then rebuilds.
  Reading a log back must be much cheaper than writing it: target >= 2x.
- The "many tracks" data set: 1,000,000 jobs in the full run (20,000 quick), each
  enqueued (tracked) and working, so 2 events per job; projected once.
- history_p50_ms: ``Tracker.history(jid)`` (what ``tracker history`` calls: settle,
  then read the job's entries) of random jobs of that data set, against an HGETALL
  round trip; target p50 <= 5 ms (on the figure).
- list_working_p50_ms: ``Tracker.list_tracks("working")`` (first page, 50 tracks, all
  partitions merged) against one pipeline of 50 HGETALL of naive hashes (the least a
  page of 50 tracks reads); no target.
- state_index_bytes_per_track: MEMORY USAGE of the state index keys per track, when the
  layout keeps the index in keys of its own (``keys.state_index``); else skipped.
"""

from __future__ import annotations

import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _benchlib as B  # noqa: E402
import redis  # noqa: E402

from tracker import events  # noqa: E402
from tracker.projector import Projector  # noqa: E402
from tracker.publisher import Publisher  # noqa: E402
from tracker.query import Tracker  # noqa: E402
from tracker.replay import log_length, rebuild  # noqa: E402
from tracker.store import keys  # noqa: E402

SIZES = {True: {"replay": 20_000, "tracks": 20_000, "calls": 50},
         False: {"replay": 200_000, "tracks": 1_000_000, "calls": 200}}


def replay_rows(quick: bool, rounds: int, url: str, log=print) -> list[dict]:
    c = redis.Redis.from_url(url)
    prefix = B.new_prefix("benchrep")
    raw = B.new_prefix("benchrepraw")
    d = B.open_deployment(url, prefix)
    try:
        mix, _ = B.job_mix(SIZES[quick]["replay"], seed=11, tag="rp")
        for chunk in B.chunks(mix, 1000):
            Publisher(d).publish_many(chunk)
        Projector(d, consumer="bench-rep").drain()
        n = log_length(d)
        entries = [(f"{raw}:{keys.partition_of(e.jid, d.partitions)}", events.encode_entry(e))
                   for e in mix]

        def xadd(i: int) -> dict:
            rate = len(entries) / B.xadd_entries(c, entries)
            B.cleanup(c, raw)
            return {"per_s": rate}

        def replay(i: int) -> dict:
            t0 = time.perf_counter()
            rebuild(d)
            rate = n / (time.perf_counter() - t0)
            log(f"  round {i + 1}: pipelined XADD {R.base[-1]['per_s']:,.0f}/s, rebuild {rate:,.0f}/s")
            return {"per_s": rate}

        R = B.Rounds()
        R.run(rounds, xadd, replay)
    finally:
        B.cleanup(c, prefix)
        B.cleanup(c, raw)
        d.close()
        c.close()
    return [B.row("replay_events_per_s", "events/s", R.s("per_s"), R.b("per_s"),
                  "redis-py pipelined XADD of the same entries", ">= 2x",
                  detail={"events": n, "partitions": d.partitions})]


def many_rows(quick: bool, rounds: int, url: str, log=print) -> list[dict]:
    """The many-tracks data set: history, list by state, the state index's bytes."""
    cfg = SIZES[quick]
    c = redis.Redis.from_url(url)
    prefix = B.new_prefix("benchmany")
    ns = B.naive_namespace()
    d = B.open_deployment(url, prefix)
    try:
        n = cfg["tracks"]
        pub = Publisher(d)
        t0 = time.perf_counter()
        for lo in range(0, n, 1000):
            batch = []
            for i in range(lo, min(n, lo + 1000)):
                jid = f"many-{i:07d}"
                batch += [events.make_enqueued(jid, {"track": 1}, "default", "Bench", 600),
                          events.make_working(jid, 3600)]
            pub.publish_many(batch)
        pub_s = time.perf_counter() - t0
        B.settle(c)
        m0 = B.used_memory(c)
        t0 = time.perf_counter()
        Projector(d, consumer="bench-many", batch=1000).drain()
        drain_s = time.perf_counter() - t0
        m1 = B.used_memory(c)
        log(f"  {n:,} tracks: published {2 * n:,} events in {pub_s:.0f} s, folded in "
            f"{drain_s:.0f} s; {(m1 - m0) / n:.0f} B/track")
        detail = {"tracks": n, "events": 2 * n, "publish_s": round(pub_s, 1),
                  "drain_s": round(drain_s, 1), "used_memory_per_track": (m1 - m0) / n}
        rng = random.Random(13)
        sample = [f"many-{rng.randrange(n):07d}" for _ in range(cfg["calls"] * rounds)]
        naive = sample[:50]
        B.naive_write(c, ns, [events.make_enqueued(j, {"track": 1}) for j in naive] +
                      [events.make_working(j, 3600) for j in naive])
        nkeys = [B.naive_key(ns, j) for j in naive]
        tr = Tracker(d)
        k = cfg["calls"]

        def hist_round(i: int) -> tuple[dict, dict]:
            b, s = B.paired_us(lambda j: c.hgetall(nkeys[j % 50]), lambda j: tr.history(sample[j]),
                               k, i * k)
            return ({"p50": B.pct(b, 50) / 1000},
                    {"p50": B.pct(s, 50) / 1000, "p99": B.pct(s, 99) / 1000})

        H = B.Rounds().paired(rounds, hist_round)

        def page_raw(_: int) -> None:
            pipe = c.pipeline(transaction=False)
            for key in nkeys:
                pipe.hgetall(key)
            pipe.execute()

        out = [B.row("history_p50_ms", "ms", H.s("p50"), H.b("p50"), "HGETALL round trip",
                     "<= 5 ms", detail={**detail, "history_p99_ms": H.s("p99")},
                     note=f"{n:,} jobs, {2 * n:,} events; 2 entries per job")]
        if not hasattr(tr, "list_tracks"):
            out.append(B.skipped("list_working_p50_ms", "Tracker.list_tracks is not there"))
        else:
            assert len(tr.list_tracks("working").tracks) == 50

            def list_round(i: int) -> tuple[dict, dict]:
                b, s = B.paired_us(page_raw, lambda _: tr.list_tracks("working"), k)
                return {"p50": B.pct(b, 50) / 1000}, {"p50": B.pct(s, 50) / 1000}

            L = B.Rounds().paired(rounds, list_round)
            out.append(B.row("list_working_p50_ms", "ms", L.s("p50"), L.b("p50"),
                             "one pipeline of 50 HGETALL", note=f"first page of 50 among {n:,}"
                             " working tracks"))
        index = getattr(keys, "state_index", None)
        if index is None:
            out.append(B.skipped("state_index_bytes_per_track", "no state index keys "
                                 "(keys.state_index) in this layout"))
        else:
            # Every index key of any generation: a state's key and, in a paged layout,
            # its pages (``<state key>:<label>``; ``{p}:stats`` has no ':' after its s).
            found = []
            for p in range(d.partitions):
                base = index(prefix, p, "working")
                pattern = base[:base.rindex(":s") + 2] + "*:*"
                found += list(c.scan_iter(match=pattern, count=5000))
            got = 0
            for i in range(0, len(found), 1000):
                pipe = c.pipeline(transaction=False)
                for key in found[i:i + 1000]:
                    pipe.memory_usage(key, samples=0)
                got += sum(int(x or 0) for x in pipe.execute())
            out.append(B.row("state_index_bytes_per_track", "B", [got / n],
                             note=f"MEMORY USAGE of the {len(found):,} index keys / {n:,} "
                                  "tracks (deterministic: one measurement)"))
        return out
    finally:
        B.cleanup(c, prefix)
        B.cleanup(c, ns)
        d.close()
        c.close()


def rows(quick: bool = False, rounds: int = 5, redis_url: str = "", log=print, **ctx) -> list:
    return replay_rows(quick, rounds, redis_url, log) + many_rows(quick, rounds, redis_url, log)


def main(argv=None) -> int:
    return B.module_main(rows, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
