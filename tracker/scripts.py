"""Lua scripts, read from their .lua files once and registered once per client.

``project.lua`` is run with the fold (``projections/track.lua``) prepended, so
the live projector executes the very file the differential tests check.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from redis.exceptions import NoScriptError, ResponseError

import projections
from tracker import events

_LUA = Path(__file__).parent / "lua"
_FOLD = Path(projections.__file__).parent / "track.lua"


@lru_cache(maxsize=None)
def source(name: str) -> str:
    if name in ("project", "replay"):  # the fold, then shared snapshot I/O (snapshot.lua)
        return "\n".join([_FOLD.read_text(), (_LUA / "snapshot.lua").read_text(),
                          (_LUA / f"{name}.lua").read_text()])
    return (_LUA / f"{name}.lua").read_text()


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
        self.project = client.register_script(source("project"))
        self.get = client.register_script(source("get"))
