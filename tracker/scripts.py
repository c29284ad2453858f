"""Lua scripts, read from their .lua files once and registered once per client.

``project.lua`` is run with the fold (``projections/track.lua``) prepended, so
the live projector executes the very file the differential tests check.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import projections
from tracker import events

_LUA = Path(__file__).parent / "lua"
_FOLD = Path(projections.__file__).parent / "track.lua"


@lru_cache(maxsize=None)
def source(name: str) -> str:
    if name == "project":
        return _FOLD.read_text() + "\n" + (_LUA / "project.lua").read_text()
    return (_LUA / f"{name}.lua").read_text()


# ARGV[9..17] of project.lua, in its order: the one source is tracker/events.py.
LIMITS = (events.MAX_JID, events.MAX_DESC, events.MAX_ERRTYPE, events.MAX_MESSAGE,
          events.MAX_NAME, events.MAX_INT, events.RESERVE_DEFAULT, events.RESERVE_MIN,
          events.RESERVE_MAX)


class Scripts:
    """The scripts registered on one client (sync or asyncio)."""

    def __init__(self, client):
        self.project = client.register_script(source("project"))
        self.get = client.register_script(source("get"))
