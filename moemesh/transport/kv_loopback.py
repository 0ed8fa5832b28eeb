"""The in-process fake of the KV transport: a sender and receivers that find each other by address inside one
`LoopbackFabric` and move real tensors (a copy into the receiver's buffer, across devices when they differ),
through the same KvInbox state machine, headers, checksums and refusals as the UCX transport.

    fabric = LoopbackFabric()
    receiver = fabric.receiver("d0");  await receiver.start()
    sender = fabric.sender();          await sender.connect(receiver.address)
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable

import torch

from moemesh.transport.errors import LeaseRefused, Unavailable
from moemesh.transport.kv import KvTarget
from moemesh.transport.kv_inbox import KvInbox
from moemesh.transport.kv_wire import make_header


class LoopbackFabric:
    """The 'network': receivers by address."""

    def __init__(self) -> None:
        self.receivers: dict[str, LoopbackKvReceiver] = {}
        self._names = itertools.count()

    def receiver(
        self, address: str | None = None, clock: Callable[[], float] = time.monotonic
    ) -> LoopbackKvReceiver:
        return LoopbackKvReceiver(self, address or f"loopback:{next(self._names)}", KvInbox(clock))

    def sender(self, checksum: bool = False) -> LoopbackKvSender:
        return LoopbackKvSender(self, checksum)


class LoopbackKvReceiver:
    def __init__(self, fabric: LoopbackFabric, address: str, inbox: KvInbox) -> None:
        self.fabric = fabric
        self.address = address
        self.inbox = inbox

    async def start(self) -> str:
        if self.address in self.fabric.receivers:
            raise OSError(f"address {self.address} is in use")
        self.fabric.receivers[self.address] = self
        return self.address

    async def close(self) -> None:
        self.fabric.receivers.pop(self.address, None)


class LoopbackKvSender:
    def __init__(self, fabric: LoopbackFabric, checksum: bool) -> None:
        self.fabric = fabric
        self.checksum = checksum
        self._connected: set[str] = set()
        self._ids = itertools.count(1)
        self.bytes_sent = 0

    async def connect(self, address: str) -> None:
        if address not in self.fabric.receivers:
            raise Unavailable(f"no KV receiver at {address}")
        self._connected.add(address)

    async def send(
        self, target: KvTarget, layer: int, first_page: int, pages: torch.Tensor, num_layers: int = 1
    ) -> int:
        header, data, segments = make_header(
            target, layer, first_page, pages, next(self._ids), self.checksum, num_layers
        )
        if target.address not in self._connected:
            await self.connect(target.address)
        receiver = self.fabric.receivers.get(target.address)
        if receiver is None:
            raise Unavailable(f"KV receiver at {target.address} is gone")
        try:
            admission = receiver.inbox.admit(header)
        except LeaseRefused as err:
            raise LeaseRefused(str(err), err.reason) from None  # the receiver's message, as over UCX
        try:
            await asyncio.sleep(0)  # the bytes are "on the wire": the receiver's loop may run meanwhile
            for seg, buffer in zip(segments, admission.buffers, strict=True):
                buffer.copy_(data[seg.offset_bytes : seg.offset_bytes + seg.num_bytes])
        except BaseException:
            receiver.inbox.abandon(admission)
            raise
        receiver.inbox.land(admission)
        self.bytes_sent += header.num_bytes
        return header.num_bytes

    async def close(self) -> None:
        self._connected.clear()
