"""UCX (ucxx) plumbing for moemesh: process-wide initialisation, a listener that tracks its connections, and a
pool of client endpoints by address. The KV transfer (kv_ucx.py) and, later, the expert wire build on these.

UCX moves host memory over TCP here, and GPU memory over cuda_ipc / NVLink or RDMA where it finds them (a CUDA
tensor goes to ucxx as is, through `__cuda_array_interface__`). On a CPU box use `UcxOptions()` (the defaults:
`tcp,self` over `lo`, blocking progress); on a GPU machine `UcxOptions(transports="", net_devices="")` lets UCX
pick. The options are passed explicitly (moemesh.config maps flags and env to them); nothing here reads env.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import torch

from moemesh.transport.errors import Unavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UcxOptions:
    transports: str = "tcp,self"  # UCX_TLS; "" lets UCX choose (cuda_ipc, rc, ... on GPU machines)
    net_devices: str = "lo"  # UCX_NET_DEVICES; "" = all
    progress_mode: str = "blocking"  # "blocking" | "polling" | "thread"
    connect_timeout_s: float = 5.0
    # "thread" only: ucxx's notifier thread completes each request's asyncio future. Without it a pending
    # request (a receiver always has one) is polled from the event loop: ~0.5 core per process while idle.
    notifier_thread: bool = False

    def __post_init__(self) -> None:
        if self.progress_mode not in ("blocking", "polling", "thread"):
            raise ValueError(
                f"progress_mode={self.progress_mode!r} must be 'blocking', 'polling' or 'thread'"
            )
        if self.notifier_thread and self.progress_mode != "thread":
            raise ValueError(f"notifier_thread=True needs progress_mode='thread', not {self.progress_mode!r}")

    def ucx_options(self) -> dict[str, str]:
        options = {"WARN_UNUSED_ENV_VARS": "n"}
        if self.transports:
            options["TLS"] = self.transports
        if self.net_devices:
            options["NET_DEVICES"] = self.net_devices
        return options


class UcxRuntime:
    """ucxx keeps one UCX context per process; this records which options it was started with, so a second
    caller with other options gets a clear error instead of silently different transports."""

    _options: UcxOptions | None = None

    @classmethod
    def ensure(cls, options: UcxOptions) -> Any:
        import ucxx

        if cls._options is None:
            ucxx.init(
                options=options.ucx_options(),
                progress_mode=options.progress_mode,
                enable_python_future=options.notifier_thread,
            )
            cls._options = options
        elif cls._options != options:
            raise RuntimeError(f"UCX already runs with {cls._options}, cannot switch to {options}")
        return ucxx

    @classmethod
    def stop_notifier(cls) -> None:
        """Stops ucxx's notifier thread (what keeps a process from exiting) without shutting UCX down."""
        import ucxx

        if cls._options is not None:
            ucxx.core.stop_notifier_thread()

    @classmethod
    def reset(cls) -> None:
        """Shuts UCX down (every endpoint and listener must be closed first)."""
        import ucxx

        if cls._options is not None:
            ucxx.reset()
            cls._options = None


def as_ucx_buffer(tensor: torch.Tensor) -> Any:
    """What ucxx sends from / receives into: a numpy view of a contiguous CPU tensor, a CUDA tensor as is."""
    return tensor.numpy() if tensor.device.type == "cpu" else tensor


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"UCX address {address!r} must be 'host:port'")
    return host, int(port)


