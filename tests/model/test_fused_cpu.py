"""The CUDA path (fused MoE and MLP, stacked projections, norms writing the next block's fp32 / FP8 input) run on
a CPU — each op's torch reference — gives LLM.generate's greedy tokens of the reference path, BF16 shapes in
fp32 and with FP8 weights (the path's logic end to end; `tests/kernels` runs its kernels)."""

from __future__ import annotations

from moemesh import LLM, SamplingParams
from moemesh.config.engine import EngineConfig
from moemesh.model.checkpoint import load_model, save_checkpoint
from moemesh.model.moe_fused import set_fused
from tests.model.test_generate_engine import prompts
from tests.model.tiny import build_hf, save_hf

CONFIG = EngineConfig(page_size=8, max_num_seqs=8, max_num_batched_tokens=64, kv_cache_memory_bytes=16 << 20)


def _tiny(tmp_path, fp8: bool):
    # 128-wide expert, shared and q-LoRA widths, so FP8 experts and stacked FP8 projections take their FP8 path
    hf = build_hf(
        "v3", seed=21, hidden_size=128, moe_intermediate_size=128, intermediate_size=256, q_lora_rank=128
    )
    path = save_hf(hf, tmp_path / "bf16")
    if fp8:
        path = save_checkpoint(load_model(path, progress=False), tmp_path / "fp8", fp8=True)
    return LLM(path, device="cpu", dtype="float32", engine_config=CONFIG, fp8=fp8)


def test_fused_path_gives_the_reference_greedy_tokens(tmp_path):
    llm = _tiny(tmp_path, fp8=False)
    batch, params = prompts(5, seed=2), SamplingParams(max_tokens=6, ignore_eos=True)
    reference = [o.token_ids for o in llm.generate(batch, params)]
    model = llm.engine.model
    assert set_fused(model, True) == sum(1 for _ in model.moe_layers()) > 0
    assert [o.token_ids for o in llm.generate(batch, params)] == reference
    assert model.model.layers[1].self_attn.stack_input_projections() is not None  # q_a + kv_a: one GEMM


def test_fused_fp8_path_as_close_to_fp32_as_the_reference(tmp_path):
    """The fused FP8 path rounds less than the reference: SiLU-and-mul and the requant from the first GEMM's fp32
    products (the reference rounds them to BF16 first), routed and shared outputs in one fp32 sum. So the logits
    differ — FP8's error, which this tiny random model amplifies to ~20 % of the fp32 model's — and the fused
    ones are no further from the fp32 model on the dequantized weights (here about half as far)."""
    llm = _tiny(tmp_path, fp8=True)
    oracle = LLM(llm.model_dir, device="cpu", dtype="float32", engine_config=CONFIG, fp8=False)
    tokens = prompts(1, seed=3)[0] * 2
    exact, reference = oracle.score(tokens), llm.score(tokens)
    model = llm.engine.model
    set_fused(model, True)
    fused = llm.score(tokens)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(fused, reference) > 0
    assert rel(fused, exact) <= 1.05 * rel(reference, exact) < 0.5
    attn = model.model.layers[1].self_attn
    assert attn.stack_input_projections().scale_inv is not None  # FP8 q_a + kv_a: one FP8 GEMM
    assert attn.input_formats(reference[:1, :128]).fp8  # ... fed by the input norm's FP8 output
