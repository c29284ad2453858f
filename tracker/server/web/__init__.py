"""``tracker web``: an HTTP API, live progress over Server-Sent Events, a web page and
Prometheus metrics, on Litestar and uvicorn (the ``web`` extra).

- ``app``: the Litestar application (``create_app``), error handling, auth, OpenAPI;
- ``api``: the ``/v1`` routes (tracks, history, jobs by state) and the health checks;
- ``sse``: the hub that tails each partition's log and pushes changed tracks;
- ``metrics``: Prometheus metrics (HTTP, deployment, SSE; the projector's own);
- ``page``: ``/`` and ``/jobs/{jid}``, served from ``static/`` in this package;
- ``config``: the settings of the web server; ``serve``: uvicorn.

This module imports nothing from the extra (every ``tracker`` command imports
it at start, and the framework takes a while to import), so the rest of the
command line works, and starts as fast, without it; ``load`` imports a module of
it, or says how to install it.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Optional

from tracker.errors import ConfigError

# The first package of the web extra that is not installed (found, not imported).
MISSING: Optional[str] = next((name for name in ("litestar", "uvicorn", "prometheus_client")
                               if importlib.util.find_spec(name) is None), None)


def load(module: str) -> ModuleType:
    """``tracker.server.web.<module>``, which needs the web extra installed.

    Imported by name, not with an import statement: the command line imports
    every command module at start, and only these need the extra.
    """
    if MISSING:
        raise ConfigError(f"this needs the web extra ({MISSING} is not installed): "
                          "pip install 'tracker[web]'")
    return importlib.import_module(f"{__name__}.{module}")
