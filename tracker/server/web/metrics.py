"""Prometheus metrics: the deployment (per partition), HTTP, SSE, and the projector's own.

Each web app has a registry of its own (several apps in one process, as in the
tests, do not collide). The deployment figures are read from Redis when
``/metrics`` is scraped (one pipeline, plus one for the lag in seconds), never
on a timer, so an idle server costs Redis nothing. ``tracker project
--metrics-port`` serves ``ProjectorCollector`` over prometheus-client's own
HTTP server.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tracker.aio import AsyncTracker
from tracker.store import keys
from tracker.store.boundary import check, redis_errors
from tracker.times import id_ms

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
STATES = ("enqueued", "working", "success", "failed", "dead")


@dataclass
class PartitionStats:
    partition: int
    length: int  # entries in the log now (after trimming)
    published: int  # entries ever appended (Redis 7's entries-added; the length on 6.2)
    applied: int  # folded by the projectors
    dead_lettered: int  # refused by the fold, moved to the DLQ
    dlq: int  # dead letters waiting now
    lag_entries: int  # appended but not folded yet
    lag_seconds: float  # age of the oldest entry not folded yet (0: none)


def _field(d: Any, name: str) -> Any:
    if not isinstance(d, dict):
        return None
    return d.get(name, d.get(name.encode()))


def _missing_key(reply: Any) -> bool:
    return isinstance(reply, redis.ResponseError) and "no such key" in str(reply).lower()


async def partition_stats(t: AsyncTracker) -> list[PartitionStats]:
    """Every partition's figures, in two round trips; each command names one partition."""
    pipe = t.client.pipeline(transaction=False)
    pipe.time()
    for p in range(t.partitions):
        stream = keys.stream(t.prefix, p)
        pipe.xinfo_stream(stream)
        pipe.xinfo_groups(stream)
        pipe.xlen(keys.dlq(t.prefix, p))
        pipe.hmget(keys.stats(t.prefix, p), "applied", "dead_lettered")
    with redis_errors(t.settings):
        replies = await pipe.execute(raise_on_error=False)
    sec, usec = check(t.settings, replies[0])
    now_ms = int(sec) * 1000 + int(usec) // 1000
    rows, probes = [], []
    for p in range(t.partitions):
        info, groups, dlq, counts = replies[1 + 4 * p: 5 + 4 * p]
        for r in (info, groups):
            if not _missing_key(r):
                check(t.settings, r)
        info = {} if _missing_key(info) else info
        groups = [] if _missing_key(groups) else groups
        length = int(_field(info, "length") or 0)
        published = int(_field(info, "entries-added") or length)
        group = next((g for g in groups if _field(g, "name") in (keys.GROUP, keys.GROUP.encode())),
                     None)
        delivered = _field(group, "last-delivered-id") if group else None
        lag = _field(group, "lag") if group else length
        if lag is None:  # Redis 6.2 has no lag: 0 once anything was delivered, as `status` says
            lag = length if delivered in (b"0-0", "0-0", None) else 0
        applied, dead = (int(x or 0) for x in check(t.settings, counts))
        rows.append(PartitionStats(p, length, published, applied, dead, int(check(t.settings, dlq)),
                                   int(lag), 0.0))
        if length and (lag or group is None):
            probes.append((p, delivered))
    if probes:  # the oldest entry each lagging partition has not folded
        pipe = t.client.pipeline(transaction=False)
        for p, delivered in probes:
            start = "-" if delivered in (None, b"0-0", "0-0") else b"(" + (
                delivered if isinstance(delivered, bytes) else delivered.encode())
            pipe.xrange(keys.stream(t.prefix, p), start, "+", count=1)
        with redis_errors(t.settings):
            firsts = await pipe.execute(raise_on_error=False)
        for (p, _), first in zip(probes, firsts):
            first = check(t.settings, first)
            if first:
                rows[p].lag_seconds = max(0.0, (now_ms - id_ms(first[0][0])) / 1000)
    return rows


