"""The HTTP API: ``/v1`` routes, ``/metrics`` and the health checks.

Every answer is built by the same code as the command line's: TRACK GET is
``AsyncTracker.get`` (the dict ``tracker get`` prints, encoded as it does), TRACK
SET is ``events.make_trackset`` / ``events.decode_trackset_json`` and history is
``history.lua`` read the way ``tracker history --json`` reads it. Request bodies
are decoded here, strictly, rather than by the framework, which would turn
``"12"`` into 12.

Handlers are closures over one ``Services`` object: no per-request dependency
lookup on the hot path.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Literal, Optional

import msgspec
from litestar import HttpMethod, Request, Response, get, post, route
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType as Media
from litestar.openapi.spec import Operation, RequestBody, Schema
from litestar.openapi.spec.enums import OpenAPIType
from litestar.params import HeaderParameter, Parameter, QueryParameter
from litestar.response.base import ASGIResponse
from litestar.status_codes import HTTP_200_OK, HTTP_204_NO_CONTENT, HTTP_503_SERVICE_UNAVAILABLE
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from tracker import events, history
from tracker.aio import AsyncTracker
from tracker.errors import TrackerError, ValidationError
from tracker.listing import CURSOR_PATTERN
from tracker.server.web import metrics
from tracker.server.web.config import WebConfig
from tracker.server.web.schemas import Appended, Error, HistoryEntry, Ready, Track, TrackPage, errors
from tracker.server.web.sse import TERMINAL, Hub, event_id
from tracker.store import keys, scripts
from tracker.store.boundary import check, redis_errors

JSON = "application/json"
# Python parameter names the framework reports -> the names clients use.
PARAM_NAMES = {"job_state": "state", "last_event_id": "Last-Event-ID"}
State = Literal["enqueued", "working", "success", "failed", "dead"]
# A JID in a path is percent-encoded ('/' as %2F); app.KeepEncodedSlashes routes it as one
# segment, carrying a decoded '/' as SLASH (a character no JID holds) until path_jid.
SLASH = "\x00"
# What the document promises reserve_until looks like (the server takes any RFC 3339 time).
TIME_RE = r"^20\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d)T([01]\d|2[0-3]):[0-5]\d:[0-5]\dZ$"
JID_RE = events.JID_PATTERN.replace(r"\A", "^").replace(r"\Z", "$")
# The pattern is documented, not enforced by the framework: path_jid checks the JID it
# names (after SLASH), with the command line's messages.
JidPath = Annotated[str, Parameter(schema_extra={"pattern": JID_RE, "maxLength": events.MAX_JID},
                                   description="The job's JID, percent-encoded (a '%' in a "
                                               "JID as %25)")]


def path_jid(jid: str) -> str:
    """The JID a path segment named (see SLASH), checked as every JID is."""
    return events.check_jid(jid.replace(SLASH, "/"))
_encode = msgspec.json.Encoder().encode


class _SetFields(msgspec.Struct, forbid_unknown_fields=True):
    """``POST /v1/tracks/{jid}``'s body: TRACK SET without the jid (it is in the path)."""

    percent: Any = None  # validated by events.make_trackset, with the CLI's messages
    desc: Any = None
    reserve_until: Any = None


_fields_decoder = msgspec.json.Decoder(_SetFields)


def _set_schema(with_jid: bool) -> Schema:
    props: dict[str, Any] = {
        "percent": Schema(one_of=[Schema(type=OpenAPIType.INTEGER, minimum=0, maximum=100),
                                  Schema(type=OpenAPIType.NULL)]),
        "desc": Schema(one_of=[Schema(type=OpenAPIType.STRING, max_length=events.MAX_DESC // 4,
                                      description=f"at most {events.MAX_DESC} bytes of UTF-8"),
                               Schema(type=OpenAPIType.NULL)]),
        "reserve_until": Schema(one_of=[Schema(type=OpenAPIType.STRING,
                                               description="RFC 3339 with a timezone, at most "
                                                           "a day ahead; only ever extends",
                                               pattern=TIME_RE),
                                        Schema(type=OpenAPIType.NULL)]),
    }
    if with_jid:
        props["jid"] = Schema(type=OpenAPIType.STRING, pattern=JID_RE, max_length=events.MAX_JID)
    return Schema(type=OpenAPIType.OBJECT, properties=props, additional_properties=False,
                  required=["jid"] if with_jid else None)


