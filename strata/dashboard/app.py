"""The dashboard's web side: a read-only JSON API, a live event stream (SSE) and one static page.

Routes (all GET):
  /                          the page (static HTML + vanilla JS, no build step)
  /api/ring                  ring version, aggregators (lease, round, agents, latest models), arcs, relays
  /api/agents                agents with telemetry, as aggregators last reported them
  /api/rounds                per aggregator and round: cluster and semi-global metrics, durations, refusals
  /api/models?q=&kind=&aggregator=&round=&limit=
  /api/models/{cid}          record, manifest, tensor summary, signature status, children
  /api/models/{cid}/weights  the safetensors weights (never a device update, unless the dashboard is audit)
  /api/lineage/{cid}?depth=  the ancestry as a DAG
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
MAX_STREAMS = 32  # concurrent event streams: each polls the coordinator

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


def build_app(
    reader: FleetReader, *, token: str = "", poll_s: float = POLL_S, allowed_hosts: frozenset[str] = frozenset()
) -> Starlette:
    """The dashboard as an ASGI app over `reader`; `token` (empty: none) guards every /api route.

    `allowed_hosts` (empty: any) are the names a request's Host may carry. A dashboard without a
    token lists its loopback names there: a web page whose name an attacker rebinds to 127.0.0.1
    then reaches it under the attacker's name and is refused (DNS rebinding)."""
    streams = 0

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
        return JSONResponse(await call(reader.lineage, request.path_params["cid"], _int_param(request, "depth", 0)))

    async def weights(request: Request) -> Response:
        record, blob = await call(reader.weights, request.path_params["cid"])
        filename = f"{record['cid']}.safetensors"
        return Response(
            blob,
            media_type="application/octet-stream",
            headers={"content-disposition": f'attachment; filename="{filename}"', "x-strata-kind": record["kind"]},
        )

    async def snapshot() -> dict[str, Any]:
        ring_view, rounds_view = await asyncio.gather(call(reader.ring), call(reader.rounds))
        return {"ring": ring_view, "rounds": rounds_view}

    async def events(request: Request) -> Response:
        nonlocal streams
        if streams >= MAX_STREAMS:
            return _refusal(429, "too_many_streams", f"at most {MAX_STREAMS} live views at once")
        streams += 1

        async def stream() -> AsyncIterator[str]:
            nonlocal streams
            seen: Any = None
            quiet = 0.0
            try:
                while not await request.is_disconnected():
                    try:
                        version = await call(reader.version)
                        if version != seen:
                            body = json.dumps(await snapshot(), separators=(",", ":"))
                            seen = version
                            quiet = 0.0
                            yield f"event: snapshot\ndata: {body}\n\n"
                    except StrataError as error:
                        # the coordinator is away: say so, keep the stream, try again next poll
                        seen = None
                        yield f"event: fleet_error\ndata: {json.dumps({'reason': error.reason, 'message': error.message})}\n\n"
                    quiet += poll_s
                    if quiet >= KEEPALIVE_S:
                        quiet = 0.0
                        yield ": keepalive\n\n"
                    await asyncio.sleep(poll_s)
            finally:
                streams -= 1

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
        Route("/api/events", api(events)),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes)
