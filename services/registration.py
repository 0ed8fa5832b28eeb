"""How every worker role runs once composed: its background loops and its registration with the gateway in
one TaskGroup, SERVING once registered, until SIGTERM / SIGINT; then it deregisters and stops."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from moemesh.config.mesh import WorkerConfig
from moemesh.transport.channels import MeshChannels
from moemesh.transport.peers import WorkerInfo
from moemesh.transport.registry import LoadReport, RegistryClient
from moemesh.transport.server import MeshServer, serve_until_signalled

log = logging.getLogger(__name__)


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
    client = RegistryClient(channel, me, load, on_members) if channel is not None else None
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(coro) for coro in background]
            if client is not None:
                tasks.append(tg.create_task(client.run()))
                await client.registered.wait()
                log.info("%s registered with %s", me.worker_id, config.registry)
            await serve_until_signalled(server)
            if client is not None:
                await client.deregister()
            for task in tasks:
                task.cancel()
    finally:
        if channel is not None:
            await channel.close()
