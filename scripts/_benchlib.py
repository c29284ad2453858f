"""Shared helpers of the benchmark scripts: a private Redis, the job mix, timing.

Every figure the benchmarks print is paired with a raw-Redis baseline measured
in the same run, because the dev machine is shared and absolute numbers drift.
Keys live under a fresh prefix per run and are deleted at the end, so the
scripts are safe to point at a shared Redis (a private one is the default).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Optional

import redis

from tracker import events
from tracker.store import keys
from tracker.store.deployment import Deployment
from tracker.store.embedded import server_binary
from tracker.store.settings import Settings

# ------------------------------------------------------------------ private Redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A throw-away redis-server on a free port, no persistence; ``stop()`` kills it."""

    def __init__(self):
        binary = shutil.which("redis-server")
        if not binary:
            binary = server_binary()
        self.binary = binary
        self.dir = tempfile.mkdtemp(prefix="tracker-bench-")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
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
                    raise RuntimeError(f"could not start {binary} on port {self.port}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


# -------------------------------------------------------------- deployments, keys


def new_prefix(kind: str = "bench") -> str:
    return f"{kind}-{uuid.uuid4().hex[:10]}"


def open_deployment(url: str, prefix: str, partitions: Optional[int] = None) -> Deployment:
    return Deployment.open(Settings(redis_url=url, prefix=prefix, partitions=partitions))


def cleanup(client: redis.Redis, prefix: str) -> int:
    """Delete every key of the prefix (partition keys and the config hash)."""
    n = 0
    for pattern in (f"{{{prefix}:*", f"{prefix}:*"):
        batch = list(client.scan_iter(match=pattern, count=5000))
        for i in range(0, len(batch), 1000):
            n += client.unlink(*batch[i:i + 1000])
    return n


def reset_projection(d: Deployment) -> None:
    """Forget everything folded (snapshots, any index, groups, stats) but keep the log."""
    c = d.client
    for part in range(d.partitions):
        log = keys.stream(d.prefix, part).encode()
        batch = [k for k in c.scan_iter(match=keys.tag(d.prefix, part) + ":*", count=5000)
                 if k != log]
        for i in range(0, len(batch), 1000):
            c.unlink(*batch[i:i + 1000])
        try:
            c.xgroup_destroy(keys.stream(d.prefix, part), keys.GROUP)
        except redis.ResponseError:
            pass


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
    """At least ``n_events`` events of interleaved jobs (a few jobs in flight at a time).

    Returns (events, jobs). Jobs overlap like a busy job server's: 64 in flight,
    each advancing one event at a time in random order.
    """
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


def naive_fields(ev, now_ms: int) -> Optional[dict]:
    """What a direct-write (non event-sourced) tracker stores for one event."""
    t = type(ev)
    if t is events.Enqueued:
        return {"state": "enqueued", "updated_at": now_ms} if ev.track else None
    if t is events.Working:
        return {"state": "working", "updated_at": now_ms,
                "reserved_until": now_ms + events.clamp_reserve(ev.reserve_for) * 1000}
    if t is events.TrackSet:
        f = {"updated_at": now_ms}
        if ev.percent is not None:
            f["percent"] = ev.percent
        if ev.desc is not None:
            f["desc"] = ev.desc
        return f
    return {"state": t.__name__.lower(), "updated_at": now_ms}


# ------------------------------------------------------------------- statistics


def pct(values: list, q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(q / 100 * (len(v) - 1)))))]


def chunks(seq: list, n: int) -> Iterator[list]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def commandstats(client: redis.Redis) -> dict:
    """INFO commandstats as {command: {calls, usec, usec_per_call}}."""
    out = {}
    for k, v in client.info("commandstats").items():
        if k.startswith("cmdstat_"):
            out[k[8:]] = {"calls": int(v["calls"]), "usec": int(v["usec"]),
                          "usec_per_call": float(v["usec_per_call"])}
    return out


def stats_delta(before: dict, after: dict) -> dict:
    out = {}
    for cmd, a in after.items():
        b = before.get(cmd, {"calls": 0, "usec": 0})
        calls, usec = a["calls"] - b["calls"], a["usec"] - b["usec"]
        if calls:
            out[cmd] = {"calls": calls, "usec": usec, "usec_per_call": round(usec / calls, 2)}
    return out
