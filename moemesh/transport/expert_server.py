"""The expert-pool worker's end of the expert wire over ucxx (bytes in expert_wire.py).

A UcxListener; each connected attention worker gets a loop that reads batch headers and their payloads in
order, and hands every batch to `compute` as its own task, so a slow batch never holds the next one's receive.
A batch that fails (a bad header, an unknown layer, an expert it does not host) is answered with an error
frame naming why, and the connection stays up; a payload that does not arrive within `recv_timeout_s` drops
the connection (UCX cancels its requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import torch

from moemesh._proto.v1 import expert_pb2
from moemesh.transport.errors import StalePlacement, status_code_number, status_for
from moemesh.transport.expert_buffers import RecvBuffers, device_or_host
from moemesh.transport.expert_hops import HopLog
from moemesh.transport.expert_wire import (
    FRAME_BYTES,
    TAG_HEADER,
    ExpertBatch,
    output_tag,
    pack_frame,
    payload_bytes,
    payload_tag,
    result_tag,
    unpack_frame,
)
from moemesh.transport.ucx import UcxListener, UcxOptions, as_ucx_buffer

log = logging.getLogger(__name__)

# -> bf16 [num_slots, hidden], fully written when it returns (a CUDA result: its stream synchronized), so the
# server sends it without a sync of its own on the event loop (which would also wait for other batches' kernels)
ExpertCompute = Callable[[ExpertBatch], Awaitable[torch.Tensor]]


class UcxExpertServer:
    """Lifecycle: start() -> (serve) -> close(). `wire_device`: where payloads land (cpu over TCP; the GPU
    when UCX moves device memory)."""

    def __init__(
        self,
        compute: ExpertCompute,
        host: str = "127.0.0.1",
        port: int = 0,
        options: UcxOptions | None = None,
        wire_device: torch.device | str = "cpu",
        recv_timeout_s: float = 30.0,
        hop_log: HopLog | None = None,
    ) -> None:
        """hop_log: benchmarks' per-batch timestamps (srv_header, srv_payload, srv_computed, srv_sent)."""
        self.compute = compute
        self.hop_log = hop_log
        self.wire_device = torch.device(wire_device)
        self.recv_buffers = RecvBuffers(self.wire_device)  # payloads (event loop)
        self.recv_timeout_s = recv_timeout_s
        self.listener = UcxListener(self._serve, host, port, options)
        self.num_batches = 0
        self._tasks: set[asyncio.Task] = set()

    @property
    def address(self) -> str:
        return self.listener.address

    async def start(self) -> str:
        self.wire_device = await device_or_host(
            self.wire_device, self.listener.options, "receive expert tokens in"
        )
        self.recv_buffers = RecvBuffers(self.wire_device)
        address = await self.listener.start()
        log.info("expert wire listening on %s", address)
        return address

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.listener.close()

    async def _serve(self, ep: Any) -> None:
        frame = torch.empty(FRAME_BYTES, dtype=torch.uint8)
        while True:
            await ep.recv(as_ucx_buffer(frame), tag=TAG_HEADER)
            try:
                header = unpack_frame(frame, expert_pb2.ExpertBatchHeader)
                payload = self.recv_buffers.empty((payload_bytes(header),), torch.uint8)
            except (
                Exception
            ) as err:  # an unreadable header: nothing after it on this connection can be trusted
                log.warning("closing an expert connection: %s", err)
                return
            self._mark(header.micro_batch_id, "srv_header")
            try:
                async with asyncio.timeout(self.recv_timeout_s):
                    await ep.recv(as_ucx_buffer(payload), tag=payload_tag(header.micro_batch_id))
            except Exception as err:
                log.warning("expert batch %d payload not received (%s); dropping the connection",
                            header.micro_batch_id, err)  # fmt: skip
                ep.abort()
                return
            self._mark(header.micro_batch_id, "srv_payload")
            RecvBuffers.consumed_on(payload)  # compute reads it on the loop's (default) stream or syncs it
            task = asyncio.ensure_future(self._answer(ep, header, payload))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, ep: Any, header: expert_pb2.ExpertBatchHeader, payload: torch.Tensor) -> None:
        """Sends the result frame and the output rows together (an error frame comes with an empty output
        message: the client posts both receives up front)."""
        reply = expert_pb2.ExpertResultHeader(
            micro_batch_id=header.micro_batch_id, layer=header.layer, unweighted=header.unweighted
        )
        out = torch.empty(0, dtype=torch.uint8)
        try:
            computed = await self.compute(ExpertBatch.from_wire(header, payload))  # written: compute synced
            rows = computed.to(self.wire_device, torch.bfloat16).contiguous()
            if rows.is_cuda and rows is not computed:  # a copy queued here (another dtype or device)
                torch.cuda.current_stream(rows.device).synchronize()
            reply.num_tokens = header.num_tokens
            reply.payloads.append(
                expert_pb2.PayloadSpec(kind=expert_pb2.PAYLOAD_KIND_OUTPUT, num_bytes=rows.numel() * 2)
            )
            out = rows.view(torch.uint8)
            self.num_batches += 1
        except Exception as err:
            code, message = status_for(err)
            level = logging.INFO if isinstance(err, StalePlacement) else logging.WARNING  # a rebalance's
            log.log(
                level, "expert batch %d of layer %d failed: %s", header.micro_batch_id, header.layer, message
            )
            reply.error, reply.error_code = message or code.name, status_code_number(code)
        self._mark(header.micro_batch_id, "srv_computed")
        with contextlib.suppress(Exception):  # a lost client learns from its own failed exchange
            await asyncio.gather(
                ep.send(as_ucx_buffer(pack_frame(reply)), tag=result_tag(header.micro_batch_id)),
                ep.send(as_ucx_buffer(out), tag=output_tag(header.micro_batch_id)),
            )
        self._mark(header.micro_batch_id, "srv_sent")

    def _mark(self, batch_id: int, event: str) -> None:
        if self.hop_log is not None:
            self.hop_log.mark(batch_id, event)
