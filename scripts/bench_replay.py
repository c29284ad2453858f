"""Rebuild rate and history latency on a private redis-server (never the shared one).

    python scripts/bench_replay.py [EVENTS]      # default 1_000_000

Prints bench_replay's dict as JSON: rebuild events/s, the same as a
ratio to a plain XRANGE read of the log in the same run, and history latency.
"""

from __future__ import annotations

import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import redis

from tracker import events
from tracker.history import history
from tracker.projector import Projector
from tracker.publisher import Publisher
from tracker.replay import log_length, rebuild
from tracker.store import keys, streams
from tracker.store.deployment import Deployment
from tracker.store.settings import Settings


def bench_replay(deployment: Deployment, n_events: int) -> dict:
    """Fill ``deployment`` (empty) with ``events`` (jobs of 5), project, then measure a
    full rebuild (events/s, and as a ratio to a plain XRANGE read of the same log in
    the same run) and ``history`` of one job (ms per call). """
    d, pub = deployment, Publisher(deployment)
    jobs = max(1, n_events // 5)
    for lo in range(0, jobs, 2000):
        batch = []
        for i in range(lo, min(jobs, lo + 2000)):
            j = f"bench-{i}"
            batch += [events.make_enqueued(j, {"track": 1}, "default", "Bench"),
                      events.make_working(j), events.make_trackset(j, 50, "half"),
                      events.make_trackset(j, 90, "nearly"), events.make_success(j)]
        pub.publish_many(batch)
    t0 = time.perf_counter()
    Projector(d, consumer="bench", batch=1000).drain()
    project_s = time.perf_counter() - t0
    n = log_length(d)
    t0 = time.perf_counter()
    for p in range(d.partitions):
        for _page in streams.pages(d.client, keys.stream(d.prefix, p)):
            pass
    raw_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rebuild(d)
    rebuild_s = time.perf_counter() - t0
    sample = [f"bench-{random.randrange(jobs)}" for _ in range(300)]
    times = []
    for jid in sample:
        t1 = time.perf_counter()
        assert len(history(d, jid).entries) == 5
        times.append((time.perf_counter() - t1) * 1000)
    times.sort()
    index_bytes = d.client.memory_usage(keys.history(d.prefix, d.partition(sample[0]), sample[0]))
    return {"events": n, "partitions": d.partitions, "project_per_s": round(n / project_s),
            "rebuild_per_s": round(n / rebuild_s), "rebuild_s": round(rebuild_s, 2),
            "raw_xrange_per_s": round(n / raw_s), "rebuild_vs_raw_xrange": round(raw_s / rebuild_s, 2),
            "history_ms_median": round(statistics.median(times), 3),
            "history_ms_p99": round(times[int(len(times) * 0.99) - 1], 3),
            "history_index_key_bytes_5_events": index_bytes}


def main() -> None:
    events = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        binary = os.environ.get("REDIS_SERVER", "redis-server")
        server = subprocess.Popen([binary, "--port", str(port), "--save", "",
                                   "--appendonly", "no", "--dir", tmp],
                                  stdout=subprocess.DEVNULL)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            for _ in range(100):
                try:
                    redis.Redis.from_url(url).ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            d = Deployment.open(Settings(redis_url=url, prefix="bench", partitions=8),
                                check_version=False)
            version = d.client.info("server")["redis_version"]
            print(json.dumps({"redis": version, **bench_replay(d, events)}, indent=1))
        finally:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()
