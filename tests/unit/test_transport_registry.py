"""Registration: the gateway's Membership table, and workers' RegistryClient loops over real gRPC — a decode
worker handshakes a prefill worker as soon as it registers, drops it when it falls silent, and both register
again after a gateway restart."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from moemesh._proto.v1 import worker_pb2_grpc
from moemesh.transport.channels import forget_worker
from moemesh.transport.errors import RegistrationRefused
from moemesh.transport.kv import Fingerprint, KvLayout
from moemesh.transport.kv_loopback import LoopbackFabric
from moemesh.transport.peers import HandshakeAcceptor, PeerSet, WorkerInfo
from moemesh.transport.registry import LoadReport, Membership, RegistryClient, RegistryServicer
from moemesh.transport.server import MeshServer, ServerOptions
from tests.unit.test_transport_peers import FakePrefill

FINGERPRINT = Fingerprint("demo@1", KvLayout("bf16", 64, 1152, 4))
FAST = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 100),
]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_membership_tracks_heartbeats_and_drops_silent_workers():
    clock = Clock()
    table = Membership(heartbeat_interval_s=1.0, expiry_intervals=3, clock=clock)
    p = WorkerInfo("prefill-0", "prefill", "h:1", "h:2", FINGERPRINT)
    d = WorkerInfo("decode-0", "decode", "h:3", "h:4", FINGERPRINT)
    assert table.register(p) == [p]
    assert table.register(d) == [p, d]
    assert table.settling()  # younger than its 3 s expiry window: a restarted table may lack live workers
    clock.now = 2.0
    known, members = table.heartbeat(LoadReport("decode-0", "decode", num_free_pages=90, num_total_pages=100))
    assert known and members == [p, d]
    assert table.load("decode-0").num_free_pages == 90 and table.load("prefill-0") is None
    clock.now = 3.5  # prefill-0 silent for 3.5 s > 3 intervals
    known, members = table.heartbeat(LoadReport("decode-0", "decode"))
    assert known and members == [d] and not table.settling()
    assert table.heartbeat(LoadReport("prefill-0", "prefill")) == (False, [])
    table.deregister("decode-0")
    assert table.members() == []
    with pytest.raises(ValueError, match="worker_id='' must be non-empty"):
        table.register(WorkerInfo("", "decode", "h:1"))


async def _wait(predicate, timeout_s: float = 5.0) -> bool:
    for _ in range(int(timeout_s / 0.02)):
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return False


async def _gateway(port: int = 0) -> tuple[MeshServer, Membership]:
    # Fast heartbeats, but a 1 s silence before a drop: a loaded CI box can delay a heartbeat past 3 intervals.
    membership = Membership(heartbeat_interval_s=0.05, expiry_intervals=20)
    server = MeshServer(ServerOptions(port=port, grace_s=0.1))
    server.add(
        worker_pb2_grpc.add_RegistryServicer_to_server, RegistryServicer(membership), "moemesh.v1.Registry"
    )
    await server.start()
    return server, membership


def test_workers_register_handshake_on_registration_and_survive_a_gateway_restart():
    fabric = LoopbackFabric()

    async def body():
        gateway, _ = await _gateway()
        port = gateway.port
        # prefill-0: a Handshake server plus its registration loop
        p_sender = fabric.sender()
        p_server = MeshServer(ServerOptions(grace_s=0.1))
        p_me = WorkerInfo("prefill-0", "prefill", "", "", FINGERPRINT)
        p_server.add(worker_pb2_grpc.add_PrefillWorkerServicer_to_server,
                     FakePrefill(HandshakeAcceptor(p_me, p_sender)), "moemesh.v1.PrefillWorker")  # fmt: skip
        await p_server.start()
        p_info = WorkerInfo("prefill-0", "prefill", p_server.address, "", FINGERPRINT)
        # decode-0: a KV receiver, a PeerSet fed by its registration loop
        receiver = fabric.receiver("decode-0")
        d_info = WorkerInfo("decode-0", "decode", "127.0.0.1:1", await receiver.start(), FINGERPRINT)
        peers = PeerSet(d_info, lambda target: grpc.aio.insecure_channel(target, options=FAST))
        channels = [grpc.aio.insecure_channel(gateway.address, options=FAST) for _ in range(2)]
        p_client = RegistryClient(
            channels[0], p_info, lambda: LoadReport("prefill-0", "prefill"), retry_s=0.05
        )
        d_client = RegistryClient(channels[1], d_info, lambda: LoadReport("decode-0", "decode", num_free_pages=7),
                                  peers.sync, retry_s=0.05)  # fmt: skip
        p_task = asyncio.ensure_future(p_client.run())
        d_task = asyncio.ensure_future(d_client.run())
        try:
            # P's KV endpoint to D exists as soon as both registered, before any request.
            assert await _wait(lambda: "prefill-0" in peers.ready)
            assert p_sender._connected == {receiver.address}

            # The gateway restarts with an empty table: both register again, and D keeps its peer.
            await gateway.stop()
            gateway, membership = await _gateway(port)
            assert await _wait(lambda: p_client.num_registrations >= 2 and d_client.num_registrations >= 2)
            assert await _wait(
                lambda: {m.worker_id for m in membership.members()} == {"prefill-0", "decode-0"}
            )
            assert await _wait(
                lambda: (membership.load("decode-0") or LoadReport("", "")).num_free_pages == 7
            )
            assert "prefill-0" in peers.ready

            # prefill-0 falls silent (crash): dropped after 20 intervals, and D forgets it.
            p_task.cancel()
            assert await _wait(lambda: "prefill-0" not in peers.ready)
            assert [m.worker_id for m in membership.members()] == ["decode-0"]
            d_task.cancel()  # a clean shutdown: stop heartbeating, then leave
            await d_client.deregister()
            assert membership.members() == []
        finally:
            for task in (p_task, d_task):
                task.cancel()
            await asyncio.gather(p_task, d_task, return_exceptions=True)
            await peers.close()
            for channel in channels:
                await channel.close()
            for server in (gateway, p_server):
                await server.stop()
            await receiver.close()

    asyncio.run(asyncio.wait_for(body(), 30))


def test_membership_admits_only_its_mesh_and_keeps_a_live_workers_name():
    clock = Clock()
    table = Membership(heartbeat_interval_s=1.0, expiry_intervals=3, clock=clock, mesh_id="m1")
    d = WorkerInfo("decode-0", "decode", "h:3")
    with pytest.raises(
        RegistrationRefused, match=r"'decode-0' belongs to mesh_id='m2', this registry to mesh_id='m1'"
    ):
        table.register(d, "m2")
    with pytest.raises(RegistrationRefused, match="mesh_id=''"):
        table.register(d)  # a worker started outside this mesh
    assert table.register(d, "m1") == [d]
    stray = WorkerInfo("decode-0", "decode", "h:9")  # a second mesh's decode-0
    with pytest.raises(
        RegistrationRefused, match=r"worker_id='decode-0' is held by a live worker at h:3; h:9"
    ):
        table.register(stray, "m1")
    assert table.members() == [d]
    restarted = WorkerInfo("decode-0", "decode", "h:3", "h:5")  # the same worker, restarted: replaces
    assert table.register(restarted, "m1") == [restarted]
    with pytest.raises(RegistrationRefused):
        table.check_mesh("decode-0", "m2")  # what Deregister checks: another mesh cannot remove it either
    clock.now = 3.5  # silent past its expiry: the name is free again
    assert table.register(stray, "m1") == [stray]
    table.deregister("decode-0")
    assert table.members() == []


def test_a_refused_worker_stops_its_registration_loop_with_the_reason():
    async def body():
        membership = Membership(heartbeat_interval_s=0.05, expiry_intervals=20, mesh_id="mine")
        server = MeshServer(ServerOptions(grace_s=0.1))
        server.add(worker_pb2_grpc.add_RegistryServicer_to_server, RegistryServicer(membership),
                   "moemesh.v1.Registry")  # fmt: skip
        await server.start()
        async with grpc.aio.insecure_channel(server.address, options=FAST) as channel:
            try:
                me = WorkerInfo("decode-0", "decode", "127.0.0.1:1")
                client = RegistryClient(channel, me, lambda: LoadReport("decode-0", "decode"), retry_s=0.05,
                                        mesh_id="theirs")  # fmt: skip
                with pytest.raises(
                    RegistrationRefused, match="mesh_id='theirs', this registry to mesh_id='mine'"
                ):
                    await asyncio.wait_for(client.run(), 10)
                assert membership.members() == [] and client.num_registrations == 0
                ours = RegistryClient(channel, me, lambda: LoadReport("decode-0", "decode"), mesh_id="mine")
                task = asyncio.ensure_future(ours.run())
                await asyncio.wait_for(ours.registered.wait(), 10)
                assert membership.members() == [me]
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                assert not await asyncio.to_thread(forget_worker, server.address, "decode-0", "theirs")
                assert membership.members() == [me]  # another mesh cannot remove it
                forgotten = await asyncio.to_thread(forget_worker, server.address, "decode-0", "mine")
                assert forgotten and membership.members() == []
            finally:
                await server.stop()

    asyncio.run(asyncio.wait_for(body(), 30))
