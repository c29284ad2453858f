"""Overhead of the job-queue integrations: jobs/s of a real worker, with and without.

    python scripts/bench_integrations.py [--quick] [--rounds N]

Two private ``redis-server``s on free ports: one is the broker (RQ's Redis, and
Celery's broker: Celery is measured on Redis), the other the tracker's Redis. Each
round runs the baseline then the subject on the same number of no-op jobs:

* RQ: ``rq worker --burst`` (plain ``rq.Worker``, a forked work horse per job) on jobs
  enqueued by ``rq.Queue``, then ``rq worker -w tracker.integrations.rq.TrackedWorker
  --burst`` on the same number enqueued by ``TrackedQueue(track=True)``;
* Celery: ``celery worker -P prefork -c 1`` on a queue filled beforehand, the app
  without and then with ``install(app)`` and ``track=True`` tasks.

Worker start-up is excluded: the first job of each batch stamps the start and the
last one the end (one process runs them in order). The figure is the median of the
subject's jobs/s; the ratio is the median of the per-round ratios subject/baseline
(target >= 0.9: at most 10 % slower). The producer side (enqueue/publish calls per
second, with ``enqueued`` published by the integration) is reported without a
target. After each tracked round the tracker's projector folds the log and the
script checks that every job's events arrived (3 per job).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import redis
from _benchlib import PrivateRedis
from rq import Queue

from tracker import Tracker
from tracker.integrations.rq import TrackedQueue
from tracker.projector import Projector

APP = '''
import os, time
import redis

R = redis.Redis.from_url(os.environ["BENCH_BROKER"], socket_timeout=60)
TOKEN = os.environ["BENCH_TOKEN"]


def noop():
    pass


def start():
    R.set(TOKEN + ":start", repr(time.time()))


def done():
    R.set(TOKEN + ":done", repr(time.time()))
'''

CELERY_APP = APP + '''
from celery import Celery

app = Celery("bench", broker=os.environ["BENCH_BROKER"])
app.conf.update(worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)
TRACKED = os.environ.get("BENCH_TRACKED") == "1"
if TRACKED:
    from tracker.integrations.celery import install
    TRACKING = install(app)

c_noop = app.task(name="noop", track=TRACKED)(noop)
c_start = app.task(name="start", track=TRACKED)(start)
c_done = app.task(name="done", track=TRACKED)(done)
'''


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Bench:
    def __init__(self, quick: bool):
        self.quick = quick
        self.broker = PrivateRedis()
        self.tracker_redis = PrivateRedis()
        self.dir = Path(tempfile.mkdtemp(prefix="bench-integrations-"))
        (self.dir / "bench_rq_app.py").write_text(textwrap.dedent(APP))
        (self.dir / "bench_celery_app.py").write_text(textwrap.dedent(CELERY_APP))
        self.prefix = f"bi{uuid.uuid4().hex[:8]}"
        self.r = redis.Redis.from_url(self.broker.url)
        self.tracker = Tracker.connect(self.tracker_redis.url, prefix=self.prefix)
        self.env = dict(os.environ, BENCH_BROKER=self.broker.url,
                        TRACKER_REDIS_URL=self.tracker_redis.url, TRACKER_PREFIX=self.prefix,
                        PYTHONPATH=os.pathsep.join([str(self.dir),
                                                    os.environ.get("PYTHONPATH", "")]))
        self.bindir = Path(sys.executable).parent

    def close(self) -> None:
        self.tracker.close()
        self.broker.stop()
        self.tracker_redis.stop()

    def folded(self) -> int:
        return Projector(self.tracker.deployment, consumer="bench").drain()

    def _times(self, token: str, proc: subprocess.Popen, timeout: float = 600) -> float:
        deadline = time.monotonic() + timeout
        while not self.r.exists(f"{token}:done"):
            if proc.poll() is not None and not self.r.exists(f"{token}:done"):
                raise RuntimeError(f"worker exited with {proc.returncode} before the last job")
            if time.monotonic() > deadline:
                raise RuntimeError("timed out waiting for the last job")
            time.sleep(0.02)
        t0 = float(self.r.get(f"{token}:start"))
        t1 = float(self.r.get(f"{token}:done"))
        return t1 - t0

    # ------------------------------------------------------------------------ RQ
    def rq_round(self, n: int, tracked: bool) -> tuple[float, float]:
        token = f"rq{uuid.uuid4().hex[:8]}"
        env = dict(self.env, BENCH_TOKEN=token)
        if tracked:
            q = TrackedQueue(token, connection=self.r, track=True, tracker=self.tracker)
        else:
            q = Queue(token, connection=self.r)
        t = time.perf_counter()
        q.enqueue("bench_rq_app.start")
        for _ in range(n):
            q.enqueue("bench_rq_app.noop")
        q.enqueue("bench_rq_app.done")
        enqueue_rate = (n + 2) / (time.perf_counter() - t)
        argv = [str(self.bindir / "rq"), "worker", "--burst", "-u", self.broker.url, "-q",
                "--logging_level", "WARNING", token]
        if tracked:
            argv[2:2] = ["-w", "tracker.integrations.rq.TrackedWorker"]
        proc = subprocess.Popen(argv, env=env, cwd=self.dir, stdout=subprocess.DEVNULL)
        try:
            secs = self._times(token, proc)
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
        self.r.flushdb()
        return n / secs, enqueue_rate

    # -------------------------------------------------------------------- Celery
    def celery_round(self, n: int, tracked: bool) -> tuple[float, float]:
        token = f"ce{uuid.uuid4().hex[:8]}"
        env = dict(self.env, BENCH_TOKEN=token, BENCH_TRACKED="1" if tracked else "0")
        code = textwrap.dedent(f"""
            import sys, time
            import bench_celery_app as m
            n = {n}
            t = time.perf_counter()
            with m.app.producer_or_acquire() as p:
                m.c_start.apply_async(queue={token!r}, producer=p)
                for _ in range(n):
                    m.c_noop.apply_async(queue={token!r}, producer=p)
                m.c_done.apply_async(queue={token!r}, producer=p)
            print((n + 2) / (time.perf_counter() - t))
        """)
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=self.dir,
                             capture_output=True, text=True, timeout=600)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        publish_rate = float(out.stdout.split()[-1])
        argv = [str(self.bindir / "celery"), "-A", "bench_celery_app", "worker", "-P", "prefork",
                "-c", "1", "-Q", token, "--without-gossip", "--without-mingle",
                "--without-heartbeat", "-l", "warning", "-n", f"{token}@%h"]
        proc = subprocess.Popen(argv, env=env, cwd=self.dir, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            secs = self._times(token, proc)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)
        self.r.flushdb()
        return n / secs, publish_rate


def interleaved(name: str, fn, n: int, rounds: int, bench: Bench) -> dict:
    base, subj, ratios, prod, base_p, subj_p = [], [], [], [], [], []
    for i in range(rounds):
        b, bp = fn(n, False)
        bench.folded()  # nothing should be pending; fold it anyway
        s, sp = fn(n, True)
        got = bench.folded()
        if got != 3 * (n + 2):
            raise RuntimeError(f"{name}: {got} events folded, expected {3 * (n + 2)}")
        base.append(b)
        subj.append(s)
        ratios.append(s / b)
        prod.append(sp / bp)
        base_p.append(bp)
        subj_p.append(sp)
        log(f"{name} round {i + 1}: plain {b:,.0f} jobs/s, tracked {s:,.0f} jobs/s, "
            f"ratio {s / b:.3f}; producer {bp:,.0f} -> {sp:,.0f} calls/s")
    return dict(base=base, subj=subj, ratios=ratios, producer=prod, base_p=base_p,
                subj_p=subj_p)


def row(metric, figure, unit, baseline_name, baseline, ratios, target=None, goal=None):
    ratio = statistics.median(ratios)
    return {"metric": metric, "figure": round(figure, 1), "unit": unit,
            "baseline_name": baseline_name, "baseline": round(baseline, 1),
            "ratio": round(ratio, 3), "target": target,
            "met": None if goal is None else ratio >= goal,
            "rounds": [round(r, 3) for r in ratios],
            "spread": [round(min(ratios), 3), round(max(ratios), 3)]}


def rows(quick: bool = False, rounds: int = 5, **ctx) -> list[dict]:
    """Benchmark rows (issue 15's format). ``ctx`` is accepted and ignored: this module
    starts its own Redis servers."""
    bench = Bench(quick)
    n_rq, n_celery = (100, 400) if quick else (300, 2000)
    try:
        out = []
        rq = interleaved("rq", bench.rq_round, n_rq, rounds, bench)
        out.append(row("rq_worker_noop_jobs_per_s", statistics.median(rq["subj"]), "jobs/s",
                       "rq.Worker without the integration", statistics.median(rq["base"]),
                       rq["ratios"], ">= 0.9x", 0.9))
        out.append(row("rq_enqueue_calls_per_s", statistics.median(rq["subj_p"]), "calls/s",
                       "rq.Queue.enqueue", statistics.median(rq["base_p"]), rq["producer"]))
        ce = interleaved("celery", bench.celery_round, n_celery, rounds, bench)
        out.append(row("celery_worker_noop_jobs_per_s", statistics.median(ce["subj"]),
                       "jobs/s", "celery prefork -c 1 on Redis without the integration",
                       statistics.median(ce["base"]), ce["ratios"], ">= 0.9x", 0.9))
        out.append(row("celery_publish_calls_per_s", statistics.median(ce["subj_p"]),
                       "calls/s", "apply_async without the integration",
                       statistics.median(ce["base_p"]), ce["producer"]))
        return out
    finally:
        bench.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(json.dumps(rows(args.quick, args.rounds), indent=2))


if __name__ == "__main__":
    main()
