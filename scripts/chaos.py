#!/usr/bin/env python
"""Fault suite: prove under faults that nothing is lost and nothing is applied twice.

A private redis-server (AOF, appendfsync everysec) on a free port, a steady
producer (the Publisher, retrying with backoff while Redis is away) and 2-3
``tracker project`` daemons. Meanwhile, at random moments: kill -9 a daemon and
start another; SIGSTOP one for longer than the claim idle time while a foreign
reader leaves entries pending (so another daemon must claim them), then SIGCONT;
restart Redis (SHUTDOWN, start again on the same port and dir); CLIENT KILL the
daemons' connections. At the end ``tracker project --once``, then the snapshots
are compared with the sequential fold of the whole log.

    python scripts/chaos.py            # --small: about 45 s, what CI runs
    python scripts/chaos.py --large    # 5 minutes, 8 partitions, more faults

Exit status 0 only if: 0 differences, 0 pending, published == applied +
dead-lettered, no published entry missing from the log, no daemon crashed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from projections import fold
from tracker import answer, events
from tracker.errors import RedisUnavailable
from tracker.publisher import Publisher
from tracker.store import keys, packed, streams
from tracker.store.deployment import Deployment
from tracker.store.embedded import server_binary
from tracker.store.settings import Settings

TRACKER = str(Path(sys.executable).with_name("tracker"))
if not os.path.exists(TRACKER):
    TRACKER = shutil.which("tracker") or "tracker"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server of our own, with AOF, that can be restarted on its port and dir."""

    def __init__(self, aof: bool = True):
        self.binary = os.environ.get("TRACKER_REDIS_SERVER") or shutil.which("redis-server")
        if not self.binary:
            self.binary = server_binary()
        self.dir = tempfile.mkdtemp(prefix="tracker-chaos-")
        self.port = free_port()
        self.aof = aof
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None
        self.start()

    def start(self) -> None:
        persist = (["--appendonly", "yes", "--appendfsync", "everysec"] if self.aof
                   else ["--appendonly", "no"])
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             *persist, "--dir", self.dir, "--daemonize", "no",
             "--logfile", os.path.join(self.dir, "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                c = self.client()
                c.ping()  # LOADING answers with an error, so this waits for the AOF
                c.close()
                return
            except redis.RedisError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}; "
                                       f"see {self.dir}/redis.log")
                time.sleep(0.05)

    def client(self, name: str = "chaos-ctl") -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=10, client_name=name)

    def shutdown(self, pause: bool = True) -> None:
        """SHUTDOWN (the AOF is fsynced). With ``pause``, writes are held first, so no
        command runs whose reply the shutdown would swallow (an operator's clean stop)."""
        c = self.client()
        try:
            if pause:
                c.execute_command("CLIENT", "PAUSE", 5000, "WRITE")
            c.shutdown()
        except redis.ConnectionError:
            pass
        self.proc.wait(timeout=30)

    def restart(self, down_for: float = 0.5, pause: bool = True) -> None:
        self.shutdown(pause)
        time.sleep(down_for)
        self.start()

    def stop(self, keep: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)


# -------------------------------------------------------------------- producer
POISON = [{"t": "bogus", "j": "p1"}, {"t": "trackset", "j": "p2", "p": "150"},
          {"t": "success"}, {"t": "working", "j": "p3", "r": "-5"},
          {"t": "trackset", "j": "p4", "d": b"\xff\xfe"}, {"x": "1"}]


