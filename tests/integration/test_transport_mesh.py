"""The wire contracts composed end to end, with fake engines: SDK -> Gateway -> DecodeWorker -> PrefillWorker
over real gRPC ports, KV pages from P into D's leased pages (loopback fake or real ucxx), tokens streamed back.
Checks what the services must keep true: D verifies every received page, cancellation and deadlines reach P,
and every lease and page is returned afterwards. The servicers here are a template, not the services."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time

import grpc
import pytest
import torch

from moemesh._proto.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, worker_pb2, worker_pb2_grpc
from moemesh.sdk import AsyncClient, DeadlineExceeded, InvalidRequest, Overloaded
from moemesh.transport.errors import InvalidArgument, LeaseRefused, from_rpc_error, map_errors
from moemesh.transport.kv import Fingerprint, KvLayout, KvTarget, Lease, LeaseKey, PagedKvSink
from moemesh.transport.kv_loopback import LoopbackFabric
from moemesh.transport.peers import HandshakeAcceptor, PeerSet, WorkerInfo
from moemesh.transport.server import MeshServer, ServerOptions

LAYOUT = KvLayout("bf16", page_size=4, bytes_per_token=12, num_layers=3)
FINGERPRINT = Fingerprint("fake@1", LAYOUT)
NUM_PAGES = 160


def fake_kv(token_ids: list[int]) -> torch.Tensor:
    """The KV a fake prefill computes: [layers, pages, page_size, 6] bf16, a function of the tokens."""
    num_pages = -(-len(token_ids) // LAYOUT.page_size)
    ids = torch.full((num_pages * LAYOUT.page_size,), -1.0)
    ids[: len(token_ids)] = torch.tensor(token_ids, dtype=torch.float32)
    layers = torch.arange(LAYOUT.num_layers, dtype=torch.float32)[:, None, None]
    cols = torch.arange(6, dtype=torch.float32)[None, None, :]
    kv = ids.view(1, -1, 1) + 0.25 * layers + 0.01 * cols  # [L, tokens, 6]
    return kv.to(torch.bfloat16).view(LAYOUT.num_layers, num_pages, LAYOUT.page_size, 6)


def first_token(token_ids: list[int]) -> int:
    return sum(token_ids) % 50 + 1


class FakePrefill(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, sender, layer_delay_s: float) -> None:
        self.sender = sender
        self.layer_delay_s = layer_delay_s
        self.acceptor = HandshakeAcceptor(WorkerInfo("prefill-0", "prefill", "", "", FINGERPRINT), sender)
        self.running: dict[str, asyncio.Event] = {}  # request id -> abort flag
        self.aborted: list[str] = []
        self.cancelled: list[str] = []

    @map_errors
    async def Handshake(self, request, context):
        return await self.acceptor.accept(request)

    @map_errors
    async def Prefill(self, request, context):
        target = KvTarget.from_proto(request.kv_target)
        token_ids = list(request.token_ids)
        kv = fake_kv(token_ids)
        abort = self.running.setdefault(target.request_id, asyncio.Event())
        try:
            for layer in range(LAYOUT.num_layers):  # "compute" a layer, then send its pages
                await asyncio.sleep(self.layer_delay_s)
                if abort.is_set():
                    raise LeaseRefused(f"request {target.request_id} aborted")
                first = target.first_page
                await self.sender.send(target, layer, first, kv[layer, first:].contiguous())
        except asyncio.CancelledError:
            self.cancelled.append(target.request_id)
            raise
        finally:
            del self.running[target.request_id]
        await context.write(worker_pb2.PrefillResult(  # a P that streams only its final result
            request_id=target.request_id, first_token_id=first_token(token_ids),
            num_prompt_tokens=len(token_ids), kv_complete=True,
        ))  # fmt: skip

    @map_errors
    async def Abort(self, request, context):
        flag = self.running.get(request.request_id)
        if flag is not None:
            flag.set()
            self.aborted.append(request.request_id)
        # A real P returns once its sends for the lease have stopped; here a set flag stops the next layer.
        return worker_pb2.AbortResponse(found=flag is not None)


class FakeDecode(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, receiver, peers: PeerSet, token_delay_s: float) -> None:
        self.receiver = receiver
        self.peers = peers
        self.token_delay_s = token_delay_s
        self.caches = [
            torch.full((NUM_PAGES, LAYOUT.page_size, 6), float("nan"), dtype=torch.bfloat16) for _ in range(3)
        ]
        self.free_pages = list(range(NUM_PAGES))
        self.lease_ids = itertools.count(1)
        self.verified: list[str] = []

    @map_errors
    async def Generate(self, request, context):
        prompt = list(request.prompt_token_ids)
        num_pages = -(-len(prompt) // LAYOUT.page_size)
        if num_pages > len(self.free_pages):  # as the engine's reserve_kv: back-pressure, RESOURCE_EXHAUSTED
            raise MemoryError(f"{num_pages} pages wanted, {len(self.free_pages)} free")
        pages = [self.free_pages.pop() for _ in range(num_pages)]
        target = KvTarget(request.request_id, LeaseKey(next(self.lease_ids), 1), self.receiver.address,
                          tuple(pages), 0, LAYOUT)  # fmt: skip
        self.receiver.inbox.expect(Lease.for_target(target, time.monotonic() + 30), PagedKvSink(self.caches))
        stub = worker_pb2_grpc.PrefillWorkerStub(self.peers.channel(request.prefill.worker_id))
        prefill_done = False
        try:
            try:
                result = await stub.Prefill(
                    worker_pb2.PrefillRequest(request_id=request.request_id, token_ids=prompt,
                                              sampling=request.sampling, kv_target=target.to_proto()),
                    timeout=context.time_remaining(),  # the client's deadline bounds this hop too
                ).read()  # fmt: skip
            except grpc.RpcError as err:
                raise from_rpc_error(err) from None
            prefill_done = True
            await self.receiver.inbox.wait_complete(target.lease, timeout_s=10)
            expected = fake_kv(prompt)
            for layer in range(LAYOUT.num_layers):
                if not torch.equal(self.caches[layer][list(pages)], expected[layer]):
                    raise AssertionError(f"layer {layer} of {request.request_id} differs")
            self.verified.append(request.request_id)
            token = result.first_token_id
            limit = request.sampling.max_tokens
            for step in range(limit):
                last = step == limit - 1
                reason = common_pb2.FINISH_REASON_LENGTH if last else common_pb2.FINISH_REASON_UNSPECIFIED
                yield worker_pb2.DecodeChunk(token_ids=[token + step], finish_reason=reason)
                await asyncio.sleep(self.token_delay_s)
        finally:
            if not prefill_done:  # cancelled or failed while P may still write: stop it, then end the lease
                abort = worker_pb2.AbortRequest(request_id=request.request_id, lease_id=target.lease.lease_id,
                                                lease_generation=target.lease.generation)  # fmt: skip
                with contextlib.suppress(grpc.RpcError):
                    await stub.Abort(abort, timeout=5)
            await self.receiver.inbox.release(target.lease)
            self.free_pages += pages


class FakeGateway(gateway_pb2_grpc.GatewayServicer):
    """Tokens are the prompt's bytes; text is chr(token)."""

    def __init__(self, decode_address: str) -> None:
        self.channel = grpc.aio.insecure_channel(decode_address)
        self.ids = itertools.count()

    @map_errors
    async def Generate(self, request, context):
        if request.WhichOneof("prompt") == "text":
            prompt = list(request.text.encode())
        else:
            prompt = list(request.token_ids.ids)
        if not prompt:
            raise InvalidArgument("prompt='' must be non-empty")
        for i, token in enumerate(prompt):
            if token >= 256:
                raise InvalidArgument(f"token_ids[{i}]={token} must be < vocab_size=256")
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(request.sampling)
        if not sampling.HasField("max_tokens"):
            sampling.max_tokens = 8
        rid = request.request_id or f"req-{next(self.ids)}"
        stub = worker_pb2_grpc.DecodeWorkerStub(self.channel)
        call = stub.Generate(
            worker_pb2.DecodeRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling,
                                     prefill=worker_pb2.PrefillPeer(worker_id="prefill-0")),
            timeout=context.time_remaining(),
        )  # fmt: skip
        first = True
        try:
            async for chunk in call:
                text = "".join(chr(t) for t in chunk.token_ids)
                yield gateway_pb2.GenerateChunk(token_ids=chunk.token_ids, text=text, finish_reason=chunk.finish_reason,
                                                request_id=rid if first else "")  # fmt: skip
                first = False
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None


