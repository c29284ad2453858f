"""Shared helpers of the benchmark scripts: servers, the job mix, the naive tracker,
interleaved rounds and the row format of issue 15.

Why interleaved rounds: the dev machine has 2 cores shared with other work, so a
baseline measured once, a minute away from its subject, can be 4x off. Every ratio
here is the median of per-round ratios, each round running the baseline and then the
subject back to back, so a burst of load elsewhere hits both alike; the spread
(min..max of the per-round ratios) says how much the machine moved meanwhile. Where
the work comes in small pieces (one call, one batch), a round alternates baseline and
subject piece by piece (``paired_us``, ``paired_rate``), finer still.

Everything is measured through the public API (Publisher, Projector, Tracker, replay)
plus INFO and MEMORY, never by reading tracker's keys, so the storage layout may
change under the bench. Keys live under fresh prefixes, deleted afterwards.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Optional

import redis

from tracker import events
from tracker.store.deployment import Deployment
from tracker.store.embedded import server_binary
from tracker.store.settings import Settings


class Skip(Exception):
    """A scenario's prerequisite is absent (a binary, a service): its rows are skipped."""


# ------------------------------------------------------------------ private Redis


def free_port() -> int:
    """A random free port in 20000-40000 (the range COMMON.md gives helpers)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(20000, 40000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-40000")


def stop_process(proc: subprocess.Popen, tmpdir: Optional[str] = None) -> None:
    """Terminate a server this bench started (kill it after 10 s), then remove its dir."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    if tmpdir:
        shutil.rmtree(tmpdir, ignore_errors=True)


def start_serve(redis_url: str, prefix: str, *args: str,
                workers: int = 1) -> tuple[subprocess.Popen, int, list[str]]:
    """``tracker serve --port 0 [args]`` as users run it (its own process): returns it,
    the port it listens on (with ``workers`` > 1, once every worker listens) and its log
    lines, which a thread keeps draining so a chatty server never blocks on the pipe."""
    cmd = [sys.executable, "-c", "from tracker.cli import main; main()", "--redis-url",
           redis_url, "--prefix", prefix, "serve", "--port", "0", "--workers", str(workers),
           *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    ready = (r"serving Faktory protocol on [^\s]+:(\d+)" if workers == 1
             else r"workers serving on [^\s]+:(\d+)")
    logged: list[str] = []
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        logged.append(line)
        m = re.search(ready, line)
        if m:
            threading.Thread(target=lambda: logged.extend(proc.stderr), daemon=True).start()
            return proc, int(m.group(1)), logged
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"tracker serve {' '.join(args)} did not start: {''.join(logged)[-300:]}")


class PrivateRedis:
    """A throw-away redis-server on a free port, no persistence; ``stop()`` kills it."""

    def __init__(self, binary: Optional[str] = None):
        self.binary = binary or shutil.which("redis-server") or server_binary()
        self.dir = tempfile.mkdtemp(prefix="tracker-bench-")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--daemonize", "no",
             "--logfile", os.path.join(self.dir, "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url, socket_timeout=1).ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"could not start {self.binary} on port {self.port}")
                time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.proc, self.dir)


# -------------------------------------------------------------- deployments, keys


def new_prefix(kind: str = "bench") -> str:
    return f"{kind}-{uuid.uuid4().hex[:10]}"


def open_deployment(url: str, prefix: str, partitions: Optional[int] = None,
                    **settings: Any) -> Deployment:
    return Deployment.open(Settings(redis_url=url, prefix=prefix, partitions=partitions,
                                    **settings))


def cleanup(client: redis.Redis, prefix: str) -> int:
    """Delete every key under ``prefix`` (tracker's partition keys ``{prefix:...``, its
    config hash, or the bench's own raw keys), then wait until Redis has freed them."""
    n = 0
    for pattern in (f"{{{prefix}:*", f"{prefix}:*"):
        batch = list(client.scan_iter(match=pattern, count=5000))
        for i in range(0, len(batch), 1000):
            n += client.unlink(*batch[i:i + 1000])
    settle(client)
    return n


