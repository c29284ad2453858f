"""Redis Cluster scale: the projector and TRACK GET on 3 masters against one Redis (issue 12).

    python scripts/bench_cluster.py [--quick] [--events N] [--rounds R]

Starts, side by side, a private single redis-server and a private 3-master
cluster (no replicas: replication would take cores from the masters on a small
machine; tests/cluster.py launches it), both with the same partition count,
and publishes the same job mix to each. Then, in interleaved rounds (single,
cluster, single, cluster, ...), it forgets everything folded and times
``Projector.drain()`` (one process: every round of script calls goes to all
masters at once, written before any reply is read), then ``get_many`` in
batches of 100 and single ``Tracker.get``. During the cluster drains it reads
each master's INFO cpu and INFO commandstats (EVALSHA usec), giving Redis CPU per
event per shard, and from that a projection for 1, 3, 10 and 30 shards.

Rows follow issue 15's format (``rows(quick) -> list[dict]``, printed as JSON by
``__main__``); ratios are medians of per-round ratios, cluster / single.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the local cluster launcher

import _benchlib as B  # noqa: E402
import redis  # noqa: E402
from cluster import LocalCluster  # noqa: E402
from redis.crc import key_slot  # noqa: E402

from tracker.projector import Projector  # noqa: E402
from tracker.publisher import Publisher  # noqa: E402
from tracker.query import Tracker  # noqa: E402
from tracker.store import keys  # noqa: E402
from tracker.store.cluster import scan_keys  # noqa: E402
from tracker.store.deployment import Deployment  # noqa: E402
from tracker.store.settings import DEFAULT_CLUSTER_PARTITIONS, Settings  # noqa: E402

PARTITIONS = DEFAULT_CLUSTER_PARTITIONS
SHARDS = (1, 3, 10, 30)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def spread(shards: int, partitions: int, prefix: str = "tracker") -> float:
    """Busiest master's partitions / the mean, with slots in even ranges per master
    (as ``redis-cli --cluster create`` assigns them) and tags ``{prefix:p}``."""
    per = [0] * shards
    for p in range(partitions):
        slot = key_slot(keys.tag(prefix, p).encode())
        per[min(shards - 1, slot * shards // 16384)] += 1
    return max(per) / (partitions / shards)


def recommended_partitions(shards: int) -> int:
    """The README's advice: 64 for up to 4 masters, 128 up to 8, 512 up to 32."""
    return 64 if shards <= 4 else 128 if shards <= 8 else 512 if shards <= 32 else 1024


def forget(d: Deployment) -> None:
    """Drop everything folded (snapshots, indexes, stats, group), keep the log."""
    for p in range(d.partitions):
        log_key = keys.stream(d.prefix, p).encode()
        doomed = [k for k in scan_keys(d.client, keys.tag(d.prefix, p) + ":*",
                                       keys.tag(d.prefix, p)) if k != log_key]
        for i in range(0, len(doomed), 500):
            d.client.unlink(*doomed[i:i + 500])
        try:
            d.client.xgroup_destroy(keys.stream(d.prefix, p), keys.GROUP)
        except redis.ResponseError:
            pass


def masters(d: Deployment) -> dict[str, redis.Redis]:
    if not d.cluster:
        return {"single": d.client}
    return {n.name: d.client.get_redis_connection(n) for n in d.client.get_primaries()}


def cpu_and_lua(clients: dict[str, redis.Redis]) -> dict[str, tuple[float, int]]:
    out = {}
    for name, c in clients.items():
        cpu = c.info("cpu")
        ev = c.info("commandstats").get("cmdstat_evalsha", {})
        out[name] = (float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), int(ev.get("usec", 0)))
    return out


def drain(d: Deployment) -> dict:
    forget(d)
    clients = masters(d)
    before = cpu_and_lua(clients)
    proj = Projector(d, consumer="bench", batch=500)
    t0 = time.perf_counter()
    n = proj.drain()
    secs = time.perf_counter() - t0
    after = cpu_and_lua(clients)
    per_node_events: dict[str, int] = {}
    for p in range(d.partitions):
        node = d.node_of(p) or "single"
        per_node_events[node] = per_node_events.get(node, 0) + d.client.xlen(keys.stream(d.prefix, p))
    shards = {name: {"events": per_node_events.get(name, 0),
                     "cpu_us": (after[name][0] - before[name][0]) * 1e6,
                     "evalsha_us": after[name][1] - before[name][1]} for name in clients}
    return {"events": n, "seconds": secs, "per_s": n / secs, "shards": shards}


