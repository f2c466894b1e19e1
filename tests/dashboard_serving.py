"""Serving the dashboard's app on loopback in a thread for a test, and reading it over real HTTP."""

from __future__ import annotations

import contextlib
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette

from tests.agent_service_contract import wait_until
from tests.procs import free_port


@contextlib.contextmanager
def serve_app(app: Starlette, timeout_s: float = 15.0) -> Iterator[str]:
    """Serve `app` on a free loopback port; yield its base URL; stop it (bounded) at the end."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="dashboard-under-test", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), timeout_s, f"the dashboard on port {port}", poll_s=0.02)
        if not server.started:
            raise RuntimeError(f"the dashboard on port {port} stopped before it started")
    except BaseException:
        server.should_exit = True
        raise
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        # an open event stream would hold a graceful shutdown forever: cut it short
        server.force_exit = True
        thread.join(timeout_s)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def get(url: str, *, headers: dict[str, str] | None = None, timeout: float = 15.0) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of a GET, without following redirects (errors are answers too)."""
    opener = urllib.request.build_opener(_NoRedirect)
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def get_json(url: str, **kwargs: Any) -> tuple[int, Any]:
    status, _, body = get(url, **kwargs)
    return status, json.loads(body)


def sse_events(url: str, count: int, *, headers: dict[str, str] | None = None, timeout: float = 20.0,
               between: Callable[[int], None] | None = None) -> list[tuple[str, Any]]:
    """The first `count` events (name, parsed data) an event stream sends, then the stream is
    closed; `between(i)` runs after the i-th event arrives (e.g. to change the fleet)."""
    request = urllib.request.Request(url, headers=headers or {})
    events: list[tuple[str, Any]] = []
    with urllib.request.urlopen(request, timeout=timeout) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        name, data = "message", []
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif not line and data:
                events.append((name, json.loads("\n".join(data))))
                if len(events) == count:
                    return events
                if between is not None:
                    between(len(events))
                name, data = "message", []
    raise AssertionError(f"the event stream ended after {len(events)} of {count} events")


def first_sse_event(url: str, *, headers: dict[str, str] | None = None, timeout: float = 20.0) -> tuple[str, Any]:
    """The first event (name, parsed data) an event stream sends."""
    return sse_events(url, 1, headers=headers, timeout=timeout)[0]
