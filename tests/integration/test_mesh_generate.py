"""The mesh in real processes (`moemesh up`, real gRPC and UCX over loopback) on a tiny checkpoint: greedy outputs
equal in-process `LLM.generate` token for token (pd with 1 prefill + 2 decode workers, and colocated), stop
strings, cancellation returning every page on every worker, bad input, and no process left behind."""

from __future__ import annotations

import asyncio
import os
import random
import re
import time

import grpc
import pytest
import torch

from moemesh import LLM, SamplingParams
from moemesh._proto.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from moemesh.config.engine import EngineConfig
from moemesh.sdk import AsyncClient, Client, DeadlineExceeded, InvalidRequest, Overloaded
from tests.integration.mesh_tiny import TINY_ENV, build_tiny, start_mesh

pytest.importorskip("ucxx")

PROMPT = "The old man and the sea"
PREFILLED = re.compile(r"\[prefill-0\] .* in (?P<chunks>\d+) chunks of up to (?P<layers>\d+) layers")
HANDOFF = re.compile(  # D's log line for each request prefilled on P
    r"\[(?P<decode>decode-\d)\] .* prefilled on prefill-0, .*\((?P<received>\d+) bytes, P sent (?P<sent>\d+)\)"
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny-mesh"))


@pytest.fixture(scope="module")
def llm(tiny_dir):
    """The reference, in this process; one torch thread, as each worker of a mesh on 2 cores gets."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _reference_llm(tiny_dir)
    torch.set_num_threads(threads)


def _reference_llm(tiny_dir) -> LLM:
    config = EngineConfig(
        page_size=int(TINY_ENV["MOEMESH_PAGE_SIZE"]), num_kv_pages=int(TINY_ENV["MOEMESH_NUM_KV_PAGES"]),
        max_num_seqs=int(TINY_ENV["MOEMESH_MAX_NUM_SEQS"]),
        max_num_batched_tokens=int(TINY_ENV["MOEMESH_MAX_NUM_BATCHED_TOKENS"]),
    )  # fmt: skip
    return LLM(tiny_dir, device="cpu", dtype="float32", engine_config=config)


def _mesh_fixture(topology: str, num_decode: int):
    @pytest.fixture(scope="module")
    def fixture(tiny_dir):
        mesh = start_mesh(tiny_dir, topology, num_decode=num_decode)
        try:
            yield mesh
        finally:
            code = mesh.stop()
            assert code == 0, "\n".join(mesh.lines[-30:])
            for name, pid in mesh.pids.items():  # every child was reaped: no orphans
                with pytest.raises(ProcessLookupError):
                    os.kill(pid, 0)
                    print(f"{name} pid {pid} is still alive")

    return fixture


pd_mesh = _mesh_fixture("pd", num_decode=2)
pd1_mesh = _mesh_fixture("pd", num_decode=1)
colocated_mesh = _mesh_fixture("colocated", num_decode=1)


def mixed_prompts(count: int, seed: int = 3) -> list[tuple[list[int], int]]:
    """(prompt token ids, max_tokens): prompts of 3..150 tokens, 1..24 new tokens."""
    rng = random.Random(seed)
    return [([rng.randrange(1, 320) for _ in range(rng.randrange(3, 150))], rng.randrange(1, 25))
            for _ in range(count)]  # fmt: skip


async def _complete_all(address: str, work: list[tuple[list[int], int]]):
    async with AsyncClient(address, timeout_s=120) as client:
        return await asyncio.gather(
            *(client.complete(token_ids=ids, max_tokens=n, temperature=0) for ids, n in work)
        )


def assert_same_as_llm(address: str, llm: LLM, work: list[tuple[list[int], int]]) -> None:
    results = asyncio.run(_complete_all(address, work))
    for i, ((ids, n), got) in enumerate(zip(work, results, strict=True)):
        want = llm.generate([ids], SamplingParams(max_tokens=n))[0]
        assert got.token_ids == want.token_ids, f"request {i} ({len(ids)} prompt tokens)"
        assert got.text == want.text, f"request {i}"
        assert got.finish_reason == want.finish_reason, f"request {i}"


@pytest.mark.parametrize("mesh_name", ["pd_mesh", "pd1_mesh", "colocated_mesh"])
def test_16_concurrent_greedy_requests_equal_llm_generate(mesh_name, request, llm):
    mesh = request.getfixturevalue(mesh_name)
    before = len(mesh.lines)
    assert_same_as_llm(mesh.address, llm, mixed_prompts(16))
    assert mesh.wait_settled() == {name: 0 for name in mesh.workers}  # every page back in every pool
    handoffs = [m for line in mesh.lines[before:] if (m := HANDOFF.search(line))]
    if (
        mesh_name != "colocated_mesh"
    ):  # every prompt was prefilled on P, its KV moved over UCX (crc32 per chunk)
        assert len(handoffs) == 16
        assert {m["decode"] for m in handoffs} == {f"decode-{i}" for i in range(len(mesh.workers) - 1)}
        assert all(m["received"] == m["sent"] and int(m["sent"]) > 0 for m in handoffs)
        prefills = [m for line in mesh.lines[before:] if (m := PREFILLED.search(line))]
        # each of the 3 layers a group of its own (packed while the forward runs): a chunk per layer and step
        assert len(prefills) == 16
        assert all(int(m["layers"]) == 1 and int(m["chunks"]) % 3 == 0 for m in prefills), prefills
    else:
        assert handoffs == []


def test_one_request_to_each_decode_worker_equals_llm_generate(pd_mesh, llm):
    """Sequential requests: the gateway alternates nothing in flight -> both D's see single requests too."""
    for ids, n in mixed_prompts(3, seed=5):
        assert_same_as_llm(pd_mesh.address, llm, [(ids, n)])


async def _timed_stream(address: str, ids: list[int], n: int) -> tuple[list[float], object]:
    """Seconds from the call to each chunk, and the last chunk's usage."""
    async with AsyncClient(address, timeout_s=60) as client:
        start, times, usage = time.monotonic(), [], None
        async for chunk in client.generate(token_ids=ids, max_tokens=n, temperature=0, ignore_eos=True):
            times += [time.monotonic() - start] * len(chunk.token_ids)
            usage = chunk.usage or usage
        return times, usage


@pytest.mark.parametrize("mesh_name", ["pd1_mesh", "colocated_mesh"])
def test_usage_reports_where_the_time_to_first_token_went(mesh_name, request):
    """The breakdown's spans are each measured by one worker: together they fit inside what the client saw
    until the second token (the first decoded on D), and each is a real, positive duration."""
    mesh = request.getfixturevalue(mesh_name)
    ids, _ = mixed_prompts(1, seed=11)[0]
    times, usage = asyncio.run(_timed_stream(mesh.address, ids, 4))
    assert len(times) == 4 and usage.completion_tokens == 4
    t = usage.ttft
    spans_ms = t.queue_ms + t.prefill_ms + t.kv_transfer_ms + t.handoff_ms + t.first_decode_step_ms
    if mesh_name == "pd1_mesh":
        assert t.remote_prefill
        # each a real span: a forward of the tiny model takes over 0.5 ms here (not a step-late timestamp)
        assert (
            t.prefill_ms > 0.5
            and t.first_decode_step_ms > 0.5
            and t.kv_transfer_ms >= 0
            and t.handoff_ms >= 0
        )
        assert spans_ms <= 1000 * times[1], (t, times)
        # the first token came from P: the client had it before D's first decode step was done
        assert t.queue_ms + t.prefill_ms + t.kv_transfer_ms <= 1000 * times[0], (t, times)
    else:
        assert not t.remote_prefill
        assert t.prefill_ms > 0.5 and t.kv_transfer_ms == t.handoff_ms == t.first_decode_step_ms == 0
        assert spans_ms <= 1000 * times[0], (t, times)


@pytest.mark.parametrize("mesh_name", ["pd1_mesh", "colocated_mesh"])
def test_usage_counts_the_prompt_tokens_the_prefix_cache_supplied(mesh_name, request):
    """The second time, the worker that computes the prompt (P, or the colocated worker) has its 7 full pages
    of 8 cached: usage says 56 of the 61 prompt tokens were not recomputed."""
    mesh = request.getfixturevalue(mesh_name)
    prompt = [(11 * i) % 297 + 2 for i in range(61)]
    with Client(mesh.address, timeout_s=60) as client:
        usages = [client.complete(token_ids=prompt, max_tokens=3, temperature=0).usage for _ in range(2)]
    assert [u.cached_prompt_tokens for u in usages] == [0, 56]
    assert [u.prompt_tokens for u in usages] == [61, 61] and [u.completion_tokens for u in usages] == [3, 3]


@pytest.mark.parametrize("mesh_name", ["pd1_mesh", "colocated_mesh"])
def test_logprobs_through_the_mesh_equal_llm_generate(mesh_name, request, llm):
    """One logprob per token, the first one included when P sampled it, equal to in-process `LLM.generate`."""
    mesh = request.getfixturevalue(mesh_name)
    ids, _ = mixed_prompts(1, seed=23)[0]
    with Client(mesh.address, timeout_s=60) as client:
        got = client.complete(token_ids=ids, max_tokens=5, temperature=0, logprobs=3)
    want = llm.generate([ids], SamplingParams(max_tokens=5, logprobs=3))[0]
    assert got.token_ids == want.token_ids
    assert [lp.token_id for lp in got.logprobs] == got.token_ids
    for mine, ref in zip(got.logprobs, want.logprobs, strict=True):
        assert mine.logprob == pytest.approx(ref.logprob, abs=1e-4)
        assert [t for t, _ in mine.top] == [t for t, _ in ref.top]
        assert [v for _, v in mine.top] == pytest.approx([v for _, v in ref.top], abs=1e-4)


def test_a_prefix_cached_on_decode_is_not_sent_again(pd1_mesh, llm):
    """The second time, D's prefix cache holds the prompt's full pages: P sends only the rest (KvTarget's
    tokens to skip) and the output is still the same."""
    prompt = [(7 * i) % 300 + 1 for i in range(61)]  # 7 full pages of 8 and 5 tokens
    before = len(pd1_mesh.lines)
    for _ in range(2):
        assert_same_as_llm(pd1_mesh.address, llm, [(prompt, 6)])
    handoffs = [m for line in pd1_mesh.lines[before:] if (m := HANDOFF.search(line))]
    sent = [int(m["sent"]) for m in handoffs]
    assert len(sent) == 2 and sent[1] * 8 == sent[0], sent  # 8 pages the first time, the last page only then
    assert "5 of 61 prompt tokens' KV received" in handoffs[1].string


def test_text_prompt_streams_the_same_text_and_stop_strings_cut_it(pd_mesh, llm):
    want = llm.generate([PROMPT], SamplingParams(max_tokens=24))[0]
    with Client(pd_mesh.address, timeout_s=60) as client:
        chunks = list(client.generate(prompt=PROMPT, max_tokens=24, temperature=0))
        assert [t for c in chunks for t in c.token_ids] == want.token_ids
        assert "".join(c.text for c in chunks) == want.text
        assert (
            all(c.finish_reason is None for c in chunks[:-1])
            and chunks[-1].finish_reason == want.finish_reason
        )
        stop = want.text[len(want.text) // 2 :][:2]  # a string the output is known to contain
        cut = llm.generate([PROMPT], SamplingParams(max_tokens=24, stop=(stop,)))[0]
        got = client.complete(prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
        assert (got.text, got.finish_reason) == (cut.text, "stop")
        assert got.token_ids == cut.token_ids
        assert client.tokenize(PROMPT) == llm.tokenizer.encode(PROMPT)


def test_cancel_mid_stream_returns_every_page_on_decode_and_prefill(pd_mesh):
    assert pd_mesh.wait_settled() == {name: 0 for name in pd_mesh.workers}
    with Client(pd_mesh.address, timeout_s=60) as client:
        for prompt_len in (20, 300):  # cancelled while decoding; cancelled early (during a long prefill)
            stream = client.generate(
                token_ids=list(range(1, prompt_len + 1)), max_tokens=200, ignore_eos=True
            )
            if prompt_len == 20:
                for _ in range(3):
                    next(stream)
            stream.cancel()
            assert pd_mesh.wait_settled() == {name: 0 for name in pd_mesh.workers}
        assert client.complete(token_ids=[5, 6, 7], max_tokens=2).finish_reason == "length"  # still serving


def test_decode_out_of_pages_is_back_pressure_and_the_rest_completes(pd1_mesh, llm):
    """6 prompts of 500 tokens need 6 x 63 pages at once; D has 256: the ones it cannot lease get
    RESOURCE_EXHAUSTED (the SDK's Overloaded) at once, never a queue; the others are right; pages come back."""
    work = [([(i * 31 + j * 7) % 300 + 1 for j in range(500)], 3) for i in range(6)]

    async def body():
        async with AsyncClient(pd1_mesh.address, timeout_s=120) as client:
            calls = (client.complete(token_ids=ids, max_tokens=n, temperature=0) for ids, n in work)
            return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(body())
    refused = [r for r in results if isinstance(r, Overloaded)]
    assert 1 <= len(refused) <= 3 and "no room for 500 tokens" in str(refused[0]), results
    for (ids, n), got in zip(work, results, strict=True):
        if not isinstance(got, Overloaded):
            assert got.token_ids == llm.generate([ids], SamplingParams(max_tokens=n))[0].token_ids
    assert pd1_mesh.wait_settled() == {name: 0 for name in pd1_mesh.workers}


def test_the_client_deadline_bounds_every_hop_and_frees_every_page(pd_mesh):
    with Client(pd_mesh.address) as client, pytest.raises(DeadlineExceeded):
        client.complete(token_ids=list(range(1, 300)), max_tokens=200, ignore_eos=True, timeout_s=0.1)
    assert pd_mesh.wait_settled() == {name: 0 for name in pd_mesh.workers}


def test_bad_input_is_invalid_argument_naming_field_and_value(pd_mesh):
    with Client(pd_mesh.address, timeout_s=30) as client:
        with pytest.raises(InvalidRequest, match=r"token_ids\[1\]=500 must be < vocab_size=320"):
            client.complete(token_ids=[5, 500], max_tokens=2)
        with pytest.raises(InvalidRequest, match="max_tokens"):
            client.complete(prompt=PROMPT, max_tokens=0)
        with pytest.raises(InvalidRequest, match="max_context_tokens"):
            client.complete(token_ids=[3] * 600, max_tokens=2)
    with grpc.insecure_channel(
        pd_mesh.address
    ) as channel:  # what the server says when the SDK does not check
        stub = gateway_pb2_grpc.GatewayStub(channel)
        cases = [
            (gateway_pb2.GenerateRequest(text="", sampling=common_pb2.SamplingParams()), "prompt=''"),
            (gateway_pb2.GenerateRequest(text=PROMPT, sampling=common_pb2.SamplingParams(max_tokens=0)),
             "max_tokens=0 must be >= 1"),
            (gateway_pb2.GenerateRequest(text=PROMPT, sampling=common_pb2.SamplingParams(temperature=-1)),
             "temperature=-1.0 must be >= 0"),
        ]  # fmt: skip
        for req, message in cases:
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(req, timeout=10))
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert message in err.value.details()


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
def test_idle_workers_do_not_spin(pd_mesh):
    """UCX progress runs in ucxx's thread with its notifier thread: nothing polls while idle (the blocking mode
    spun ~0.5 core per worker with a receive pending)."""
    pids = {name: pd_mesh.pids[name] for name in pd_mesh.workers}
    pd_mesh.wait_settled()  # the previous test's requests are done everywhere: what follows is idle time
    time.sleep(0.5)
    before = {name: _cpu_ticks(pid) for name, pid in pids.items()}
    time.sleep(2.0)
    used = {
        name: (_cpu_ticks(pid) - before[name]) / os.sysconf("SC_CLK_TCK") / 2.0 for name, pid in pids.items()
    }
    assert all(cores < 0.15 for cores in used.values()), used


def test_bench_serve_against_the_mesh_completes_every_request_with_every_token(pd1_mesh, tmp_path):
    """`moemesh bench serve` through the SDK: a single run and a two-rate sweep, JSON + PNG written."""
    import json
    import subprocess
    import sys

    def bench(out, *args: str) -> dict:
        argv = [sys.executable, "-m", "moemesh.cli", "bench", "serve", "--target", pd1_mesh.address,
                "--num-prompts", "6", "--input-len", "20", "--output-len", "8", "--range-ratio", "0",
                "--no-progress", "--result-file", str(out), *args]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        return json.loads(out.read_text())

    single = bench(tmp_path / "one.json", "--request-rate", "40", "--slo-ttft-ms", "60000")
    assert {"name", "card", "date", "commit", "config", "metrics", "peer", "ratio"} <= single.keys()
    m = single["metrics"]
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (6, 0, 120, 48)
    assert m["request_goodput"] == pytest.approx(m["request_throughput"])
    assert 0 < m["median_ttft_ms"] <= m["p99_ttft_ms"] <= m["p99_e2el_ms"]
    sweep = bench(tmp_path / "sweep.json", "--sweep", "40,inf", "--concurrency", "3")
    assert [(r["request_rate"], r["completed"], r["total_output_tokens"]) for r in sweep["metrics"]] == [
        (40.0, 6, 48),
        ("inf", 6, 48),
    ]
    assert pd1_mesh.wait_settled() == {name: 0 for name in pd1_mesh.workers}
