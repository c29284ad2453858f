"""Shared by the job-queue integration tests: real brokers, real worker processes.

The brokers are the machine's own (CI starts nothing by hand for these):

* Redis: ``TRACKER_TEST_BROKER_REDIS`` (default ``redis://127.0.0.1:6379/0``), shared, so
  every run uses its own token in queue names / key prefixes / namespaces and
  deletes only keys carrying it;
* RabbitMQ: ``TRACKER_TEST_AMQP`` (default ``amqp://guest:guest@127.0.0.1:5672//``),
  queues named with the token, deleted after.

The tracker lives under a fresh prefix on ``TRACKER_REDIS_URL`` (or ``REDIS_URL``),
else on the broker Redis. A broker that does not answer skips the test with the
reason, or fails it when ``TRACKER_CI=1`` (``helpers.missing``).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import redis
from click.testing import CliRunner
from helpers import missing

from tracker import Tracker
from tracker.cli import cli as tracker_cli
from tracker.projector import Projector

BROKER_REDIS = os.environ.get("TRACKER_TEST_BROKER_REDIS", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("TRACKER_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")  # updated_at as TRACK GET prints it
TIMEOUT = 30.0  # seconds any one wait may take before the test fails


def need_module(name: str):
    """Import a job library for a test module, at module level: absent, the module is
    skipped, or under CI (``TRACKER_CI=1``) fails to collect."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        missing(f"{name} is not installed ({e}); pip install -e '.[test]'", module=True)


def need_redis(url: str = BROKER_REDIS) -> redis.Redis:
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10)
    try:
        client.ping()
    except redis.RedisError as e:
        missing(f"no Redis broker at {url}: {e}")
    return client


def need_amqp(kombu, url: str = AMQP_URL) -> None:
    """RabbitMQ answers (``kombu``: the module, which the Celery tests import)."""
    try:
        with kombu.Connection(url, connect_timeout=2) as conn:
            conn.connect()
    except Exception as e:
        missing(f"no RabbitMQ at {url}: {e}")


def tracker_url() -> str:
    return os.environ.get("TRACKER_REDIS_URL") or os.environ.get("REDIS_URL") or BROKER_REDIS


def wait_for(what: str, check: Callable[[], object], timeout: float = TIMEOUT,
              every: float = 0.05, worker: Optional[WorkerProcess] = None):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if worker is not None:
            worker.check_alive()
        if time.monotonic() > deadline:
            extra = f"\n--- worker log ---\n{worker.log_tail()}" if worker else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{extra}")
        time.sleep(every)