def _operation(with_jid: bool) -> type[Operation]:
    """An OpenAPI operation with the TRACK SET body the handler decodes itself."""
    body = RequestBody(required=True, content={JSON: Media(schema=_set_schema(with_jid))},
                       description="TRACK SET: absent or null fields leave the value unchanged")

    @dataclass
    class TrackSetOperation(Operation):
        def __post_init__(self) -> None:
            self.request_body = body

    return TrackSetOperation


class Services:
    """What the handlers share; filled in by the app's lifespan."""

    tracker: AsyncTracker
    hub: Hub

    def __init__(self, config: WebConfig, registry: CollectorRegistry):
        self.config = config
        self.registry = registry
        self.collector = metrics.DeploymentCollector()
        registry.register(self.collector)
        self._token = config.token.encode() if config.token else None

    def _bearer_ok(self, request: Request) -> bool:
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        return (self._token is not None and scheme.lower() == "bearer"
                and hmac.compare_digest(given.strip().encode("utf-8", "replace"), self._token))

    def authorize_read(self, request: Request) -> None:
        if self.config.reads_need_token and not self._bearer_ok(request):
            raise NotAuthorizedException("authorization: reads need Authorization: Bearer "
                                         "<TRACKER_WEB_TOKEN>")

    def authorize_write(self, request: Request) -> None:
        if self._token is None:
            raise PermissionDeniedException("authorization: writes are off (the server has "
                                            "no TRACKER_WEB_TOKEN)")
        if not self._bearer_ok(request):
            raise NotAuthorizedException("authorization: writes need Authorization: Bearer "
                                         "<TRACKER_WEB_TOKEN>")


def json_response(obj: Any, status: int = HTTP_200_OK) -> Response[Any]:
    return raw_json(_encode(obj), status)


def raw_json(body: bytes, status: int = HTTP_200_OK,
             headers: Optional[dict[str, str]] = None) -> Response[Any]:
    """JSON already encoded (as the command line encodes it), sent as is."""
    return _Json(body, status, headers)


class _Json(Response[Any]):
    """A response of encoded JSON that skips the framework's rendering and header merging
    (no route here sets headers or cookies of its own): about 10 us less per request, on
    the hot read path. Middleware still sees the ASGI messages as usual."""

    __slots__ = ("_body", "_status", "_extra")

    def __init__(self, body: bytes, status: int, headers: Optional[dict[str, str]]):
        self._body, self._status, self._extra = body, status, headers

    def to_asgi_response(self, app: Any, request: Request, **kwargs: Any) -> Any:
        return partial(_send_json, self._body, self._status, self._extra)


_JSON_TYPE = (b"content-type", JSON.encode())


async def _send_json(body: bytes, status: int, extra: Optional[dict[str, str]],
                     scope: Any, receive: Any, send: Any) -> None:
    headers = [_JSON_TYPE, (b"content-length", b"%d" % len(body))]
    if extra:
        headers += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def track_set(t: AsyncTracker, event: events.TrackSet) -> str:
    """Append a validated TRACK SET to its partition's log; the entry ID."""
    with redis_errors(t.settings):
        entry = await t.client.xadd(keys.stream(t.prefix, t.partition(event.jid)),
                                    events.encode_entry(event))
    return entry.decode()


async def read_history(t: AsyncTracker, jid: str) -> tuple[list[dict], int]:
    """``tracker history --json``'s records for a job, and how many were trimmed away:
    the same history.lua call as ``tracker.history.history``, on the asyncio client."""
    events.check_jid(jid)
    call = history.history_call(t.prefix, t.partition(jid), jid)
    with redis_errors(t.settings):
        reply = check(t.settings, (await scripts.arun(t.client, "history", [call]))[0])
    h = history.from_reply(jid, reply)
    return [e.as_json() for e in h.entries], len(h.trimmed)


