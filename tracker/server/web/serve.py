"""Running the app under uvicorn (``tracker web``), as the benchmark does too.

SIGINT/SIGTERM first end every SSE stream (each would otherwise hold uvicorn's
graceful shutdown until its timeout), then stop the server.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any, Optional

import uvicorn

from tracker.server.web.app import create_app
from tracker.server.web.config import WebConfig
from tracker.store.settings import Settings


class Server(uvicorn.Server):
    """uvicorn's server, which says where it listens and closes SSE streams on exit."""

    def __init__(self, config: uvicorn.Config, announce: bool = True):
        super().__init__(config)
        self.announce = announce
        self.port: Optional[int] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None

    async def startup(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)
        for server in self.servers:
            for sock in server.sockets:
                self.port = sock.getsockname()[1]
        if self.announce and self.port is not None:
            print(f"tracker web: listening on http://{self.config.host}:{self.port}",
                  file=sys.stderr, flush=True)

    def close_streams(self) -> None:
        """End the open SSE streams (from any thread)."""
        services = getattr(self.config.app, "services", None)
        hub = getattr(services, "hub", None)
        if hub is not None and self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(hub.close_streams)

    def handle_exit(self, sig: int, frame: Any) -> None:
        """A graceful stop exits 0, as ``tracker serve`` and ``tracker project`` do (uvicorn
        itself re-raises the signal after shutting down); a second SIGINT forces it."""
        self.close_streams()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True

    def stop(self) -> None:
        """Stop serving, from another thread (tests, the benchmark)."""
        self.close_streams()
        self.should_exit = True


def uvicorn_config(app: Any, host: str, port: int) -> uvicorn.Config:
    """One configuration for ``tracker web`` and the benchmark: uvloop and httptools
    when installed, no access log (metrics count requests), a short graceful exit."""
    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                          lifespan="on", timeout_graceful_shutdown=3, server_header=False,
                          proxy_headers=False, backlog=2048)


def run(settings: Settings, config: WebConfig, app: Any = None) -> None:
    app = app if app is not None else create_app(settings, config)
    Server(uvicorn_config(app, config.host, config.port)).run()


def run_in_thread_loop(server: Server) -> None:
    """Serve on a fresh event loop in the calling thread (tests run one per thread)."""
    asyncio.run(server.serve())
