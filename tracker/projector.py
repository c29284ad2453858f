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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import redis

from tracker.retention import Keeper
from tracker.store import keys, scripts
from tracker.store.deployment import Deployment
from tracker.store.scripts import LIMITS

log = logging.getLogger("tracker.projector")


def default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def project_call(prefix: str, part: int, consumer: str, batch: int, ttl_ms: int, grace_ms: int,
                 claim_idle_ms: int = 60_000, dlq_maxlen: int = 100_000) -> scripts.Call:
    """KEYS and ARGV of project.lua: one atomic fold step of one partition. Readers that
    catch a partition up (tracker.query, tracker.aio) send the very same call."""
    return ([keys.stream(prefix, part), keys.dlq(prefix, part), keys.stats(prefix, part),
             keys.fence(prefix, part)],
            [keys.GROUP, consumer, batch, keys.snapshot_prefix(prefix, part), ttl_ms, grace_ms,
             claim_idle_ms, dlq_maxlen, *LIMITS])


class Step(NamedTuple):
    """What one call of project.lua did to one partition."""

    entries: int  # folded, dead letters included
    poisoned: int  # of those, moved to the dead-letter stream
    last_id: str  # the batch's last entry, or with an empty batch the stream's newest
    claimed: int  # pending entries of another reader taken over
    waiting: bool  # another reader's pending entries are not idle long enough yet

    @classmethod
    def of(cls, reply: list) -> Step:
        n, poisoned, last, claimed, waiting = reply
        last = last.decode() if isinstance(last, bytes) else str(last)
        return cls(int(n), int(poisoned), last, int(claimed), bool(waiting))


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
    def call(self, part: int) -> scripts.Call:
        """This projector's project.lua call for one partition."""
        return project_call(self.d.prefix, part, self.consumer, self.batch, self.d.ttl_ms,
                            self.d.grace_ms, self.claim_idle_ms, self.dlq_maxlen)

    def ensure_group(self, part: int, client=None) -> None:
        """Create the partition's stream and group if missing (from the log's start)."""
        try:
            (client or self.d.client).xgroup_create(keys.stream(self.d.prefix, part), keys.GROUP,
                                                    id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def step(self, part: int, client: Any = None) -> Step:
        """Fold one batch of one partition."""
        client = client or self.d.client
        k, a = self.call(part)
        try:
            step = Step.of(scripts.call(client, "project", k, a))
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            self.ensure_group(part, client)
            step = Step.of(scripts.call(client, "project", k, a))
        self._account(part, step)
        return step

    def _check_lag(self, part: int, last: str) -> None:
        """Warn when folding entries older than the expiry grace (see project.lua):
        a snapshot key may have expired physically before a late event reached it."""
        at = int(last.split("-")[0])
        behind = time.time() * 1000 - at
        if behind > self.d.grace_ms and part not in self._warned_lag:
            self._warned_lag.add(part)
            log.warning("partition %d: folding events %.0fs old, more than the %ds expiry grace; "
                        "tracks that expired meanwhile may have missed late events: run "
                        "`tracker replay` once caught up", part, behind / 1000,
                        self.d.grace_ms // 1000)

    def _account(self, part: int, step: Step) -> None:
        n, poisoned, claimed = step.entries, step.poisoned, step.claimed
        if n:
            self.totals.add(n, poisoned, claimed)
            log.debug("partition %d: folded %d entries (%d dead-lettered)", part, n, poisoned)
            self._check_lag(part, step.last_id)
        if poisoned:
            log.warning("partition %d: %d poison entries moved to %s", part, poisoned,
                        keys.dlq(self.d.prefix, part))
        if claimed:
            log.info("partition %d: claimed %d pending entries of another reader", part, claimed)

    # -- drain once -----------------------------------------------------------
    def drain(self, progress: Optional[Callable[[int], None]] = None) -> int:
        """Fold everything in the log now, then return (``tracker project --once``)."""
        busy = set(range(self.d.partitions))
        start = self.totals.folded + self.totals.dead_lettered
        with self.d.errors():
            for part in range(self.d.partitions):
                self.ensure_group(part)
            while busy and not self.stopping.is_set():
                order = sorted(busy)
                replies = scripts.run(self.d.client, "project", [self.call(p) for p in order])
                for part, reply in zip(order, replies):
                    if isinstance(reply, Exception):
                        if "NOGROUP" in str(reply):
                            self.ensure_group(part)
                            continue
                        raise reply
                    step = Step.of(reply)
                    self._account(part, step)
                    if progress and step.entries:
                        progress(step.entries)
                    if step.entries == 0 and not step.waiting:
                        busy.discard(part)
                    elif step.waiting:
                        time.sleep(0.05)
        return self.totals.folded + self.totals.dead_lettered - start

    # -- the daemon -----------------------------------------------------------
    def _worker(self, part: int) -> None:
        """Loop for one partition. The client's pool gives each thread its own
        connection per command, so a blocking XREAD here holds up no one else."""
        client = self.d.client
        stream = keys.stream(self.d.prefix, part)
        backoff = 0.05
        grouped = False
        while not self.stopping.is_set():
            try:
                if not grouped:  # here, inside the retry loop: Redis may be away at start
                    self.ensure_group(part, client)
                    grouped = True
                step = self.step(part, client)
                backoff = 0.05
                if step.entries >= self.batch or step.claimed:
                    continue  # more may be waiting: fold again at once
                if step.entries:
                    # A short batch took all there was: block from its last entry
                    # rather than pay one more (empty) script call first.
                    client.xread({stream: step.last_id}, count=1, block=self.block_ms)
                    continue
                if step.waiting:
                    self.stopping.wait(0.1)
                    continue
                # Nothing new: sleep until an entry newer than the newest the script saw.
                client.xread({stream: step.last_id}, count=1, block=self.block_ms)
                backoff = 0.05
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as e:
                log.warning("partition %d: Redis unavailable (%s); retrying in %.1fs",
                            part, e.__class__.__name__, backoff)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 1.0)
            except redis.ResponseError as e:
                log.error("partition %d: Redis error %s; retrying in %.1fs", part, e, backoff)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 1.0)
            except Exception:  # never let one partition stop folding silently
                log.exception("partition %d: unexpected error; retrying in %.1fs", part, backoff)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 1.0)

    def run(self, report_every: float = 10.0) -> None:
        """Run until ``stop()``; each thread finishes its batch (atomic) and leaves."""
        log.info("projecting %d partitions of %r on %s as consumer %s", self.d.partitions,
                 self.d.prefix, self.d.settings.where(), self.consumer)
        threads = [threading.Thread(target=self._worker, args=(p,), name=f"partition-{p}",
                                    daemon=True) for p in range(self.d.partitions)]
        for t in threads:
            t.start()
        last_t, last_n = time.monotonic(), 0  # the first interval starts with the daemon
        keeper = Keeper(self.d)  # periodic trim by age (tracker/retention.py)
        while not self.stopping.wait(min(report_every, keeper.every)):
            keeper.tick()
            now, n = time.monotonic(), self.totals.folded
            if n != last_n:
                # The count and the rate of this interval (the total separately): a trickle
                # of 4 events in 10 s reads 0.4/s, not 0/s, and a burst is not averaged
                # into the whole run.
                secs = max(now - last_t, 1e-6)
                rate = (n - last_n) / secs
                log.info("folded %d events in %.3gs (%s/s), %d in total; dead-lettered %d, "
                         "claimed %d, in %d batches", n - last_n, secs,
                         f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}", n,
                         self.totals.dead_lettered, self.totals.claimed, self.totals.batches)
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
