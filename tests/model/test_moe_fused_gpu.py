"""The fused MoE path on a GPU: layer by layer against the reference path at V2-Lite expert shapes (BF16 and
FP8), captured in a CUDA graph, and greedy tokens of the whole engine unchanged (against transformers and
against the reference path)."""

from __future__ import annotations

import pytest
import torch

from moemesh import LLM, SamplingParams
from moemesh.config.engine import EngineConfig
from moemesh.model.moe_fused import fused_moe, set_fused
from tests.kernels.test_moe_fused import _fp8_copy, make_moe
from tests.model.test_generate_engine import assert_no_leaks, prompts
from tests.model.tiny import build_hf, hf_greedy, save_hf

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

V2_LITE_MOE = dict(hidden_size=2048, moe_intermediate_size=1408, n_routed_experts=64, num_experts_per_tok=6)


def _rel(out, ref):
    out, ref = out.float(), ref.float()
    rel = ((out - ref).norm() / ref.norm()).item()
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    return rel, cos


@pytest.mark.parametrize("kind", ["v2", "v3"])
def test_fused_layer_equals_reference_bf16_v2_lite_shapes(kind):
    moe = make_moe(
        kind,
        device="cuda",
        **V2_LITE_MOE,
        n_group=8 if kind == "v3" else 1,
        topk_group=4 if kind == "v3" else 1,
    )
    set_fused(moe, False)  # moe(x): the block's torch path (router, grouped LocalExperts, shared MLP)
    for tokens in (1, 8, 64, 256):
        x = torch.randn(tokens, 2048, device="cuda").bfloat16()
        rel, cos = _rel(fused_moe(moe, x), moe(x))
        assert rel < 1e-2 and cos > 0.9999, f"{tokens} tokens: relative L2 {rel:.4f}, cosine {cos:.6f}"


def test_fused_layer_equals_reference_fp8_v2_lite_shapes():
    moe = make_moe("v2", device="cuda", **V2_LITE_MOE)
    fp8, oracle = _fp8_copy(moe)
    set_fused(fp8, False)
    for tokens in (1, 8, 64, 256):
        x = torch.randn(tokens, 2048, device="cuda").bfloat16()
        fused = fused_moe(fp8, x)
        rel, cos = _rel(fused, fp8(x))  # the block's own FP8 path (Fp8Experts, Fp8Linear shared experts)
        assert rel < 2e-2 and cos > 0.9998, (
            f"{tokens} tokens vs FP8 block: relative L2 {rel:.4f}, cosine {cos:.6f}"
        )
        rel, cos = _rel(fused, oracle(x.float()))
        assert rel < 0.06 and cos > 0.998, f"{tokens} tokens vs fp32: relative L2 {rel:.4f}, cosine {cos:.6f}"


def test_fused_layer_replays_in_a_cuda_graph():
    moe = make_moe("v3", device="cuda", **V2_LITE_MOE, n_group=8, topk_group=4)
    x = torch.randn(8, 2048, device="cuda").bfloat16()
    eager = fused_moe(moe, x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fused_moe(moe, x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(moe, x)
    x.copy_(torch.randn(8, 2048, device="cuda").bfloat16())
    graph.replay()
    torch.testing.assert_close(out, fused_moe(moe, x), atol=0, rtol=0)  # deterministic: same bits
    assert not torch.equal(out, eager)


def test_engine_greedy_tokens_unchanged_with_the_fused_path(tmp_path):
    """The engine on CUDA (fused MoE, captured graphs) gives LLM.generate's greedy tokens on a CPU (the torch
    reference path) and the previous GPU path's (`set_fused(model, False)`: the block's own torch path)."""
    hf = build_hf("v3", seed=3, q_lora_rank=24)
    path = save_hf(hf, tmp_path)
    config = EngineConfig(
        page_size=8, max_num_seqs=16, max_num_batched_tokens=40, cuda_graph_batch_sizes=(1, 4, 16),
        kv_cache_memory_bytes=64 << 20,
    )  # fmt: skip
    batch = prompts(16)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    cpu = LLM(path, device="cpu", dtype="float32", engine_config=config)
    cpu_tokens = [o.token_ids for o in cpu.generate(batch, params)]
    del cpu
    llm = LLM(path, device="cuda", dtype="float32", engine_config=config)
    assert sorted(llm.engine.runner.graphs) == [1, 4, 16]
    fused = [o.token_ids for o in llm.generate(batch, params)]
    assert fused == cpu_tokens
    for prompt, got in zip(batch[:4], fused[:4], strict=True):
        assert got == hf_greedy(hf, prompt, 12)
    eager = LLM(path, device="cuda", dtype="float32", engine_config=EngineConfig(
        page_size=8, max_num_seqs=16, max_num_batched_tokens=40, cuda_graph_batch_sizes=(),
        kv_cache_memory_bytes=64 << 20,
    ))  # fmt: skip
    assert set_fused(eager.engine.model, False) == eager.engine.model.config.num_hidden_layers - 1
    assert [o.token_ids for o in eager.generate(batch, params)] == fused
    assert_no_leaks(llm)
    assert_no_leaks(eager)