class _EventBody(ASGIResponse):
    """The body of an SSE response: the hub writes it (``send_body`` is the framework's
    place for a response that sends its own body)."""

    __slots__ = ("serve",)
    _should_set_content_length = False

    def __init__(self, serve: Callable[[Any, Any], Awaitable[None]], **kwargs: Any):
        super().__init__(**kwargs)
        self.serve = serve

    async def send_body(self, send: Any, receive: Any) -> None:
        await self.serve(send, receive)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class EventStream(Response[Any]):
    """``text/event-stream`` written by ``serve(send, receive)``."""

    def __init__(self, serve: Callable[[Any, Any], Awaitable[None]]):
        super().__init__(content=None, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.serve = serve

    def to_asgi_response(self, app: Any, request: Request, *,
                         headers: Optional[dict[str, str]] = None, is_head_response: bool = False,
                         **_: Any) -> ASGIResponse:
        return _EventBody(self.serve, headers={**(headers or {}), **self.headers},
                          media_type="text/event-stream", is_head_response=is_head_response)


def routes(svc: Services) -> list[HTTPRouteHandler]:
    """The API's route handlers, bound to ``svc``."""
    bearer: list[dict[str, list[str]]] = [{"bearer": []}]
    read_security = bearer if svc.config.reads_need_token else None
    common: dict[str, Any] = {"security": read_security, "tags": ["tracks"],
                              "responses": errors(400, 401, 503)}
    writes: dict[str, Any] = {"security": bearer, "tags": ["tracks"], "status_code": HTTP_200_OK,
                              "responses": errors(400, 401, 403, 413, 503)}

    @get("/v1/tracks/{jid:str}", summary="TRACK GET", operation_id="getTrack", **common)
    async def get_track(request: Request, jid: JidPath) -> Response[Track]:
        """The track, exactly as `tracker get JID` prints it (`unknown` for an untracked JID)."""
        svc.authorize_read(request)
        jid = path_jid(jid)
        return raw_json(_encode(await svc.tracker.get(jid)))

    @get("/v1/tracks", summary="TRACK GET, many", operation_id="getTracks", **common)
    async def get_tracks(request: Request, jid: Annotated[
            list[str], Parameter(description="Repeat for each JID, in the order wanted",
                                 min_items=1, schema_extra={"items": {
                                     "type": "string", "pattern": JID_RE,
                                     "maxLength": events.MAX_JID}})]) -> Response[list[Track]]:
        """Many tracks in one round trip, in the order asked."""
        svc.authorize_read(request)
        if len(jid) > svc.config.max_jids:
            raise ValidationError("jid", f"at most {svc.config.max_jids} per request")
        return raw_json(_encode(await svc.tracker.get_many(jid)))

    @post("/v1/tracks/{jid:str}", summary="TRACK SET", operation_id="setTrack",
          operation_class=_operation(False), **writes)
    async def set_track(request: Request, jid: JidPath) -> Response[Appended]:
        """Report progress: `percent`, `desc`, `reserve_until` (absent or null: unchanged).
        Answers the log entry's ID; a GET after it answers the new state."""
        svc.authorize_write(request)
        jid = path_jid(jid)
        try:
            f = _fields_decoder.decode(await request.body())
        except msgspec.ValidationError as e:
            field, problem = events.split_error(e, {})  # "event": the top level, not an object
            raise ValidationError("body" if field == "event" else field, problem) from None
        except msgspec.DecodeError as e:
            raise ValidationError("body", f"not a JSON object ({e})") from None
        entry = await track_set(svc.tracker, events.make_trackset(jid, f.percent, f.desc,
                                                                  f.reserve_until))
        return json_response({"ok": True, "id": entry})

    @post("/v1/tracks", summary="TRACK SET, Faktory's JSON", operation_id="setTrackJson",
          operation_class=_operation(True), **writes)
    async def set_track_json(request: Request) -> Response[Appended]:
        """TRACK SET with the JSON a Faktory client sends (`jid` in the body: any JID)."""
        svc.authorize_write(request)
        entry = await track_set(svc.tracker, events.decode_trackset_json(await request.body()))
        return json_response({"ok": True, "id": entry})

    @get("/v1/tracks/{jid:str}/history", summary="History", operation_id="getHistory", **common)
    async def get_history(request: Request, jid: JidPath) -> Response[list[HistoryEntry]]:
        """The job's events in log order, as `tracker history --json` prints them (one
        object per event). `X-Tracker-Trimmed` counts earlier events past retention."""
        svc.authorize_read(request)
        jid = path_jid(jid)
        entries, trimmed = await read_history(svc.tracker, jid)
        return raw_json(_encode(entries), headers={"X-Tracker-Trimmed": str(trimmed)})

    sse_responses = {**errors(400, 401, 503), HTTP_204_NO_CONTENT: ResponseSpec(
        None, description="The client has the final state already (EventSource stops)")}

    @get("/v1/tracks/{jid:str}/events", summary="Live track (SSE)", operation_id="trackEvents",
         media_type="text/event-stream", security=read_security, tags=["tracks"],
         responses=sse_responses)
    async def track_events(request: Request, jid: JidPath, last_event_id: Annotated[
            Optional[str], HeaderParameter(name="Last-Event-ID", max_length=64, required=False)] = None
    ) -> Response[Any]:
        """Server-Sent Events: the track now (unless `Last-Event-ID` says the client has
        it), then one event per change, each the TRACK GET JSON with a digest as its id,
        until success or dead. 204 when the client already has the final state."""
        svc.authorize_read(request)
        jid = path_jid(jid)
        if last_event_id:
            now = await svc.tracker.get(jid)
            if now["state"] in TERMINAL and event_id(_encode(now)) == last_event_id:
                return Response(content=b"", status_code=HTTP_204_NO_CONTENT)
        return EventStream(partial(svc.hub.serve_track, jid, last_event_id))

    @get("/v1/events", summary="Every track, live (SSE)", operation_id="allEvents",
         media_type="text/event-stream", **common)
    async def all_events(request: Request) -> EventStream:
        """Server-Sent Events: each change of any track (the page's feed); a `resync`
        event when the client fell too far behind and should reload its lists."""
        svc.authorize_read(request)
        return EventStream(svc.hub.serve_all)

    @get("/v1/jobs", summary="Tracks by state", operation_id="listJobs", security=read_security,
         tags=["tracks"], responses=errors(400, 401, 503))
    async def list_jobs(request: Request, job_state: Annotated[State, QueryParameter(name="state")],
                        queue: Annotated[Optional[str], Parameter(max_length=events.MAX_NAME)] = None,
                        limit: Annotated[int, Parameter(ge=1, le=1000)] = 50,
                        cursor: Annotated[Optional[str], Parameter(
                            max_length=146, pattern=CURSOR_PATTERN)] = None
                        ) -> Response[TrackPage]:
        """Live tracks in one state (and queue), newest update first, paged by `cursor`."""
        svc.authorize_read(request)
        if queue is not None and not events.is_name(queue):
            # No track can have it (the fold stores only names is_name accepts), and the
            # schema cannot say "printable" or count bytes: an empty page, not a 400.
            return json_response({"tracks": [], "next_cursor": None})
        page = await svc.tracker.list_tracks(job_state, queue=queue, limit=limit, cursor=cursor)
        return json_response({"tracks": page.tracks, "next_cursor": page.next_cursor})

    @get("/metrics", summary="Prometheus metrics", operation_id="metrics",
         media_type=CONTENT_TYPE_LATEST, **common)
    async def get_metrics(request: Request) -> Response[str]:
        svc.authorize_read(request)
        svc.collector.rows = await metrics.partition_stats(svc.tracker)
        svc.collector.by_state = await svc.tracker.count_tracks()
        body: Response[Any] = Response(content=generate_latest(svc.registry),
                                       media_type=CONTENT_TYPE_LATEST)
        return body

    @get("/healthz", summary="Process up", operation_id="healthz", tags=["health"])
    async def healthz() -> Response[Ready]:
        return json_response({"ok": True})

    @get("/readyz", summary="Redis reachable, projector lag under the bound",
         operation_id="readyz", tags=["health"],
         responses={503: ResponseSpec(Ready, description="Not ready (the reason in error)",
                                       generate_examples=False)})
    async def readyz() -> Response[Ready]:
        try:
            rows = await metrics.partition_stats(svc.tracker)
        except TrackerError:
            return json_response({"ok": False, "error": "Redis unavailable"},
                                 HTTP_503_SERVICE_UNAVAILABLE)
        lag = max((r.lag_seconds for r in rows), default=0.0)
        ok = lag <= svc.config.ready_max_lag
        body: dict[str, Any] = {"ok": ok, "lag_seconds": round(lag, 3),
                                "lag_entries": sum(r.lag_entries for r in rows),
                                "max_lag_seconds": svc.config.ready_max_lag}
        if not ok:
            body["error"] = "projector lag over the bound: is `tracker project` running?"
        return json_response(body, HTTP_200_OK if ok else HTTP_503_SERVICE_UNAVAILABLE)

    @route(["/v1/tracks", "/v1/tracks/{jid:str}"], http_method=[HttpMethod.OPTIONS],
           include_in_schema=False)
    async def options_tracks() -> Response[None]:
        """Allow for the paths with both GET and POST (the framework's own lists only GET)."""
        return Response(content=None, status_code=HTTP_204_NO_CONTENT,
                        headers={"Allow": "GET, OPTIONS, POST"})

    # OPTIONS first: the framework adds its own (listing the first handler's methods only)
    # to a path that has none when its first handler is registered.
    return [options_tracks, get_track, get_tracks, set_track, set_track_json, get_history,
            track_events, all_events, list_jobs, get_metrics, healthz, readyz]


__all__ = ["Error", "Services", "routes", "track_set", "read_history"]
