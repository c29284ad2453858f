"""Answering TRACK GET and taking TRACK SET, for Python callers.

Reads go through ``get.lua`` so that expiry is judged by Redis's clock, the
clock that stamped the events the fold computed it from. ``get_many`` sends one
script call per partition in a single pipeline: one round trip, and never a
command across partitions.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterable, Optional

import redis

from tracker import events, keys
from tracker.config import Deployment, Settings, unavailable
from tracker.publisher import Publisher

_TERMINAL = frozenset({"success", "failed", "dead"})


def unknown(jid: str) -> dict:
    """The observed answer for an untracked, never-enqueued or expired JID."""
    return {"jid": jid, "state": "unknown", "updated_at": ""}


def track_answer(jid: str, row: list, now_ms: int) -> dict:
    """TRACK GET's object from an HMGET row (s, p, d, u, r, x), keys in contract order."""
    s, p, d, u, _r, x = row
    if s is None or x is None or int(x) <= now_ms:
        return unknown(jid)
    out: dict[str, Any] = {"jid": jid}
    if p is not None:
        out["percent"] = int(p)
    if d is not None:
        out["desc"] = d.decode()
    out["state"] = s.decode()
    out["updated_at"] = events.format_time(int(u))
    return out


def reservation(row: list, now_ms: int) -> Optional[dt.datetime]:
    s, _p, _d, _u, r, x = row
    if s != b"working" or r is None or x is None or int(x) <= now_ms or int(r) <= now_ms:
        return None
    return dt.datetime.fromtimestamp(int(r) / 1000, dt.timezone.utc)


def plan(deployment: Deployment, jids: list[str]) -> dict[int, list[int]]:
    """Partition -> indexes into ``jids``, so replies can be put back in order."""
    groups: dict[int, list[int]] = {}
    for i, jid in enumerate(jids):
        events._check_jid(jid)
        groups.setdefault(deployment.partition(jid), []).append(i)
    return groups


class Tracker:
    """Query and update tracks. ``Tracker.connect()`` with no URL uses the embedded Redis."""

    def __init__(self, deployment: Deployment):
        self.deployment = deployment
        self.publisher = Publisher(deployment)

    @classmethod
    def connect(cls, redis_url: Optional[str] = None, **settings) -> "Tracker":
        return cls(Deployment.open(Settings.from_env(redis_url=redis_url, **settings)))

    def close(self) -> None:
        self.deployment.close()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _rows(self, jids: list[str]) -> tuple[list, int]:
        d = self.deployment
        groups = plan(d, jids)
        rows: list = [None] * len(jids)
        now = 0
        try:
            if len(groups) == 1:
                (part, idx), = groups.items()
                replies = [d.scripts.get(keys=[keys.stream(d.prefix, part)],
                                         args=[keys.snapshot_prefix(d.prefix, part),
                                               *(jids[i] for i in idx)])]
            else:
                pipe = d.client.pipeline(transaction=False)
                for part, idx in groups.items():
                    d.scripts.get(keys=[keys.stream(d.prefix, part)],
                                  args=[keys.snapshot_prefix(d.prefix, part),
                                        *(jids[i] for i in idx)], client=pipe)
                replies = pipe.execute()
        except redis.RedisError as e:
            raise unavailable(d.settings, e) from e
        for idx, reply in zip(groups.values(), replies):
            now = int(reply[0])
            for i, row in zip(idx, reply[1:]):
                rows[i] = row
        return rows, now

    def get(self, jid: str) -> dict:
        """TRACK GET: the contract's JSON object for one JID (never None)."""
        rows, now = self._rows([jid])
        return track_answer(jid, rows[0], now)

    def get_many(self, jids: Iterable[str]) -> list[dict]:
        """TRACK GET for many JIDs in one round trip, in the order given."""
        jids = list(jids)
        if not jids:
            return []
        rows, now = self._rows(jids)
        return [track_answer(j, r, now) for j, r in zip(jids, rows)]

    def reserved_until(self, jid: str) -> Optional[dt.datetime]:
        """The job's effective reservation (extended by reserve_until), or None.

        A job server checks this before reaping a job whose own reservation ran out.
        """
        rows, now = self._rows([jid])
        return reservation(rows[0], now)

    def set(self, jid: str, percent: Optional[int] = None, desc: Optional[str] = None,
            reserve_until: Any = None) -> str:
        """TRACK SET from a worker. Validates, appends, returns the entry ID."""
        return self.publisher.publish(events.make_trackset(jid, percent, desc, reserve_until))[0]

    def set_json(self, payload: bytes | str) -> str:
        """TRACK SET with Faktory's JSON payload."""
        return self.publisher.publish(events.decode_trackset_json(payload))[0]

    def is_finished(self, answer: dict) -> bool:
        return answer["state"] in _TERMINAL or answer["state"] == "unknown"
