"""tracker: Faktory-style job tracking, event-sourced on Redis Streams.

``Tracker`` answers TRACK GET and takes TRACK SET; ``Publisher`` is the job
server's side; ``Projector`` folds the log. Imports are lazy so that
``tracker.events`` (used by the pure folds) pulls in no Redis client.
"""

import importlib

from tracker.errors import ConfigError, RedisUnavailable, TrackerError, ValidationError
from tracker.integrations.context import current_jid, progress  # noqa: F401

__all__ = ["Tracker", "Publisher", "Projector", "Deployment", "Settings", "TrackerError",
           "ValidationError", "ConfigError", "RedisUnavailable", "progress", "current_jid"]
__version__ = "0.1.0"

_LAZY = {"Tracker": "tracker.query", "Publisher": "tracker.publisher",
         "Projector": "tracker.projector", "Deployment": "tracker.store.deployment",
         "Settings": "tracker.store.settings"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tracker' has no attribute {name!r}")
