"""The SDK against a small fake Gateway on a real port: streaming, completion, validation on both sides,
cancellation reaching the server, and status codes becoming the SDK's exception types."""

from __future__ import annotations

import re
import threading
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from moemesh._proto.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from moemesh.sdk import Client, InvalidRequest, Overloaded, ServerError, Unavailable
from moemesh.transport.errors import InvalidArgument, ResourceExhausted, map_errors

EOS = 0


class FakeGateway(gateway_pb2_grpc.GatewayServicer):
    """Generates token i+100 for step i, text "t{id} "; stops at EOS after `eos_after` tokens, honours
    max_tokens and stop strings; a prompt of "slow" streams forever until cancelled."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.requests: list[gateway_pb2.GenerateRequest] = []

    @map_errors
    def Generate(self, request, context):
        self.requests.append(request)
        sampling = request.sampling
        if sampling.HasField("temperature") and sampling.temperature > 10:
            raise InvalidArgument.field("temperature", sampling.temperature, "<= 10")
        if request.text == "busy":
            raise ResourceExhausted("queue full: 64 requests waiting")
        if request.text == "mute":
            yield gateway_pb2.GenerateChunk(token_ids=[1])
            return  # a buggy server: no finish_reason
        context.add_callback(self.cancelled.set)
        limit = sampling.max_tokens if sampling.HasField("max_tokens") else 1000
        eos_after = 5 if request.text != "slow" else 1 << 30
        text = ""
        rid = {"request_id": request.request_id or "r1"}  # on the first chunk only, as the gateway does
        for step in range(limit):
            if request.text == "slow":
                time.sleep(0.01)
            token = EOS if step == eos_after else 100 + step
            piece = f"t{token} "
            text += piece
            if any(s in text for s in sampling.stop) or token == EOS:
                yield gateway_pb2.GenerateChunk(
                    token_ids=[token], finish_reason=common_pb2.FINISH_REASON_STOP, **rid
                )
                return
            yield gateway_pb2.GenerateChunk(token_ids=[token], text=piece, **rid)
            rid = {}
        yield gateway_pb2.GenerateChunk(finish_reason=common_pb2.FINISH_REASON_LENGTH)

    @map_errors
    def Tokenize(self, request, context):
        return gateway_pb2.TokenizeResponse(token_ids=[ord(c) for c in request.text])

    def ListModels(self, request, context):
        return gateway_pb2.ListModelsResponse(models=[gateway_pb2.ModelInfo(id="demo")])


@pytest.fixture
def gateway():
    servicer = FakeGateway()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("moemesh.v1.Gateway", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None).wait()


def test_generate_streams_new_tokens_per_chunk_and_finishes_with_length(gateway):
    _, target = gateway
    with Client(target) as client:
        chunks = list(client.generate(prompt="hi", max_tokens=3, temperature=0))
    assert [c.token_ids for c in chunks] == [[100], [101], [102], []]
    assert [c.text for c in chunks] == ["t100 ", "t101 ", "t102 ", ""]
    assert [c.finish_reason for c in chunks] == [None, None, None, "length"]


def test_complete_joins_tokens_and_text_and_reports_stop(gateway):
    servicer, target = gateway
    with Client(target) as client:
        result = client.complete(token_ids=[5, 6], top_k=4, top_p=0.5, seed=7, stop=["never"])
    assert result.token_ids == [100, 101, 102, 103, 104, EOS]
    assert result.text == "t100 t101 t102 t103 t104 "
    assert result.finish_reason == "stop"
    assert result.request_id == "r1"
    sent = servicer.requests[-1]
    assert list(sent.token_ids.ids) == [5, 6]
    assert (sent.sampling.top_k, sent.sampling.seed, list(sent.sampling.stop)) == (4, 7, ["never"])
    assert sent.sampling.top_p == pytest.approx(0.5)
    assert not sent.sampling.HasField("temperature") and not sent.sampling.HasField("max_tokens")


def test_stop_string_ends_with_stop(gateway):
    _, target = gateway
    with Client(target) as client:
        result = client.complete(prompt="x", stop="t101", max_tokens=50)
    assert result.token_ids == [100, 101]
    assert result.finish_reason == "stop"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": "x", "max_tokens": 0}, "max_tokens=0 must be >= 1"),
        ({"prompt": "x", "temperature": -1}, "temperature=-1 must be >= 0"),
        ({"prompt": "x", "top_p": 1.5}, "top_p=1.5 must be in (0, 1]"),
        ({"prompt": "x", "seed": -3}, "seed=-3 must be >= 0"),
        ({"prompt": "x", "stop": [""]}, "stop=[''] must be a non-empty string"),
        ({"token_ids": []}, "token_ids=[] must be a non-empty list"),
        ({"token_ids": [1, -2]}, "token_ids=-2 must be >= 0"),
        ({}, "exactly one of prompt= and token_ids="),
        ({"prompt": "x", "token_ids": [1]}, "exactly one of prompt= and token_ids="),
    ],
)
def test_client_side_validation_raises_invalid_request_before_sending(gateway, kwargs, message):
    servicer, target = gateway
    with Client(target) as client, pytest.raises(InvalidRequest, match=re.escape(message)) as info:
        client.generate(**kwargs)
    assert info.value.code == "CLIENT"
    assert servicer.requests == []


def test_server_side_invalid_argument_is_invalid_request_too(gateway):
    _, target = gateway
    with (
        Client(target) as client,
        pytest.raises(InvalidRequest, match="temperature=50.0 must be <= 10") as info,
    ):
        client.complete(prompt="x", temperature=50)
    assert info.value.code == "INVALID_ARGUMENT"


def test_resource_exhausted_is_overloaded(gateway):
    _, target = gateway
    with Client(target) as client, pytest.raises(Overloaded, match="queue full"):
        client.complete(prompt="busy")


def test_unknown_sampling_keyword_is_a_type_error(gateway):
    _, target = gateway
    with Client(target) as client, pytest.raises(TypeError, match="temprature"):
        client.generate(prompt="x", temprature=0)


def test_cancel_stops_the_stream_and_reaches_the_server(gateway):
    servicer, target = gateway
    with Client(target) as client:
        stream = client.generate(prompt="slow")
        first = next(stream)
        assert first.token_ids == [100]
        stream.cancel()
        assert list(stream) == []  # iteration ends quietly after our own cancel
    assert servicer.cancelled.wait(5), "the server never saw the cancellation"


def test_dropping_the_stream_cancels_it(gateway):
    servicer, target = gateway
    with Client(target) as client:
        stream = client.generate(prompt="slow")
        next(stream)
        del stream
        assert servicer.cancelled.wait(5), "dropping the stream did not cancel the call"


def test_every_chunk_and_the_completion_carry_the_request_id(gateway):
    _, target = gateway
    with Client(target) as client:
        stream = client.generate(prompt="hi", max_tokens=3, request_id="mine-7")
        chunks = list(stream)
        result = client.complete(prompt="hi", max_tokens=2)
    assert [c.request_id for c in chunks] == ["mine-7"] * 4 and stream.request_id == "mine-7"
    assert result.request_id == "r1"  # the server's id when the client chose none


def test_health_says_serving_or_not_and_raises_when_unreachable(gateway):
    _, target = gateway
    with Client(target, timeout_s=5) as client:
        assert client.health() is True
        assert client.health("moemesh.v1.Gateway") is False  # NOT_SERVING
        assert client.health("no.such.Service") is False  # NOT_FOUND
    with (
        socket_port() as port,
        Client(f"127.0.0.1:{port}", timeout_s=2) as client,
        pytest.raises(Unavailable),
    ):
        client.health()


def test_tokenize_and_list_models(gateway):
    _, target = gateway
    with Client(target) as client:
        assert client.tokenize("ab") == [97, 98]
        assert client.list_models() == ["demo"]


def test_unreachable_server_is_unavailable():
    with (
        socket_port() as port,
        Client(f"127.0.0.1:{port}", timeout_s=2) as client,
        pytest.raises(Unavailable),
    ):
        client.complete(prompt="x")


class socket_port:
    """A port that nothing listens on while the block runs (bound without listen)."""

    def __enter__(self) -> int:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        return self._sock.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        self._sock.close()


def test_the_sdk_imports_no_server_side_package():
    import subprocess
    import sys

    code = "import sys, moemesh.sdk; bad = {'torch', 'numpy', 'moemesh.transport'} & set(sys.modules); print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "set()"


def test_complete_refuses_a_stream_that_ends_without_a_finish_reason(gateway):
    _, target = gateway
    with Client(target) as client, pytest.raises(ServerError, match="without a finish_reason"):
        client.complete(prompt="mute")