def gets(t: Tracker, jids: list[str], seconds: float, rng: random.Random) -> dict:
    """get_many of 100 random JIDs for ``seconds``, then 300 single gets."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        t.get_many(rng.sample(jids, 100))
        n += 100
    many = n / (time.perf_counter() - t0)
    lat = []
    for jid in rng.sample(jids, 300):
        s = time.perf_counter()
        t.get(jid)
        lat.append((time.perf_counter() - s) * 1e6)
    return {"get_many_per_s": many, "get_p50_us": statistics.median(lat)}


def row(metric, figure, unit, baseline_name=None, baseline=None, rounds=None, target=None,
        met=None) -> dict:
    ratio = statistics.median(rounds) if rounds else None
    out = {"metric": metric, "figure": round(figure, 2), "unit": unit,
           "baseline_name": baseline_name,
           "baseline": None if baseline is None else round(baseline, 2),
           "ratio": None if ratio is None else round(ratio, 3), "target": target, "met": met,
           "rounds": [round(r, 3) for r in rounds or []]}
    if rounds:
        out["spread"] = [round(min(rounds), 3), round(max(rounds), 3)]
    return out


def rows(quick: bool = False, events: int | None = None, rounds: int | None = None,
         **ctx) -> list[dict]:
    n_events = events or (15_000 if quick else 60_000)
    n_rounds = max(5, rounds or 5)
    get_secs = 0.5 if quick else 1.5
    single = B.PrivateRedis()
    cl = LocalCluster(masters=3, replicas=0, node_timeout_ms=2000).start()
    ds = []
    try:
        prefix = B.new_prefix("benchcl")
        for url in (single.url, cl.url):
            d = Deployment.open(Settings(redis_url=url, prefix=prefix, partitions=PARTITIONS))
            evs, _jobs = B.job_mix(n_events, seed=3)
            pub = Publisher(d)
            for chunk in B.chunks(evs, 1000):
                pub.publish_many(chunk)
            ds.append(d)
        jids = sorted({e.jid for e in evs})
        log(f"{len(evs)} events of {len(jids)} jobs in {PARTITIONS} partitions on single Redis "
            f"and on 3 masters ({cl.startup_seconds:.1f}s to start the cluster)")
        res: dict[str, list] = {"drain": [], "gets": []}
        rng = random.Random(5)
        for k in range(n_rounds):
            pair = [drain(d) for d in ds]  # baseline, then subject
            res["drain"].append(pair)
            res["gets"].append([gets(Tracker(d), jids, get_secs, rng) for d in ds])
            log(f"round {k + 1}: drain {pair[0]['per_s']:,.0f} vs {pair[1]['per_s']:,.0f} ev/s; "
                f"get_many {res['gets'][-1][0]['get_many_per_s']:,.0f} vs "
                f"{res['gets'][-1][1]['get_many_per_s']:,.0f} jids/s")
        return _rows(res)
    finally:
        for d in ds:  # private servers: stopped below, nothing to clean
            d.close()
        cl.stop()
        single.stop()


def _rows(res: dict) -> list[dict]:
    drains, gts = res["drain"], res["gets"]
    med = lambda xs: statistics.median(xs)  # noqa: E731
    s_rate, c_rate = med([p[0]["per_s"] for p in drains]), med([p[1]["per_s"] for p in drains])
    out = [row("cluster_projector_events_per_s", c_rate, "ev/s", "single Redis, same run",
               s_rate, [p[1]["per_s"] / p[0]["per_s"] for p in drains],
               "> 1x (3 masters + the projector share 2 cores)",
               med([p[1]["per_s"] / p[0]["per_s"] for p in drains]) > 1)]
    g = [(x[0]["get_many_per_s"], x[1]["get_many_per_s"]) for x in gts]
    out.append(row("cluster_get_many_jids_per_s", med([b for _, b in g]), "jids/s",
                   "single Redis get_many", med([a for a, _ in g]), [b / a for a, b in g],
                   ">= 0.8x", med([b / a for a, b in g]) >= 0.8))
    lat = [(x[0]["get_p50_us"], x[1]["get_p50_us"]) for x in gts]
    out.append(row("cluster_get_p50_us", med([b for _, b in lat]), "us", "single Redis get p50",
                   med([a for a, _ in lat]), [b / a for a, b in lat], "<= 1.3x",
                   med([b / a for a, b in lat]) <= 1.3))
    # Redis CPU (and Lua time) per event, per shard, from the cluster drains
    per_shard: dict[str, list[float]] = {}
    lua: dict[str, list[float]] = {}
    for _s, c in drains:
        for name, sh in c["shards"].items():
            if sh["events"]:
                per_shard.setdefault(name, []).append(sh["cpu_us"] / sh["events"])
                lua.setdefault(name, []).append(sh["evalsha_us"] / sh["events"])
    single_cpu = [p[0]["shards"]["single"]["cpu_us"] / p[0]["shards"]["single"]["events"]
                  for p in drains]
    for i, name in enumerate(sorted(per_shard)):
        c_us = med(per_shard[name])
        out.append(row(f"cluster_redis_cpu_us_per_event_shard{i}", c_us, "us (INFO cpu)",
                       "single Redis", med(single_cpu),
                       [a / b for a, b in zip(per_shard[name], single_cpu)]))
        out.append(row(f"cluster_evalsha_us_per_event_shard{i}", med(lua[name]),
                       "us (INFO commandstats)"))
    cpu_us = med([med(v) for v in per_shard.values()])
    for shards in SHARDS:
        parts = recommended_partitions(shards)
        imb = spread(shards, parts)
        projected = shards * 1e6 / cpu_us / imb
        out.append(row(f"cluster_projected_events_per_s_{shards}_shards", projected,
                       f"ev/s (projected; {parts} partitions, busiest shard {imb:.2f}x the mean)"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--events", type=int)
    ap.add_argument("--rounds", type=int)
    a = ap.parse_args(argv)
    t0 = time.time()
    out = rows(a.quick, a.events, a.rounds)
    print(json.dumps(out, indent=1))
    log(f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
