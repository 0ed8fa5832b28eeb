"""AsyncClient against the same fake Gateway as the sync tests: streaming, completion, errors, cancel."""

from __future__ import annotations

import asyncio

import pytest

from moemesh.sdk import AsyncClient, InvalidRequest, Overloaded, Unavailable
from tests.unit.test_sdk_client import EOS, gateway, socket_port  # noqa: F401  (the fixture)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_async_generate_streams_and_complete_joins(gateway):  # noqa: F811
    _, target = gateway

    async def body():
        async with AsyncClient(target) as client:
            chunks = [c async for c in client.generate(prompt="hi", max_tokens=2)]
            result = await client.complete(token_ids=[1])
            models = await client.list_models()
        return chunks, result, models

    chunks, result, models = run(body())
    assert [c.token_ids for c in chunks] == [[100], [101], []]
    assert [c.finish_reason for c in chunks] == [None, None, "length"]
    assert result.token_ids == [100, 101, 102, 103, 104, EOS] and result.finish_reason == "stop"
    assert models == ["demo"]


def test_async_errors_map_to_the_same_exceptions(gateway):  # noqa: F811
    servicer, target = gateway

    async def body():
        async with AsyncClient(target) as client:
            with pytest.raises(InvalidRequest, match="max_tokens=0 must be >= 1"):
                client.generate(prompt="x", max_tokens=0)
            with pytest.raises(InvalidRequest, match="temperature=50.0 must be <= 10"):
                await client.complete(prompt="x", temperature=50)
            with pytest.raises(Overloaded):
                await client.complete(prompt="busy")

    run(body())
    assert len(servicer.requests) == 2  # the locally invalid one never left


def test_async_cancel_ends_iteration_and_reaches_the_server(gateway):  # noqa: F811
    servicer, target = gateway

    async def body():
        async with AsyncClient(target) as client:
            stream = client.generate(prompt="slow")
            first = await stream.__anext__()
            stream.cancel()
            rest = [c async for c in stream]
        return first, rest

    first, rest = run(body())
    assert first.token_ids == [100] and rest == []
    assert servicer.cancelled.wait(5)


def test_async_health_and_request_ids(gateway):  # noqa: F811
    _, target = gateway

    async def body():
        async with AsyncClient(target, timeout_s=5) as client:
            serving = (await client.health(), await client.health("moemesh.v1.Gateway"))
            chunks = [c async for c in client.generate(prompt="hi", max_tokens=2, request_id="a-1")]
            result = await client.complete(prompt="hi", max_tokens=1)
        with socket_port() as port:
            async with AsyncClient(f"127.0.0.1:{port}", timeout_s=2) as client:
                with pytest.raises(Unavailable):
                    await client.health()
        return serving, chunks, result

    serving, chunks, result = run(body())
    assert serving == (True, False)
    assert [c.request_id for c in chunks] == ["a-1"] * 3
    assert result.request_id == "r1"
