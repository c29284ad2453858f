"""Per-partition health: how long the log is, how far the projector lags, and on a
Redis Cluster which master serves it (from the client's slot map)."""

from __future__ import annotations

import redis

from tracker.store import keys
from tracker.store.boundary import check
from tracker.store.deployment import Deployment


def partition_status(d: Deployment) -> list[dict]:
    """One pipeline; each command names keys of a single partition."""
    pipe = d.client.pipeline(transaction=False)
    for p in range(d.partitions):
        pipe.xlen(keys.stream(d.prefix, p))
        pipe.xinfo_groups(keys.stream(d.prefix, p))
        pipe.xlen(keys.dlq(d.prefix, p))
        pipe.hget(keys.stats(d.prefix, p), "applied")
    with d.errors():
        replies = pipe.execute(raise_on_error=False)
        nodes = [d.node_of(p) for p in range(d.partitions)]
    for reply in replies:  # a missing stream or group is data; anything else is trouble
        if not (isinstance(reply, redis.RedisError) and "no such key" in str(reply).lower()):
            check(d.settings, reply)
    rows = []
    for p in range(d.partitions):
        length, groups, dlq, applied = replies[4 * p: 4 * p + 4]
        group = next((g for g in groups if g.get("name") in (keys.GROUP, keys.GROUP.encode())),
                     None) if isinstance(groups, list) else None
        lag = pending = 0
        if group:
            pending = group.get("pending", 0)
            lag = group.get("lag")
            if lag is None:  # Redis 6.2 has no lag field: unknown, show the log length
                lag = length if group.get("last-delivered-id") in (b"0-0", "0-0") else 0
        else:
            lag = length
        rows.append({"partition": p, "length": length, "lag": lag, "pending": pending,
                     "dead_letters": dlq if isinstance(dlq, int) else 0,
                     "folded": int(applied or 0), "node": nodes[p]})
    return rows


def node_summary(rows: list[dict]) -> dict[str, int]:
    """Master -> how many partitions it serves (empty on single Redis)."""
    out: dict[str, int] = {}
    for r in rows:
        if r["node"]:
            out[r["node"]] = out.get(r["node"], 0) + 1
    return dict(sorted(out.items()))
