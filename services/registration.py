"""How every worker role runs once composed: its background loops and its registration with the gateway in
one TaskGroup, SERVING once registered, until SIGTERM / SIGINT; then it deregisters and stops. A worker the registry refuses
(another mesh's, or a name a live worker holds) logs why and exits with status 3."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from moemesh.config.mesh import WorkerConfig
from moemesh.transport.channels import MeshChannels
from moemesh.transport.errors import RegistrationRefused
from moemesh.transport.peers import WorkerInfo
from moemesh.transport.registry import LoadReport, RegistryClient
from moemesh.transport.server import MeshServer, serve_until_signalled

log = logging.getLogger(__name__)


async def drain(
    me: WorkerInfo,
    server: MeshServer,
    client: RegistryClient | None,
    heartbeats: asyncio.Task | None,
    load: Callable[[], LoadReport],
    grace_s: float,
    poll_s: float = 0.05,
) -> None:
    """On SIGTERM: leave the mesh (no new requests are routed here), say NOT_SERVING, then wait until no
    request runs, waits or holds pages, `grace_s` at most. What is left is cancelled when the server stops:
    the gateway migrates a decode worker's requests, a decode worker retries a prefill worker's elsewhere."""
    if heartbeats is not None:
        heartbeats.cancel()
    if client is not None:
        await client.deregister()
    await server.set_serving(False)
    deadline = asyncio.get_running_loop().time() + grace_s
    while True:
        report = load()
        busy = (report.num_running_requests + report.num_queued_requests + report.num_queued_tokens
                + report.num_total_pages - report.num_free_pages)  # fmt: skip
        if busy == 0:
            log.info("%s drained", me.worker_id)
            return
        if asyncio.get_running_loop().time() >= deadline:
            log.warning("%s: drain grace of %s s over with %d requests running and %d waiting; stopping",
                        me.worker_id, grace_s, report.num_running_requests, report.num_queued_requests)  # fmt: skip
            return
        await asyncio.sleep(poll_s)


async def run_worker_server(
    config: WorkerConfig,
    server: MeshServer,
    me: WorkerInfo,
    load: Callable[[], LoadReport],
    background: list[Coroutine[Any, Any, None]],
    on_members: Callable[[list[WorkerInfo]], Awaitable[None]] | None = None,
) -> None:
    """`server` is started; `background` coroutines run until the worker stops (their failure stops it)."""
    channels = MeshChannels(config.security.tls_files())
    channel = channels(config.registry) if config.registry else None
    client = None
    if channel is not None:
        client = RegistryClient(channel, me, load, on_members, mesh_id=config.mesh_id)
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(coro) for coro in background]
            heartbeats = None
            if client is not None:
                heartbeats = tg.create_task(client.run())
                await client.registered.wait()
                log.info("%s registered with %s", me.worker_id, config.registry)

            async def leave() -> None:
                await drain(me, server, client, heartbeats, load, config.drain_grace_s)

            await serve_until_signalled(server, drain=leave)
            for task in tasks:
                task.cancel()
    except* RegistrationRefused as group:
        log.error("%s not admitted by %s: %s", me.worker_id, config.registry, group.exceptions[0])
        raise SystemExit(3) from None
    finally:
        if channel is not None:
            await channel.close()