def settle(client: redis.Redis, timeout: float = 5.0) -> None:
    """Wait for background frees (UNLINK of big keys) and the keyspace tables to shrink
    back (serverCron resizes them), so the next used_memory delta starts from rest."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        info = client.info("memory")
        over = table_overhead(client)
        if int(info.get("lazyfree_pending_objects", 0)) == 0 and over == last:
            return
        last = over
        time.sleep(0.15)


def table_overhead(client: redis.Redis) -> int:
    """Bytes of the selected DB's key and expiry hash tables (MEMORY STATS)."""
    db = client.connection_pool.connection_kwargs.get("db", 0)
    st = client.memory_stats()
    d = st.get(f"db.{db}") or {}
    return int(d.get("overhead.hashtable.main", 0)) + int(d.get("overhead.hashtable.expires", 0))


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def memory_usage(client: redis.Redis, match: str, skip: Callable[[bytes], bool] = lambda k: False,
                 ) -> dict[str, int]:
    """MEMORY USAGE (every element counted) of each key matching ``match``, summed by key
    family: the name's part between the hash tag's ``}:`` and the next ``:`` (``t``,
    ``h``, ``s``... whatever the layout of the day calls them), so the bench needs to
    know no key names and the lead can still see where the bytes are."""
    out: dict[str, int] = {}
    batch: list[bytes] = []

    def flush() -> None:
        pipe = client.pipeline(transaction=False)
        for k in batch:
            pipe.memory_usage(k, samples=0)
        for k, n in zip(batch, pipe.execute()):
            fam = family(k)
            out[fam] = out.get(fam, 0) + int(n or 0)
        batch.clear()

    for k in client.scan_iter(match=match, count=5000):
        if not skip(k):
            batch.append(k)
            if len(batch) >= 1000:
                flush()
    if batch:
        flush()
    return out


def family(key: bytes) -> str:
    k = key.decode("utf-8", "replace")
    if "}:" in k:
        k = k.split("}:", 1)[1]
        return k.split(":", 1)[0] or "?"
    return "(no tag)"


# --------------------------------------------------------------------- job mix

TRACKSETS = 3  # TRACK SETs per attempt
FAIL_RATE = 0.10  # jobs whose first attempt fails and is retried
UNTRACKED_RATE = 0.05  # jobs without custom.track (the projector ignores them)


def job_events(jid: str, rng: random.Random, now_ms: int) -> list:
    """The lifecycle of one job, as validated events, in the order a job server emits them."""
    if rng.random() < UNTRACKED_RATE:
        return [events.make_enqueued(jid, None, "default", "Plain"),
                events.make_working(jid, 60), events.make_success(jid)]
    evs = [events.make_enqueued(jid, {"track": 1}, "default", "Report", 600)]
    attempts = 2 if rng.random() < FAIL_RATE else 1
    for attempt in range(attempts):
        evs.append(events.make_working(jid, 600))
        for k in range(TRACKSETS):
            pct = (k + 1) * 100 // (TRACKSETS + 1)
            until = now_ms + 900_000 if k == 0 else None
            evs.append(events.make_trackset(jid, pct, f"step {k + 1} of {TRACKSETS}",
                                            None if until is None else
                                            events.format_time(until), now_ms=now_ms))
        if attempt + 1 < attempts:
            evs.append(events.make_failure(events.Failed, jid, "RuntimeError",
                                           "connection reset by peer"))
            evs.append(events.make_enqueued(jid, {"track": 1}, "default", "Report", 600))
    evs.append(events.make_success(jid))
    return evs


