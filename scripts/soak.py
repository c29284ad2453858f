#!/usr/bin/env python
"""Soak: publish at a fixed rate for N minutes and show that memory stays flat.

A private redis-server (as scripts/chaos.py), a projector (in this process, so the
expiry grace can be short: ``tracker project`` has no --grace flag yet), a short
track TTL, and the log trimmed by ``tracker.retention.trim`` (min retention 60 s).
Every interval: used_memory, total stream length, stored jobs (the buckets' field
count: the projector's sweep removes dead ones), and a verification of recent jobs
against the fold of the retained log.

    python scripts/soak.py --minutes 4 --rate 200 --ttl 5

Exit 1 if a verification finds a difference or memory in the last third of the run
grows more than 25 % above the middle third's peak.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chaos import PrivateRedis, Producer, log, totals, verify  # noqa: E402

from tracker import retention  # noqa: E402
from tracker.projector import Projector  # noqa: E402
from tracker.store import keys  # noqa: E402
from tracker.store.deployment import Deployment
from tracker.store.settings import Settings  # noqa: E402


def sample(c, prefix: str, parts: int) -> dict:
    t = totals(c, prefix, parts)
    mem = c.info("memory")
    pipe = c.pipeline(transaction=False)
    for p in range(parts):  # jobs stored in each partition's buckets (the sweep removes them)
        pipe.hget(keys.meta(prefix, p), "n")
    return {"used_memory": mem["used_memory"], "log": t["log"],
            "snapshots": sum(int(n or 0) for n in pipe.execute()), "pending": t["pending"],
            "lag": t["log"] - t["applied"] - t["dead_lettered"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=4)
    ap.add_argument("--rate", type=float, default=200, help="events per second")
    ap.add_argument("--ttl", type=int, default=5, help="track TTL, seconds")
    ap.add_argument("--grace", type=int, default=5, help="snapshot key grace, seconds")
    ap.add_argument("--retention", type=int, default=60, help="log retention, seconds (>= 60)")
    ap.add_argument("--every", type=float, default=15, help="seconds between samples")
    ap.add_argument("--partitions", type=int, default=4)
    a = ap.parse_args()
    r = PrivateRedis(aof=False)
    prefix = "soak"
    c = r.client()
    try:
        settings = Settings(redis_url=r.url, prefix=prefix, partitions=a.partitions, ttl=a.ttl,
                            grace=a.grace)
        d = Deployment.open(settings)
        proj = Projector(d, consumer="soak", claim_idle_ms=1000)
        threading.Thread(target=proj.run, daemon=True).start()
        prod = Producer(r.url, prefix, a.rate, poison_every=0, seed=1)
        prod.start()
        log(f"soak {a.minutes} min at {a.rate:.0f}/s, ttl {a.ttl}s, grace {a.grace}s, "
            f"retention {a.retention}s (tracker.retention.trim), {a.partitions} partitions")
        print(f"{'t(s)':>5} {'used_memory':>12} {'log':>7} {'snapshots':>9} {'lag':>5} "
              f"{'pending':>7} {'published':>9} {'checked':>7} {'diff':>4}", flush=True)
        t0, rows, problems = time.monotonic(), [], []
        while time.monotonic() - t0 < a.minutes * 60:
            time.sleep(a.every)
            retention.trim(d, max(a.retention, 60) * 1000)
            # Verify jobs enqueued within the retained window: fold from the oldest
            # retained entry, compare the JIDs whose whole life is in that window.
            prod.paused.set()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and sample(c, prefix, a.partitions)["lag"] > 0:
                time.sleep(0.02)
            recent = {j["jid"] for j in prod.jobs}
            v = verify(c, prefix, a.partitions, d.ttl_ms, only=recent)
            prod.paused.clear()
            s = sample(c, prefix, a.partitions)
            s["t"] = round(time.monotonic() - t0)
            rows.append(s)
            print(f"{s['t']:>5} {s['used_memory']:>12} {s['log']:>7} {s['snapshots']:>9} "
                  f"{s['lag']:>5} {s['pending']:>7} {len(prod.ids):>9} {v['tracks']:>7} "
                  f"{v['differences']:>4}", flush=True)
            if v["differences"]:
                problems.append(f"t={s['t']}: {v['differences']} differences {v['examples'][:1]}")
        prod.stopping.set()
        prod.join(10)
        proj.stop()
        third = max(1, len(rows) // 3)
        mid = max(x["used_memory"] for x in rows[third:2 * third] or rows)
        last = max(x["used_memory"] for x in rows[2 * third:] or rows)
        print(f"peak used_memory middle third {mid}, last third {last} "
              f"({(last - mid) / mid * 100:+.1f} %)")
        if last > mid * 1.25:
            problems.append("memory grew by more than 25 % in the last third")
        for p in problems:
            print("VIOLATION:", p)
        print("OK: memory flat, no differences" if not problems else "FAILED")
        return 1 if problems else 0
    finally:
        c.close()
        r.stop()


if __name__ == "__main__":
    sys.exit(main())
