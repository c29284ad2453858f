"""The ``tracker`` command line: ``main`` and the ``cli`` group live in ``app``; each
module here adds its commands to the group with ``@cli.command()`` (rq's pattern).

- ``track``: emit, set, get     - ``watch``: watch      - ``daemons``: project, serve
- ``recovery``: replay, history, trim, export, import   - ``dlq``: dlq list|retry|purge
- ``admin``: status, embedded   - ``demo``: demo
- ``list``: list (by state)     - ``web``: web (the HTTP API and page; the web extra)
"""

from tracker.cli import admin, daemons, demo, dlq, recovery, track, watch, web
from tracker.cli import list as list_
from tracker.cli.app import cli, main

__all__ = ["cli", "main", "admin", "daemons", "demo", "dlq", "list_", "recovery", "track", "watch",
           "web"]
