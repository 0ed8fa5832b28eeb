"""Checkpoint loading: FP8 blocks (unaligned dims), sharding, both config spellings, MTP layers, clear errors."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from moemesh import LLM
from moemesh.kernels import weight_dequant, weight_quant
from moemesh.model.checkpoint import CheckpointError, load_model, save_checkpoint
from moemesh.model.config import ConfigError
from tests.model.tiny import build_hf, save_hf

# hidden 160 and kv_lora_rank 136 + rope 8 = 144 rows: no dimension of kv_a_proj_with_mqa is a multiple of 128,
# like DeepSeek-V3's 576 x 7168.
UNALIGNED = dict(
    hidden_size=160, kv_lora_rank=136, intermediate_size=200, moe_intermediate_size=72, q_lora_rank=136
)


@pytest.fixture(scope="module")
def hf_and_dir(tmp_path_factory):
    hf = build_hf("v3", seed=5, n_group=2, topk_group=1, **UNALIGNED)
    return hf, save_hf(hf, tmp_path_factory.mktemp("bf32"))


def _fp8_twin(hf):
    """The transformers model with every FP8-quantized projection replaced by its exact dequantization."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.startswith("model.layers.") and (
                name.endswith("_proj.weight") or name.endswith("_mqa.weight")
            ):
                p.copy_(weight_dequant(*weight_quant(p), torch.float32))
            elif name.endswith(
                "experts.gate_up_proj"
            ):  # [E, 2I, D]: gate and up are separate checkpoint tensors
                half = p.shape[1] // 2
                for e in range(p.shape[0]):
                    for rows in (slice(0, half), slice(half, 2 * half)):
                        p[e, rows].copy_(weight_dequant(*weight_quant(p[e, rows]), torch.float32))
            elif name.endswith("experts.down_proj"):
                for e in range(p.shape[0]):
                    p[e].copy_(weight_dequant(*weight_quant(p[e]), torch.float32))
    return hf


def test_fp8_checkpoint_with_unaligned_dims_matches_dequantized_twin(hf_and_dir, tmp_path):
    hf, bf_dir = hf_and_dir
    llm = LLM(bf_dir, device="cpu", dtype="float32")
    fp8_dir = save_checkpoint(llm.model, tmp_path / "fp8", fp8=True, dtype=torch.float32)
    tensors = load_file(fp8_dir / "model.safetensors")
    kv_a = tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    assert kv_a.dtype == torch.float8_e4m3fn and tuple(kv_a.shape) == (144, 160)
    assert tuple(tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape) == (2, 2)
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32  # embeddings stay high precision
    fp8 = LLM(fp8_dir, device="cpu", dtype="float32")
    ids = list(range(3, 40))
    twin = _fp8_twin(build_hf("v3", seed=5, n_group=2, topk_group=1, **UNALIGNED))
    with torch.no_grad():
        expected = twin(torch.tensor([ids])).logits[0]
        original = hf(torch.tensor([ids])).logits[0]
    got = fp8.score(ids)
    assert (got - expected).abs().max().item() < 1e-4
    assert (got - original).abs().max().item() > 1e-3  # quantization really happened


def test_sharded_checkpoint_with_index_loads(hf_and_dir, tmp_path):
    hf, bf_dir = hf_and_dir
    llm = LLM(bf_dir, device="cpu", dtype="float32")
    out = save_checkpoint(llm.model, tmp_path / "sharded", dtype=torch.float32, max_shard_bytes=200_000)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2
    assert (out / "model.safetensors.index.json").is_file()
    ids = [5, 9, 2, 77, 31]
    assert torch.equal(LLM(out, device="cpu").score(ids), llm.score(ids))


def test_deepseek_own_config_spelling_loads(tmp_path):
    """DeepSeek's config.json: rope_scaling + rope_theta, torch_dtype, noaux_tc, extra keys."""
    hf = build_hf(
        "v3",
        seed=7,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 50000.0,
            "factor": 8.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    )
    save_hf(hf, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["rope_parameters"]
    raw.update(
        rope_theta=50000.0,
        rope_scaling={
            "type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        torch_dtype="bfloat16",
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        ep_size=1,
        moe_layer_freq=1,
        quantization_config=None,
        auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
    )
    (tmp_path / "config.json").write_text(json.dumps(raw))
    ids = list(range(10, 50))
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    assert (LLM(tmp_path, device="cpu").score(ids) - expected).abs().max().item() < 1e-4


def test_mtp_layers_are_skipped_with_an_info_line(hf_and_dir, tmp_path, caplog):
    _, bf_dir = hf_and_dir
    tensors = load_file(bf_dir / "model.safetensors")
    # An MTP layer is stored as layer index num_hidden_layers (DeepSeek-V3 ships layer 61 of 61).
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(4, 4)
    tensors["model.layers.3.self_attn.kv_a_proj_with_mqa.weight"] = torch.zeros(4, 4)
    (tmp_path / "config.json").write_text((bf_dir / "config.json").read_text())
    save_file(tensors, tmp_path / "model.safetensors")
    with caplog.at_level(logging.INFO, logger="moemesh"):
        model = load_model(tmp_path, progress=False)
    assert len(model.model.layers) == 3
    assert any("multi-token-prediction" in r.message and "[3]" in r.message for r in caplog.records)


def test_shape_mismatch_names_tensor_and_shapes(hf_and_dir, tmp_path):
    _, bf_dir = hf_and_dir
    tensors = load_file(bf_dir / "model.safetensors")
    tensors["model.layers.1.self_attn.o_proj.weight"] = torch.zeros(160, 63)
    (tmp_path / "config.json").write_text((bf_dir / "config.json").read_text())
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"model\.layers\.1\.self_attn\.o_proj\.weight has shape \(160, 63\), expected \(160, 64\)",
    ):
        load_model(tmp_path, progress=False)


def test_missing_tensor_and_missing_shard_and_model_type(hf_and_dir, tmp_path):
    _, bf_dir = hf_and_dir
    tensors = load_file(bf_dir / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.3.up_proj.weight"]
    (tmp_path / "config.json").write_text((bf_dir / "config.json").read_text())
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"experts\.w13\[3\]\.up_proj"):
        load_model(tmp_path, progress=False)

    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_model(tmp_path, progress=False)

    raw = json.loads((bf_dir / "config.json").read_text())
    raw["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="model_type='llama' is not supported"):
        load_model(tmp_path, progress=False)
