"""Every role's HTTP port: `/metrics` (Prometheus text format) served by aiohttp in the role's own event loop,
and the worker stats it reports at each scrape.

    async with serve_http(metrics_app(registry), config.host, config.http_port):   # port 0: no HTTP at all
        ... the role serves ...
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry

from moemesh.engine.engine import Engine
from moemesh.telemetry.metrics import (
    CONTENT_TYPE,
    WorkerStats,
    WorkerStatsCollector,
    new_registry,
    register_build_info,
    render,
)

log = logging.getLogger(__name__)
SHUTDOWN_GRACE_S = 2.0  # open HTTP requests (streams) get this long when the role stops


def metrics_route(registry: CollectorRegistry) -> web.RouteDef:
    async def metrics(request: web.Request) -> web.Response:
        response = web.Response(body=render(registry))
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    return web.get("/metrics", metrics)


def metrics_app(registry: CollectorRegistry) -> web.Application:
    """A worker's HTTP app: `/metrics` only."""
    app = web.Application()
    app.add_routes([metrics_route(registry)])
    return app


@contextlib.asynccontextmanager
async def serve_http(app: web.Application, host: str, port: int) -> AsyncIterator[int | None]:
    """Serves `app` on host:port for the block's duration; yields the bound port (None when port is 0: off).
    A client that goes away cancels its handler (a streamed request stops on the workers too)."""
    if port == 0:
        yield None
        return
    runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True,
                           shutdown_timeout=SHUTDOWN_GRACE_S)  # fmt: skip
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        bound = runner.addresses[0][1]
        log.info("http on http://%s:%d (/metrics)", host, bound)
        yield bound
    finally:
        await runner.cleanup()


def worker_registry(
    role: str, model: str, device: str, stats: Callable[[], WorkerStats]
) -> CollectorRegistry:
    """A worker's registry: build info and its engine's live stats (read at each scrape)."""
    registry = new_registry()
    register_build_info(registry, version=importlib.metadata.version("moemesh"), role=role, model=model,
                        device=device)  # fmt: skip
    registry.register(WorkerStatsCollector(stats))
    return registry


def engine_stats(engine: Engine, pages_leased: Callable[[], int] | None = None) -> Callable[[], WorkerStats]:
    """A `WorkerStats` reader over the engine's counters (read on the event loop while the engine thread
    steps: each number is a length or an int, so a scrape never waits for a step)."""

    def read() -> WorkerStats:
        s = engine.stats()
        return WorkerStats(
            num_running=s["num_running"], num_waiting=s["num_waiting"], pages_total=s["pages_total"],
            pages_free=s["pages_free"], pages_cached=s["pages_cached"],
            prefix_hit_tokens=s["prefix_hit_tokens"], prefill_tokens_computed=s["prefill_tokens_computed"],
            num_preemptions=s["num_preemptions"], num_steps=s["num_steps"],
            pages_leased=pages_leased() if pages_leased is not None else None,
        )  # fmt: skip

    return read
