"""``tracker serve --workers N``: N processes on one port (tracker/server/workers.py).

Each test runs the real CLI as a subprocess on the suite's real Redis: the workers
answer TRACK GET on the one port, connections spread over them (SO_REUSEPORT), a
worker killed is replaced, SIGTERM stops them all with exit 0, a taken port is one
error line, and the proxy mode (``--upstream``) runs as workers too, an ACK on one
worker finding the FETCH seen by another.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from fake_faktory import FakeFaktory
from helpers import Raw, cleanup, missing

from tracker.projector import Projector
from tracker.publisher import Publisher
from tracker.server import workers
from tracker.store.deployment import Deployment
from tracker.store.settings import Settings

if not workers.reuse_port_supported():
    missing("--workers needs SO_REUSEPORT (Linux)", module=True)


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(link[8:-1])
    return out


def established(port: int, side: int = 1) -> set[str]:
    """Inodes of the established TCP sockets whose local (side 1) or remote (side 2) port
    is ``port``, from /proc/net/tcp{,6}."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if int(cols[side].rsplit(":", 1)[1], 16) == port and cols[3] == "01":
                out.add(cols[9])
    return out


class Serve:
    """``tracker serve --workers N`` as a subprocess, its log read on demand."""

    def __init__(self, url: str, prefix: str, n: int, *extra: str):
        cmd = [sys.executable, "-c", "from tracker.cli import main; main()", "--redis-url", url,
               "--prefix", prefix, "serve", "--port", "0", "--workers", str(n), *extra]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            self.lines.append(line)
            m = re.search(rf"{n} workers serving on 127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                return
            if not line and self.proc.poll() is not None:
                break
        self.proc.kill()
        raise AssertionError("serve --workers did not start: " + "".join(self.lines))

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(20)
        assert self.proc.stderr is not None
        return rc, "".join(self.lines) + self.proc.stderr.read()


@pytest.fixture
def deployment(real_redis_url, prefix):
    d = Deployment.open(Settings(redis_url=real_redis_url, prefix=prefix))
    yield d
    cleanup(d.client, prefix)
    d.close()


def tracked(d: Deployment, jids: list[str]) -> None:
    with Publisher(d).batch() as b:
        for j in jids:
            b.enqueued(j, {"track": 1})
            b.set(j, percent=30, desc="in workers")
    Projector(d, consumer="test-workers").drain()


def test_workers_share_the_port_and_answer(real_redis_url, prefix, deployment):
    jids = [f"wk-{i:04d}" for i in range(20)]
    tracked(deployment, jids)
    s = Serve(real_redis_url, prefix, 2)
    conns = []
    try:
        pids = children(s.proc.pid)
        assert len(pids) == 2
        for j in jids:
            c = Raw(s.port)
            assert c.hello() == b"+OK"
            c.send(b"TRACK GET %s\r\n" % j.encode())
            got = json.loads(c.reply())
            assert (got["jid"], got["state"], got["percent"], got["desc"]) == \
                   (j, "enqueued", 30, "in workers")
            conns.append(c)
        ours = established(s.port)
        assert len(ours) == 20
        per_worker = [len(socket_inodes(p) & ours) for p in pids]
        assert sum(per_worker) == 20 and min(per_worker) >= 1, per_worker  # spread by the kernel
    finally:
        for c in conns:
            c.close()
        rc, log = s.stop()
    assert rc == 0, log
    assert log.count("stopped") == 2 and "Traceback" not in log
    assert all(_zombie_or_gone(p) for p in pids)


def _zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_killed_worker_is_replaced(real_redis_url, prefix, deployment):
    tracked(deployment, ["wk-alive1"])
    s = Serve(real_redis_url, prefix, 2)
    try:
        first = children(s.proc.pid)
        os.kill(first[0], signal.SIGKILL)
        deadline = time.monotonic() + 15
        now = first
        while time.monotonic() < deadline:
            now = children(s.proc.pid)
            if len(now) == 2 and first[0] not in now:
                break
            time.sleep(0.1)
        assert len(now) == 2 and first[0] not in now and first[1] in now, (first, now)
        for _ in range(6):  # whichever worker takes it, the port answers
            c = Raw(s.port)
            assert c.hello() == b"+OK"
            c.send(b"TRACK GET wk-alive1\r\n")
            assert json.loads(c.reply())["state"] == "enqueued"
            c.close()
    finally:
        rc, log = s.stop()
    assert rc == 0
    assert "a worker exited" in log and "Traceback" not in log


def test_a_taken_port_is_one_line_and_exit_1(real_redis_url, prefix, deployment):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        cmd = [sys.executable, "-c", "from tracker.cli import main; main()", "--redis-url",
               real_redis_url, "--prefix", prefix, "serve", "--workers", "3",
               "--port", str(taken.getsockname()[1])]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    finally:
        taken.close()
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot listen on 127.0.0.1:" in lines[0], lines


def test_workers_out_of_range_is_a_usage_error(real_redis_url, prefix):
    cmd = [sys.executable, "-c", "from tracker.cli import main; main()", "--redis-url",
           real_redis_url, "--prefix", prefix, "serve", "--workers", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--workers" in done.stderr and "Traceback" not in done.stderr


def test_proxy_workers_ack_on_one_finds_the_fetch_of_another(real_redis_url, prefix, deployment):
    """Each proxy worker has its own upstream connections; what an ACK needs is in Redis."""
    fake = FakeFaktory(fetch_wait=0.3)
    s = Serve(real_redis_url, prefix, 2, "--upstream", f"tcp://127.0.0.1:{fake.port}")
    try:
        pids = children(s.proc.pid)
        by_worker: dict[int, Raw] = {}
        deadline = time.monotonic() + 20
        while len(by_worker) < 2 and time.monotonic() < deadline:  # one client on each worker
            c = Raw(s.port)
            assert c.hello() == b"+OK"
            c.send(b"BEAT {\"wid\":\"w\"}\r\n")
            c.reply()
            mine = worker_of(c, pids)
            if mine is not None and mine not in by_worker:
                by_worker[mine] = c
            else:
                c.close()
        assert len(by_worker) == 2, "the kernel never put a connection on the second worker"
        a, b = by_worker.values()
        job = {"jid": "wk-proxied", "jobtype": "T", "args": [], "queue": "default",
               "custom": {"track": 1}}
        a.send(b"PUSH " + json.dumps(job).encode() + b"\r\n")
        assert a.reply() == b"+OK"
        a.send(b"FETCH default\r\n")
        assert json.loads(a.reply())["jid"] == "wk-proxied"
        # What a's FETCH recorded is appended asynchronously; a read on a waits for it
        # (read-your-writes is per connection), as a client would before handing over.
        a.send(b"TRACK GET wk-proxied\r\n")
        assert json.loads(a.reply())["state"] == "working"
        b.send(b'ACK {"jid":"wk-proxied"}\r\n')
        assert b.reply() == b"+OK"
        b.send(b"TRACK GET wk-proxied\r\n")
        assert json.loads(b.reply())["state"] == "success"
        for c in by_worker.values():
            c.close()
    finally:
        rc, log = s.stop()
        fake.close()
    assert rc == 0, log


def worker_of(c: Raw, pids: list[int]) -> int | None:
    """The worker holding the server side of client connection ``c``."""
    theirs = established(c.sock.getsockname()[1], side=2)
    for p in pids:
        if socket_inodes(p) & theirs:
            return p
    return None


def test_workers_stop_when_the_parent_is_killed(real_redis_url, prefix, deployment):
    s = Serve(real_redis_url, prefix, 2)
    pids = children(s.proc.pid)
    s.proc.kill()  # SIGKILL: no chance to stop them itself
    s.proc.wait(10)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not all(_zombie_or_gone(p) for p in pids):
        time.sleep(0.1)
    assert all(_zombie_or_gone(p) for p in pids), "a worker outlived its parent"
