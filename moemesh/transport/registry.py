"""Registration and load reports (proto `Registry`, implemented by the gateway).

* Gateway: `Membership` is the table (who is in the mesh, their last LoadReport; a worker silent for
  `expiry_intervals` heartbeats is dropped); `RegistryServicer` serves it over gRPC.
* Worker: `RegistryClient.run()` registers once the worker is SERVING, then heartbeats its load every
  interval and hands each membership it hears back to `on_members` (a decode worker passes it to
  `PeerSet.sync`, so P <-> D handshakes and UCX endpoints happen when a worker registers, not on a user's
  first request). It re-registers when the gateway has forgotten it (a gateway restart) and keeps retrying
  while the gateway is unreachable.

Who may join: every registration names the mesh it was started for (`mesh_id`; `moemesh up` makes a fresh one
per mesh, "" outside it). The registry refuses a worker of another mesh, and a `worker_id` that a live worker
at another address holds (a stray of a second mesh must not take over `decode-0`); the same id at the same
address is that worker restarted, and replaces its entry. A refused worker gets FAILED_PRECONDITION
(`RegistrationRefused`) and stops, rather than retrying: the refusal will not go away by itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from moemesh._proto.v1 import worker_pb2, worker_pb2_grpc
from moemesh.transport.errors import RegistrationRefused, map_errors
from moemesh.transport.peers import ROLES, WorkerInfo

log = logging.getLogger(__name__)
_ROLE_NAMES = {v: k for k, v in ROLES.items()}


@dataclass(frozen=True)
class ExpertTokenCount:
    """Token slots one routed expert of one MoE layer computed since its expert-pool worker started."""

    layer: int
    expert_id: int
    num_tokens: int


@dataclass(frozen=True)
class LoadReport:
    worker_id: str
    role: str
    num_running_requests: int = 0
    num_queued_requests: int = 0
    num_queued_tokens: int = 0  # prompt tokens waiting for prefill
    num_free_pages: int = 0
    num_total_pages: int = 0
    unix_ms: int = 0
    num_remote_prefills: int = 0  # decode: requests whose KV a prefill worker sent
    num_prefill_fallbacks: int = 0  # decode: requests meant for a prefill worker, prefilled here instead
    expert_tokens: tuple[ExpertTokenCount, ...] = ()  # expert-pool workers

    def to_proto(self) -> worker_pb2.LoadReport:
        return worker_pb2.LoadReport(
            worker_id=self.worker_id, role=ROLES[self.role], num_running_requests=self.num_running_requests,
            num_queued_requests=self.num_queued_requests, num_queued_tokens=self.num_queued_tokens,
            num_free_pages=self.num_free_pages, num_total_pages=self.num_total_pages, unix_ms=self.unix_ms,
            num_remote_prefills=self.num_remote_prefills, num_prefill_fallbacks=self.num_prefill_fallbacks,
            expert_tokens=[worker_pb2.ExpertTokenCount(layer=c.layer, expert_id=c.expert_id,
                                                       num_tokens=c.num_tokens) for c in self.expert_tokens],
        )  # fmt: skip

    @classmethod
    def from_proto(cls, msg: worker_pb2.LoadReport) -> LoadReport:
        return cls(
            msg.worker_id, _ROLE_NAMES.get(msg.role, ""), msg.num_running_requests, msg.num_queued_requests,
            msg.num_queued_tokens, msg.num_free_pages, msg.num_total_pages, msg.unix_ms,
            msg.num_remote_prefills, msg.num_prefill_fallbacks,
            tuple(ExpertTokenCount(c.layer, c.expert_id, c.num_tokens) for c in msg.expert_tokens),
        )  # fmt: skip


@dataclass
class _Member:
    info: WorkerInfo
    load: LoadReport | None
    last_seen_s: float


class Membership:
    """The gateway's table of workers. Pure (no I/O); `clock` gives seconds."""

    def __init__(
        self,
        heartbeat_interval_s: float = 1.0,
        expiry_intervals: int = 3,
        clock: Callable[[], float] = time.monotonic,
        mesh_id: str = "",
    ) -> None:
        if heartbeat_interval_s <= 0:
            raise ValueError(f"heartbeat_interval_s={heartbeat_interval_s} must be > 0")
        self.heartbeat_interval_s = heartbeat_interval_s
        self.expiry_s = heartbeat_interval_s * expiry_intervals
        self.clock = clock
        self.mesh_id = mesh_id
        self.started_s = clock()
        self._members: dict[str, _Member] = {}

    def settling(self) -> bool:
        """True until one expiry window has passed since the table started: until then a live worker may be
        missing from it (after a gateway restart each worker re-registers on its next heartbeat)."""
        return self.clock() - self.started_s < self.expiry_s

    def register(self, info: WorkerInfo, mesh_id: str = "") -> list[WorkerInfo]:
        """Adds (or replaces, at the same address) a worker; returns the membership, itself included.
        RegistrationRefused for another mesh's worker or a name a live worker elsewhere holds."""
        if not info.worker_id:
            raise ValueError("worker_id='' must be non-empty")
        self.check_mesh(info.worker_id, mesh_id)
        self.expire()
        held = self._members.get(info.worker_id)
        if held is not None and held.info.grpc_address != info.grpc_address:
            raise RegistrationRefused(
                f"worker_id={info.worker_id!r} is held by a live worker at {held.info.grpc_address}; "
                f"{info.grpc_address} may not take it"
            )
        if held is None:
            log.info("worker %s (%s) joined at %s", info.worker_id, info.role, info.grpc_address)
        self._members[info.worker_id] = _Member(info, None, self.clock())
        return self.members()

    def heartbeat(self, report: LoadReport) -> tuple[bool, list[WorkerInfo]]:
        """Records a load report; (False, []) for a worker the table does not know (it must register)."""
        self.expire()
        member = self._members.get(report.worker_id)
        if member is None:
            return False, []
        member.load = report
        member.last_seen_s = self.clock()
        return True, self.members()

    def check_mesh(self, worker_id: str, mesh_id: str) -> None:
        if mesh_id != self.mesh_id:
            raise RegistrationRefused(
                f"worker {worker_id!r} belongs to mesh_id={mesh_id!r}, this registry to mesh_id={self.mesh_id!r}"
            )

    def deregister(self, worker_id: str) -> None:
        if self._members.pop(worker_id, None) is not None:
            log.info("worker %s left", worker_id)

    def expire(self) -> list[str]:
        """Drops workers silent for longer than expiry; returns their ids."""
        now = self.clock()
        gone = [wid for wid, m in self._members.items() if now - m.last_seen_s > self.expiry_s]
        for worker_id in gone:
            log.warning("worker %s missed its heartbeats; dropping it", worker_id)
            del self._members[worker_id]
        return gone

    def members(self, role: str | None = None) -> list[WorkerInfo]:
        return [m.info for m in self._members.values() if role is None or m.info.role == role]

    def load(self, worker_id: str) -> LoadReport | None:
        member = self._members.get(worker_id)
        return member.load if member is not None else None


