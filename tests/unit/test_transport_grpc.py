"""MeshServer (health, reflection, graceful stop) and the one error mapping, over a real port."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from moemesh._proto.v1 import gateway_pb2, gateway_pb2_grpc
from moemesh.transport import errors
from moemesh.transport.server import MeshServer, ServerOptions


class Failing(gateway_pb2_grpc.GatewayServicer):
    """Tokenize raises whatever `self.exc` is; Generate raises it after one chunk."""

    exc: BaseException = ValueError("max_tokens=0 must be >= 1")

    @errors.map_errors
    async def Tokenize(self, request, context):
        raise self.exc

    @errors.map_errors
    async def Generate(self, request, context):
        yield gateway_pb2.GenerateChunk(token_ids=[1])
        raise self.exc


async def _with_server(body):
    server = MeshServer(ServerOptions(grace_s=0.1))
    servicer = Failing()
    server.add(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer, "moemesh.v1.Gateway")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            return await body(server, servicer, channel)
    finally:
        await server.stop()


async def _health(channel, service=""):
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_health_goes_serving_only_when_told_and_reflection_lists_services():
    async def body(server, servicer, channel):
        assert await _health(channel) == "NOT_SERVING"
        await server.set_serving()
        assert await _health(channel) == "SERVING"
        assert await _health(channel, "moemesh.v1.Gateway") == "SERVING"
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in stub.ServerReflectionInfo(iter([request])):
            return {s.name for s in reply.list_services_response.service}

    names = asyncio.run(_with_server(body))
    assert {"moemesh.v1.Gateway", "grpc.health.v1.Health"} <= names


CASES = [
    (errors.InvalidArgument.field("max_tokens", 0, ">= 1"), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens=0"),
    (ValueError("top_p=2 must be in (0, 1]"), grpc.StatusCode.INVALID_ARGUMENT, "top_p=2"),
    (errors.ResourceExhausted("free_pages=0"), grpc.StatusCode.RESOURCE_EXHAUSTED, "free_pages=0"),
    (TimeoutError("prefill took 31 s"), grpc.StatusCode.DEADLINE_EXCEEDED, "31 s"),
    (errors.Unavailable("prefill worker p0 lost"), grpc.StatusCode.UNAVAILABLE, "p0 lost"),
    (ConnectionResetError("peer reset"), grpc.StatusCode.UNAVAILABLE, "peer reset"),
    (errors.Unauthenticated("api key missing"), grpc.StatusCode.UNAUTHENTICATED, "api key"),
    (errors.IncompatiblePeer("page_size=64 vs 128"), grpc.StatusCode.FAILED_PRECONDITION, "page_size"),
    (ZeroDivisionError("oops"), grpc.StatusCode.INTERNAL, "ZeroDivisionError: oops"),
]


@pytest.mark.parametrize(("exc", "code", "text"), CASES, ids=[type(c[0]).__name__ for c in CASES])
def test_exceptions_become_status_codes_in_unary_and_streaming_methods(exc, code, text):
    async def body(server, servicer, channel):
        servicer.exc = exc
        stub = gateway_pb2_grpc.GatewayStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await stub.Tokenize(gateway_pb2.TokenizeRequest(text="x"))
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as streaming:
            async for chunk in stub.Generate(gateway_pb2.GenerateRequest(text="x")):
                received.append(list(chunk.token_ids))
        return unary.value, streaming.value, received

    unary, streaming, received = asyncio.run(_with_server(body))
    for err in (unary, streaming):
        assert err.code() == code
        assert text in err.details()
    assert received == [[1]]  # chunks before the failure still arrive


def test_status_codes_come_back_as_our_exceptions():
    class Err(grpc.RpcError):
        def __init__(self, code):
            self._code = code

        def code(self):
            return self._code

        def details(self):
            return "detail"

    assert isinstance(errors.from_rpc_error(Err(grpc.StatusCode.UNAVAILABLE)), errors.Unavailable)
    assert isinstance(errors.from_rpc_error(Err(grpc.StatusCode.INVALID_ARGUMENT)), ValueError)
    assert type(errors.from_rpc_error(Err(grpc.StatusCode.INTERNAL))) is errors.MeshError


def test_stop_makes_health_not_serving_and_frees_the_port():
    async def run():
        server = MeshServer(ServerOptions(grace_s=0.1))
        await server.start()
        await server.set_serving()
        port = server.port
        await server.stop()
        again = MeshServer(ServerOptions(port=port))
        await again.start()  # the same port binds again once the first server stopped
        await again.stop()
        return port

    assert asyncio.run(run()) > 0
