"""Lua scripts, read from their .lua files once and registered once per client.

Every script is composed here, and only here: ``project.lua`` and ``replay.lua``
run with the fold (``projections/track.lua``) and the snapshot I/O
(``snapshot.lua``) prepended, so the live projector and a rebuild execute the very
files the differential tests check.
"""

from __future__ import annotations

import weakref
from functools import lru_cache
from pathlib import Path

from redis.exceptions import NoScriptError, ResponseError

import projections
from tracker import events

_LUA = Path(__file__).parent / "lua"
_FOLD = Path(projections.__file__).parent / "track.lua"


# Each script's parts, in order ("fold" is projections/track.lua, the rest tracker/lua/).
_PARTS = {
    "project": ("fold", "snapshot", "project"),
    "replay": ("fold", "snapshot", "replay"),
    "history": ("snapshot", "history"),
    "trim": ("snapshot", "trim"),
    "get": ("get",),
    "dlq_retry": ("dlq_retry",),
}


@lru_cache(maxsize=None)
def source(name: str) -> str:
    return "\n".join((_FOLD if part == "fold" else _LUA / f"{part}.lua").read_text()
                     for part in _PARTS[name])


_registered: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def registered(client, name: str):
    """The named script on ``client``, registered once per client."""
    per = _registered.setdefault(client, {})
    if name not in per:
        per[name] = client.register_script(source(name))
    return per[name]


# ARGV[9..17] of project.lua, in its order: the one source is tracker/events.py.
LIMITS = (events.MAX_JID, events.MAX_DESC, events.MAX_ERRTYPE, events.MAX_MESSAGE,
          events.MAX_NAME, events.MAX_INT, events.RESERVE_DEFAULT, events.RESERVE_MIN,
          events.RESERVE_MAX)


def call_many(client, script, calls: list[tuple[list, list]]) -> list:
    """EVALSHA ``script`` once per (keys, args) in one round trip; errors are returned
    in place, as ``pipeline.execute(raise_on_error=False)`` does.

    redis-py's Script objects make a pipeline send SCRIPT EXISTS first, a second
    round trip on every call; here the script is loaded only when Redis says
    NOSCRIPT (after a restart or SCRIPT FLUSH) and only those calls are re-sent.
    """
    todo = list(range(len(calls)))
    replies: list = [None] * len(calls)
    for attempt in (0, 1):
        if len(todo) == 1:
            keys, args = calls[todo[0]]
            try:
                out = [client.evalsha(script.sha, len(keys), *keys, *args)]
            except NoScriptError as e:
                out = [e]
            except ResponseError as e:
                out = [e]
        else:
            pipe = client.pipeline(transaction=False)
            for i in todo:
                keys, args = calls[i]
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            out = pipe.execute(raise_on_error=False)
        for i, reply in zip(todo, out):
            replies[i] = reply
        todo = [i for i, r in zip(todo, out) if isinstance(r, NoScriptError)]
        if not todo or attempt:
            break
        client.script_load(script.script)
    return replies


class Scripts:
    """The scripts registered on one client (sync or asyncio)."""

    def __init__(self, client):
        self.project = registered(client, "project")
        self.get = registered(client, "get")
