"""The KV sender and receiver over ucxx (see kv.py for the transfer's lifecycle, kv_wire.py for the bytes).

Per chunk, on one endpoint P -> D (tags are scoped to the endpoint by ucxx, so two senders' ids never mix):
    P: send header (HEADER_BYTES, tag TAG_HEADER), its segments (`plan_segments`: one per layer and run of
       consecutive destination pages, or one staged, tag _data_tag(id, i)) and recv the ack (ACK_BYTES), all
       posted at once
    D: recv header -> inbox.admit -> recv every segment into the sink's buffers (the pages themselves, or
       pooled staging) -> inbox.land -> send ack (accepted, or refused with the reason and message)
A chunk of several layers and few page runs is a few large messages and one round trip. A refused header's
segments are drained into one reused host buffer (never an allocation sized by the header); a header claiming
more than MAX_CHUNK_BYTES or MAX_SEGMENTS is hostile: D drops the connection. A payload D does not get within
`recv_timeout_s` aborts the endpoint (UCX cancels its requests, so nothing can land late). On P, `timeout_s`
bounds each chunk's whole exchange: a stalled receiver costs one DeadlineExceeded, never a hang, and the next
send reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from moemesh.transport.errors import DeadlineExceeded, LeaseRefused, Unavailable
from moemesh.transport.kv import KvTarget
from moemesh.transport.kv_inbox import KvInbox
from moemesh.transport.kv_wire import (
    ACK_BYTES,
    HEADER_BYTES,
    MAX_CHUNK_BYTES,
    MAX_SEGMENTS,
    ChunkHeader,
    RefusalReason,
    Segment,
    make_header,
    pack_ack,
    unpack_ack,
)
from moemesh.transport.ucx import UcxEndpointPool, UcxListener, UcxOptions, as_ucx_buffer

log = logging.getLogger(__name__)

TAG_HEADER = 1


_SEGMENT_BITS = 12  # MAX_SEGMENTS < 2**12


def _data_tag(transfer_id: int, segment: int = 0) -> int:
    return 4 * ((transfer_id << _SEGMENT_BITS) + segment) + 2


def _ack_tag(transfer_id: int) -> int:
    return 4 * (transfer_id << _SEGMENT_BITS) + 3


class UcxKvReceiver:
    """D's end: a UcxListener; each connected sender gets a loop reading chunk headers."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        options: UcxOptions | None = None,
        clock: Callable[[], float] = time.monotonic,
        recv_timeout_s: float = 60.0,
    ) -> None:
        self.inbox = KvInbox(clock)
        self.recv_timeout_s = recv_timeout_s
        self.listener = UcxListener(self._serve, host, port, options)
        self._tasks: set[asyncio.Task] = set()
        self._drain_buffer = torch.empty(0, dtype=torch.uint8)  # refused chunks' bytes go here, reused
        self._drain_lock = asyncio.Lock()
        self.num_hostile_headers = 0  # connections dropped for a header over the limits

    @property
    def address(self) -> str:
        return self.listener.address

    async def start(self) -> str:
        address = await self.listener.start()
        log.info("KV receiver listening on %s", address)
        return address

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.listener.close()

    async def _serve(self, ep: Any) -> None:
        raw = torch.empty(HEADER_BYTES, dtype=torch.uint8)
        while not ep.closed:  # a failed payload aborts the endpoint: stop reading it, never touch it again
            await ep.recv(as_ucx_buffer(raw), tag=TAG_HEADER)
            try:
                header = ChunkHeader.unpack(raw.numpy().tobytes())
            except ValueError as err:
                log.warning("closing a KV connection: %s", err)
                return
            if header.num_bytes > MAX_CHUNK_BYTES or not 1 <= header.num_segments <= MAX_SEGMENTS:
                log.warning("closing a KV connection: a header for lease %s claims %d bytes in %d segments "
                            "(at most %d in %d)", header.lease, header.num_bytes, header.num_segments,
                            MAX_CHUNK_BYTES, MAX_SEGMENTS)  # fmt: skip
                self.num_hostile_headers += 1
                return
            task = asyncio.ensure_future(self._receive(ep, header))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _receive(self, ep: Any, header: ChunkHeader) -> None:
        try:
            admission = self.inbox.admit(header)
        except LeaseRefused as err:
            reason = RefusalReason(err.reason or RefusalReason.RECEIVER_ERROR)
            if await self._drain(ep, header):
                await self._ack(ep, header, reason, str(err))
            return
        if not await self._recv_payload(ep, header, admission.buffers):
            self.inbox.abandon(admission)
            return
        try:
            self.inbox.land(admission)
        except LeaseRefused as err:
            await self._ack(ep, header, RefusalReason(err.reason or RefusalReason.RECEIVER_ERROR), str(err))
            return
        await self._ack(ep, header, RefusalReason.ACCEPTED, "")

    async def _drain(self, ep: Any, header: ChunkHeader) -> bool:
        """A refused chunk's segments, one after the other, into the one reused host buffer (each segment is
        at most header.num_bytes <= MAX_CHUNK_BYTES)."""
        async with self._drain_lock:
            if self._drain_buffer.numel() < header.num_bytes:
                self._drain_buffer = torch.empty(header.num_bytes, dtype=torch.uint8)
            for i in range(header.num_segments):
                if not await self._recv_payload(ep, header, [self._drain_buffer], first_segment=i):
                    return False
            return True

    async def _recv_payload(
        self, ep: Any, header: ChunkHeader, buffers: list[torch.Tensor], first_segment: int = 0
    ) -> bool:
        try:
            recvs = [ep.recv(as_ucx_buffer(b), tag=_data_tag(header.transfer_id, first_segment + i))
                     for i, b in enumerate(buffers)]  # fmt: skip
            async with asyncio.timeout(self.recv_timeout_s):  # in this task: no task of its own per chunk
                await (recvs[0] if len(recvs) == 1 else asyncio.gather(*recvs))
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
        with contextlib.suppress(Exception):  # a lost sender learns from its own failed exchange
            await ep.send(as_ucx_buffer(reply), tag=_ack_tag(header.transfer_id))


