"""How fast ``tracker project --once`` folds a prepared log, and that it folds it right.

    python scripts/bench_project.py [--redis-url URL] [--events 100000] [--json PATH]

Prepares a realistic log (per job: enqueued (tracked), working, three TRACK
SETs, success; 10% fail once and are re-enqueued; 5% untracked) with the
Publisher's bulk path, then times the fold twice: in-process
``Projector.drain()`` and the real ``tracker project --once`` CLI subprocess.
After each, a sample of snapshots must equal ``projections.fold`` of the log.
Without --redis-url it runs on a private redis-server; its keys are deleted after.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _benchlib as B  # noqa: E402

from projections import track as fold_mod  # noqa: E402
from tracker import events  # noqa: E402
from tracker.projector import Projector  # noqa: E402
from tracker.publisher import Publisher  # noqa: E402
from tracker.store import keys  # noqa: E402


def prepare(d, n_events: int, seed: int = 1, tag: str = "j", batch: int = 1000) -> dict:
    """Publish the job mix in bulk; returns counts and the publish time."""
    evs, jobs = B.job_mix(n_events, seed, tag)
    pub = Publisher(d)
    t0 = time.perf_counter()
    for chunk in B.chunks(evs, batch):
        pub.publish_many(chunk)
    secs = time.perf_counter() - t0
    return {"events": len(evs), "jobs": jobs, "publish_seconds": secs,
            "jids": sorted({e.jid for e in evs})}


def drain_in_process(d, batch: int = 500) -> dict:
    proj = Projector(d, consumer="bench-0", batch=batch)
    t0 = time.perf_counter()
    n = proj.drain()
    secs = time.perf_counter() - t0
    return {"entries": n, "seconds": secs, "per_second": n / secs,
            "batches": proj.totals.batches}


def tracker_command() -> list:
    exe = shutil.which("tracker", path=os.path.dirname(sys.executable) + os.pathsep +
                       os.environ.get("PATH", ""))
    return [exe] if exe else [sys.executable, "-c", "from tracker.cli import main; main()"]


def drain_cli(url: str, prefix: str, batch: int = 500) -> dict:
    """The actual ``tracker project --once`` in a subprocess (wall time includes start-up)."""
    cmd = tracker_command() + ["--prefix", prefix, "project", "--once", "--json",
                               "--batch", str(batch), "--consumer", "bench-cli"]
    env = dict(os.environ, TRACKER_REDIS_URL=url)  # not on the command line: it may hold a password
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900, env=env)
    wall = time.perf_counter() - t0
    rep = json.loads(out.stdout.strip().splitlines()[-1])
    return {"entries": rep["entries"], "seconds": rep["seconds"],
            "per_second": rep["per_second"], "wall_seconds": wall,
            "wall_per_second": rep["entries"] / wall, "command": "tracker " + " ".join(cmd[-9:])}


def _child(url, prefix, consumer, batch, barrier, q):
    d = B.open_deployment(url, prefix)
    proj = Projector(d, consumer=consumer, batch=batch)
    barrier.wait()
    t0 = time.perf_counter()
    n = proj.drain()
    q.put((t0, time.perf_counter(), n))


def drain_processes(url: str, prefix: str, procs: int, batch: int = 500) -> dict:
    """``procs`` projector processes draining the same log at once (consumer group)."""
    ctx = multiprocessing.get_context("fork")
    barrier, q = ctx.Barrier(procs), ctx.Queue()
    ps = [ctx.Process(target=_child, args=(url, prefix, f"bench-{i}", batch, barrier, q))
          for i in range(procs)]
    for p in ps:
        p.start()
    res = [q.get(timeout=900) for _ in ps]
    for p in ps:
        p.join()
    start, end = min(r[0] for r in res), max(r[1] for r in res)
    n = sum(r[2] for r in res)
    return {"entries": n, "seconds": end - start, "per_second": n / (end - start),
            "processes": procs}


def read_log(d) -> list:
    """Every entry of every partition as (partition, time ms, event)."""
    out = []
    for part in range(d.partitions):
        stream, last = keys.stream(d.prefix, part), "-"
        while True:
            got = d.client.xrange(stream, min=last, max="+", count=10_000)
            if last != "-":
                got = got[1:]
            if not got:
                break
            for eid, fields in got:
                out.append((int(eid.split(b"-")[0]), events.decode_entry(fields)))
            last = got[-1][0]
    return out


def verify(d, jids: list, sample: int = 2000, seed: int = 7) -> dict:
    """Compare the snapshots of a sample of JIDs with the Python fold of the whole log.

    Each partition's entries are in stream order; partitions are independent, so
    folding their concatenation gives each JID's track.
    """
    expected = fold_mod.fold(read_log(d), d.ttl_ms)
    pick = random.Random(seed).sample(jids, min(sample, len(jids)))
    pipe = d.client.pipeline(transaction=False)
    for jid in pick:
        pipe.hgetall(keys.snapshot(d.prefix, d.partition(jid), jid))
    bad = []
    for jid, h in zip(pick, pipe.execute()):
        want = expected.get(jid)
        got = None
        if h:
            got = fold_mod.Track(state=h[b"s"].decode(), updated_at=int(h[b"u"]),
                                 expires_at=int(h[b"x"]), reserved_until=int(h.get(b"r", 0)),
                                 percent=int(h[b"p"]) if b"p" in h else None,
                                 desc=h[b"d"].decode() if b"d" in h else None)
        if got != want:
            bad.append({"jid": jid, "want": str(want), "got": str(got)})
    return {"checked": len(pick), "mismatches": len(bad), "examples": bad[:3],
            "tracked": len(expected)}


def run(url: str, n_events: int, cli: bool = True, procs: tuple = (), batch: int = 500,
        log=print) -> dict:
    """Prepare once, then fold it with each runner in turn, verifying every result."""
    prefix = B.new_prefix("benchproj")
    d = B.open_deployment(url, prefix)
    out: dict = {"prefix": prefix, "partitions": d.partitions, "batch": batch}
    try:
        prep = prepare(d, n_events)
        jids = prep.pop("jids")
        out["prepare"] = prep
        log(f"prepared {prep['events']} events of {prep['jobs']} jobs in "
            f"{prep['publish_seconds']:.2f}s ({prep['events'] / prep['publish_seconds']:,.0f}/s)")
        before = B.commandstats(d.client)
        r = drain_in_process(d, batch)
        r["commandstats"] = B.stats_delta(before, B.commandstats(d.client))
        r["verify"] = verify(d, jids)
        out["in_process"] = r
        ev = r["commandstats"].get("evalsha", {})
        log(f"Projector.drain(): {r['entries']} entries in {r['seconds']:.2f}s = "
            f"{r['per_second']:,.0f} events/s; EVALSHA {ev.get('usec_per_call', 0):.0f} us/call, "
            f"{ev.get('usec', 0) / max(1, r['entries']):.1f} us/event inside Redis; "
            f"verify {r['verify']['checked']} jids: {r['verify']['mismatches']} mismatches")
        if cli:
            B.reset_projection(d)
            r = drain_cli(url, prefix, batch)
            r["verify"] = verify(d, jids)
            out["cli"] = r
            log(f"tracker project --once: {r['entries']} entries in {r['seconds']:.2f}s = "
                f"{r['per_second']:,.0f} events/s (wall incl. start-up {r['wall_seconds']:.2f}s = "
                f"{r['wall_per_second']:,.0f}/s); verify: {r['verify']['mismatches']} mismatches")
        for n in procs:
            B.reset_projection(d)
            r = drain_processes(url, prefix, n, batch)
            r["verify"] = verify(d, jids, sample=500)
            out[f"processes_{n}"] = r
            log(f"{n} projector processes: {r['entries']} entries in {r['seconds']:.2f}s = "
                f"{r['per_second']:,.0f} events/s; verify: {r['verify']['mismatches']} mismatches")
    finally:
        B.cleanup(d.client, prefix)
        d.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--redis-url", help="Redis to use (default: a private redis-server)")
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=500, help="projector batch size")
    ap.add_argument("--procs", type=int, nargs="*", default=[2],
                    help="also time this many concurrent projector processes")
    ap.add_argument("--json", metavar="PATH", help="write every figure here")
    a = ap.parse_args(argv)
    server = None if a.redis_url else B.PrivateRedis()
    url = a.redis_url or server.url
    try:
        print(f"Redis: {'private ' + server.binary if server else a.redis_url}")
        out = run(url, a.events, cli=True, procs=tuple(a.procs), batch=a.batch)
    finally:
        if server:
            server.stop()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    bad = sum(out[k]["verify"]["mismatches"] for k in out if isinstance(out[k], dict)
              and "verify" in out[k])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
