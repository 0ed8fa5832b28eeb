"""UCX (ucxx) for moemesh: process-wide initialisation, and the KV sender and receiver over ucxx endpoints.

UCX moves host memory over TCP here, and GPU memory over cuda_ipc / NVLink or RDMA where it finds them (a CUDA
tensor goes to ucxx as is, through `__cuda_array_interface__`). On a CPU box use `UcxOptions()` (the defaults:
`tcp,self` over `lo`, blocking progress); on a GPU machine `UcxOptions(transports="", net_devices="")` lets UCX
pick. The options are passed explicitly (moemesh.config maps flags and env to them); nothing here reads env.

Wire protocol on one endpoint P -> D, per chunk (tags are scoped to the endpoint by ucxx):
    P: send header (HEADER_BYTES, tag TAG_HEADER) -> send payload (tag 4*id+2) -> recv ack (ACK_BYTES, tag 4*id+3)
    D: recv header -> inbox.admit -> recv payload into the sink's buffer (or a scratch buffer when refused)
       -> inbox.land -> send ack (accepted, or refused with the reason and message)
A payload whose receive takes longer than `recv_timeout_s` aborts the endpoint (UCX cancels its requests, so
nothing can land late), and the sender reconnects on its next send.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moemesh.transport.errors import DeadlineExceeded, LeaseRefused, Unavailable
from moemesh.transport.kv import KvTarget
from moemesh.transport.kv_inbox import KvInbox
from moemesh.transport.kv_wire import (
    ACK_BYTES,
    HEADER_BYTES,
    ChunkHeader,
    RefusalReason,
    make_header,
    pack_ack,
    unpack_ack,
)

log = logging.getLogger(__name__)

TAG_HEADER = 1


def _data_tag(transfer_id: int) -> int:
    return 4 * transfer_id + 2


def _ack_tag(transfer_id: int) -> int:
    return 4 * transfer_id + 3


@dataclass(frozen=True)
class UcxOptions:
    transports: str = "tcp,self"  # UCX_TLS; "" lets UCX choose (cuda_ipc, rc, ... on GPU machines)
    net_devices: str = "lo"  # UCX_NET_DEVICES; "" = all
    progress_mode: str = "blocking"  # "blocking" | "polling" | "thread"
    connect_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.progress_mode not in ("blocking", "polling", "thread"):
            raise ValueError(
                f"progress_mode={self.progress_mode!r} must be 'blocking', 'polling' or 'thread'"
            )

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
            ucxx.init(options=options.ucx_options(), progress_mode=options.progress_mode)
            cls._options = options
        elif cls._options != options:
            raise RuntimeError(f"UCX already runs with {cls._options}, cannot switch to {options}")
        return ucxx

    @classmethod
    def reset(cls) -> None:
        """Shuts UCX down (every endpoint and listener must be closed first). Tests use it between cases."""
        import ucxx

        if cls._options is not None:
            ucxx.reset()
            cls._options = None


def _wire(tensor: torch.Tensor) -> Any:
    """What ucxx accepts: a numpy view of a CPU tensor, a CUDA tensor as is."""
    return tensor.numpy() if tensor.device.type == "cpu" else tensor


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"UCX address {address!r} must be 'host:port'")
    return host, int(port)


class UcxKvReceiver:
    """D's end: a ucxx listener; each connected sender gets a loop reading chunk headers."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        options: UcxOptions | None = None,
        clock: Callable[[], float] = time.monotonic,
        recv_timeout_s: float = 60.0,
    ) -> None:
        self.host = host
        self.port = port
        self.options = options or UcxOptions()
        self.inbox = KvInbox(clock)
        self.recv_timeout_s = recv_timeout_s
        self.address = ""
        self._listener: Any = None
        self._endpoints: set[Any] = set()
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> str:
        ucxx = UcxRuntime.ensure(self.options)
        self._listener = ucxx.create_listener(self._serve, port=self.port)
        self.address = f"{self.host}:{self._listener.port}"
        log.info("KV receiver listening on %s", self.address)
        return self.address

    async def close(self) -> None:
        for ep in list(self._endpoints):
            ep.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _ in range(200):  # let each connection's handler see its aborted endpoint and retire
            if not self._endpoints and (self._listener is None or self._listener.active_clients == 0):
                break
            await asyncio.sleep(0.005)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    async def _serve(self, ep: Any) -> None:
        self._endpoints.add(ep)
        raw = torch.empty(HEADER_BYTES, dtype=torch.uint8)
        try:
            while True:
                await ep.recv(_wire(raw), tag=TAG_HEADER)
                try:
                    header = ChunkHeader.unpack(raw.numpy().tobytes())
                except ValueError as err:
                    log.warning("closing a KV connection: %s", err)
                    return
                task = asyncio.ensure_future(self._receive(ep, header))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except Exception as err:  # the peer closed or the endpoint was aborted
            log.debug("KV connection ended: %s", err)
        finally:
            self._endpoints.discard(ep)
            if not ep.closed:
                ep.abort()

    async def _receive(self, ep: Any, header: ChunkHeader) -> None:
        try:
            admission = self.inbox.admit(header)
        except LeaseRefused as err:
            reason = RefusalReason(err.reason or RefusalReason.RECEIVER_ERROR)
            scratch = torch.empty(header.num_bytes, dtype=torch.uint8)  # drain the payload, then refuse
            if await self._recv_payload(ep, header, scratch):
                await self._ack(ep, header, reason, str(err))
            return
        if not await self._recv_payload(ep, header, admission.buffer):
            self.inbox.abandon(admission)
            return
        try:
            self.inbox.land(admission)
        except LeaseRefused as err:
            await self._ack(ep, header, RefusalReason(err.reason or RefusalReason.RECEIVER_ERROR), str(err))
            return
        await self._ack(ep, header, RefusalReason.ACCEPTED, "")

    async def _recv_payload(self, ep: Any, header: ChunkHeader, buffer: torch.Tensor) -> bool:
        try:
            await asyncio.wait_for(
                ep.recv(_wire(buffer), tag=_data_tag(header.transfer_id)), self.recv_timeout_s
            )
            return True
        except Exception as err:
            # Abort: UCX cancels the endpoint's requests, so the buffer is never written after this.
            log.warning(
                "KV payload of lease %s not received (%s); dropping the connection", header.lease, err
            )
            ep.abort()
            return False

    async def _ack(self, ep: Any, header: ChunkHeader, reason: RefusalReason, message: str) -> None:
        reply = torch.frombuffer(bytearray(pack_ack(header.transfer_id, reason, message)), dtype=torch.uint8)
        with contextlib.suppress(Exception):  # a lost sender learns from its own failed receive
            await ep.send(_wire(reply), tag=_ack_tag(header.transfer_id))


