"""The trace view's HTTP routes on an aiohttp test app: the gateway's recent requests and one request's spans,
gathered from the gateway's own store and from a worker's `Spans` service over real gRPC (a dead worker is
left out, not fatal); bad input gets 400 / 404 naming the value."""

from __future__ import annotations

import asyncio

import grpc
import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("opentelemetry.sdk")

from aiohttp import web  # noqa: E402
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from moemesh.services.gateway.traces import TraceView  # noqa: E402
from moemesh.services.gateway.traces_http import trace_routes  # noqa: E402
from moemesh.supervisor import free_ports  # noqa: E402
from moemesh.telemetry.trace_store import TraceStore  # noqa: E402
from moemesh.telemetry.tracing import Telemetry, trace_id_of  # noqa: E402
from moemesh.transport import spans as spans_service  # noqa: E402
from moemesh.transport.peers import WorkerInfo  # noqa: E402
from moemesh.transport.registry import Membership  # noqa: E402
from moemesh.transport.server import MeshServer, ServerOptions  # noqa: E402


async def _scenario() -> None:
    gateway = Telemetry.create("moemesh-gateway", "gateway", trace_buffer=8)
    decode = Telemetry.create("moemesh-decode", "decode-0", trace_buffer=8)
    worker = MeshServer(ServerOptions(grace_s=0))
    spans_service.add_to_server(worker, decode.store)
    await worker.start()
    membership = Membership(heartbeat_interval_s=10)
    membership.register(WorkerInfo("decode-0", "decode", worker.address))
    (dead_port,) = free_ports(1)
    membership.register(WorkerInfo("decode-9", "decode", f"127.0.0.1:{dead_port}"))  # nobody listens there
    store = TraceStore(4)
    channels: dict[str, grpc.aio.Channel] = {}

    def channel(address: str) -> grpc.aio.Channel:
        return channels.setdefault(address, grpc.aio.insecure_channel(address))

    root = gateway.start("gateway.generate", "", {"moemesh.request_id": "req-1"})
    entry = store.begin("req-1", trace_id_of(root), "demo", 5)
    with decode.span("decode.admit", gateway.traceparent(root), {"moemesh.request_id": "req-1"}):
        pass
    entry.on_tokens(3)
    entry.finish("length")
    root.end()
    store.begin("req-2", trace_id_of(gateway.start("gateway.generate", "")), "demo", 2)  # still running

    app = web.Application()
    app.add_routes(trace_routes(TraceView(store, gateway, membership, channel)))
    async with TestClient(TestServer(app)) as client:
        listed = await (await client.get("/traces?format=json")).json()
        assert [t["request_id"] for t in listed["traces"]] == ["req-2", "req-1"]
        assert listed["traces"][1]["completion_tokens"] == 3 and listed["traces"][0]["total_ms"] is None
        page = await client.get("/traces")
        assert page.content_type == "text/html" and 'href="/traces/req-1"' in await page.text()

        trace = await (await client.get("/traces/req-1?format=json")).json()
        by_name = {s["name"]: s for s in trace["spans"]}
        assert set(by_name) == {"gateway.generate", "decode.admit"}
        assert by_name["decode.admit"]["worker"] == "decode-0"
        assert by_name["decode.admit"]["parent_id"] == by_name["gateway.generate"]["span_id"]
        assert by_name["decode.admit"]["attributes"] == {"moemesh.request_id": "req-1"}
        html = await (await client.get("/traces/req-1")).text()
        assert html.count('<tr class="span') == 2 and ">decode.admit</td>" in html
        text = await (await client.get("/traces/req-1?format=text")).text()
        assert text.startswith("request req-1  trace ") and "decode.admit" in text

        decode.store._traces.clear()  # the worker forgot it: the gateway keeps what it gathered
        again = await (await client.get("/traces/req-1", headers={"Accept": "application/json"})).json()
        assert {s["name"] for s in again["spans"]} == {"gateway.generate", "decode.admit"}

        missing = await client.get("/traces/nope?format=json")
        assert missing.status == 404 and "request_id='nope'" in (await missing.json())["error"]["message"]
        bad = await client.get("/traces/req-1?format=xml")
        assert bad.status == 400 and "format='xml'" in (await bad.json())["error"]["message"]
        bad_limit = await client.get("/traces?limit=0")
        assert bad_limit.status == 400 and "limit='0'" in (await bad_limit.json())["error"]["message"]

        odd = gateway.start("gateway.generate", "")
        store.begin("odd id/1", trace_id_of(odd), "demo", 1)  # a client's own id: quoted in links
        odd.end()
        assert 'href="/traces/odd%20id%2F1"' in await (await client.get("/traces")).text()
        reply = await (await client.get("/traces/odd%20id%2F1?format=json")).json()
        assert reply["request_id"] == "odd id/1" and [s["name"] for s in reply["spans"]] == [
            "gateway.generate"
        ]
    for c in channels.values():
        await c.close()
    await worker.stop(0)
    gateway.shutdown()
    decode.shutdown()


def test_trace_routes():
    asyncio.run(_scenario())


def test_get_spans_refuses_a_bad_trace_id():
    async def scenario() -> None:
        server = MeshServer(ServerOptions(grace_s=0))
        spans_service.add_to_server(server, None)
        await server.start()
        async with grpc.aio.insecure_channel(server.address) as channel:
            assert await spans_service.fetch_spans(channel, ["0" * 32], 5.0) == []  # tracing off: none
            with pytest.raises(ValueError, match="trace_ids='xyz' must be 32 lowercase hex digits"):
                await spans_service.fetch_spans(channel, ["xyz"], 5.0)
        await server.stop(0)

    asyncio.run(scenario())