class Producer(threading.Thread):
    """Job lifecycles at a steady rate; every event it got an ID for is counted."""

    def __init__(self, url: str, prefix: str, rate: float, poison_every: int, seed: int):
        super().__init__(daemon=True, name="producer")
        client = redis.Redis.from_url(
            url, client_name="chaos-producer", socket_timeout=5, socket_connect_timeout=2,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError])
        self.d = Deployment.open(Settings(redis_url=url, prefix=prefix), client=client)
        self.pub = Publisher(self.d)
        self.rate, self.poison_every = rate, poison_every
        self.rnd = random.Random(seed)
        self.stopping = threading.Event()
        self.paused = threading.Event()  # the soak holds it while it verifies
        self.ids: list[tuple[int, str]] = []  # (partition, entry ID)
        self.poison = 0
        self.retries = 0
        self.jobs: list[dict] = []
        self.n = 0

    def _send(self, fn, *args, part: int, **kw) -> None:
        backoff = 0.05
        while True:
            try:
                self.ids.append((part, fn(*args, **kw)))
                return
            except RedisUnavailable:
                self.retries += 1
                if self.stopping.is_set() and backoff >= 2:
                    return  # give up only when asked to stop and Redis stays away
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _step(self) -> None:
        rnd, pub = self.rnd, self.pub
        self.n += 1
        if self.poison_every and self.n % self.poison_every == 0:
            part = rnd.randrange(self.d.partitions)
            self.poison += 1
            self._send(lambda: self.d.client.xadd(keys.stream(self.d.prefix, part),
                                                  rnd.choice(POISON)).decode(), part=part)
            return
        if len(self.jobs) < 20 or rnd.random() < 0.1:
            jid = uuid.uuid4().hex[:16]
            job = {"jid": jid, "state": "enqueued", "retries": rnd.randrange(3),
                   "track": rnd.random() < 0.85}
            self.jobs.append(job)
            self._send(pub.enqueued, jid, custom={"track": 1} if job["track"] else None,
                       queue="default", jobtype="Chaos", reserve_for=rnd.choice([None, 600]),
                       part=self.d.partition(jid))
            return
        job = rnd.choice(self.jobs)
        jid, part = job["jid"], self.d.partition(job["jid"])
        if job["state"] == "enqueued":
            job["state"] = "working"
            self._send(pub.working, jid, reserve_for=rnd.choice([None, 60, 1800]), part=part)
        elif rnd.random() < 0.6:
            until = None
            if rnd.random() < 0.2:
                until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
            self._send(self.pub_set, jid, rnd.randrange(101), f"step {self.n}", until, part=part)
        else:
            self.jobs.remove(job)
            if rnd.random() < 0.7:
                self._send(pub.success, jid, part=part)
            elif job["retries"] > 0:
                job["retries"] -= 1
                self._send(pub.failed, jid, errtype="IOError", message="disk full", part=part)
                job["state"] = "enqueued"
                self.jobs.append(job)
                self._send(pub.enqueued, jid, custom={"track": 1} if job["track"] else None,
                           part=part)
            else:
                self._send(pub.dead, jid, errtype="IOError", message="gave up", part=part)

    def pub_set(self, jid, percent, desc, until) -> str:
        return self.pub.publish(events.make_trackset(jid, percent, desc, until))[0]

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stopping.is_set():
            while self.paused.is_set():
                time.sleep(0.01)
                t0 += 0.01  # keep the rate, do not burst afterwards
            self._step()
            delay = t0 + self.n / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)


