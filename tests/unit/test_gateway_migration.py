"""The gateway's migration loop against fake decode workers on real gRPC servers (their multiplexed Session
streams): a stream that fails with UNAVAILABLE moves its request to another D carrying the tokens relayed so
far, at most GatewayConfig.max_migrations times; a request's other errors are never migrated."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from moemesh._proto.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from moemesh.config.mesh import GatewayConfig
from moemesh.engine.sampling_params import SamplingParams
from moemesh.services.gateway.worker import Gateway, GenerateJob
from moemesh.transport.errors import InvalidArgument, Unavailable
from moemesh.transport.peers import WorkerInfo
from moemesh.transport.registry import Membership


class FakeDecode(worker_pb2_grpc.DecodeWorkerServicer):
    """A decode worker's Session: for each started request, streams the next token (100 + how many the request
    already has), then either ends it with "length" at `max_tokens` or fails after the first token with
    `fail_with`: UNAVAILABLE ends the whole stream (a dying worker), another code is that request's error
    event (None: keeps streaming)."""

    def __init__(self, fail_with: grpc.StatusCode | None) -> None:
        self.fail_with = fail_with
        self.seen: list[list[int]] = []  # generated_token_ids of each started request

    async def Session(self, request_iterator, context):
        async for message in request_iterator:
            if message.WhichOneof("kind") != "start":
                continue
            request = message.start
            generated = list(request.generated_token_ids)
            self.seen.append(list(generated))
            while True:
                token = 100 + len(generated)
                generated.append(token)
                done = len(generated) == request.sampling.max_tokens
                reason = common_pb2.FINISH_REASON_LENGTH if done else common_pb2.FINISH_REASON_UNSPECIFIED
                chunk = worker_pb2.DecodeChunk(token_ids=[token], finish_reason=reason)
                yield worker_pb2.SessionUpdate(
                    events=[worker_pb2.SessionEvent(request_id=request.request_id, chunk=chunk)]
                )
                if done:
                    break
                if self.fail_with == grpc.StatusCode.UNAVAILABLE:
                    await context.abort(self.fail_with, "decode worker going away")
                if self.fail_with is not None:
                    failed = worker_pb2.SessionEvent(request_id=request.request_id, status_code=self.fail_with.value[0],
                                                     status_message="the request failed")  # fmt: skip
                    yield worker_pb2.SessionUpdate(events=[failed])
                    break


async def _run(fakes: list[FakeDecode], max_tokens: int = 6) -> tuple[list[int], BaseException | None]:
    servers, membership = [], Membership(heartbeat_interval_s=60)
    for i, fake in enumerate(fakes):
        server = grpc.aio.server()
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        membership.register(WorkerInfo(f"decode-{i}", "decode", f"127.0.0.1:{port}"))
    gateway = Gateway(
        GatewayConfig(pick_timeout_s=0.2), membership, None, 320, 512, grpc.aio.insecure_channel
    )
    job = GenerateJob("r1", [1, 2, 3], SamplingParams(max_tokens=max_tokens))
    tokens, error = [], None
    try:
        async for delta in gateway.generate(job, lambda: 10.0):
            tokens += delta.token_ids
    except Exception as err:  # noqa: BLE001 - returned for the test to check
        error = err
    finally:
        await gateway.close()
        for server in servers:
            await server.stop(None)
    assert gateway.inflight == 0
    return tokens, error


def test_lost_decode_worker_resumes_on_another_with_the_tokens_so_far():
    fakes = [
        FakeDecode(grpc.StatusCode.UNAVAILABLE),
        FakeDecode(grpc.StatusCode.UNAVAILABLE),
        FakeDecode(None),
    ]
    tokens, error = asyncio.run(_run(fakes))
    assert error is None
    assert tokens == [100, 101, 102, 103, 104, 105]  # no gap, no duplicate
    calls = sorted((seen for fake in fakes for seen in fake.seen), key=len)
    assert calls == [[], [100], [100, 101]]  # each D got the prompt plus everything relayed before it


def test_migrations_are_bounded_then_unavailable():
    fakes = [FakeDecode(grpc.StatusCode.UNAVAILABLE) for _ in range(GatewayConfig().max_migrations + 2)]
    tokens, error = asyncio.run(_run(fakes, max_tokens=20))
    assert isinstance(error, Unavailable)
    assert f"gave up after {GatewayConfig().max_migrations} migrations" in str(error)
    assert tokens == [100 + i for i in range(GatewayConfig().max_migrations + 1)]
    assert sum(len(fake.seen) for fake in fakes) == GatewayConfig().max_migrations + 1


def test_no_other_decode_worker_is_unavailable_at_once():
    tokens, error = asyncio.run(_run([FakeDecode(grpc.StatusCode.UNAVAILABLE)]))
    assert isinstance(error, Unavailable)
    assert "lost decode worker(s) decode-0 and no other is registered" in str(error)
    assert tokens == [100]


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_other_failures_are_not_migrated(code):
    fakes = [FakeDecode(code), FakeDecode(None)]
    tokens, error = asyncio.run(_run(fakes))
    assert error is not None and not isinstance(error, Unavailable)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert isinstance(error, InvalidArgument)
    assert tokens == [100]
    assert sum(len(fake.seen) for fake in fakes) == 1
