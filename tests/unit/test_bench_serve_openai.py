"""`moemesh bench serve --openai-url` against a small server speaking the OpenAI completions streaming protocol
(server-sent events), started here. It stands in for moemesh's own HTTP front until that lands: then this test
should target the real front (`moemesh up`'s --http-port)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

from moemesh.supervisor import free_ports  # noqa: E402


class OpenAIServer:
    """/v1/models and streaming /v1/completions: one SSE chunk per token, then a usage chunk, then [DONE]."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.bodies: list[dict] = []
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        prompt = body.get("prompt")
        if not (body.get("stream") is True and isinstance(body.get("max_tokens"), int) and prompt):
            return web.json_response({"error": {"message": f"bad request {body}"}}, status=400)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(body["max_tokens"]):
            await asyncio.sleep(0.002)
            chunk = {"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                     "choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}  # fmt: skip
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        prompt_tokens = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        usage = {
            "choices": [],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": body["max_tokens"]},
        }
        await response.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        return response

    def start(self) -> None:
        self.thread.start()
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        self.runner = web.AppRunner(app)
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    async def _start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def server():
    s = OpenAIServer(free_ports(1)[0])
    s.start()
    yield s
    s.stop()


def bench(*args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "moemesh.cli", "bench", "serve", "--no-progress", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def test_openai_stream_counts_every_token_and_writes_json_and_png(server, tmp_path):
    out = tmp_path / "openai.json"
    done = bench("--openai-url", f"http://127.0.0.1:{server.port}", "--vocab-size", "100", "--num-prompts", "6",
                 "--input-len", "10", "--output-len", "7", "--request-rate", "200", "--slo-ttft-ms", "5000",
                 "--result-file", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert {"name", "card", "date", "commit", "config", "metrics", "peer", "ratio"} <= result.keys()
    m = result["metrics"]
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (6, 0, 60, 42)
    assert m["request_goodput"] == pytest.approx(m["request_throughput"])
    assert m["mean_tpot_ms"] >= 2.0  # the server sleeps 2 ms before each token
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sent = server.bodies[-6:]  # the 4 warm-up requests came first
    assert len(server.bodies) == 4 + 6
    assert all(b["model"] == "fake-model" and len(b["prompt"]) == 10 and b["max_tokens"] == 7 for b in sent)
    assert all(b["ignore_eos"] is True and b["stream_options"] == {"include_usage": True} for b in sent)


def test_openai_without_a_vocab_size_says_what_to_pass(server):
    done = bench("--openai-url", f"http://127.0.0.1:{server.port}/v1", "--num-prompts", "2")
    assert done.returncode == 2
    assert "the server does not report its vocabulary size: pass --vocab-size" in done.stderr
