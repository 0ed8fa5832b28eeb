"""Worker identity and the P <-> D handshake (issue 6's handshake rules).

* D learns of prefill workers from the registry (Heartbeat answers) and calls `PeerSet.sync(members)`: every new
  prefill peer gets a `PrefillWorker.Handshake` *now*, not on a user's first request. Both sides compare
  `Fingerprint`s; a mismatch is refused with IncompatiblePeer (FAILED_PRECONDITION) naming each field, and the
  peer is kept out of `ready` with its error in `refused`.
* P's servicer hands Handshake requests to `HandshakeAcceptor.accept`, which checks the fingerprint and opens
  its UCX endpoint to D's receiver (`KvSender.connect`) before answering.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from moemesh._proto.v1 import worker_pb2, worker_pb2_grpc
from moemesh.transport.errors import IncompatiblePeer, MeshError, from_rpc_error
from moemesh.transport.kv import Fingerprint, KvSender

log = logging.getLogger(__name__)

ROLES = {
    "prefill": worker_pb2.WORKER_ROLE_PREFILL,
    "decode": worker_pb2.WORKER_ROLE_DECODE,
    "colocated": worker_pb2.WORKER_ROLE_COLOCATED,
    "expert": worker_pb2.WORKER_ROLE_EXPERT,
}
_ROLE_NAMES = {v: k for k, v in ROLES.items()}


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    role: str  # one of ROLES
    grpc_address: str
    ucx_address: str = ""
    fingerprint: Fingerprint | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role={self.role!r} must be one of {', '.join(ROLES)}")

    def to_proto(self) -> worker_pb2.WorkerInfo:
        msg = worker_pb2.WorkerInfo(
            worker_id=self.worker_id, role=ROLES[self.role], grpc_address=self.grpc_address,
            ucx_address=self.ucx_address,
        )  # fmt: skip
        if self.fingerprint is not None:
            msg.fingerprint.CopyFrom(self.fingerprint.to_proto())
        return msg

    @classmethod
    def from_proto(cls, msg: worker_pb2.WorkerInfo) -> WorkerInfo:
        fingerprint = Fingerprint.from_proto(msg.fingerprint) if msg.HasField("fingerprint") else None
        role = _ROLE_NAMES.get(msg.role, "")
        return cls(msg.worker_id, role, msg.grpc_address, msg.ucx_address, fingerprint)


class HandshakeAcceptor:
    """P's side of Handshake: compare fingerprints, open the KV endpoint to the caller, answer with ours."""

    def __init__(self, me: WorkerInfo, sender: KvSender) -> None:
        if me.fingerprint is None:
            raise ValueError(f"worker {me.worker_id} needs a fingerprint to accept handshakes")
        self.me = me
        self.sender = sender

    async def accept(self, request: worker_pb2.HandshakeRequest) -> worker_pb2.HandshakeResponse:
        """Raises IncompatiblePeer on a fingerprint mismatch, Unavailable when D's UCX address is unreachable."""
        assert self.me.fingerprint is not None
        peer = Fingerprint.from_proto(request.fingerprint)
        self.me.fingerprint.check_compatible(peer, f"worker {request.worker_id}")
        if request.ucx_address:
            await self.sender.connect(request.ucx_address)
        log.info("handshake with %s accepted (KV to %s)", request.worker_id, request.ucx_address or "-")
        return worker_pb2.HandshakeResponse(
            worker_id=self.me.worker_id,
            fingerprint=self.me.fingerprint.to_proto(),
            ucx_address=self.me.ucx_address,
        )


async def handshake(channel: grpc.aio.Channel, me: WorkerInfo, timeout_s: float = 10.0) -> WorkerInfo:
    """D's side: Handshake with the prefill worker behind `channel`; checks its fingerprint as well."""
    assert me.fingerprint is not None
    stub = worker_pb2_grpc.PrefillWorkerStub(channel)
    request = worker_pb2.HandshakeRequest(
        worker_id=me.worker_id,
        role=ROLES[me.role],
        fingerprint=me.fingerprint.to_proto(),
        ucx_address=me.ucx_address,
    )
    try:
        reply = await stub.Handshake(request, timeout=timeout_s)
    except grpc.RpcError as err:
        raise from_rpc_error(err) from None
    theirs = Fingerprint.from_proto(reply.fingerprint)
    me.fingerprint.check_compatible(theirs, f"worker {reply.worker_id}")
    return WorkerInfo(reply.worker_id, "prefill", "", reply.ucx_address, theirs)


class PeerSet:
    """D's view of the prefill workers it may use: handshaken ones (`ready`), refused ones with the reason
    (`refused`). sync() is idempotent; call it with each membership the registry reports."""

    def __init__(
        self,
        me: WorkerInfo,
        channel_factory: Callable[[str], grpc.aio.Channel],
        timeout_s: float = 10.0,
    ) -> None:
        self.me = me
        self.channel_factory = channel_factory
        self.timeout_s = timeout_s
        self.ready: dict[str, WorkerInfo] = {}  # worker_id -> info (with its grpc address)
        self.refused: dict[str, MeshError] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, worker_id: str) -> grpc.aio.Channel:
        return self._channels[worker_id]

    async def sync(self, members: list[WorkerInfo]) -> None:
        """Handshakes every new prefill member (concurrently); forgets members that left."""
        prefill = {m.worker_id: m for m in members if m.role == "prefill"}
        for gone in set(self.ready) - set(prefill):
            await self._forget(gone)
        for gone in set(self.refused) - set(prefill):
            del self.refused[gone]
        new = [m for wid, m in prefill.items() if wid not in self.ready and wid not in self.refused]
        await asyncio.gather(*(self._handshake(m) for m in new))

    async def close(self) -> None:
        for worker_id in list(self._channels):
            await self._forget(worker_id)

    async def _handshake(self, member: WorkerInfo) -> None:
        channel = self.channel_factory(member.grpc_address)
        try:
            reply = await handshake(channel, self.me, self.timeout_s)
        except MeshError as err:
            await channel.close()
            if isinstance(err, IncompatiblePeer):
                log.error("refusing prefill worker %s: %s", member.worker_id, err)
                self.refused[member.worker_id] = err
            else:  # unreachable for now: the next sync() tries again
                log.warning("handshake with %s failed: %s", member.worker_id, err)
            return
        self._channels[member.worker_id] = channel
        self.ready[member.worker_id] = WorkerInfo(
            member.worker_id, "prefill", member.grpc_address, reply.ucx_address, reply.fingerprint
        )

    async def _forget(self, worker_id: str) -> None:
        self.ready.pop(worker_id, None)
        channel = self._channels.pop(worker_id, None)
        if channel is not None:
            await channel.close()