class Mesh:
    def __init__(self, kind: str, layer_delay_s: float = 0.0, token_delay_s: float = 0.0) -> None:
        self.kind = kind
        self.layer_delay_s = layer_delay_s
        self.token_delay_s = token_delay_s

    async def __aenter__(self) -> Mesh:
        if self.kind == "loopback":
            fabric = LoopbackFabric()
            self.receiver, self.sender = fabric.receiver(), fabric.sender(checksum=True)
        else:
            pytest.importorskip("ucxx")
            from moemesh.transport.kv_ucx import UcxKvReceiver, UcxKvSender

            self.receiver, self.sender = UcxKvReceiver(), UcxKvSender(checksum=True, timeout_s=10)
        await self.receiver.start()
        self.servers = [MeshServer(ServerOptions(grace_s=0.2)) for _ in range(3)]
        p_server, d_server, g_server = self.servers
        self.prefill = FakePrefill(self.sender, self.layer_delay_s)
        p_server.add(
            worker_pb2_grpc.add_PrefillWorkerServicer_to_server, self.prefill, "moemesh.v1.PrefillWorker"
        )
        await p_server.start()
        me = WorkerInfo("decode-0", "decode", "", self.receiver.address, FINGERPRINT)
        self.peers = PeerSet(me, grpc.aio.insecure_channel)
        await self.peers.sync([WorkerInfo("prefill-0", "prefill", p_server.address, "", FINGERPRINT)])
        assert set(self.peers.ready) == {"prefill-0"}
        self.decode = FakeDecode(self.receiver, self.peers, self.token_delay_s)
        d_server.add(
            worker_pb2_grpc.add_DecodeWorkerServicer_to_server, self.decode, "moemesh.v1.DecodeWorker"
        )
        await d_server.start()
        self.gateway = FakeGateway(d_server.address)
        g_server.add(gateway_pb2_grpc.add_GatewayServicer_to_server, self.gateway, "moemesh.v1.Gateway")
        await g_server.start()
        for server in self.servers:
            await server.set_serving()
        self.client = AsyncClient(g_server.address)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()
        for server in reversed(self.servers):
            await server.stop()
        await self.gateway.channel.close()
        await self.peers.close()
        await self.sender.close()
        await self.receiver.close()

    async def settled(self, timeout_s: float = 5.0) -> bool:
        """True once D holds no lease and every page is free again."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.receiver.inbox.num_live == 0 and len(self.decode.free_pages) == NUM_PAGES:
                return True
            await asyncio.sleep(0.02)
        return False


def run(coro) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


@pytest.mark.parametrize("kind", ["loopback", "ucx"])
def test_concurrent_requests_stream_tokens_after_verified_kv_and_return_every_page(kind):
    async def body():
        async with Mesh(kind) as mesh:
            prompts = [f"prompt number {i} " * (i + 1) for i in range(8)]  # 17 .. 136 tokens
            results = await asyncio.gather(*(mesh.client.complete(prompt=p, max_tokens=4) for p in prompts))
            for prompt, result in zip(prompts, results, strict=True):
                start = first_token(list(prompt.encode()))
                assert result.token_ids == [start, start + 1, start + 2, start + 3]
                assert result.text == "".join(chr(t) for t in result.token_ids)
                assert result.finish_reason == "length"
            assert len(mesh.decode.verified) == 8
            assert await mesh.settled()
            assert list(mesh.receiver.inbox.refusals) == []

    run(body())


@pytest.mark.parametrize("kind", ["loopback", "ucx"])
def test_cancel_during_prefill_reaches_prefill_and_returns_every_page(kind):
    async def body():
        async with Mesh(kind, layer_delay_s=0.3) as mesh:
            stream = mesh.client.generate(prompt="a long prompt " * 4, max_tokens=4)
            task = asyncio.ensure_future(stream.__anext__())
            await asyncio.sleep(0.4)  # P has sent layer 0 and is "computing" layer 1
            stream.cancel()
            with pytest.raises((StopAsyncIteration, asyncio.CancelledError)):
                await task
            assert await mesh.settled()
            for _ in range(100):
                if not mesh.prefill.running:
                    break
                await asyncio.sleep(0.02)
            assert mesh.prefill.running == {}
            assert mesh.prefill.cancelled or mesh.prefill.aborted  # P stopped: by gRPC cancel or by Abort
            assert mesh.decode.verified == []

    run(body())


def test_the_client_deadline_bounds_every_hop():
    async def body():
        async with Mesh("loopback", layer_delay_s=0.5) as mesh:
            with pytest.raises(DeadlineExceeded):
                await mesh.client.complete(prompt="slow prompt", max_tokens=2, timeout_s=0.4)
            assert await mesh.settled()
            assert mesh.decode.verified == []

    run(body())


def test_bad_input_and_back_pressure_reach_the_client_as_their_exception_types():
    async def body():
        async with Mesh("loopback") as mesh:
            with pytest.raises(InvalidRequest, match="token_ids.1.=300 must be < vocab_size=256"):
                await mesh.client.complete(
                    token_ids=[5, 300], max_tokens=2
                )  # only the server knows the vocab
            with pytest.raises(Overloaded, match="161 pages wanted, 160 free"):
                await mesh.client.complete(token_ids=[7] * (161 * LAYOUT.page_size), max_tokens=2)
            assert await mesh.settled()

    run(body())