class UcxListener:
    """Accepts connections and runs `handler(endpoint)` for each until it returns or the peer goes.

    close() aborts every connection (UCX cancels their pending requests), waits for the handlers to retire,
    then stops listening. `address` is "host:port" with the port UCX bound."""

    def __init__(
        self,
        handler: Callable[[Any], Awaitable[None]],
        host: str = "127.0.0.1",
        port: int = 0,
        options: UcxOptions | None = None,
    ) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.options = options or UcxOptions()
        self.address = ""
        self.endpoints: set[Any] = set()
        self._listener: Any = None

    async def start(self) -> str:
        ucxx = UcxRuntime.ensure(self.options)
        self._listener = ucxx.create_listener(self._serve, port=self.port)
        self.address = f"{self.host}:{self._listener.port}"
        return self.address

    async def close(self) -> None:
        for ep in list(self.endpoints):
            ep.abort()
        for _ in range(200):  # let each handler see its aborted endpoint and retire
            if not self.endpoints and (self._listener is None or self._listener.active_clients == 0):
                break
            await asyncio.sleep(0.005)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def _serve(self, ep: Any) -> None:
        self.endpoints.add(ep)
        try:
            await self.handler(ep)
        except Exception as err:  # the peer closed or the endpoint was aborted
            log.debug("UCX connection on %s ended: %s", self.address, err)
        finally:
            self.endpoints.discard(ep)
            if not ep.closed:
                ep.abort()


class UcxEndpointPool:
    """One client endpoint per peer address, made once (at handshake) and reused; `drop()` after a failure so
    the next `get()` reconnects."""

    def __init__(self, options: UcxOptions | None = None) -> None:
        self.options = options or UcxOptions()
        self._endpoints: dict[str, Any] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def addresses(self) -> set[str]:
        return set(self._endpoints)

    async def get(self, address: str) -> Any:
        """The endpoint to `address`; raises Unavailable when it cannot be reached."""
        lock = self._locks.setdefault(address, asyncio.Lock())
        async with lock:
            ep = self._endpoints.get(address)
            if ep is not None and not ep.closed:
                return ep
            ucxx = UcxRuntime.ensure(self.options)
            host, port = split_address(address)
            try:
                ep = await ucxx.create_endpoint(host, port, connect_timeout=self.options.connect_timeout_s)
            except Exception as err:
                raise Unavailable(f"cannot reach UCX peer at {address}: {err}") from err
            self._endpoints[address] = ep
            return ep

    def drop(self, address: str, ep: Any) -> None:
        """Forgets and aborts `ep` (if it is still the pooled one for `address`)."""
        if self._endpoints.get(address) is ep:
            del self._endpoints[address]
        with contextlib.suppress(Exception):
            ep.abort()

    async def close(self) -> None:
        for ep in self._endpoints.values():
            try:
                await asyncio.wait_for(ep.close(), 2.0)
            except Exception:  # an unresponsive peer: drop the connection
                ep.abort()
        self._endpoints.clear()


async def probe_device_memory(
    options: UcxOptions, device: torch.device, timeout_s: float = 10.0
) -> str | None:
    """Sends 64 KiB of `device` memory to ourselves over UCX with `options` (what a KV transfer does) and
    compares it. Returns None when it arrived intact, else why not (UCX built without CUDA, transports that
    cannot carry device memory, ...). CPU memory is always fine over TCP; call it at start-up."""
    if device.type == "cpu":
        return None
    sent = torch.arange(1 << 16, dtype=torch.int32, device=device).to(torch.uint8)
    got = torch.zeros_like(sent)
    done = asyncio.Event()

    async def serve(ep: Any) -> None:
        await ep.recv(as_ucx_buffer(got), tag=7)
        done.set()

    listener = UcxListener(serve, "127.0.0.1", 0, options)
    pool = UcxEndpointPool(options)
    try:
        address = await listener.start()
        ep = await pool.get(address)
        torch.cuda.synchronize(device)
        await asyncio.wait_for(ep.send(as_ucx_buffer(sent), tag=7), timeout_s)
        await asyncio.wait_for(done.wait(), timeout_s)
        if not torch.equal(sent, got):
            return f"the bytes arrived changed (UCX_TLS={options.transports!r})"
        return None
    except Exception as err:
        return f"{type(err).__name__}: {err} (UCX_TLS={options.transports!r})"
    finally:
        with contextlib.suppress(Exception):
            await pool.close()
        with contextlib.suppress(Exception):
            await listener.close()
