"""The web application: Litestar, with tracker's errors, metrics and OpenAPI document.

``create_app`` returns an ASGI app (Litestar inside the HTTP metrics wrapper). Its
lifespan connects to Redis (``AsyncTracker``), starts the SSE hub's tailers, and
closes both at shutdown. Tests hand it a ``connect`` of their own (fakeredis).

Errors are one JSON shape everywhere, ``{"error": "<field>: <problem>", "field":
"<field>"}``: tracker's ValidationError is 400 naming its field, the framework's
parameter errors are mapped to the same, Redis trouble is 503 (its address stays
in the server's log, not in the answer).
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import unquote

import redis.asyncio as aredis
from litestar import Litestar, Request, Response
from litestar.config.cors import CORSConfig
from litestar.exceptions import HTTPException, ValidationException
from litestar.handlers import HTTPRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import JsonRenderPlugin, YamlRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from prometheus_client import CollectorRegistry

from tracker.aio import AsyncTracker
from tracker.errors import TrackerError, ValidationError
from tracker.server.web import api, page
from tracker.server.web.config import WebConfig
from tracker.server.web.metrics import HttpMetrics
from tracker.server.web.sse import Hub
from tracker.store.connection import create_async_client
from tracker.store.settings import Settings

log = logging.getLogger("tracker.web")


@dataclass
class Backend:
    """What the app reads and writes through: the tracker, and a client for the SSE
    tailers' blocking reads (one connection held per partition)."""

    tracker: AsyncTracker
    tail_client: aredis.Redis
    block_ms: int = 5000  # the tailers' XREAD BLOCK

    async def close(self) -> None:
        await self.tracker.close()
        if self.tail_client is not self.tracker.client:
            await self.tail_client.aclose()


Connect = Callable[[], Awaitable[Backend]]


def connector(settings: Settings) -> Connect:
    """The production ``connect``: Redis from ``settings`` (the embedded one by default)."""

    async def connect() -> Backend:
        t = await AsyncTracker.open(settings)
        return Backend(t, create_async_client(settings, max_connections=t.partitions + 1))

    return connect


def _error(status: int, text: str, field: Optional[str] = None,
           headers: Optional[dict[str, str]] = None) -> Response:
    return Response(content={"error": text, "field": field}, status_code=status,
                    headers=headers, media_type="application/json")


def _field_of(text: str) -> Optional[str]:
    head, sep, _ = text.partition(": ")
    return head if sep and head.replace("_", "").isalnum() and head.islower() else None


def on_validation(_: Request, exc: ValidationError) -> Response:
    return _error(400, str(exc), exc.field)


def on_framework_validation(_: Request, exc: ValidationException) -> Response:
    """A parameter the framework refused: name it, as our own errors do."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    first = extra[0] if extra and isinstance(extra[0], dict) else {}
    absent = re.match(r"Missing required \w+ parameter '([^']+)'", exc.detail or "")
    key = first.get("key") or (absent.group(1) if absent else "body")
    field = api.PARAM_NAMES.get(key, key)
    message = "required" if absent else first.get("message") or exc.detail
    return _error(400, f"{field}: {message}", field)


def on_http(_: Request, exc: HTTPException) -> Response:
    headers = dict(exc.headers or {})  # e.g. 405's Allow
    if exc.status_code == 401:
        headers["WWW-Authenticate"] = "Bearer"
    text = exc.detail or "error"
    return _error(exc.status_code, text, _field_of(text), headers)


def on_tracker(_: Request, exc: TrackerError) -> Response:
    log.warning("request failed: %s", exc)
    return _error(503, "Redis unavailable; see the server's log", None)


def on_crash(_: Request, exc: Exception) -> Response:
    log.exception("unexpected error", exc_info=exc)
    return _error(500, "internal error; see the server's log", None)


class KeepEncodedSlashes:
    """ASGI: a JID holding '/' travels in a path as %2F, which the server decodes into a
    separator before routing. Decode each segment on its own instead, a '/' inside one
    carried as ``api.SLASH`` (handlers turn it back with ``api.path_jid``)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        raw = scope.get("raw_path") if scope["type"] == "http" else None
        if raw and (b"%2f" in raw.lower() or b"%00" in raw):
            segments = raw.split(b"?", 1)[0].decode("latin-1").split("/")
            # a NUL sent as %00 must stay invalid (not turn into a '/')
            scope["path"] = "/".join(unquote(s).replace(api.SLASH, "\x01").replace("/", api.SLASH)
                                     for s in segments)
        await self.app(scope, receive, send)


def create_app(settings: Settings, config: WebConfig, connect: Optional[Connect] = None,
               extra_handlers: Sequence[HTTPRouteHandler] = ()) -> HttpMetrics:
    """The ASGI app. ``extra_handlers`` join the same stack (the benchmark's baseline route)."""
    config.validate()
    registry = CollectorRegistry()
    svc = api.Services(config, registry)
    connect = connect or connector(settings)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        backend = await connect()
        svc.tracker = backend.tracker
        svc.hub = Hub(backend.tracker, backend.tail_client, block_ms=backend.block_ms,
                      keepalive=config.keepalive)
        svc.collector.subscribers = lambda: svc.hub.subscribers
        svc.collector.sent = lambda: svc.hub.sent
        svc.hub.start()
        try:
            yield
        finally:
            await svc.hub.stop()
            await backend.close()

    cors = None
    if config.cors_origins:
        cors = CORSConfig(allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                          allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
                          expose_headers=["X-Tracker-Trimmed"])
    openapi = OpenAPIConfig(
        title="tracker", version="1", path="/schema",
        description="Job tracking (Faktory's TRACK GET / TRACK SET) over HTTP and SSE.",
        render_plugins=[JsonRenderPlugin(path=["/", "/openapi.json"]), YamlRenderPlugin()],
        components=Components(security_schemes={"bearer": SecurityScheme(
            type="http", scheme="bearer", description="TRACKER_WEB_TOKEN")}),
        use_handler_docstrings=True)
    handlers: dict[Any, Any] = {
        ValidationError: on_validation, ValidationException: on_framework_validation,
        HTTPException: on_http, TrackerError: on_tracker, Exception: on_crash}
    app = Litestar(
        route_handlers=[*api.routes(svc), *page.routes(), *extra_handlers],
        lifespan=[lifespan], exception_handlers=handlers, openapi_config=openapi,
        cors_config=cors, request_max_body_size=config.max_body, logging_config=None)
    app.state.services = svc
    wrapped = HttpMetrics(KeepEncodedSlashes(app), registry)
    wrapped.litestar, wrapped.services = app, svc
    return wrapped
