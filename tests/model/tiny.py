"""Tiny random DeepSeek configs, built and saved by transformers (the oracle), loaded by moemesh."""

from __future__ import annotations

from pathlib import Path

import torch

V3_BASE = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    n_shared_experts=1,
    kv_lora_rank=32,
    q_lora_rank=None,
    qk_rope_head_dim=8,
    v_head_dim=16,
    qk_nope_head_dim=16,
    n_group=1,
    topk_group=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    max_position_embeddings=512,
    routed_scaling_factor=2.5,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=None,
)


def build_hf(kind: str, seed: int = 0, std: float = 0.08, **overrides):
    """A random transformers DeepseekV3/V2ForCausalLM in fp32 eval mode."""
    import transformers

    torch.manual_seed(seed)
    kwargs = {**V3_BASE, **overrides}
    if kind == "v3":
        config = transformers.DeepseekV3Config(**kwargs)
        model = transformers.DeepseekV3ForCausalLM(config)
    else:
        kwargs.setdefault("topk_method", "greedy")
        config = transformers.DeepseekV2Config(**kwargs)
        model = transformers.DeepseekV2ForCausalLM(config)
    with torch.no_grad():  # random weights with some scale, and a visible correction bias
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.copy_(0.2 * torch.randn_like(module.e_score_correction_bias))
    return model.float().eval()


def save_hf(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


def hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, max_new_tokens=num_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt) :].tolist()