class UcxKvSender:
    """P's end: a UcxEndpointPool, one endpoint per receiver address."""

    def __init__(self, options: UcxOptions | None = None, checksum: bool = False, timeout_s: float = 60.0):
        """timeout_s bounds each chunk's whole exchange: header, payload and ack."""
        self.pool = UcxEndpointPool(options)
        self.checksum = checksum
        self.timeout_s = timeout_s
        self.bytes_sent = 0
        self._ids = itertools.count(1)
        self._inflight: set[asyncio.Task] = set()

    async def connect(self, address: str) -> None:
        await self.pool.get(address)

    async def send(
        self, target: KvTarget, layer: int, first_page: int, pages: torch.Tensor, num_layers: int = 1
    ) -> int:
        header, data, segments = make_header(
            target, layer, first_page, pages, next(self._ids), self.checksum, num_layers
        )
        ep = await self.pool.get(target.address)
        # Shielded: once the header is out, the payload and the ack follow even if the caller is cancelled, so
        # the receiver never waits on a payload that cannot come. close() awaits what is still in flight.
        exchange = asyncio.ensure_future(self._exchange(ep, target.address, header, data, segments))
        self._inflight.add(exchange)
        exchange.add_done_callback(self._inflight.discard)
        _, reason, message = await asyncio.shield(exchange)
        if reason is not RefusalReason.ACCEPTED:
            raise LeaseRefused(message or f"receiver refused the write: {reason.name}", reason)
        self.bytes_sent += header.num_bytes
        return header.num_bytes

    async def close(self) -> None:
        await asyncio.gather(*self._inflight, return_exceptions=True)
        await self.pool.close()

    async def _exchange(
        self, ep: Any, address: str, header: ChunkHeader, data: torch.Tensor, segments: list[Segment]
    ) -> tuple[int, RefusalReason, str]:
        raw = torch.frombuffer(bytearray(header.pack()), dtype=torch.uint8)
        ack = torch.zeros(ACK_BYTES, dtype=torch.uint8)

        async def wire() -> None:
            # Header, payload and ack all posted at once, in that order (no wait for the header's completion:
            # one hop less). The payload's rendezvous waits for D to post its receives, after the header.
            await asyncio.gather(
                ep.send(as_ucx_buffer(raw), tag=TAG_HEADER),
                *(ep.send(as_ucx_buffer(data[s.offset_bytes : s.offset_bytes + s.num_bytes]),
                          tag=_data_tag(header.transfer_id, i)) for i, s in enumerate(segments)),
                ep.recv(as_ucx_buffer(ack), tag=_ack_tag(header.transfer_id)),
            )  # fmt: skip

        try:
            async with asyncio.timeout(self.timeout_s):  # in this task: no task of its own per chunk
                await wire()
        except TimeoutError:
            self.pool.drop(address, ep)  # aborting the endpoint cancels its requests: nothing lands later
            raise DeadlineExceeded(
                f"KV chunk to {address} not acknowledged after {self.timeout_s} s"
            ) from None
        except Exception as err:
            self.pool.drop(address, ep)
            if (
                ep.closed
            ):  # another chunk's failure aborted the shared endpoint (ucxx: "'NoneType' ... raise_on_error")
                raise Unavailable(f"KV transfer to {address} failed: its connection was closed by an earlier "
                                  f"failure on it ({type(err).__name__})") from err  # fmt: skip
            raise Unavailable(f"KV transfer to {address} failed: {err}") from err
        return unpack_ack(ack.numpy().tobytes())
