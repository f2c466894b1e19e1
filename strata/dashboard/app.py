"""The dashboard's web side: a read-only JSON API, a live event stream (SSE) and one static page.

Routes (all GET):
  /                          the page (static HTML + vanilla JS, no build step)
  /api/ring                  ring version, aggregators (lease, round, agents, latest models), arcs, relays
  /api/agents                agents with telemetry, as aggregators last reported them
  /api/rounds                per aggregator and round: cluster and semi-global metrics, durations, refusals
  /api/models?q=&kind=&aggregator=&round=&limit=
  /api/models/{cid}          record, manifest, tensor summary, signature status, children
  /api/models/{cid}/weights  the safetensors weights (never a device update, unless the dashboard is audit)
  /api/lineage/{cid}?depth=&bases=1  the ancestry as a DAG (bases=1: also what each model was trained from)
  /api/hub                   federations (spec, owners, base, heads, releases), forks, proposals
  /api/events                SSE: a `snapshot` event (ring + rounds) whenever the fleet moves on

Authentication: with an operator token, every /api request carries `Authorization: Bearer
TOKEN` or the cookie that `/?token=TOKEN` sets (the page's own requests then need nothing
more). Without a token the CLI binds loopback only. Every refusal is JSON with a
machine-readable reason, like the fleet's own: {"error": {"reason": ..., "message": ...}}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from proto.errors import InvalidInput, NotFound, StrataError, Unavailable
from strata.dashboard.reader import FleetReader

__all__ = ["COOKIE", "build_app"]

log = logging.getLogger("strata.dashboard")

STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "strata_dashboard"
POLL_S = 1.5  # how often the event stream asks the coordinator whether the fleet moved on
KEEPALIVE_S = 15.0  # a comment line now and then, so proxies and the browser keep the stream open
MAX_STREAMS = 32  # open event streams at once (one poller serves them all)

_STATUS = {
    "INVALID_ARGUMENT": 400,
    "NOT_FOUND": 404,
    "PERMISSION_DENIED": 403,
    "UNAUTHENTICATED": 401,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "RESOURCE_EXHAUSTED": 429,
}


def _refusal(status: int, reason: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"reason": reason, "message": message}}, status_code=status)


def _error_response(error: StrataError) -> JSONResponse:
    if isinstance(error, NotFound):
        status = 404
    elif isinstance(error, InvalidInput):
        status = 400
    elif isinstance(error, Unavailable):
        status = 503
    else:
        status = _STATUS.get(error.status, 502)
    return _refusal(status, error.reason, error.message)


def _int_param(request: Request, name: str, default: int) -> int:
    text = request.query_params.get(name, "")
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise InvalidInput(f"{name} must be an integer, got {text[:40]!r}", reason="bad_argument") from None


class FleetFeed:
    """One poller for every open event stream: it asks the coordinator whether the fleet moved
    on every `poll_s` while anyone listens, builds one snapshot per change and hands it to each
    stream (a slow stream skips to the newest). N browsers cost the coordinator what one does."""

    def __init__(self, reader: FleetReader, *, poll_s: float) -> None:
        self._reader = reader
        self._poll_s = poll_s
        self._inboxes: set[asyncio.Queue[str]] = set()
        self._task: asyncio.Task[None] | None = None
        self._latest = ""  # the last snapshot event, for streams that open between changes

    @property
    def subscribers(self) -> int:
        return len(self._inboxes)

    def subscribe(self) -> asyncio.Queue[str]:
        inbox: asyncio.Queue[str] = asyncio.Queue(maxsize=1)
        if self._latest:
            inbox.put_nowait(self._latest)
        self._inboxes.add(inbox)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll())
        return inbox

    def unsubscribe(self, inbox: asyncio.Queue[str]) -> None:
        self._inboxes.discard(inbox)

    def _publish(self, event: str) -> None:
        for inbox in self._inboxes:
            if inbox.full():
                inbox.get_nowait()  # it has not read the older one: the newer one replaces it
            inbox.put_nowait(event)

    async def _poll(self) -> None:
        seen: Any = None
        while self._inboxes:
            try:
                version = await run_in_threadpool(self._reader.version)
                if version != seen:
                    ring_view, rounds_view = await asyncio.gather(
                        run_in_threadpool(self._reader.ring), run_in_threadpool(self._reader.rounds)
                    )
                    body = json.dumps({"ring": ring_view, "rounds": rounds_view}, separators=(",", ":"))
                    seen = version
                    self._latest = f"event: snapshot\ndata: {body}\n\n"
                    self._publish(self._latest)
            except StrataError as error:
                # the coordinator is away: say so, keep the streams, try again next poll
                seen, self._latest = None, ""
                self._publish(f"event: fleet_error\ndata: {json.dumps({'reason': error.reason, 'message': error.message})}\n\n")
            await asyncio.sleep(self._poll_s)
        self._latest = ""  # nobody listened for a while: the next stream starts from a fresh read


def build_app(
    reader: FleetReader, *, token: str = "", poll_s: float = POLL_S, allowed_hosts: frozenset[str] = frozenset()
) -> Starlette:
    """The dashboard as an ASGI app over `reader`; `token` (empty: none) guards every /api route.

    `allowed_hosts` (empty: any) are the names a request's Host may carry. A dashboard without a
    token lists its loopback names there: a web page whose name an attacker rebinds to 127.0.0.1
    then reaches it under the attacker's name and is refused (DNS rebinding)."""
    def refused_host(request: Request) -> Response | None:
        if allowed_hosts and (request.url.hostname or "") not in allowed_hosts:
            return _refusal(403, "bad_host", f"this dashboard answers to {', '.join(sorted(allowed_hosts))} only")
        return None

    def authorized(request: Request) -> bool:
        if not token:
            return True
        header = request.headers.get("authorization", "")
        offered = header[7:] if header.lower().startswith("bearer ") else request.cookies.get(COOKIE, "")
        return hmac.compare_digest(offered.encode(), token.encode())

    def api(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            if (refusal := refused_host(request)) is not None:
                return refusal
            if not authorized(request):
                return _refusal(401, "unauthenticated", "an operator token is required (Authorization: Bearer, or open /?token=...)")
            try:
                return await handler(request)
            except StrataError as error:
                return _error_response(error)

        return guarded

    async def call(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await run_in_threadpool(method, *args, **kwargs)

    async def page(request: Request) -> Response:
        if (refusal := refused_host(request)) is not None:
            return refusal
        offered = request.query_params.get("token")
        if offered is not None:
            if not token or not hmac.compare_digest(offered.encode(), token.encode()):
                return _refusal(401, "unauthenticated", "wrong operator token")
            # the token leaves the URL (and so the history and any Referer) for an HttpOnly cookie
            response = RedirectResponse(url=request.url.path, status_code=303)
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https")
            return response
        if not authorized(request):
            return _refusal(401, "unauthenticated", "an operator token is required: open /?token=...")
        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-store"})

    async def ring(request: Request) -> Response:
        return JSONResponse(await call(reader.ring))

    async def agents(request: Request) -> Response:
        return JSONResponse({"agents": await call(reader.agents)})

    async def rounds(request: Request) -> Response:
        return JSONResponse(await call(reader.rounds))

    async def models(request: Request) -> Response:
        params = request.query_params
        found = await call(
            reader.models,
            query=params.get("q", "").strip(),
            kind=params.get("kind", ""),
            aggregator=params.get("aggregator", ""),
            round_=_int_param(request, "round", 0),
            limit=_int_param(request, "limit", 100),
        )
        return JSONResponse({"models": found})

    async def model(request: Request) -> Response:
        return JSONResponse(await call(reader.model, request.path_params["cid"]))

    async def lineage(request: Request) -> Response:
        bases = _int_param(request, "bases", 0) == 1
        return JSONResponse(
            await call(reader.lineage, request.path_params["cid"], _int_param(request, "depth", 0), bases=bases)
        )

    async def weights(request: Request) -> Response:
        record, blob = await call(reader.weights, request.path_params["cid"])
        filename = f"{record['cid']}.safetensors"
        return Response(
            blob,
            media_type="application/octet-stream",
            headers={"content-disposition": f'attachment; filename="{filename}"', "x-strata-kind": record["kind"]},
        )

    feed = FleetFeed(reader, poll_s=poll_s)

    async def hub(request: Request) -> Response:
        return JSONResponse(await call(reader.hub))

    async def events(request: Request) -> Response:
        if feed.subscribers >= MAX_STREAMS:
            return _refusal(429, "too_many_streams", f"at most {MAX_STREAMS} live views at once")
        inbox = feed.subscribe()

        async def stream() -> AsyncIterator[str]:
            try:
                while not await request.is_disconnected():
                    try:
                        yield await asyncio.wait_for(inbox.get(), KEEPALIVE_S)
                    except TimeoutError:
                        yield ": keepalive\n\n"
            finally:
                feed.unsubscribe(inbox)

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"cache-control": "no-store", "x-accel-buffering": "no"}
        )

    routes = [
        Route("/", page),
        Route("/api/ring", api(ring)),
        Route("/api/agents", api(agents)),
        Route("/api/rounds", api(rounds)),
        Route("/api/models", api(models)),
        Route("/api/models/{cid}", api(model)),
        Route("/api/models/{cid}/weights", api(weights)),
        Route("/api/lineage/{cid}", api(lineage)),
        Route("/api/hub", api(hub)),
        Route("/api/events", api(events)),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes)