# ------------------------------------------------------------------- daemons
class Daemons:
    def __init__(self, url: str, prefix: str, count: int, claim_idle: int, logdir: str):
        self.url, self.prefix, self.claim_idle, self.logdir = url, prefix, claim_idle, logdir
        self.procs: list[subprocess.Popen] = []
        self.killed: set[int] = set()  # pids we killed on purpose
        self.started = 0
        for _ in range(count):
            self.spawn()

    def spawn(self) -> subprocess.Popen:
        self.started += 1
        name = f"chaos-daemon-{self.started}"
        err = open(os.path.join(self.logdir, f"{name}.log"), "wb")
        p = subprocess.Popen([TRACKER, "--redis-url", self.url, "--prefix", self.prefix,
                              "project", "--consumer", name, "--batch", "50",
                              "--claim-idle", str(self.claim_idle)],
                             stdout=err, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        p.log = err.name  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    @staticmethod
    def ready(p: subprocess.Popen, timeout: float = 60.0) -> None:
        """Wait until the daemon says it is projecting: its SIGTERM handler is in place
        (a SIGTERM during interpreter start-up kills any Python process with -15)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and p.poll() is None:
            if b"projecting" in Path(p.log).read_bytes():
                return
            time.sleep(0.05)

    def live(self) -> list[subprocess.Popen]:
        return [p for p in self.procs if p.poll() is None]

    def crashed(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is not None and p.pid not in self.killed]

    def kill9(self, p: subprocess.Popen) -> None:
        self.killed.add(p.pid)
        p.send_signal(signal.SIGCONT)
        p.kill()
        p.wait()

    def stop_all(self) -> list[int]:
        """SIGTERM; returns the exit codes (0 = clean stop)."""
        codes = []
        for p in self.live():
            p.send_signal(signal.SIGCONT)
            self.ready(p)
            p.terminate()
        for p in self.procs:
            if p.pid in self.killed:
                continue
            try:
                codes.append(p.wait(timeout=30))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append("hung")
        return codes

    def tracebacks(self) -> int:
        n = 0
        for f in Path(self.logdir).glob("chaos-daemon-*.log"):
            text = f.read_bytes()
            n += text.count(b"Traceback") + text.count(b"Exception in thread")
        return n


# ---------------------------------------------------------------- verification
def _xrange_all(client: redis.Redis, key: str, start: str = "-"):
    return streams.entries(client, key, start)


def _expected(t) -> dict:
    """The snapshot fields the projector stores for folded track ``t``."""
    return {k.encode(): v.encode() for k, v in (answer.stored_fields(t) or {}).items()
            if v is not None}


def verify(client: redis.Redis, prefix: str, partitions: int, ttl_ms: int,
           start_ids: dict | None = None, only: set | None = None, show: int = 5) -> dict:
    """Fold each partition's log in order and compare with its snapshots.

    Returns counts: entries, poison, tracks, differences (missing, extra or unequal
    snapshots). Tracks whose logical expiry has passed are compared only if their key
    still exists (it outlives expiry by the grace period). With ``start_ids`` the fold
    starts at those IDs and ``only`` limits the comparison to those JIDs (the soak).
    """
    secs, usecs = client.time()
    now = int(secs) * 1000 + int(usecs) // 1000
    out = {"entries": 0, "poison": 0, "tracks": 0, "differences": 0, "examples": []}
    for p in range(partitions):
        evs = []
        for eid, fields in _xrange_all(client, keys.stream(prefix, p),
                                       (start_ids or {}).get(p, "-")):
            out["entries"] += 1
            try:
                evs.append((int(eid.split(b"-")[0]), events.decode_entry(fields)))
            except events.PoisonEntry:
                out["poison"] += 1
        tracks = fold(evs, ttl_ms)
        if only is not None:
            tracks = {j: t for j, t in tracks.items() if j in only}
        _, raw = packed.read_all(client, prefix, p)  # the live generation's jobs
        stored = {j: _expected(packed.decode(v).track) or None for j, v in raw.items()
                  if only is None or j in only}
        for jid in set(tracks) | set(stored):
            t, row = tracks.get(jid), stored.get(jid)
            if t is not None and t.expires_at <= now and not row:
                continue  # expired and physically gone: fine
            if t is not None:
                out["tracks"] += 1
            want = _expected(t) if t is not None else None
            if want != (row or None):
                out["differences"] += 1
                if len(out["examples"]) < show:
                    out["examples"].append({"jid": jid, "fold": str(want), "redis": str(row)})
    return out


def totals(client: redis.Redis, prefix: str, partitions: int) -> dict:
    pipe = client.pipeline(transaction=False)
    for p in range(partitions):
        pipe.xlen(keys.stream(prefix, p))
        pipe.xlen(keys.dlq(prefix, p))
        pipe.hget(keys.stats(prefix, p), "applied")
        pipe.xpending(keys.stream(prefix, p), keys.GROUP)
    r = pipe.execute(raise_on_error=False)
    out = {"log": 0, "dead_lettered": 0, "applied": 0, "pending": 0}
    for p in range(partitions):
        log_len, dlq, applied, pend = r[4 * p: 4 * p + 4]
        out["log"] += log_len
        out["dead_lettered"] += dlq
        out["applied"] += int(applied or 0)
        out["pending"] += pend["pending"] if isinstance(pend, dict) else 0
    return out


# --------------------------------------------------------------------- faults
class Chaos:
    def __init__(self, args):
        self.args = args
        self.rnd = random.Random(args.seed)
        self.redis = PrivateRedis()
        self.prefix = "chaos-" + uuid.uuid4().hex[:8]
        self.logdir = tempfile.mkdtemp(prefix="tracker-chaos-logs-")
        d = Deployment.open(Settings(redis_url=self.redis.url, prefix=self.prefix,
                                     partitions=args.partitions))
        self.ttl_ms = d.ttl_ms
        d.close()
        self.counts = {"kills": 0, "restarts": 0, "sigstops": 0, "client_kills": 0,
                       "connections_killed": 0, "foreign_reads": 0}

    def kill9(self) -> None:
        live = self.daemons.live()
        if live:
            victim = self.rnd.choice(live)
            self.daemons.kill9(victim)
            self.counts["kills"] += 1
            self.daemons.spawn()

    def foreign_read(self) -> None:
        """A reader outside tracker takes entries and never acknowledges them."""
        c = self.redis.client()
        try:
            p = self.rnd.randrange(self.args.partitions)
            got = c.xreadgroup(keys.GROUP, f"chaos-foreign-{self.rnd.randrange(10**6)}",
                               {keys.stream(self.prefix, p): ">"}, count=5)
            if got and got[0][1]:
                self.counts["foreign_reads"] += len(got[0][1])
        except redis.RedisError:
            pass
        finally:
            c.close()

    def sigstop(self) -> None:
        live = self.daemons.live()
        if not live:
            return
        victim = self.rnd.choice(live)
        victim.send_signal(signal.SIGSTOP)
        self.counts["sigstops"] += 1
        self.foreign_read()
        hold = self.args.claim_idle / 1000 * 3 + 1
        threading.Timer(hold, lambda: victim.poll() is None and victim.send_signal(signal.SIGCONT)
                        ).start()

    def restart_redis(self) -> None:
        self.redis.restart(down_for=self.rnd.uniform(0.2, 1.0), pause=not self.args.no_pause)
        self.counts["restarts"] += 1

    def client_kill(self) -> None:
        c = self.redis.client()
        try:
            for cl in c.client_list():
                if not cl.get("name", "").startswith("chaos-"):
                    c.client_kill_filter(_id=cl["id"])
                    self.counts["connections_killed"] += 1
            self.counts["client_kills"] += 1
        except redis.RedisError:
            pass
        finally:
            c.close()

    def schedule(self) -> list[tuple[float, str]]:
        a, dur = self.args, self.args.duration
        plan = [(dur * (i + 1) / (a.restarts + 1), "restart_redis") for i in range(a.restarts)]
        plan += [(self.rnd.uniform(0.05, 0.9) * dur, "kill9") for _ in range(a.kills)]
        plan += [(self.rnd.uniform(0.1, 0.8) * dur, "sigstop") for _ in range(a.sigstops)]
        plan += [(self.rnd.uniform(0.05, 0.95) * dur, "client_kill") for _ in range(a.client_kills)]
        plan += [(self.rnd.uniform(0.05, 0.9) * dur, "foreign_read") for _ in range(a.sigstops)]
        return sorted(plan)

    def run(self) -> int:
        a = self.args
        log(f"private redis-server on port {self.redis.port} (AOF everysec, dir {self.redis.dir}), "
            f"prefix {self.prefix}, {a.partitions} partitions, {a.projectors} daemons, "
            f"{a.duration:.0f}s at {a.rate:.0f} events/s")
        self.daemons = Daemons(self.redis.url, self.prefix, a.projectors, a.claim_idle, self.logdir)
        self.producer = Producer(self.redis.url, self.prefix, a.rate, a.poison_every, a.seed)
        self.producer.start()
        t0 = time.monotonic()
        for at, action in self.schedule():
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            getattr(self, action)()
            log(f"{action:<14} published so far {len(self.producer.ids)}")
        time.sleep(max(0.0, t0 + a.duration - time.monotonic()))
        self.producer.stopping.set()
        self.producer.join(timeout=60)
        return self.finish()

    def finish(self) -> int:
        a, c = self.args, self.redis.client()
        published = len(self.producer.ids)
        # The daemons alone must catch up: a dead partition thread would show here.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            t = totals(c, self.prefix, a.partitions)
            if t["applied"] + t["dead_lettered"] >= t["log"] and t["pending"] == 0:
                break
            time.sleep(0.2)
        caught_up = t["applied"] + t["dead_lettered"] >= t["log"] and t["pending"] == 0
        crashed = self.daemons.crashed()
        codes = self.daemons.stop_all()
        once = subprocess.run([TRACKER, "--redis-url", self.redis.url, "--prefix", self.prefix,
                               "project", "--once", "--claim-idle", "0", "--json"],
                              capture_output=True, timeout=300)
        once_out = json.loads(once.stdout or b"{}") if once.returncode == 0 else {}
        t = totals(c, self.prefix, a.partitions)
        v = verify(c, self.prefix, a.partitions, self.ttl_ms)
        log_ids = {p: set() for p in range(a.partitions)}
        for p in range(a.partitions):
            log_ids[p] = {e[0].decode() for e in _xrange_all(c, keys.stream(self.prefix, p))}
        lost = sum(1 for p, i in self.producer.ids if i not in log_ids[p])
        replay = replay_verify(self.redis.url, self.prefix)
        report = {
            "projector kills survived": self.counts["kills"],
            "Redis restarts survived": self.counts["restarts"],
            "SIGSTOPs": self.counts["sigstops"],
            "CLIENT KILLs": f"{self.counts['client_kills']} "
                            f"({self.counts['connections_killed']} connections)",
            "foreign entries claimed": self.counts["foreign_reads"],
            "daemons started": self.daemons.started,
            "publisher retries": self.producer.retries,
            "events published": published,
            "poison published": self.producer.poison,
            "log entries": t["log"],
            "events applied": t["applied"],
            "dead-lettered": t["dead_lettered"],
            "folded by final --once": once_out.get("entries", "failed"),
            "tracks compared": v["tracks"],
            "differences": v["differences"],
            "pending": t["pending"],
            "published missing from log": lost,
            "daemon crashes": len(crashed) + self.daemons.tracebacks(),
            "replay --verify": replay,
        }
        width = max(map(len, report))
        print("\n== chaos figures ==")
        for k, val in report.items():
            print(f"{k:<{width}}  {val}")
        problems = []
        if v["differences"]:
            problems.append(f"{v['differences']} differences, e.g. {v['examples'][:2]}")
        if t["pending"]:
            problems.append(f"{t['pending']} entries pending")
        if published != t["applied"] + t["dead_lettered"]:
            problems.append(f"published {published} != applied {t['applied']} + "
                            f"dead-lettered {t['dead_lettered']} (log holds {t['log']})")
        if t["dead_lettered"] != self.producer.poison:
            problems.append(f"dead-lettered {t['dead_lettered']} != poison {self.producer.poison}")
        if lost:
            problems.append(f"{lost} published entries missing from the log")
        if crashed or self.daemons.tracebacks():
            problems.append(f"daemons crashed: {crashed}, tracebacks: {self.daemons.tracebacks()}"
                            f" (logs in {self.logdir})")
        if not caught_up:
            problems.append("the daemons did not catch up within 30 s of the producer stopping")
        if once.returncode != 0:
            problems.append(f"tracker project --once failed: {once.stderr.decode()[-300:]}")
        if any(code != 0 for code in codes):
            problems.append(f"daemon exit codes on SIGTERM: {codes}")
        if replay not in ("n/a", "ok"):
            problems.append(f"tracker replay --verify: {replay}")
        for p in problems:
            print(f"VIOLATION: {p}")
        print("OK: nothing lost, nothing applied twice" if not problems else "FAILED")
        c.close()
        return 1 if problems else 0

    def close(self) -> None:
        self.redis.stop(keep=self.args.keep)
        if not self.args.keep:
            shutil.rmtree(self.logdir, ignore_errors=True)


def replay_verify(url: str, prefix: str) -> str:
    """``tracker replay --verify`` if that command exists (another issue adds it)."""

    if importlib.util.find_spec("tracker.replay") is None:
        return "n/a"
    r = subprocess.run([TRACKER, "--redis-url", url, "--prefix", prefix, "replay", "--verify"],
                       capture_output=True, timeout=300)
    if r.returncode == 2 and b"No such command" in r.stderr:
        return "n/a"
    return "ok" if r.returncode == 0 else (r.stdout + r.stderr).decode()[-300:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    scale = ap.add_mutually_exclusive_group()
    scale.add_argument("--small", action="store_true", help="CI scale (the default)")
    scale.add_argument("--large", action="store_true", help="5 minutes, 8 partitions")
    ap.add_argument("--duration", type=float, help="seconds of producing")
    ap.add_argument("--rate", type=float, help="events per second")
    ap.add_argument("--partitions", type=int)
    ap.add_argument("--projectors", type=int)
    ap.add_argument("--kills", type=int)
    ap.add_argument("--restarts", type=int)
    ap.add_argument("--sigstops", type=int)
    ap.add_argument("--client-kills", type=int)
    ap.add_argument("--claim-idle", type=int, default=500, help="ms (daemons' --claim-idle)")
    ap.add_argument("--poison-every", type=int, default=97, help="every Nth event is poison")
    ap.add_argument("--no-pause", action="store_true",
                    help="SHUTDOWN without CLIENT PAUSE first: a reply can be lost, so the "
                         "publisher's retry may append an event twice")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the Redis dir and daemon logs")
    a = ap.parse_args()
    big = dict(duration=300, rate=400, partitions=8, projectors=3, kills=40, restarts=6,
               sigstops=6, client_kills=30)
    small = dict(duration=25, rate=150, partitions=4, projectors=3, kills=8, restarts=2,
                 sigstops=2, client_kills=6)
    for k, v in (big if a.large else small).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.seed is None:
        a.seed = random.randrange(10**6)
    log(f"seed {a.seed}")
    chaos = Chaos(a)
    rc = 1
    try:
        rc = chaos.run()
        return rc
    finally:
        a.keep = a.keep or rc != 0  # keep the daemons' logs of a failed run
        chaos.close()


if __name__ == "__main__":
    sys.exit(main())