def job_mix(n_events: int, seed: int = 1, tag: str = "j") -> tuple[list, int]:
    """At least ``n_events`` events of interleaved jobs (64 in flight, each advancing one
    event at a time in random order, like a busy job server's). Returns (events, jobs);
    about 6.4 events per job, 95% of jobs tracked."""
    rng = random.Random(seed)
    now = int(time.time() * 1000)
    pending: list[list] = []
    out: list = []
    jobs = 0
    while len(out) < n_events or pending:
        while len(pending) < 64 and len(out) + sum(map(len, pending)) < n_events:
            pending.append(job_events(f"{tag}{jobs:07d}", rng, now))
            jobs += 1
        if not pending:
            break
        i = rng.randrange(len(pending))
        out.append(pending[i].pop(0))
        if not pending[i]:
            pending.pop(i)
    return out, jobs


def tracked(mix: list) -> list[str]:
    return sorted({e.jid for e in mix if type(e) is events.Enqueued and e.track})


def payload_bytes(mix: list) -> float:
    """Mean bytes of field names plus values per logged entry (what XADD carries)."""
    return sum(len(k) + len(str(v)) for e in mix for k, v in
               events.encode_entry(e).items()) / len(mix)


def chunks(seq: list, n: int) -> Iterator[list]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


# ------------------------------------------------------------- the naive tracker

NAIVE_BATCH = 1000  # events per pipeline
NAIVE_TTL_MS = 1_800_000  # 30 minutes, the contract's TTL
NAIVE = {
    "what": "a direct-write tracker: no log, the job server's client writes the track",
    "per_event": "one HSET of the event's track fields (long names: state, percent, desc, "
                 "updated_at, reserved_until; times epoch ms) + one PEXPIREAT "
                 "(the batch's clock + 30 min) on the job's hash; untracked jobs' events "
                 "write nothing",
    "key": "'<7-character namespace>:<jid>', one hash per job",
    "batch": f"redis-py pipeline(transaction=False) of {NAIVE_BATCH} events "
             f"({2 * NAIVE_BATCH} commands), one client, one connection",
}


def naive_fields(ev, now_ms: int) -> Optional[dict]:
    """What the naive tracker stores for one event (None: nothing)."""
    t = type(ev)
    if t is events.Enqueued:
        return {"state": "enqueued", "updated_at": now_ms} if ev.track else None
    if t is events.Working:
        return {"state": "working", "updated_at": now_ms,
                "reserved_until": now_ms + events.clamp_reserve(ev.reserve_for) * 1000}
    if t is events.TrackSet:
        f: dict = {"updated_at": now_ms}
        if ev.percent is not None:
            f["percent"] = ev.percent
        if ev.desc is not None:
            f["desc"] = ev.desc
        return f
    return {"state": t.__name__.lower(), "updated_at": now_ms}


def naive_namespace() -> str:
    return "n" + uuid.uuid4().hex[:6]  # 7 characters, as long as the default prefix


def naive_key(ns: str, jid: str) -> str:
    return f"{ns}:{jid}"


def naive_write(client: redis.Redis, ns: str, mix: list, jids: Optional[set] = None) -> float:
    """Run the naive tracker (NAIVE) over ``mix``; returns the seconds it took."""
    keep = set(tracked(mix)) if jids is None else jids
    t0 = time.perf_counter()
    for chunk in chunks(mix, NAIVE_BATCH):
        pipe = client.pipeline(transaction=False)
        now = int(time.time() * 1000)
        for ev in chunk:
            if ev.jid not in keep:
                continue  # the job server knows custom.track: nothing to write
            f = naive_fields(ev, now)
            if f:
                key = naive_key(ns, ev.jid)
                pipe.hset(key, mapping=f)
                pipe.pexpireat(key, now + NAIVE_TTL_MS)
        pipe.execute()
    return time.perf_counter() - t0


def xadd_entries(client: redis.Redis, entries: list, batch: int = 1000) -> float:
    """Pipelined XADD of (stream, fields) pairs, ``batch`` per pipeline: the baseline of
    replay_events_per_s. Returns the seconds it took."""
    t0 = time.perf_counter()
    for chunk in chunks(entries, batch):
        pipe = client.pipeline(transaction=False)
        for s, f in chunk:
            pipe.xadd(s, f)
        pipe.execute()
    return time.perf_counter() - t0