class DeploymentCollector(Collector):
    """The figures of the last ``partition_stats`` call, as Prometheus metrics."""

    def __init__(self) -> None:
        self.rows: list[PartitionStats] = []
        self.by_state: dict[str, int] = {}  # tracks per state, when the core can count them
        self.subscribers: Callable[[], int] = lambda: 0
        self.sent: Callable[[], int] = lambda: 0

    def collect(self) -> Iterator[Metric]:
        per_part = [
            ("tracker_events_published", "Events appended to the log", "published", Counter),
            ("tracker_events_applied", "Events folded into snapshots", "applied", Counter),
            ("tracker_events_dead_lettered", "Events the fold refused (dead letters)",
             "dead_lettered", Counter),
            ("tracker_log_length", "Entries in the log now (after retention)", "length", None),
            ("tracker_projector_lag_entries", "Entries appended but not folded yet",
             "lag_entries", None),
            ("tracker_projector_lag_seconds", "Age of the oldest entry not folded yet",
             "lag_seconds", None),
            ("tracker_dlq_depth", "Dead letters waiting", "dlq", None),
        ]
        for name, doc, attr, kind in per_part:
            fam: Any = (CounterMetricFamily(name, doc, labels=["partition"]) if kind
                        else GaugeMetricFamily(name, doc, labels=["partition"]))
            for r in self.rows:
                fam.add_metric([str(r.partition)], getattr(r, attr))
            yield fam
        if self.by_state:
            g = GaugeMetricFamily("tracker_tracks", "Live tracks by state", labels=["state"])
            for state, n in self.by_state.items():
                g.add_metric([state], n)
            yield g
        yield GaugeMetricFamily("tracker_sse_subscribers", "Open Server-Sent Events streams",
                                value=self.subscribers())
        yield CounterMetricFamily("tracker_sse_events_sent", "Events written to SSE streams",
                                  value=self.sent())


class ProjectorCollector(Collector):
    """``tracker project --metrics-port``: the counters the projector keeps (``Totals``)."""

    def __init__(self, totals: Any):
        self.totals = totals

    def collect(self) -> Iterator[Metric]:
        t = self.totals
        for name, doc, value in (
                ("tracker_projector_folded", "Events this process folded", t.folded),
                ("tracker_projector_dead_lettered", "Entries this process dead-lettered",
                 t.dead_lettered),
                ("tracker_projector_claimed", "Pending entries of other readers claimed",
                 t.claimed),
                ("tracker_projector_batches", "Fold steps (script calls) run", t.batches)):
            yield CounterMetricFamily(name, doc, value=value)


def projector_registry(totals: Any) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(ProjectorCollector(totals))
    return reg


def serve_projector(totals: Any, port: int, host: str = "127.0.0.1") -> int:
    """prometheus-client's HTTP server (a daemon thread) for a projector; the port it got."""
    server, _thread = start_http_server(port, addr=host, registry=projector_registry(totals))
    return int(server.server_port)


class HttpMetrics:
    """ASGI wrapper: requests by route template, method and status; time to the response's
    first byte (for SSE streams that is when the stream opened, not how long it ran)."""

    litestar: Any = None  # the wrapped application and its Services, for tests and tools
    services: Any = None

    def __init__(self, app: Any, registry: CollectorRegistry):
        self.app = app
        self.requests = Counter("tracker_http_requests", "HTTP requests",
                                ["route", "method", "status"], registry=registry)
        self.latency = Histogram("tracker_http_request_duration_seconds",
                                 "Time to the first byte of the response", ["route", "method"],
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self._children: dict[tuple, tuple[Any, Any]] = {}

    def _observe(self, route: str, method: str, status: int, secs: float) -> None:
        key = (route, method, status)
        pair = self._children.get(key)
        if pair is None:  # label lookups cost more than the counting: cache the children
            pair = (self.requests.labels(route, method, str(status)),
                    self.latency.labels(route, method))
            self._children[key] = pair
        pair[0].inc()
        pair[1].observe(secs)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        started: list[Optional[float]] = [None]
        status = [500]

        async def timed_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                started[0] = time.perf_counter()
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            # The route template, never the path: JIDs must not become label values.
            route = scope.get("path_template") or "unmatched"
            self._observe(route, scope.get("method", "GET"), status[0],
                          (started[0] or time.perf_counter()) - t0)
