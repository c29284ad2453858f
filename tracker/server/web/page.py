"""The page: ``/`` (tracks by state, live bars) and ``/jobs/{jid}`` (one job, its history
as a timeline). Plain HTML, CSS and JavaScript from ``static/`` in this package: nothing
loads from outside the app. Both paths serve the same document; the script reads the
path, fetches ``/v1`` and listens to ``/v1/events`` or ``/v1/tracks/{jid}/events``."""

from __future__ import annotations

from pathlib import Path

from litestar import Response, get
from litestar.handlers import HTTPRouteHandler
from litestar.static_files import create_static_files_router

STATIC = Path(__file__).parent / "static"


def routes() -> list[HTTPRouteHandler]:
    html = (STATIC / "index.html").read_bytes()
    headers = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
               "Content-Security-Policy": "default-src 'self'; img-src 'self' data:"}

    @get(["/", "/jobs/{jid:str}"], include_in_schema=False)
    async def index() -> Response[bytes]:
        return Response(content=html, media_type="text/html; charset=utf-8", headers=headers)

    static = create_static_files_router(path="/static", directories=[STATIC],
                                        include_in_schema=False, send_as_attachment=False)
    return [index, static]  # type: ignore[list-item]