class UcxKvSender:
    """P's end: one cached ucxx endpoint per receiver address."""

    def __init__(self, options: UcxOptions | None = None, checksum: bool = False, timeout_s: float = 60.0):
        """timeout_s bounds each chunk's whole exchange: header, payload and ack."""
        self.options = options or UcxOptions()
        self.checksum = checksum
        self.timeout_s = timeout_s
        self.bytes_sent = 0
        self._endpoints: dict[str, Any] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._ids = itertools.count(1)
        self._inflight: set[asyncio.Task] = set()

    async def connect(self, address: str) -> None:
        await self._endpoint(address)

    async def send(self, target: KvTarget, layer: int, first_page: int, pages: torch.Tensor) -> int:
        header, data = make_header(target, layer, first_page, pages, next(self._ids), self.checksum)
        ep = await self._endpoint(target.address)
        # Shielded: once the header is out, the payload and the ack follow even if the caller is cancelled, so
        # the receiver never waits on a payload that cannot come. close() awaits what is still in flight.
        exchange = asyncio.ensure_future(self._exchange(ep, target.address, header, data))
        self._inflight.add(exchange)
        exchange.add_done_callback(self._inflight.discard)
        _, reason, message = await asyncio.shield(exchange)
        if reason is not RefusalReason.ACCEPTED:
            raise LeaseRefused(message or f"receiver refused the write: {reason.name}", reason)
        self.bytes_sent += header.num_bytes
        return header.num_bytes

    async def close(self) -> None:
        await asyncio.gather(*self._inflight, return_exceptions=True)
        for ep in self._endpoints.values():
            try:
                await asyncio.wait_for(ep.close(), 2.0)
            except Exception:  # an unresponsive peer: drop the connection
                ep.abort()
        self._endpoints.clear()

    async def _exchange(
        self, ep: Any, address: str, header: ChunkHeader, data: torch.Tensor
    ) -> tuple[int, RefusalReason, str]:
        raw = torch.frombuffer(bytearray(header.pack()), dtype=torch.uint8)
        ack = torch.zeros(ACK_BYTES, dtype=torch.uint8)

        async def wire() -> None:
            await ep.send(_wire(raw), tag=TAG_HEADER)
            await ep.send(_wire(data), tag=_data_tag(header.transfer_id))  # rendezvous: needs D to progress
            await ep.recv(_wire(ack), tag=_ack_tag(header.transfer_id))

        try:
            await asyncio.wait_for(wire(), self.timeout_s)
        except TimeoutError:
            self._drop(address, ep)  # aborting the endpoint cancels its requests: nothing lands later
            raise DeadlineExceeded(
                f"KV chunk to {address} not acknowledged after {self.timeout_s} s"
            ) from None
        except Exception as err:
            self._drop(address, ep)
            raise Unavailable(f"KV transfer to {address} failed: {err}") from err
        return unpack_ack(ack.numpy().tobytes())

    async def _endpoint(self, address: str) -> Any:
        lock = self._locks.setdefault(address, asyncio.Lock())
        async with lock:
            ep = self._endpoints.get(address)
            if ep is not None and not ep.closed:
                return ep
            ucxx = UcxRuntime.ensure(self.options)
            host, port = _split(address)
            try:
                ep = await ucxx.create_endpoint(host, port, connect_timeout=self.options.connect_timeout_s)
            except Exception as err:
                raise Unavailable(f"cannot reach KV receiver at {address}: {err}") from err
            self._endpoints[address] = ep
            return ep

    def _drop(self, address: str, ep: Any) -> None:
        if self._endpoints.get(address) is ep:
            del self._endpoints[address]
        with contextlib.suppress(Exception):
            ep.abort()
