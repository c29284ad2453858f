"""Lua scripts: composed from their .lua files, and invoked, here and only here.

``project.lua`` and ``replay.lua`` run with the fold (``projections/track.lua``),
the value codec (``packed.lua``) and the bucket I/O (``snapshot.lua``) prepended, so
the live projector and a rebuild execute the very files the differential tests check.

Invoking: scripts are sent by SHA (EVALSHA) and loaded only when Redis answers
NOSCRIPT (after a restart, a failover or SCRIPT FLUSH); only those calls are
re-sent. ``run`` is the sync face and ``arun`` the asyncio one; both send many
calls in one round trip and return errors in place, as
``pipeline.execute(raise_on_error=False)`` does. (redis-py's Script objects
send SCRIPT EXISTS first in a pipeline: a second round trip on every call.)

On a Redis Cluster the calls go through ``tracker.store.cluster.send``: each to the
master of its partition's slot (every declared key shares the partition's hash
tag), one packed write per node, MOVED/ASK/TRYAGAIN and lost connections handled
there until the deadline. SCRIPT LOAD reaches every master; a promoted replica
never had the scripts (they are not replicated) and answers NOSCRIPT once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

import projections
from tracker import events
from tracker.store import cluster

_LUA = Path(__file__).parent / "lua"
_FOLD = Path(projections.__file__).parent / "track.lua"

# Each script's parts, in order ("fold" is projections/track.lua, the rest store/lua/).
_PARTS = {
    "project": ("fold", "ids", "packed", "index", "snapshot", "project"),
    "replay": ("fold", "ids", "packed", "index", "snapshot", "replay"),
    "sweep": ("ids", "packed", "index", "snapshot", "sweep"),
    "history": ("ids", "packed", "history"),
    "trim": ("ids", "packed", "index", "snapshot", "trim"),
    "get": ("ids", "packed", "get"),
    "list": ("ids", "packed", "index", "list"),
    "count": ("ids", "packed", "index", "count"),
    "dlq_retry": ("dlq_retry",),
}

# ARGV[9..17] of project.lua, in its order: the one source is tracker/events.py.
LIMITS = (events.MAX_JID, events.MAX_DESC, events.MAX_ERRTYPE, events.MAX_MESSAGE,
          events.MAX_NAME, events.MAX_INT, events.RESERVE_DEFAULT, events.RESERVE_MIN,
          events.RESERVE_MAX)

Call = tuple[Sequence[Any], Sequence[Any]]  # (KEYS, ARGV)


@dataclass(frozen=True)
class Script:
    name: str
    source: str
    sha: str


def compose(*parts: str | Path) -> str:
    """The source of a script from its parts, in order: a part's name (``"fold"`` is
    projections/track.lua, any other a file of store/lua/) or a path to a .lua file of
    one's own (the benchmarks' scripts prepend the very parts the real ones run)."""
    return "\n".join((part if isinstance(part, Path) else
                      _FOLD if part == "fold" else _LUA / f"{part}.lua").read_text()
                     for part in parts)


@cache
def script(name: str) -> Script:
    src = compose(*_PARTS[name])
    return Script(name, src, hashlib.sha1(src.encode()).hexdigest())


def source(name: str) -> str:
    return script(name).source


def _noscript(replies: list, todo: list[int], out: list) -> list[int]:
    """Put ``out`` (replies to the calls ``todo``) in place; the calls to re-send."""
    for i, reply in zip(todo, out):
        replies[i] = reply
    return [i for i, r in zip(todo, out) if isinstance(r, NoScriptError)]


def _evalsha(s: Script, calls: Sequence[Call], todo: list[int]) -> list[list]:
    return [["EVALSHA", s.sha, len(calls[i][0]), *calls[i][0], *calls[i][1]] for i in todo]


def _send(client, s: Script, calls: Sequence[Call], todo: list[int]):
    """One EVALSHA, or a pipeline of them; returns a list or, on asyncio, an awaitable."""
    if len(todo) == 1:
        keys, args = calls[todo[0]]
        return client.evalsha(s.sha, len(keys), *keys, *args)
    pipe = client.pipeline(transaction=False)
    for i in todo:
        keys, args = calls[i]
        pipe.evalsha(s.sha, len(keys), *keys, *args)
    return pipe.execute(raise_on_error=False)


def run(client, name: str, calls: Sequence[Call]) -> list:
    """EVALSHA ``name`` once per (KEYS, ARGV) in one round trip; errors in place."""
    s = script(name)
    replies: list = [None] * len(calls)
    todo = list(range(len(calls)))
    on_cluster = cluster.is_cluster(client)
    for attempt in (0, 1):
        if on_cluster:
            out = cluster.send(client, _evalsha(s, calls, todo), cluster.patience_of(client))
        else:
            try:
                out = _send(client, s, calls, todo)
                out = [out] if len(todo) == 1 else out
            except (NoScriptError, ResponseError) as e:  # a single call raises
                out = [e]
        todo = _noscript(replies, todo, out)
        if not todo or attempt:
            break
        client.script_load(s.source)
    return replies


async def arun(client, name: str, calls: Sequence[Call]) -> list:
    """``run`` on a redis.asyncio client."""
    s = script(name)
    replies: list = [None] * len(calls)
    todo = list(range(len(calls)))
    on_cluster = cluster.is_cluster(client)
    for attempt in (0, 1):
        if on_cluster:
            out = await cluster.asend(client, _evalsha(s, calls, todo),
                                      cluster.patience_of(client))
        else:
            try:
                out = await _send(client, s, calls, todo)
                out = [out] if len(todo) == 1 else out
            except (NoScriptError, ResponseError) as e:
                out = [e]
        todo = _noscript(replies, todo, out)
        if not todo or attempt:
            break
        await client.script_load(s.source)
    return replies


def call(client, name: str, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
    """One call of ``name``; a Redis error is raised (callers translate it at the boundary)."""
    reply = run(client, name, [(keys, args)])[0]
    if isinstance(reply, Exception):
        raise reply
    return reply
