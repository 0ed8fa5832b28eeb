"""The OpenAI-compatible HTTP front and /metrics of a real `moemesh up` mesh (pd: gateway, prefill, decode
processes) on the tiny checkpoint, used as a user would: the `openai` client, streaming and not, chat and
completions; greedy output equal to the gRPC SDK's; every role's /metrics scraped and parsed, with values that
follow from the requests sent."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moemesh.sdk import Client
from tests.integration.mesh_tiny import TINY_ENV, build_tiny, start_mesh

openai = pytest.importorskip("openai")  # the dev extra has it; the GPU machines do not

pytest.importorskip("ucxx")

PROMPT = "The old man and the sea"
PAGE_SIZE = int(TINY_ENV["MOEMESH_PAGE_SIZE"])


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    tiny = build_tiny(tmp_path_factory.mktemp("tiny-http"))
    mesh = start_mesh(tiny, "pd")
    try:
        ready = next(line for line in mesh.lines if line.startswith("ready on"))
        mesh.http = re.search(r"OpenAI-compatible HTTP on (http://\S+)/v1", ready).group(1)
        mesh.metrics = {name: url for name, url in (re.match(r"started (\S+) pid=\d+ on \S+ \(metrics (\S+)\)", line).groups()
                        for line in mesh.lines if line.startswith("started "))}  # fmt: skip
        mesh.kv_bytes_per_page = _kv_bytes_per_page(tiny)
        mesh.model = tiny.name  # the gateway serves a checkpoint directory under its name
        yield mesh
    finally:
        assert mesh.stop() == 0, "\n".join(mesh.lines[-30:])


@pytest.fixture(scope="module")
def oai(mesh):
    return openai.OpenAI(base_url=mesh.http + "/v1", api_key="none", max_retries=0, timeout=120)


def _kv_bytes_per_page(tiny) -> int:
    config = json.loads((tiny / "config.json").read_text())
    per_token = (config["kv_lora_rank"] + config["qk_rope_head_dim"]) * 4  # float32 (TINY_ENV's dtype)
    return per_token * PAGE_SIZE * config["num_hidden_layers"]


def test_up_prints_the_http_and_metrics_urls_and_health_says_serving(mesh, oai):
    assert set(mesh.metrics) == {"gateway", "prefill-0", "decode-0"}
    assert mesh.metrics["gateway"] == mesh.http + "/metrics"
    assert [m.id for m in oai.models.list().data] == [mesh.model]
    with Client(mesh.address, timeout_s=10) as client:
        assert client.health() is True
        assert client.health("moemesh.v1.Gateway") is True


def test_greedy_completion_equals_the_sdk_streamed_or_not(mesh, oai):
    with Client(mesh.address, timeout_s=120) as client:
        sdk = client.complete(prompt=PROMPT, max_tokens=12, temperature=0)
    whole = oai.completions.with_raw_response.create(model=mesh.model, prompt=PROMPT, max_tokens=12,
                                                     temperature=0)  # fmt: skip
    body = whole.parse()
    assert body.choices[0].text == sdk.text and body.choices[0].finish_reason == sdk.finish_reason
    assert (body.usage.prompt_tokens, body.usage.completion_tokens) == (
        sdk.usage.prompt_tokens, len(sdk.token_ids))  # fmt: skip
    assert body.usage.total_tokens == body.usage.prompt_tokens + body.usage.completion_tokens
    assert body.id == "cmpl-" + whole.headers["X-Request-Id"]
    stream = oai.completions.create(model=mesh.model, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                    stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == sdk.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(sdk.token_ids)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == sdk.finish_reason
    assert len({c.id for c in chunks}) == 1


def test_chat_streamed_equals_whole_and_stop_strings_cut_the_text(mesh, oai):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    whole = oai.chat.completions.create(model=mesh.model, messages=messages, max_tokens=10, temperature=0)
    text = whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens == 10
    with Client(mesh.address, timeout_s=120) as client:  # the plain template's prompt, through the SDK
        sdk = client.complete(
            prompt="User: Tell me about the sea.\n\nAssistant:", max_tokens=10, temperature=0
        )
    assert text == sdk.text and whole.usage.prompt_tokens == sdk.usage.prompt_tokens
    stream = oai.chat.completions.create(model=mesh.model, messages=messages, max_tokens=10, temperature=0,
                                         stream=True)  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    stop = text[3:5]
    if stop.strip():  # a stop string inside the greedy text: the answer ends before it
        cut = oai.chat.completions.create(model=mesh.model, messages=messages, max_tokens=10, temperature=0,
                                          stop=[stop])  # fmt: skip
        assert cut.choices[0].message.content == text[: text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_logprobs_seed_and_n(mesh, oai):
    out = oai.completions.create(model=mesh.model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert (
            logprob <= 0 and len(top) <= 2 and max(top.values()) == pytest.approx(logprob)
        )  # greedy: the best
    chat = oai.chat.completions.create(model=mesh.model, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    seeded = [oai.completions.create(model=mesh.model, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5)
              .choices[0].text for _ in range(2)]  # fmt: skip
    assert seeded[0] == seeded[1]
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=mesh.model, prompt=PROMPT, n=2)
    assert info.value.status_code == 400 and info.value.body["param"] == "n"


def test_a_client_that_disconnects_mid_stream_cancels_the_request_on_every_worker(mesh, oai):
    failed_before = value(scrape(mesh.metrics["gateway"]), "moemesh_requests_failed_total", code="CANCELLED")
    stream = oai.completions.create(model=mesh.model, prompt=PROMPT, max_tokens=400, temperature=0, stream=True,
                                    extra_body={"ignore_eos": True})  # fmt: skip
    received = [next(stream).choices[0].text for _ in range(3)]
    stream.close()  # the connection drops with ~400 tokens to go
    assert len(received) == 3
    _wait_settled(mesh)
    gateway = scrape(mesh.metrics["gateway"])
    assert value(gateway, "moemesh_requests_failed_total", code="CANCELLED") == failed_before + 1
    assert value(gateway, "moemesh_gateway_requests_inflight") == 0
    decode = scrape(mesh.metrics["decode-0"])
    assert value(decode, "moemesh_kv_pages_used") == 0 and value(decode, "moemesh_requests_running") == 0


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(samples: dict[str, dict[tuple, float]], name: str, **labels: str) -> float:
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def test_metrics_follow_from_the_requests_sent(mesh, oai):
    before = {name: scrape(url) for name, url in mesh.metrics.items()}
    prompts = [
        [7 + i] * (5 + 9 * i) for i in range(3)
    ]  # distinct first tokens: no prefix shared; 5, 14, 23 tokens
    usages = []
    for i, prompt in enumerate(prompts):
        out = oai.completions.create(model=mesh.model, prompt=prompt, max_tokens=4 + i, temperature=0,
                                     stream=True, stream_options={"include_usage": True})  # fmt: skip
        usages.append(list(out)[-1].usage)
    again = oai.completions.create(model=mesh.model, prompt=prompts[2], max_tokens=2, temperature=0)
    usages.append(again.usage)  # its 23-token prompt is cached now: 2 full pages on the decode worker
    _wait_settled(mesh)
    after = {name: scrape(url) for name, url in mesh.metrics.items()}

    def delta(worker: str, name: str, **labels: str) -> float:
        return value(after[worker], name, **labels) - value(before[worker], name, **labels)

    num_requests, tokens = len(usages), sum(u.completion_tokens for u in usages)
    finished = delta("gateway", "moemesh_requests_finished_total", finish_reason="length")
    assert finished == num_requests
    assert delta("gateway", "moemesh_time_to_first_token_seconds_count") == num_requests
    assert delta("gateway", "moemesh_request_duration_seconds_count") == num_requests
    assert delta("gateway", "moemesh_inter_token_latency_seconds_count") == tokens - num_requests
    assert delta("gateway", "moemesh_generation_tokens_total") == tokens
    assert delta("gateway", "moemesh_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert value(after["gateway"], "moemesh_gateway_requests_inflight") == 0
    assert value(after["gateway"], "moemesh_workers_registered", role="decode") == 1
    assert value(after["gateway"], "moemesh_workers_registered", role="prefill") == 1
    # The decode worker queued every request; the prefill worker sent the three new prompts' KV, page by page.
    assert delta("decode-0", "moemesh_request_queue_time_seconds_count") == num_requests
    pages = sum(-(-len(p) // PAGE_SIZE) for p in prompts)
    assert delta("prefill-0", "moemesh_kv_transfer_seconds_count") >= len(prompts)
    assert delta("prefill-0", "moemesh_kv_transfer_bytes_total") >= pages * mesh.kv_bytes_per_page
    assert delta("prefill-0", "moemesh_kv_transfer_failures_total") == 0
    hits = sum(delta(w, "moemesh_prefix_cache_hit_tokens_total") for w in ("prefill-0", "decode-0"))
    assert hits >= 2 * PAGE_SIZE  # the repeated prompt's two full pages
    for worker in ("prefill-0", "decode-0"):
        s = after[worker]
        role = worker.split("-")[0]
        assert (
            value(s, "moemesh_build_info", version="0.1.0", role=role, model=_model_label(s), device="cpu")
            == 1
        )
        assert value(s, "moemesh_requests_running") == value(s, "moemesh_requests_waiting") == 0
        assert value(s, "moemesh_kv_pages_used") == 0
        assert value(s, "moemesh_kv_pages_total") == int(TINY_ENV["MOEMESH_NUM_KV_PAGES"])
        free, cached = value(s, "moemesh_kv_pages_free"), value(s, "moemesh_kv_pages_cached")
        assert free + cached == value(s, "moemesh_kv_pages_total")
        assert delta(worker, "moemesh_engine_steps_total") > 0
    assert value(after["decode-0"], "moemesh_kv_pages_leased") == 0


def _model_label(samples: dict[str, dict[tuple, float]]) -> str:
    (labels,) = samples["moemesh_build_info"]
    return dict(labels)["model"]


def _wait_settled(mesh, timeout_s: float = 30.0) -> None:
    """Until no worker holds a page or runs a request (the engines finish after the last chunk went out)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        samples = [scrape(url) for name, url in mesh.metrics.items() if name != "gateway"]
        if all(
            value(s, "moemesh_kv_pages_used") == 0 and value(s, "moemesh_requests_running") == 0
            for s in samples
        ):
            return
        time.sleep(0.1)


def test_bench_serve_through_the_openai_front_counts_every_token(mesh, tmp_path):
    """`moemesh bench serve --openai-url` against this front: every request completes with every token."""
    out = tmp_path / "oai.json"
    argv = [sys.executable, "-m", "moemesh.cli", "bench", "serve", "--openai-url", mesh.http + "/v1",
            "--model", mesh.model, "--vocab-size", "320", "--num-prompts", "5", "--input-len", "12",
            "--output-len", "6", "--range-ratio", "0", "--request-rate", "inf", "--no-progress",
            "--result-file", str(out)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    m = json.loads(out.read_text())["metrics"]
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (5, 0, 60, 30)
    assert 0 < m["median_ttft_ms"] <= m["p99_e2el_ms"]
    _wait_settled(mesh)
    # OpenAI's /v1/models has no vocabulary size: without --vocab-size, synthetic prompts cannot be drawn.
    argv = [a for a in argv if a not in ("--vocab-size", "320")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "the server does not report its vocabulary size: pass --vocab-size" in done.stderr