def add_server_args(ap: argparse.ArgumentParser) -> None:
    """--redis-url and --redis-server, which ``private_server`` reads."""
    ap.add_argument("--redis-url", help="Redis to use (default: a private redis-server)")
    ap.add_argument("--redis-server", metavar="PATH",
                    help="the private server's binary (default: the first redis-server on PATH)")


def private_server(a: argparse.Namespace) -> Optional[PrivateRedis]:
    """The private redis-server the arguments ask for (None with --redis-url)."""
    return None if a.redis_url else PrivateRedis(a.redis_server)


def module_main(rows: Callable[..., list], doc: Optional[str], argv=None) -> int:
    """The command line of a bench module run alone: its rows as JSON on stdout, the
    rounds' log on stderr, on a private redis-server unless --redis-url names one."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    add_server_args(ap)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    server = private_server(a)
    try:
        out = rows(a.quick, a.rounds, a.redis_url or server.url,
                   log=lambda m: print(m, file=sys.stderr, flush=True))
    finally:
        if server:
            server.stop()
    print(json.dumps(out, indent=1, default=str))
    return 0


# ------------------------------------------------------------- rounds and rows


def pct(values: list, q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(q / 100 * (len(v) - 1)))))]


def paired_us(baseline: Callable[[int], Any], subject: Callable[[int], Any], n: int,
              start: int = 0) -> tuple[list[float], list[float]]:
    """Latencies (us) of ``n`` baseline and ``n`` subject calls, alternating call by call,
    so that within a round both meet the same moments of the machine's load."""
    base, subj = [], []
    clock = time.perf_counter_ns
    for i in range(start, start + n):
        t0 = clock()
        baseline(i)
        t1 = clock()
        subject(i)
        t2 = clock()
        base.append((t1 - t0) / 1000)
        subj.append((t2 - t1) / 1000)
    return base, subj


def paired_rate(baseline: Callable[[int], Any], subject: Callable[[int], Any], batches: int,
                items: int) -> tuple[float, float]:
    """Items/s of baseline and subject over the same ``batches`` (each callable takes the
    batch's index), alternating batch by batch; ``items`` in all the batches."""
    tb = ts = 0.0
    clock = time.perf_counter
    for j in range(batches):
        t0 = clock()
        baseline(j)
        t1 = clock()
        subject(j)
        t2 = clock()
        tb += t1 - t0
        ts += t2 - t1
    return items / tb, items / ts


class Rounds:
    """Per-round figures of a baseline and its subject, run back to back each round
    (``run``), or interleaved more finely within the round by one callable (``paired``)."""

    def __init__(self) -> None:
        self.base: list[dict] = []
        self.subj: list[dict] = []

    def paired(self, n: int, both: Callable[[int], tuple[dict, dict]]) -> Rounds:
        for i in range(n):
            b, s = both(i)
            self.base.append(b)
            self.subj.append(s)
        return self

    def run(self, n: int, baseline: Callable[[int], dict], subject: Callable[[int], dict]
            ) -> Rounds:
        for i in range(n):
            self.base.append(baseline(i))
            self.subj.append(subject(i))
        return self

    def b(self, key: str) -> list:
        return [r[key] for r in self.base]

    def s(self, key: str) -> list:
        return [r[key] for r in self.subj]


_TARGET = re.compile(r"^(<=|>=)\s*([\d.,]+)\s*(x|\S+)?$")


def passes(target: Optional[str], figure: Optional[float], ratio: Optional[float]
           ) -> Optional[bool]:
    """Judge ``target`` ('>= 2x' on the ratio; '<= 60 B', '<= 10 ms' on the figure)."""
    m = _TARGET.match(target or "")
    if not m:
        return None
    value = ratio if m.group(3) == "x" else figure
    if value is None or value != value:
        return None
    bound = float(m.group(2).replace(",", ""))
    return value <= bound if m.group(1) == "<=" else value >= bound


