"""The gateway's HTTP front in this process (a real Gateway with the demo tokenizer, no workers registered),
driven by the real `openai` client: every error's status, OpenAI error shape and `param`; X-Request-Id on
every response; API keys (401); routes other modules add; chat prompts through the checkpoint's template
or the plain one; failures counted in /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from moemesh.config.mesh import DEMO_DIR, GatewayConfig
from moemesh.model.tokenizer import Tokenizer
from moemesh.services.gateway.http import api_key_check, build_http_app, request_id_of
from moemesh.services.gateway.openai_schema import parse_chat, plain_chat
from moemesh.services.gateway.worker import Delta, Gateway
from moemesh.services.metrics_http import serve_http
from moemesh.supervisor import free_ports
from moemesh.telemetry.metrics import GatewayMetrics, new_registry
from moemesh.transport.errors import Unavailable
from moemesh.transport.registry import Membership
from moemesh.transport.security import ApiKeys

openai = pytest.importorskip("openai")  # the dev extra has it; the GPU machines do not


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


@contextlib.asynccontextmanager
async def front(pick_timeout_s: float = 0.0, max_inflight: int = 8, **app_kwargs):
    """An HTTP front on a free port; yields (base url, the gateway, the registry)."""
    config = GatewayConfig(model="demo", pick_timeout_s=pick_timeout_s, max_inflight=max_inflight)
    registry = new_registry()
    gateway = Gateway(config, Membership(heartbeat_interval_s=0.5, expiry_intervals=10), Tokenizer(DEMO_DIR),
                      vocab_size=4096, max_context_tokens=256, channel_factory=None,
                      metrics=GatewayMetrics(registry))  # fmt: skip
    (port,) = free_ports(1)
    async with serve_http(build_http_app(gateway, registry, **app_kwargs), "127.0.0.1", port):
        yield f"http://127.0.0.1:{port}", gateway, registry


def client(base: str, api_key: str = "none") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base + "/v1", api_key=api_key, max_retries=0)


async def expect_error(
    kind: type[openai.APIStatusError], call, request_id: str = "gw-"
) -> openai.APIStatusError:
    """request_id: what the response's X-Request-Id starts with (the gateway's ids are gw-N)."""
    with pytest.raises(kind) as info:
        await call
    err = info.value
    assert set(err.body) == {"message", "type", "param", "code"}, err.body  # OpenAI's error object
    assert err.response.headers["X-Request-Id"].startswith(request_id)
    return err


def test_bad_fields_are_400_naming_the_field():
    async def body():
        async with front() as (base, _, _):
            c = client(base)
            cases = [
                (dict(prompt="hi", n=2), "n"),
                (dict(prompt="hi", max_tokens=0), "max_tokens"),
                (dict(prompt="hi", temperature=-1), "temperature"),
                (dict(prompt="hi", top_p=0), "top_p"),
                (dict(prompt="hi", logprobs=21), "logprobs"),
                (dict(prompt="", max_tokens=4), "prompt"),
                (dict(prompt=[5, 10**9]), "prompt"),  # a token id past the vocabulary
                (dict(prompt="hi", stop=[""]), "stop"),
                (dict(prompt="hi", echo=True), "echo"),
                (dict(prompt="hi", extra_body={"stream_options": {"include_usage": True}}), "stream_options"),
            ]
            for kwargs, param in cases:
                err = await expect_error(openai.BadRequestError, c.completions.create(model="demo", **kwargs))
                assert (err.status_code, err.body["param"], err.body["type"]) == (
                    400, param, "invalid_request_error"), (kwargs, err.body)  # fmt: skip
            chat_cases = [
                (dict(messages=[]), "messages"),
                (dict(messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
                (dict(messages=[{"role": "user", "content": "x"}], n=3), "n"),
                (dict(messages=[{"role": "user", "content": "x"}], top_logprobs=2), "top_logprobs"),
                (dict(messages=[{"role": "user", "content": "x"}], max_completion_tokens=0), "max_tokens"),
            ]
            for kwargs, param in chat_cases:
                err = await expect_error(
                    openai.BadRequestError, c.chat.completions.create(model="demo", **kwargs)
                )
                assert (err.status_code, err.body["param"]) == (400, param), (kwargs, err.body)
            err = await expect_error(openai.NotFoundError, c.completions.create(model="gpt-9", prompt="hi"))
            assert (err.body["param"], err.body["code"]) == ("model", "model_not_found")
            assert "model='gpt-9' is not served here" in err.body["message"]
            async with aiohttp.ClientSession() as http:
                async with http.post(base + "/v1/completions", data=b"{not json") as r:
                    assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_request_error"
                async with http.get(base + "/v1/nothing") as r:
                    assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"
                    assert r.headers["X-Request-Id"].startswith("gw-")
                async with http.get(base + "/v1/models", headers={"X-Request-Id": "bad id!"}) as r:
                    assert r.status == 400 and (await r.json())["error"]["param"] == "X-Request-Id"

    run(body())


def test_mesh_errors_map_to_503_429_504_with_the_request_id():
    async def body():
        async with front(pick_timeout_s=0.0) as (base, _, registry):
            err = await expect_error(
                openai.InternalServerError, client(base).completions.create(model="demo", prompt="hi")
            )
            assert (err.status_code, err.body["code"]) == (503, "unavailable")
            assert "no decode worker is registered" in err.body["message"]
            err = await expect_error(
                openai.InternalServerError,
                client(base).chat.completions.create(model="demo", messages=[{"role": "user", "content": "x"}],
                                                     stream=True),
            )  # fmt: skip
            assert err.status_code == 503  # a stream that fails before its first token: the status, not a 200
            failed = scrape(registry)["moemesh_requests_failed_total"]
            assert failed == {(("code", "UNAVAILABLE"),): 2.0}
        async with front(pick_timeout_s=30.0, max_inflight=1) as (base, gateway, _):
            c = client(base)
            parked = asyncio.ensure_future(c.completions.create(model="demo", prompt="hi"))  # waits in pick
            while gateway.inflight == 0:
                await asyncio.sleep(0.01)
            err = await expect_error(openai.RateLimitError, c.completions.create(model="demo", prompt="hi"))
            assert (err.status_code, err.body["code"]) == (429, "resource_exhausted")
            assert "max_inflight=1" in err.body["message"]
            parked.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await parked
            while gateway.inflight:  # the client left: the server cancelled the request
                await asyncio.sleep(0.01)
            err = await expect_error(
                openai.APIStatusError,
                c.completions.create(model="demo", prompt="hi", extra_body={"timeout_s": 0.2},
                                     extra_headers={"X-Request-Id": "deadline-1"}),
                request_id="deadline-1",
            )  # fmt: skip
            assert (err.status_code, err.body["code"]) == (504, "deadline_exceeded")

    run(body())


def test_a_stream_that_fails_after_its_first_token_ends_with_an_error_event_and_done():
    async def body():
        async with front() as (base, gateway, registry):

            async def lost_after_one_token(job, time_remaining):  # D is lost with no other to migrate to
                yield Delta([5], "Holmes", None)
                raise Unavailable("lost decode worker(s) decode-0 and no other is registered")

            gateway._migrating = lost_after_one_token
            stream = await client(base).completions.create(model="demo", prompt="hi", stream=True)
            texts = []
            with pytest.raises(openai.APIError, match="lost decode worker"):
                async for chunk in stream:
                    texts.append(chunk.choices[0].text)
            assert texts == ["Holmes"]
            payload = {"model": "demo", "prompt": "hi", "stream": True}
            async with (
                aiohttp.ClientSession() as http,
                http.post(base + "/v1/completions", json=payload) as r,
            ):
                assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
                events = [e for e in (await r.text()).split("\n\n") if e]
            assert events[-1] == "data: [DONE]"
            error = json.loads(events[-2].removeprefix("data: "))["error"]
            assert (error["type"], error["code"]) == ("service_unavailable_error", "unavailable")
            assert scrape(registry)["moemesh_requests_failed_total"] == {(("code", "UNAVAILABLE"),): 2.0}

    run(body())


def test_api_keys_answer_401_without_the_key_and_extra_routes_are_mounted():
    async def extra(request: web.Request) -> web.Response:
        return web.json_response({"request_id": request_id_of(request)})

    keys = api_key_check(ApiKeys(["sesame"]))  # what the gateway's --api-keys installs
    assert api_key_check(ApiKeys([])) is None  # no keys: no check

    async def body():
        async with front(authenticate=keys, extra_routes=[web.get("/extra", extra)]) as (base, _, _):
            for wrong in ("none", "sesame2"):
                err = await expect_error(
                    openai.AuthenticationError, client(base, api_key=wrong).models.list()
                )
                assert (err.status_code, err.body["type"]) == (401, "authentication_error")
                assert "sesame" not in err.body["message"]
            err = await expect_error(
                openai.AuthenticationError, client(base).completions.create(model="demo", prompt="hi")
            )
            assert "Authorization: Bearer <key>" in err.body["message"]
            models = await client(base, api_key="sesame").models.list()
            assert [m.id for m in models.data] == ["demo"]
            async with aiohttp.ClientSession() as http:
                async with http.get(base + "/extra") as r:  # added routes sit behind the same check
                    assert r.status == 401
                async with http.get(base + "/extra", headers={"Authorization": "Bearer sesame"}) as r:
                    assert r.status == 200
                    assert (await r.json())["request_id"] == r.headers["X-Request-Id"]
                async with http.get(base + "/metrics") as r:  # scrapes need no key
                    assert r.status == 200 and "moemesh_requests_failed_total" in await r.text()

    run(body())


def test_chat_prompts_use_the_checkpoints_template_or_the_plain_one():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Holmes?"}]
    demo = Tokenizer(DEMO_DIR)
    parsed = parse_chat({"messages": messages}, demo.apply_chat_template)
    assert parsed.prompt_text == "System: Be brief.\n\nUser: Who is Holmes?\n\nAssistant:"
    assert plain_chat(messages) == parsed.prompt_text  # the fallback reads the same as the demo's template
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert parse_chat({"messages": parts}, plain_chat).prompt_text == "User: ab\n\nAssistant:"


def scrape(registry) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted labels: value}} of the registry's text format."""
    from moemesh.telemetry.metrics import render

    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(render(registry).decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out