class Run:
    """One test module's world: a token, the tracker under a fresh prefix, the broker Redis."""

    def __init__(self, kind: str):
        self.token = f"ti{kind}{uuid.uuid4().hex[:8]}"
        self.prefix = self.token
        self.tracker_url = tracker_url()
        self.tracker = Tracker.connect(self.tracker_url, prefix=self.prefix)
        self.projector = Projector(self.tracker.deployment, consumer="itest")
        self.broker = redis.Redis.from_url(BROKER_REDIS)
        self.jids: list[str] = []

    def env(self, **extra) -> dict:
        """The environment for a worker process (and for the producer side)."""
        env = dict(os.environ, TRACKER_REDIS_URL=self.tracker_url, TRACKER_PREFIX=self.prefix,
                   ITEST_TOKEN=self.token, ITEST_BROKER_REDIS=BROKER_REDIS,
                   PYTHONUNBUFFERED="1")
        env.update({k: str(v) for k, v in extra.items()})
        return env

    # --------------------------------------------------------------- the track
    def get(self, jid: str) -> dict:
        self.projector.drain()
        return self.tracker.get(jid)

    def wait_track(self, jid: str, what: str, pred: Callable[[dict], bool],
                   worker: Optional[WorkerProcess] = None) -> dict:
        last = {}

        def check():
            nonlocal last
            last = self.get(jid)
            return last if pred(last) else None
        try:
            return wait_for(f"{jid} to be {what}", check, worker=worker)
        except AssertionError as e:
            raise AssertionError(f"{e}\nlast track: {last}") from None

    def wait_state(self, jid: str, state: str, worker=None, **fields) -> dict:
        return self.wait_track(jid, f"{state} {fields or ''}".strip(),
                               lambda t: t["state"] == state
                               and all(t.get(k) == v for k, v in fields.items()), worker)

    def history(self, jid: str) -> list[tuple[str, dict]]:
        """(event, fields) in log order, from ``tracker history --json`` (the CLI, run
        in-process: a subprocess would spend a second importing)."""
        self.projector.drain()
        out = CliRunner().invoke(tracker_cli, ["--redis-url", self.tracker_url, "--prefix",
                                          self.prefix, "history", "--json", jid])
        assert out.exit_code == 0, out.output
        return [(r["event"], r["fields"]) for r in map(json.loads, out.stdout.splitlines())]

    def events(self, jid: str) -> list[str]:
        return [e for e, _ in self.history(jid)]

    # ---------------------------------------------------------- job helpers
    def key(self, *parts: str) -> str:
        return ":".join((self.token, *parts))

    def release(self, jid: str) -> None:
        """Let a job blocked on its gate go on."""
        self.broker.rpush(self.key("gate", jid), 1)

    def attempts(self, jid: str) -> int:
        """How many attempts of the job have started (the jobs count them)."""
        return int(self.broker.get(self.key("attempt", jid)) or 0)

    def done(self, jid: str) -> bool:
        return bool(self.broker.exists(self.key("done", jid)))

    # ------------------------------------------------------------- clean-up
    def cleanup(self, extra_ids: tuple = ()) -> None:
        """Delete the tracker's keys under the prefix and broker keys naming the token
        (or a job id this run made)."""
        ids = {i.encode() for i in (*self.jids, *extra_ids)}
        token = self.token.encode()
        doomed = [k for k in self.broker.scan_iter(count=1000)
                  if token in k or any(i in k for i in ids)]
        for i in range(0, len(doomed), 500):
            self.broker.delete(*doomed[i:i + 500])
        c = self.tracker.deployment.client
        for pattern in (f"{{{self.prefix}:*", f"{self.prefix}:*"):
            keys = list(c.scan_iter(match=pattern, count=1000))
            for i in range(0, len(keys), 500):
                c.delete(*keys[i:i + 500])
        self.tracker.close()


def write_module(directory: Path, name: str, source: str) -> Path:
    path = directory / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


JOB_HELPERS = '''
import os, time
import redis
import tracker

BROKER = redis.Redis.from_url(os.environ["ITEST_BROKER_REDIS"], socket_timeout=60)
TOKEN = os.environ["ITEST_TOKEN"]


def key(*parts):
    return ":".join((TOKEN,) + parts)


def attempt():
    """This job's attempt number (1, 2, ...), counted on the broker Redis."""
    k = key("attempt", tracker.current_jid())
    n = BROKER.incr(k)
    BROKER.expire(k, 600)
    return n


def gate():
    """Block until the test releases this job (at most 30 s)."""
    BROKER.blpop(key("gate", tracker.current_jid()), timeout=30)


def mark_done():
    BROKER.set(key("done", tracker.current_jid()), 1, ex=600)
'''


class WorkerProcess:
    """A job library's worker, as its users start it, in its own process group."""

    def __init__(self, argv: list[str], env: dict, cwd: Path, name: str):
        self.argv = argv
        self.log_path = cwd / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"

    def tracker_warnings(self) -> list[str]:
        """Lines where the integration complained (it never should against a live tracker)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return [ln for ln in text.splitlines()
                if "tracker: " in ln or "Unexpected failure" in ln or "CRITICAL" in ln]

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"worker {self.argv[:3]} exited with {self.proc.returncode}:\n"
                                 f"{self.log_tail()}")

    def stop(self, timeout: float = 15) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
            except ProcessLookupError:
                pass
        self._log.close()


def bin_path(name: str) -> str:
    """A console script of the running interpreter's environment (celery, rq, dramatiq)."""
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        missing(f"{name} command not found beside {sys.executable}")
    return str(path)