class RegistryServicer(worker_pb2_grpc.RegistryServicer):
    """Proto <-> Membership."""

    def __init__(self, membership: Membership) -> None:
        self.membership = membership

    @map_errors
    async def Register(self, request, context):
        members = self.membership.register(WorkerInfo.from_proto(request.worker), request.mesh_id)
        interval_ms = int(self.membership.heartbeat_interval_s * 1000)
        return worker_pb2.RegisterResponse(
            heartbeat_interval_ms=interval_ms, peers=[m.to_proto() for m in members],
            settling=self.membership.settling(),
        )  # fmt: skip

    @map_errors
    async def Heartbeat(self, request, context):
        known, members = self.membership.heartbeat(LoadReport.from_proto(request))
        return worker_pb2.HeartbeatResponse(
            known=known, peers=[m.to_proto() for m in members], settling=self.membership.settling()
        )

    @map_errors
    async def Deregister(self, request, context):
        self.membership.check_mesh(request.worker_id, request.mesh_id)
        self.membership.deregister(request.worker_id)
        return worker_pb2.DeregisterResponse()


class RegistryClient:
    """A worker's registration loop. `load()` makes its current LoadReport; `on_members(members)` gets every
    membership the registry answers with (an async callback, awaited in the loop). While the registry is
    settling (it just restarted and not every live worker has re-registered), members it has not heard from
    yet are kept from the last membership rather than reported gone."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        me: WorkerInfo,
        load: Callable[[], LoadReport],
        on_members: Callable[[list[WorkerInfo]], Awaitable[None]] | None = None,
        retry_s: float = 0.5,
        timeout_s: float = 5.0,
        mesh_id: str = "",
    ) -> None:
        self.stub = worker_pb2_grpc.RegistryStub(channel)
        self.me = me
        self.mesh_id = mesh_id
        self.load = load
        self.on_members = on_members
        self.retry_s = retry_s
        self.timeout_s = timeout_s
        self.registered = asyncio.Event()
        self.num_registrations = 0
        self._last_members: dict[str, WorkerInfo] = {}

    async def run(self) -> None:
        """Registers, then heartbeats until cancelled. Never raises for a lost or restarted registry;
        raises RegistrationRefused when the registry refuses this worker (another mesh, a name held)."""
        interval_s = self.retry_s
        known = False
        while True:
            try:
                if not known:
                    request = worker_pb2.RegisterRequest(worker=self.me.to_proto(), mesh_id=self.mesh_id)
                    reply = await self.stub.Register(request, timeout=self.timeout_s)
                    interval_s = reply.heartbeat_interval_ms / 1000 or self.retry_s
                    self.num_registrations += 1
                    self.registered.set()
                    known = True
                    await self._deliver(reply.peers, reply.settling)
                else:
                    reply = await self.stub.Heartbeat(self.load().to_proto(), timeout=self.timeout_s)
                    known = reply.known
                    if known:
                        await self._deliver(reply.peers, reply.settling)
                    else:
                        log.warning("the registry forgot %s; registering again", self.me.worker_id)
                        continue
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    raise RegistrationRefused(err.details() or "registration refused") from None
                log.warning("registry unreachable from %s: %s", self.me.worker_id, err.code().name)
                known = False
                await asyncio.sleep(self.retry_s)
                continue
            await asyncio.sleep(interval_s)

    async def deregister(self) -> None:
        try:
            await self.stub.Deregister(
                worker_pb2.DeregisterRequest(worker_id=self.me.worker_id, mesh_id=self.mesh_id),
                timeout=self.timeout_s,
            )
        except grpc.RpcError as err:
            log.warning("could not deregister %s: %s", self.me.worker_id, err.code().name)

    async def _deliver(self, peers, settling: bool) -> None:
        members = {m.worker_id: m for m in map(WorkerInfo.from_proto, peers)}
        if settling:
            members = {**self._last_members, **members}
        self._last_members = members
        if self.on_members is not None:
            await self.on_members(list(members.values()))
