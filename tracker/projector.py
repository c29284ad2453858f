"""The projector daemon: folds each partition's log into snapshots.

Each call of ``project.lua`` reads, folds and acknowledges one batch of one
partition as a single atomic step (see the header of that file for why). This
module only drives it: one thread per partition, a blocking XREAD (which
consumes nothing) to wake up when a partition has new entries, backoff when
Redis is away, counters for the logs.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import redis

from tracker import keys
from tracker.config import Deployment, unavailable
from tracker.scripts import LIMITS, Scripts, call_many

log = logging.getLogger("tracker.projector")


def default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class Totals:
    folded: int = 0
    dead_lettered: int = 0
    claimed: int = 0
    batches: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, folded: int, poisoned: int, claimed: int) -> None:
        with self.lock:
            self.folded += folded - poisoned
            self.dead_lettered += poisoned
            self.claimed += claimed
            self.batches += 1


class Projector:
    def __init__(self, deployment: Deployment, consumer: Optional[str] = None, batch: int = 500,
                 block_ms: int = 1000, claim_idle_ms: int = 60_000, dlq_maxlen: int = 100_000):
        self.d = deployment
        self.consumer = consumer or default_consumer()
        self.batch = batch
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.dlq_maxlen = dlq_maxlen
        self.totals = Totals()
        self.stopping = threading.Event()
        self._warned_lag: set[int] = set()

    # -- one step -------------------------------------------------------------
    def _args(self, part: int) -> tuple[list, list]:
        p = self.d.prefix
        return ([keys.stream(p, part), keys.dlq(p, part), keys.stats(p, part)],
                [keys.GROUP, self.consumer, self.batch, keys.snapshot_prefix(p, part),
                 self.d.ttl_ms, self.d.grace_ms, self.claim_idle_ms, self.dlq_maxlen, *LIMITS])

    def ensure_group(self, part: int, client=None) -> None:
        """Create the partition's stream and group if missing (from the log's start)."""
        try:
            (client or self.d.client).xgroup_create(keys.stream(self.d.prefix, part), keys.GROUP,
                                                    id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def step(self, part: int, scripts: Optional[Scripts] = None, client=None) -> tuple:
        """Fold one batch of one partition: (entries, poisoned, last_id, claimed, waiting)."""
        k, a = self._args(part)
        script = (scripts or self.d.scripts).project
        try:
            n, poisoned, last, claimed, waiting = script(keys=k, args=a, client=client)
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            self.ensure_group(part, client)
            n, poisoned, last, claimed, waiting = script(keys=k, args=a, client=client)
        self._account(part, n, poisoned, claimed)
        if n:
            self._check_lag(part, last)
        return n, poisoned, last, claimed, waiting

    def _check_lag(self, part: int, last) -> None:
        """Warn when folding entries older than the expiry grace (see project.lua):
        a snapshot key may have expired physically before a late event reached it."""
        at = int((last.decode() if isinstance(last, bytes) else last).split("-")[0])
        behind = time.time() * 1000 - at
        if behind > self.d.grace_ms and part not in self._warned_lag:
            self._warned_lag.add(part)
            log.warning("partition %d: folding events %.0fs old, more than the %ds expiry grace; "
                        "tracks that expired meanwhile may have missed late events: run "
                        "`tracker replay` once caught up", part, behind / 1000,
                        self.d.grace_ms // 1000)

    def _account(self, part: int, n: int, poisoned: int, claimed: int) -> None:
        if n:
            self.totals.add(n, poisoned, claimed)
            log.debug("partition %d: folded %d entries (%d dead-lettered)", part, n, poisoned)
        if poisoned:
            log.warning("partition %d: %d poison entries moved to %s", part, poisoned,
                        keys.dlq(self.d.prefix, part))
        if claimed:
            log.info("partition %d: claimed %d pending entries of another reader", part, claimed)

    # -- drain once -----------------------------------------------------------
    def drain(self, progress=None) -> int:
        """Fold everything in the log now, then return (``tracker project --once``)."""
        busy = set(range(self.d.partitions))
        start = self.totals.folded + self.totals.dead_lettered
        try:
            for part in range(self.d.partitions):
                self.ensure_group(part)
            while busy and not self.stopping.is_set():
                order = sorted(busy)
                replies = call_many(self.d.client, self.d.scripts.project,
                                    [self._args(p) for p in order])
                for part, reply in zip(order, replies):
                    if isinstance(reply, Exception):
                        if "NOGROUP" in str(reply):
                            self.ensure_group(part)
                            continue
                        raise reply
                    n, poisoned, last, claimed, waiting = reply
                    self._account(part, n, poisoned, claimed)
                    if n:
                        self._check_lag(part, last)
                    if progress and n:
                        progress(n)
                    if n == 0 and not waiting:
                        busy.discard(part)
                    elif waiting:
                        time.sleep(0.05)
        except redis.RedisError as e:
            raise unavailable(self.d.settings, e) from e
        return self.totals.folded + self.totals.dead_lettered - start

    # -- the daemon -----------------------------------------------------------
    def _worker(self, part: int) -> None:
        """Loop for one partition. The client's pool gives each thread its own
        connection per command, so a blocking XREAD here holds up no one else."""
        client, scripts = self.d.client, self.d.scripts
        stream = keys.stream(self.d.prefix, part)
        backoff = 0.05
        grouped = False
        while not self.stopping.is_set():
            try:
                if not grouped:  # here, inside the retry loop: Redis may be away at start
                    self.ensure_group(part, client)
                    grouped = True
                n, _p, last, claimed, waiting = self.step(part, scripts, client)
                backoff = 0.05
                if n >= self.batch or claimed:
                    continue  # more may be waiting: fold again at once
                if n:
                    # A short batch took all there was: block from its last entry
                    # rather than pay one more (empty) script call first.
                    client.xread({stream: last}, count=1, block=self.block_ms)
                    continue
                if waiting:
                    self.stopping.wait(0.1)
                    continue
                # Nothing new: sleep until an entry newer than the newest the script saw.
                client.xread({stream: last}, count=1, block=self.block_ms)
                backoff = 0.05
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as e:
                log.warning("partition %d: Redis unavailable (%s); retrying in %.1fs",
                            part, e.__class__.__name__, backoff)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except redis.ResponseError as e:
                log.error("partition %d: Redis error %s; retrying in %.1fs", part, e, backoff)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:  # never let one partition stop folding silently
                log.exception("partition %d: unexpected error; retrying in %.1fs", part, backoff)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def run(self, report_every: float = 10.0) -> None:
        """Run until ``stop()``; each thread finishes its batch (atomic) and leaves."""
        log.info("projecting %d partitions of %r on %s as consumer %s", self.d.partitions,
                 self.d.prefix, self.d.settings.where(), self.consumer)
        threads = [threading.Thread(target=self._worker, args=(p,), name=f"partition-{p}",
                                    daemon=True) for p in range(self.d.partitions)]
        for t in threads:
            t.start()
        last_t, last_n = time.monotonic(), 0
        from tracker.retention import Keeper

        keeper = Keeper(self.d)  # periodic trim by age (tracker/retention.py)
        while not self.stopping.wait(min(report_every, keeper.every)):
            keeper.tick()
            now, n = time.monotonic(), self.totals.folded
            if n != last_n:
                log.info("folded %d events (%.0f/s), dead-lettered %d, claimed %d, in %d batches",
                         n, (n - last_n) / (now - last_t), self.totals.dead_lettered,
                         self.totals.claimed, self.totals.batches)
            last_t, last_n = now, n
        for t in threads:
            t.join(timeout=self.block_ms / 1000 + 15)
        self._leave()
        log.info("stopped after folding %d events (%d dead-lettered)", self.totals.folded,
                 self.totals.dead_lettered)

    def _leave(self) -> None:
        """Remove this consumer from each group where it holds no pending entry.

        Our own steps never leave any, but a script stopped half-way (a missing ACL
        right) or another reader using our name can; DELCONSUMER would drop those.
        """
        try:
            for part in range(self.d.partitions):
                stream = keys.stream(self.d.prefix, part)
                if not self.d.client.xpending_range(stream, keys.GROUP, "-", "+", 1,
                                                    consumername=self.consumer):
                    self.d.client.xgroup_delconsumer(stream, keys.GROUP, self.consumer)
        except redis.RedisError:
            pass

    def stop(self) -> None:
        self.stopping.set()
