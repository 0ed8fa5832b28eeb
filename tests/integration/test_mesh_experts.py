"""Topology pd-experts in real processes (`moemesh up --topology pd-experts --experts 3`: gateway, prefill,
decode and three expert-pool workers; real gRPC and UCX over loopback) on the tiny checkpoint in BF16: greedy
output of concurrent ragged prompts through the SDK equals the colocated model's (`LLM`, one process, its
experts local) token for token; each expert worker reports tokens for its own experts only; an expert worker
killed mid-request ends the affected requests with UNAVAILABLE within their deadline, and no page leaks on any
worker; `moemesh rebalance` under load loses no request. One mesh for the module (the kill comes last)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moemesh import LLM, SamplingParams
from moemesh._proto.v1 import expert_pb2, expert_pb2_grpc
from moemesh.config.engine import EngineConfig
from moemesh.sdk import AsyncClient, Client, Unavailable
from moemesh.telemetry import spans as names
from moemesh.transport.channels import MeshChannels
from tests.integration.mesh_tiny import ROOT, TINY_ENV, build_tiny, start_mesh
from tests.integration.test_mesh_generate import mixed_prompts

pytest.importorskip("ucxx")

# BF16, and a token budget no concurrent prompt mix exceeds: in BF16 a prompt prefilled in chunks whose
# boundaries depend on what else is running may round differently (in any topology, experts or not), so every
# prompt is prefilled in one piece here and in the reference.
KNOBS = {**TINY_ENV, "MOEMESH_DTYPE": "bfloat16", "MOEMESH_EXPERT_TIMEOUT_S": "5",
         "MOEMESH_MAX_NUM_BATCHED_TOKENS": "4096"}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny-pd-experts"))


@pytest.fixture(scope="module")
def colocated(tiny_dir):
    config = EngineConfig(page_size=8, num_kv_pages=256, max_num_seqs=32, max_num_batched_tokens=4096)
    return LLM(tiny_dir, device="cpu", dtype="bfloat16", engine_config=config)


@pytest.fixture(scope="module")
def mesh(tiny_dir):
    mesh = start_mesh(
        tiny_dir, "pd-experts", num_expert=3, knobs=KNOBS, fail_fast=False, max_restarts=0, timeout_s=180
    )
    try:
        yield mesh
    finally:
        code = mesh.stop()
        assert code == 0, "\n".join(mesh.lines[-30:])
        for pid in mesh.pids.values():  # every child was reaped, the killed one too
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


async def _complete_all(address, work, timeout_s=120):
    async with AsyncClient(address, timeout_s=timeout_s) as client:
        return await asyncio.gather(
            *(client.complete(token_ids=ids, max_tokens=n, temperature=0) for ids, n in work),
            return_exceptions=True,
        )


def test_concurrent_greedy_requests_equal_the_colocated_model(mesh, colocated):
    assert sorted(mesh.workers) == ["decode-0", "expert-0", "expert-1", "expert-2", "prefill-0"]
    work = mixed_prompts(10, seed=7)
    results = asyncio.run(_complete_all(mesh.address, work))
    for i, ((ids, n), got) in enumerate(zip(work, results, strict=True)):
        assert not isinstance(got, BaseException), f"request {i}: {got!r}"
        want = colocated.generate([ids], SamplingParams(max_tokens=n))[0]
        assert got.token_ids == want.token_ids, f"request {i} ({len(ids)} prompt tokens)"
        assert got.finish_reason == want.finish_reason
    hosted = {"expert-0": {0, 1}, "expert-1": {2, 3, 4}, "expert-2": {5, 6, 7}}  # --experts i/3 of 8
    for name, experts in hosted.items():
        counts = mesh.load(name).expert_tokens
        assert {c.expert_id for c in counts} == experts and {c.layer for c in counts} == {1, 2}
        assert sum(c.num_tokens for c in counts) > 0, name
    assert mesh.wait_settled() == {name: 0 for name in mesh.workers}


def test_each_expert_worker_serves_its_token_counts_at_metrics(mesh):
    urls = {name: url for name, url in (re.match(r"started (\S+) pid=\d+ on \S+ \(metrics (\S+)\)", line).groups()
            for line in mesh.lines if line.startswith("started "))}  # fmt: skip
    assert {"expert-0", "expert-1", "expert-2"} <= set(urls)  # `up` gave each an HTTP port and printed it
    hosted = {"expert-0": {0, 1}, "expert-1": {2, 3, 4}, "expert-2": {5, 6, 7}}
    for name, experts in hosted.items():
        samples = _scrape(urls[name])  # after the requests above: nothing runs, so GetLoad agrees
        load = {(c.layer, c.expert_id): c.num_tokens for c in mesh.load(name).expert_tokens}
        served = {(int(dict(labels)["layer"]), int(dict(labels)["expert"])): v
                  for labels, v in samples.get("moemesh_expert_tokens_total", {}).items()}  # fmt: skip
        assert served == {key: n for key, n in load.items() if n > 0}, name
        assert {expert for _, expert in served} == experts, name  # > 0 exactly for its own experts
        batches = sum(samples["moemesh_expert_batches_total"].values())
        assert batches > 0 and sum(samples["moemesh_expert_compute_seconds_count"].values()) == batches
        rows = sum(samples["moemesh_expert_batch_tokens_total"].values())
        assert batches <= rows <= sum(served.values())  # a row per token sent, each with >= 1 slot here
        (info,) = map(dict, samples["moemesh_build_info"])
        assert info["role"] == "expert" and info["device"] == "cpu"


def test_each_attention_worker_traces_one_expert_dispatch_per_request(mesh, tiny_dir):
    """`up` keeps traces by default (--trace-buffer 256): the gateway's trace view shows P's and D's
    `expert.dispatch`, one per request and worker, and the output rows they say came back are the slots the
    pool counted (GetLoad) for that request."""
    config = json.loads((tiny_dir / "config.json").read_text())
    row_bytes = 2 * config["hidden_size"]  # bf16 output rows
    moe_layers, top_k = 2, config["num_experts_per_tok"]
    pool = [name for name in mesh.workers if name.startswith("expert")]

    def pool_slots() -> int:
        return sum(c.num_tokens for name in pool for c in mesh.load(name).expert_tokens)

    before = pool_slots()
    prompt, max_tokens = list(range(5, 24)), 6
    with Client(mesh.address, timeout_s=120) as client:
        client.complete(token_ids=prompt, max_tokens=max_tokens, temperature=0, request_id="experts-traced")
    deadline = time.monotonic() + 30
    while True:  # each process ends its spans as its part ends
        url = f"http://127.0.0.1:{mesh.http_port}/traces/experts-traced?format=json"
        with urllib.request.urlopen(url, timeout=30) as reply:
            trace = json.loads(reply.read())
        found = [s for s in trace["spans"] if s["name"] == names.EXPERT_DISPATCH]
        if len(found) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    by_id = {s["span_id"]: s for s in trace["spans"]}
    dispatch = {s["worker"]: s for s in found}
    assert sorted(dispatch) == ["decode-0", "prefill-0"], [(s["worker"], s["name"]) for s in found]
    p, d = dispatch["prefill-0"]["attributes"], dispatch["decode-0"]["attributes"]
    assert by_id[dispatch["prefill-0"]["parent_id"]]["name"] == names.PREFILL_FORWARD
    assert by_id[dispatch["decode-0"]["parent_id"]]["name"] == names.DECODE_STREAM
    # P: the prompt in one step; D: a step per token after P's first, the request alone in its batch
    assert (p[names.EXPERT_STEPS], p[names.EXPERT_LAYERS]) == (1, moe_layers)
    assert (d[names.EXPERT_STEPS], d[names.EXPERT_LAYERS]) == (max_tokens - 1, moe_layers * (max_tokens - 1))
    assert p[names.EXPERT_BYTES_RECEIVED] == len(prompt) * top_k * row_bytes * moe_layers
    assert d[names.EXPERT_BYTES_RECEIVED] == (max_tokens - 1) * top_k * row_bytes * moe_layers
    slots = (p[names.EXPERT_BYTES_RECEIVED] + d[names.EXPERT_BYTES_RECEIVED]) // row_bytes
    assert slots == pool_slots() - before  # what the pool computed for this request
    for a, tokens in ((p, len(prompt)), (d, max_tokens - 1)):
        assert tokens * moe_layers <= a[names.EXPERT_TOKENS] <= tokens * moe_layers * top_k
        assert a[names.EXPERT_BYTES_SENT] > a[names.EXPERT_TOKENS] * row_bytes  # bf16 rows + ids + weights
        assert set(a[names.EXPERT_WORKERS]) <= set(pool) and a[names.EXPERT_WORKERS]
    for span in found:  # the waits lie inside the span: first layer sent -> last answer combined
        assert 0 < span["attributes"][names.EXPERT_WAIT_MS] <= span["end_ms"] - span["start_ms"] + 0.01


def _scrape(url: str) -> dict[str, dict[tuple, float]]:
    """name -> {labels (sorted (key, value) pairs) -> value}."""
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _describe(mesh, name: str) -> tuple[int, ...]:
    """The experts `name` hosts (the same set in every MoE layer)."""
    with MeshChannels(None).sync(mesh.workers[name]) as channel:
        reply = expert_pb2_grpc.ExpertPoolStub(channel).DescribeExperts(
            expert_pb2.DescribeExpertsRequest(), timeout=5
        )
    (hosted,) = {tuple(p.expert_ids) for p in reply.placements}
    return hosted


def _rebalance(mesh, *flags: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "moemesh.cli", "rebalance", "--target", mesh.address, *flags]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)


def _printed_placement(stdout: str, block: str) -> dict[str, set[int]]:
    """`moemesh rebalance`'s "before:" / "after:" block -> worker -> experts."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{block}:"))
    out = {}
    for line in lines[start + 1 :]:
        m = re.match(r"  (\S+)\s+experts (\S+)\s+load", line)
        if not m:
            break
        out[m.group(1)] = {e for part in m.group(2).split(",") for e in _span(part)}
    return out


