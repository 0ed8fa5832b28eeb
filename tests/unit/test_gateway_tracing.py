"""The gateway's part of a trace, against fake decode workers on real gRPC: the root span joins the client's
trace, each attempt's `gateway.route` hangs under it, every D gets the root's traceparent in its
DecodeRequest (also after a migration), and the trace view's entry has the request's TTFT and tokens."""

from __future__ import annotations

import asyncio

import grpc
import pytest

pytest.importorskip("opentelemetry.sdk")

from moemesh._proto.v1 import worker_pb2_grpc  # noqa: E402
from moemesh.config.mesh import GatewayConfig  # noqa: E402
from moemesh.engine.sampling_params import SamplingParams  # noqa: E402
from moemesh.services.gateway.worker import Gateway, GenerateJob  # noqa: E402
from moemesh.telemetry import spans as names  # noqa: E402
from moemesh.telemetry.trace_store import TraceStore  # noqa: E402
from moemesh.telemetry.tracing import Telemetry  # noqa: E402
from moemesh.transport.peers import WorkerInfo  # noqa: E402
from moemesh.transport.registry import Membership  # noqa: E402
from tests.unit.test_gateway_migration import FakeDecode  # noqa: E402

CLIENT_TRACE = "ab" * 16
CLIENT_SPAN = "cd" * 8


class SpyDecode(FakeDecode):
    """A FakeDecode that keeps the traceparent of every request it starts."""

    def __init__(self, fail_with: grpc.StatusCode | None) -> None:
        super().__init__(fail_with)
        self.traceparents: list[str] = []

    async def Session(self, request_iterator, context):
        async def spy():
            async for message in request_iterator:
                if message.WhichOneof("kind") == "start":
                    self.traceparents.append(message.start.traceparent)
                yield message

        async for update in super().Session(spy(), context):
            yield update


async def _scenario():
    fakes = [SpyDecode(grpc.StatusCode.UNAVAILABLE), SpyDecode(None)]
    servers, membership = [], Membership(heartbeat_interval_s=60)
    for i, fake in enumerate(fakes):
        server = grpc.aio.server()
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(fake, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        membership.register(WorkerInfo(f"decode-{i}", "decode", f"127.0.0.1:{port}"))
    telemetry = Telemetry.create("moemesh-gateway", "gateway", trace_buffer=4)
    traces = TraceStore(4)
    gateway = Gateway(GatewayConfig(pick_timeout_s=0.2), membership, None, 320, 512, grpc.aio.insecure_channel,
                      telemetry=telemetry, traces=traces)  # fmt: skip
    job = GenerateJob("r1", [1, 2, 3], SamplingParams(max_tokens=6))
    tokens = []
    try:
        async for delta in gateway.generate(job, lambda: 10.0, f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"):
            tokens += delta.token_ids
    finally:
        await gateway.close()
        for server in servers:
            await server.stop(None)
    return fakes, telemetry, traces, tokens


def test_gateway_spans_and_the_traceparent_sent_to_decode():
    fakes, telemetry, traces, tokens = asyncio.run(_scenario())
    assert tokens == [100, 101, 102, 103, 104, 105]
    recorded = telemetry.store.spans([CLIENT_TRACE])
    roots = [s for s in recorded if s.name == names.GATEWAY_GENERATE]
    routes = [s for s in recorded if s.name == names.GATEWAY_ROUTE]
    assert len(roots) == 1 and roots[0].parent_id == CLIENT_SPAN  # joined the client's trace
    root = roots[0]
    assert [r.attributes[names.DECODE_WORKER] for r in routes] == ["decode-0", "decode-1"]  # the migration
    assert all(r.parent_id == root.span_id for r in routes)
    assert root.attributes[names.COMPLETION_TOKENS] == 6 and root.attributes[names.FINISH_REASON] == "length"
    assert root.attributes[names.PROMPT_TOKENS] == 3 and root.attributes[names.REQUEST_ID] == "r1"
    sent = [tp for fake in fakes for tp in fake.traceparents]
    assert sent == [f"00-{CLIENT_TRACE}-{root.span_id}-01"] * 2
    entry = traces.get("r1")
    assert entry.trace_id == CLIENT_TRACE and entry.num_completion_tokens == 6
    assert entry.finish_reason == "length" and 0 < entry.ttft_ms <= entry.total_ms
    assert entry.start_unix_ns == root.start_unix_ns
