"""The P <-> D handshake over real gRPC: fingerprints compared on both sides, a mismatch refused with the
differing fields named, and P's KV endpoint to D opened at handshake time (loopback fake and real ucxx)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from moemesh._proto.v1 import worker_pb2_grpc
from moemesh.transport.errors import IncompatiblePeer, map_errors
from moemesh.transport.kv import Fingerprint, KvLayout
from moemesh.transport.kv_loopback import LoopbackFabric
from moemesh.transport.peers import HandshakeAcceptor, PeerSet, WorkerInfo
from moemesh.transport.server import MeshServer, ServerOptions

LAYOUT = KvLayout("bf16", page_size=64, bytes_per_token=1152, num_layers=4)
GOOD = Fingerprint("demo@1234", LAYOUT)
BAD = Fingerprint("demo@1234", KvLayout("fp8_e4m3", page_size=64, bytes_per_token=656, num_layers=4))


class FakePrefill(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, acceptor: HandshakeAcceptor) -> None:
        self.acceptor = acceptor

    @map_errors
    async def Handshake(self, request, context):
        return await self.acceptor.accept(request)


async def start_prefill(worker_id: str, fingerprint: Fingerprint, sender) -> tuple[MeshServer, WorkerInfo]:
    server = MeshServer(ServerOptions(grace_s=0.1))
    me = WorkerInfo(worker_id, "prefill", "", "", fingerprint)
    server.add(worker_pb2_grpc.add_PrefillWorkerServicer_to_server, FakePrefill(HandshakeAcceptor(me, sender)),
               "moemesh.v1.PrefillWorker")  # fmt: skip
    await server.start()
    return server, WorkerInfo(worker_id, "prefill", server.address, "", fingerprint)


def make_kv(kind: str):
    if kind == "loopback":
        fabric = LoopbackFabric()
        return fabric.receiver("decode-0"), fabric.sender, lambda s: set(s._connected)
    pytest.importorskip("ucxx")
    from moemesh.transport.kv_ucx import UcxKvReceiver, UcxKvSender

    return UcxKvReceiver(), UcxKvSender, lambda s: s.pool.addresses


@pytest.mark.parametrize("kind", ["loopback", "ucx"])
def test_sync_handshakes_new_prefill_peers_and_refuses_a_mismatch(kind):
    receiver, new_sender, connected = make_kv(kind)

    async def body():
        address = await receiver.start()
        good_sender, bad_sender = new_sender(), new_sender()
        p0, p0_info = await start_prefill("prefill-0", GOOD, good_sender)
        p1, p1_info = await start_prefill("prefill-1", BAD, bad_sender)
        me = WorkerInfo("decode-0", "decode", "127.0.0.1:1", address, GOOD)
        peers = PeerSet(me, grpc.aio.insecure_channel)
        try:
            await peers.sync([p0_info, p1_info, me])
            assert set(peers.ready) == {"prefill-0"}
            assert connected(good_sender) == {address}  # P's endpoint to D exists before any request
            assert connected(bad_sender) == set()
            err = peers.refused["prefill-1"]
            assert isinstance(err, IncompatiblePeer)
            assert "kv dtype 'fp8_e4m3' != 'bf16'" in str(err) and "bytes_per_token 656 != 1152" in str(err)
            await peers.sync([p0_info, p1_info])  # idempotent: no second handshake
            assert set(peers.ready) == {"prefill-0"}
            await peers.sync([p1_info])  # prefill-0 left the mesh
            assert peers.ready == {} and set(peers.refused) == {"prefill-1"}
        finally:
            await peers.close()
            for server in (p0, p1):
                await server.stop()
            await good_sender.close()
            await bad_sender.close()
            await receiver.close()

    asyncio.run(asyncio.wait_for(body(), 30))


def fresh_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def test_an_unreachable_peer_is_retried_on_the_next_sync():
    fabric = LoopbackFabric()
    receiver = fabric.receiver("decode-0")

    async def body():
        address = await receiver.start()
        me = WorkerInfo("decode-0", "decode", "127.0.0.1:1", address, GOOD)
        # A private subchannel pool: gRPC's shared one would keep the refused connection's reconnect backoff.
        peers = PeerSet(me, fresh_channel, timeout_s=1)
        server, info = await start_prefill("prefill-0", GOOD, fabric.sender())
        port = server.port
        await server.stop()
        await peers.sync([info])
        assert peers.ready == {} and peers.refused == {}
        again = MeshServer(ServerOptions(port=port, grace_s=0.1))
        sender = fabric.sender()
        me_p = WorkerInfo("prefill-0", "prefill", "", "", GOOD)
        again.add(worker_pb2_grpc.add_PrefillWorkerServicer_to_server,
                  FakePrefill(HandshakeAcceptor(me_p, sender)), "moemesh.v1.PrefillWorker")  # fmt: skip
        await again.start()
        try:
            await peers.sync([info])
            assert set(peers.ready) == {"prefill-0"}
        finally:
            await peers.close()
            await again.stop()

    asyncio.run(asyncio.wait_for(body(), 30))


def test_worker_info_roundtrips_through_the_proto():
    info = WorkerInfo("prefill-3", "prefill", "10.1.2.3:50061", "10.1.2.3:13337", GOOD)
    assert WorkerInfo.from_proto(info.to_proto()) == info
    bare = WorkerInfo("gw", "decode", "h:1")
    assert WorkerInfo.from_proto(bare.to_proto()) == bare
    with pytest.raises(ValueError, match="role='router' must be one of"):
        WorkerInfo("x", "router", "h:1")