def _span(part: str) -> range:
    first, _, last = part.partition("-")
    return range(int(first), int(last or first) + 1)


def test_a_rebalance_under_load_loses_no_request(mesh, colocated):
    """`moemesh rebalance` (the CLI, through the gateway) while rounds of 6 concurrent greedy requests keep
    running (before, during and after it, whatever the box's speed): every request completes with the colocated
    model's tokens; the expert workers then describe the placement the command printed (3 experts each, 9 slots
    for 8: one replica) and compute on their new sets. (The kill test below relies on expert-1 then still
    hosting an expert nobody else does: at most one of its three is the replicated one.)"""
    before = {name: _describe(mesh, name) for name in ("expert-0", "expert-1", "expert-2")}
    assert before == {"expert-0": (0, 1), "expert-1": (2, 3, 4), "expert-2": (5, 6, 7)}
    work = [(ids, 24) for ids, _ in mixed_prompts(6, seed=21)]
    want = [
        colocated.generate([ids], SamplingParams(max_tokens=n, ignore_eos=True))[0].token_ids
        for ids, n in work
    ]
    done_requests: list[
        tuple[int, float, float, object]
    ] = []  # (work index, start, end, completion or error)
    stop = threading.Event()

    async def rounds():
        async with AsyncClient(mesh.address, timeout_s=120) as client:

            async def one(i):
                start = time.monotonic()
                try:
                    ids, n = work[i]
                    got = await client.complete(token_ids=ids, max_tokens=n, temperature=0, ignore_eos=True)
                except Exception as err:
                    got = err
                done_requests.append((i, start, time.monotonic(), got))

            while not stop.is_set():  # round after round: requests are in flight at every moment
                await asyncio.gather(*(one(i) for i in range(len(work))))

    sender = threading.Thread(target=lambda: asyncio.run(rounds()))
    sender.start()
    try:
        deadline = time.monotonic() + 60
        while mesh.load("decode-0").num_running_requests < 2:  # decoding: every step goes to the pool
            assert time.monotonic() < deadline and sender.is_alive(), "no requests reached decode-0"
            time.sleep(0.02)
        dry = _rebalance(mesh, "--dry-run")
        assert dry.returncode == 0, dry.stderr
        assert "dry run: nothing changed" in dry.stdout and _printed_placement(dry.stdout, "before") == {
            name: set(hosted) for name, hosted in before.items()
        }
        assert {name: _describe(mesh, name) for name in before} == before
        started_s = time.monotonic()
        done = _rebalance(mesh, "--slots-per-worker", "3")
        applied_s = time.monotonic()
        assert done.returncode == 0, done.stderr
        assert "applied:" in done.stdout, done.stdout
        deadline = time.monotonic() + 120
        while not any(start > applied_s for _, start, _, _ in list(done_requests)):  # a round after it, done
            assert time.monotonic() < deadline and sender.is_alive(), (
                "no request completed after the rebalance"
            )
            time.sleep(0.05)
    finally:
        stop.set()
        sender.join(timeout=120)
    assert not sender.is_alive(), "requests hung across the rebalance"
    assert any(start < applied_s and end > started_s for _, start, end, _ in done_requests)  # under load
    for i, start, _, got in done_requests:
        assert not isinstance(got, BaseException), f"request {i} sent at {start - started_s:+.2f} s: {got!r}"
        assert got.token_ids == want[i], f"request {i} sent at {start - started_s:+.2f} s"
    deadline = time.monotonic() + 10  # D's batches routed by the old epochs were refused and resent
    while not any("[decode-0]" in line and "by the refreshed placement" in line for line in list(mesh.lines)):
        assert time.monotonic() < deadline, "decode-0 never resent a layer by the new placement"
        time.sleep(0.1)
    after = _printed_placement(done.stdout, "after")
    assert {name: set(_describe(mesh, name)) for name in before} == after
    assert all(len(hosted) == 3 for hosted in after.values())
    replicas = [sum(e in hosted for hosted in after.values()) for e in range(8)]
    assert sorted(replicas) == [1] * 7 + [2]
    balance = [float(x) for x in re.findall(r"max/mean load per worker (\S+)", done.stdout)]
    assert len(balance) == 2 and balance[1] <= balance[0]
    counts = {name: mesh.load(name).expert_tokens for name in before}

    async def again():
        async with AsyncClient(mesh.address, timeout_s=120) as client:
            return await asyncio.gather(
                *(
                    client.complete(token_ids=ids, max_tokens=4, temperature=0, ignore_eos=True)
                    for ids, _ in work
                )
            )

    assert [r.token_ids for r in asyncio.run(again())] == [w[:4] for w in want]  # greedy: a prefix of the 24
    for name, hosted in after.items():  # the new sets compute, the dropped experts no more
        now = {(c.layer, c.expert_id): c.num_tokens for c in mesh.load(name).expert_tokens}
        then = {(c.layer, c.expert_id): c.num_tokens for c in counts[name]}
        grew = {e for (layer, e), n in now.items() if n > then.get((layer, e), 0)}
        assert grew and grew <= hosted, (name, grew, hosted)
    assert mesh.wait_settled() == {name: 0 for name in mesh.workers}


def test_a_killed_expert_worker_ends_requests_unavailable_without_leaking_pages(mesh):
    work = [(ids, 200) for ids, _ in mixed_prompts(4, seed=9)]
    results: list = []
    start = time.monotonic()
    sender = threading.Thread(
        target=lambda: results.extend(asyncio.run(_complete_all(mesh.address, work, 60)))
    )
    sender.start()
    deadline = time.monotonic() + 30
    while mesh.load("decode-0").num_running_requests == 0:  # decoding: every step needs every expert worker
        assert time.monotonic() < deadline and sender.is_alive(), "no request reached decode-0"
        time.sleep(0.02)
    before = len(mesh.lines)
    mesh.kill("expert-1")
    sender.join(timeout=90)
    assert not sender.is_alive(), "requests hung after an expert worker was lost"
    assert len(results) == len(work) and time.monotonic() - start < 60  # within the requests' deadline
    assert all(isinstance(r, Unavailable) for r in results), results
    causes = [line for line in mesh.lines[before:] if "[gateway]" in line and "lost after" in line]
    assert any("expert worker expert-1" in line for line in causes), causes  # why D failed them
    assert mesh.wait_settled() == {name: 0 for name in mesh.workers}  # P, D and the surviving pool