def row(metric: str, unit: str, subject: list, baseline: Optional[list] = None,
        baseline_name: Optional[str] = None, target: Optional[str] = None,
        note: Optional[str] = None, detail: Optional[dict] = None) -> dict:
    """One row of issue 15's format from per-round figures.

    figure and baseline are the medians of the per-round figures; ratio is the median of
    the per-round ratios subject/baseline; rounds lists those ratios (or, for a row
    without a baseline, the per-round figures); met judges the medians; rounds_met counts
    the rounds that alone would have met the target (the verdict's robustness).
    """
    subject = [float(x) for x in subject]
    fig = statistics.median(subject) if subject else None
    base = ratio = None
    per = subject
    if baseline:
        baseline = [float(x) for x in baseline]
        base = statistics.median(baseline)
        per = [s / b if b else float("nan") for s, b in zip(subject, baseline)]
        ratio = statistics.median(per)
    r = {"metric": metric, "figure": fig, "unit": unit, "baseline_name": baseline_name,
         "baseline": base, "ratio": ratio, "target": target, "met": passes(target, fig, ratio),
         "rounds": [round(x, 4) for x in per],
         "spread": [round(min(per), 4), round(max(per), 4)] if per else None}
    if target:
        each = [passes(target, s, (s / b if b else None) if baseline else None)
                for s, b in zip(subject, baseline or subject)]
        r["rounds_met"] = f"{sum(1 for x in each if x)}/{len(each)}"
    if note:
        r["note"] = note
    if detail is not None:
        r["detail"] = detail
    return r


def skipped(metric: str, why: str, target: Optional[str] = None) -> dict:
    return {"metric": metric, "figure": None, "unit": "", "baseline_name": None,
            "baseline": None, "ratio": None, "target": target, "met": None, "rounds": [],
            "note": "skipped: " + why}


# ----------------------------------------------------------------- the machine


def machine(client: redis.Redis) -> dict:
    info = client.info()
    parser = "hiredis" if importlib.util.find_spec("hiredis") else "python"
    return {"cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "python": f"{platform.python_implementation()} {platform.python_version()}",
            "platform": platform.platform(), "redis_version": info.get("redis_version"),
            "redis_mode": info.get("redis_mode"), "valkey_version": info.get("valkey_version"),
            "mem_allocator": info.get("mem_allocator"), "redis_py": redis.__version__,
            "redis_py_parser": parser}


def cpu_seconds(pid: int) -> Optional[float]:
    """utime + stime of a process from /proc (Linux), None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def machine_ticks() -> Optional[tuple[int, int]]:
    """(busy, total) clock ticks of all CPUs since boot, from /proc/stat (Linux)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v) - v[3] - v[4], sum(v)
    except (OSError, IndexError, ValueError):
        return None


def busy_share(before: Optional[tuple[int, int]], after: Optional[tuple[int, int]]
               ) -> Optional[float]:
    """How busy the whole machine was between two machine_ticks() (1.0: every core)."""
    if not before or not after or after[1] == before[1]:
        return None
    return round((after[0] - before[0]) / (after[1] - before[1]), 2)


def redis_cpu(client: redis.Redis) -> float:
    c = client.info("cpu")
    return float(c["used_cpu_user"]) + float(c["used_cpu_sys"])


def commandstats(client: redis.Redis) -> dict:
    """INFO commandstats as {command: {calls, usec}}."""
    return {k[8:]: {"calls": int(v["calls"]), "usec": int(v["usec"])}
            for k, v in client.info("commandstats").items() if k.startswith("cmdstat_")}


def stats_delta(before: dict, after: dict) -> dict:
    out = {}
    for cmd, a in after.items():
        b = before.get(cmd, {"calls": 0, "usec": 0})
        calls, usec = a["calls"] - b["calls"], a["usec"] - b["usec"]
        if calls:
            out[cmd] = {"calls": calls, "usec": usec, "usec_per_call": round(usec / calls, 2)}
    return out
