"""``tracker web``: an HTTP API, live progress over Server-Sent Events, a web page and
Prometheus metrics, on Litestar and uvicorn (the ``web`` extra).

- ``app``: the Litestar application (``create_app``), error handling, auth, OpenAPI;
- ``api``: the ``/v1`` routes (tracks, history, jobs by state) and the health checks;
- ``sse``: the hub that tails each partition's log and pushes changed tracks;
- ``metrics``: Prometheus metrics (HTTP, deployment, SSE; the projector's own);
- ``page``: ``/`` and ``/jobs/{jid}``, served from ``static/`` in this package;
- ``config``: the settings of the web server; ``serve``: uvicorn.

This module imports nothing from the extra, so the rest of the command line
works without it; ``load`` imports a module of it, or says how to install it.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

from tracker.errors import ConfigError

MISSING: Optional[str]
try:  # the web extra is optional: `tracker web` names what is missing
    import litestar  # noqa: F401
    import prometheus_client  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as e:
    MISSING = e.name or "litestar"
else:
    MISSING = None


def load(module: str) -> ModuleType:
    """``tracker.server.web.<module>``, which needs the web extra installed.

    Imported by name, not with an import statement: the command line imports
    every command module at start, and only these need the extra.
    """
    if MISSING:
        raise ConfigError(f"this needs the web extra ({MISSING} is not installed): "
                          "pip install 'tracker[web]'")
    return importlib.import_module(f"{__name__}.{module}")
