"""The trace view's HTTP routes on the gateway's HTTP port:

    GET /traces                          recent requests, newest first, with TTFT and total time
                                         (HTML for a browser; JSON with `?format=json` or `Accept: application/json`)
    GET /traces/{request_id}             the request's waterfall, one row per span (HTML)
    GET /traces/{request_id}?format=json its spans: name, worker, span id, parent id, start and end in ms after
                                         the request reached the gateway, attributes
    GET /traces/{request_id}?format=text the waterfall as `moemesh trace` prints it

`trace_routes(view)` returns the aiohttp routes; the gateway's HTTP app mounts them."""

from __future__ import annotations

from aiohttp import web

from moemesh.services.gateway.traces import TraceView
from moemesh.telemetry import waterfall

FORMATS = ("html", "json", "text")


def trace_routes(view: TraceView) -> list[web.RouteDef]:
    async def index(request: web.Request) -> web.Response:
        fmt = _format(request)
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            limit = -1
        if limit < 1:
            return _error(400, f"limit={request.query['limit']!r} must be an integer >= 1")
        summaries = [entry.summary() for entry in view.recent(limit)]
        if fmt == "json":
            return web.json_response({"traces": summaries})
        if fmt == "text":
            lines = [
                f"{s['request_id']}  TTFT {s['ttft_ms']} ms  total {s['total_ms']} ms" for s in summaries
            ]
            return web.Response(text="\n".join(lines) + "\n")
        return web.Response(text=waterfall.index_page(summaries), content_type="text/html")

    async def one(request: web.Request) -> web.Response:
        fmt = _format(request)
        if fmt not in FORMATS:
            return _error(400, f"format={fmt!r} must be one of {', '.join(FORMATS)}")
        request_id = request.match_info["request_id"]
        entry = await view.gather(request_id)
        if entry is None:
            return _error(404, f"request_id={request_id!r} is not among the last {view.store.max_requests} "
                               "requests traced here")  # fmt: skip
        trace = entry.to_json()
        if fmt == "json":
            return web.json_response(trace)
        if fmt == "text":
            return web.Response(text=waterfall.text(trace) + "\n")
        return web.Response(text=waterfall.page(trace), content_type="text/html")

    return [web.get("/traces", index), web.get("/traces/{request_id}", one)]


def _format(request: web.Request) -> str:
    fmt = request.query.get("format")
    if fmt is None and "application/json" in request.headers.get("Accept", ""):
        return "json"
    return fmt or "html"


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "code": status}}, status=status)
