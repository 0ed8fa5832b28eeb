"""FP8 weights kept as FP8 (`load_model(..., fp8=True)`): FP8 linears and FP8 experts against the dequantized
model. Stated tolerance on a tiny random V3 config: relative logit error < 10 %, cosine > 0.995 (activations
are quantized to e4m3 with 1x128 scales before every projection: ~3 % per GEMM, compounded over layers)."""

from __future__ import annotations

import pytest
import torch

from moemesh.model.batch import ForwardBatch
from moemesh.model.checkpoint import load_model, save_checkpoint
from moemesh.model.fp8 import Fp8Experts, Fp8Linear
from tests.model.tiny import build_hf, save_hf

FP8_FRIENDLY = dict(
    hidden_size=256, intermediate_size=256, moe_intermediate_size=128, kv_lora_rank=128, q_lora_rank=128,
    n_group=2, topk_group=1, num_experts_per_tok=2,
)  # fmt: skip


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    hf = build_hf("v3", seed=3, std=0.02, **FP8_FRIENDLY)
    d = save_hf(hf, tmp_path_factory.mktemp("hf"))
    return save_checkpoint(load_model(d, progress=False), d / "fp8", fp8=True)


def _logits(model, ids, decode_steps=0):
    """Prefill logits of every prompt row, then greedy decode logits for `decode_steps` tokens."""
    cfg = model.config
    cache = [torch.zeros(4, 64, cfg.kv_cache_dim) for _ in range(cfg.num_hidden_layers)]
    rows = [model(ForwardBatch.build([ids], [0], [[0, 1, 2, 3]], 64, "cpu", logits="all"), cache)]
    tokens = list(ids)
    for _ in range(decode_steps):
        tokens.append(int(rows[-1][-1].argmax()))
        rows.append(
            model(ForwardBatch.build([[tokens[-1]]], [len(tokens) - 1], [[0, 1, 2, 3]], 64, "cpu"), cache)
        )
    return torch.cat(rows)


def test_fp8_model_keeps_fp8_and_matches_dequantized_model(fp8_dir):
    fp8 = load_model(fp8_dir, progress=False, fp8=True)
    deq = load_model(fp8_dir, progress=False)
    assert (
        sum(isinstance(m, Fp8Linear) for m in fp8.modules()) == 3 * 5 + 3 + 2 * 3
    )  # q_a, q_b, kv_a, kv_b, o; dense MLP; shared experts
    assert sum(isinstance(m, Fp8Experts) for m in fp8.modules()) == 2
    layer = fp8.model.layers[1]
    assert layer.self_attn.kv_a_proj_with_mqa.weight.dtype == torch.float8_e4m3fn
    assert layer.mlp.experts.w13.dtype == torch.float8_e4m3fn and layer.mlp.gate.weight.dtype == torch.float32
    ids = list(range(2, 60))
    got, ref = _logits(fp8, ids, decode_steps=6), _logits(deq, ids, decode_steps=6)
    rel = ((got - ref).norm() / ref.norm()).item()
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0).item()
    assert rel < 0.10 and cos > 0.995, (rel, cos)
    assert rel > 1e-3  # activations really were quantized


def test_bf16_checkpoint_quantized_at_load_equals_fp8_checkpoint(fp8_dir, tmp_path):
    """Loading a high-precision checkpoint with fp8=True quantizes it exactly as our writer does."""
    deq = load_model(fp8_dir, progress=False)
    hi = save_checkpoint(deq, tmp_path / "fp32", dtype=torch.float32)
    a = load_model(hi, progress=False, fp8=True).state_dict()
    b = load_model(fp8_dir, progress=False, fp8=True).state_dict()
    for name in (
        "model.layers.1.mlp.experts.w13",
        "model.layers.1.mlp.experts.w13_scale_inv",
        "model.layers.0.self_attn.kv_b_proj.weight_scale_inv",
        "model.layers.2.mlp.experts.w2",
    ):
        assert torch.equal(a[name].float(), b[name].float()), name


def test_demo_model_in_fp8_matches_its_dequantized_self():
    """On the trained demo model (stated tolerance): relative logit error < 5 %, held-out perplexity within 2 %."""
    from moemesh.llm import DEMO_DIR
    from moemesh.model.tokenizer import Tokenizer

    ids = Tokenizer(DEMO_DIR).encode((DEMO_DIR / "corpus" / "heldout.txt").read_text()[:4000])[:250]
    assert len(ids) == 250
    fp8, deq = load_model(DEMO_DIR, progress=False, fp8=True), load_model(DEMO_DIR, progress=False)
    assert sum(isinstance(m, Fp8Experts) for m in fp8.modules()) == fp8.config.num_hidden_layers - 1
    got, ref = _logits(fp8, ids), _logits(deq, ids)
    rel = ((got - ref).norm() / ref.norm()).item()
    targets = torch.tensor(ids[1:])
    ppl = [torch.nn.functional.cross_entropy(x[:-1], targets).exp().item() for x in (got, ref)]
    assert rel < 0.05, rel
    assert abs(ppl[0] / ppl[1] - 1) < 0.02, ppl
