"""`moemesh make-checkpoint`: a random checkpoint that LLM and transformers both load, with the same logits."""

from __future__ import annotations

import json

import pytest
import torch

from moemesh import LLM
from moemesh.make_checkpoint import shape_config, write_random_checkpoint
from moemesh.model.checkpoint import is_fp8_checkpoint
from moemesh.model.config import ModelConfig


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    raw = shape_config("tiny", num_layers=2)
    root = tmp_path_factory.mktemp("make-ckpt")
    bf16 = write_random_checkpoint(raw, root / "bf16", seed=3, log=lambda *_: None)
    fp8 = write_random_checkpoint(
        raw, root / "fp8", fp8=True, seed=3, max_shard_bytes=1 << 20, log=lambda *_: None
    )
    return bf16, fp8


def test_bf16_checkpoint_logits_match_transformers(tiny_dirs):
    transformers = pytest.importorskip("transformers")
    bf16, _ = tiny_dirs
    hf = transformers.AutoModelForCausalLM.from_pretrained(bf16, torch_dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM" and hf.config.num_hidden_layers == 2
    llm = LLM(bf16, device="cpu", dtype="float32")
    ids = torch.randint(0, 4096, (29,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].float()
    got = llm.score(ids)
    assert got.shape == expected.shape == (29, 4096)
    assert (got - expected).abs().max().item() < 1e-3 * expected.abs().max().item()
    assert expected.std().item() > 0.1  # not a degenerate model: the logits vary
    text = llm.tokenizer.decode(llm.tokenizer.encode("To Sherlock Holmes"))  # the demo tokenizer came along
    assert text == "To Sherlock Holmes"


def test_fp8_checkpoint_is_deepseek_blocks_in_shards_and_loads(tiny_dirs):
    from safetensors import safe_open

    bf16, fp8 = tiny_dirs
    assert is_fp8_checkpoint(fp8) and not is_fp8_checkpoint(bf16)
    index = json.loads((fp8 / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1  # sharded
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    with safe_open(fp8 / index[name], "pt") as f:
        weight = f.get_tensor(name)
    with safe_open(fp8 / index[name + "_scale_inv"], "pt") as f:
        scale = f.get_tensor(name + "_scale_inv")
    assert weight.dtype == torch.float8_e4m3fn and weight.shape == (128, 64)
    assert scale.dtype == torch.float32 and scale.shape == (1, 1)
    assert "model.embed_tokens.weight" in index and "model.embed_tokens.weight_scale_inv" not in index
    llm = LLM(fp8, device="cpu", dtype="float32")
    ids = list(range(5, 40))
    a, b = llm.score(ids), LLM(bf16, device="cpu", dtype="float32").score(ids)
    rel = ((a - b).norm() / b.norm()).item()
    assert 0 < rel < 0.2  # the same random weights, block-quantized


def test_real_shapes_parse_in_ours_and_transformers():
    transformers = pytest.importorskip("transformers")
    lite = shape_config("v2-lite", num_layers=8)
    ours = ModelConfig.from_dict(lite)
    assert (ours.num_hidden_layers, ours.n_routed_experts, ours.num_experts_per_tok, ours.kv_lora_rank) == (
        8, 64, 6, 512,
    )  # fmt: skip
    assert ours.rope.rope_type == "yarn" and ours.scoring_func == "softmax"
    theirs = transformers.DeepseekV2Config(**{k: v for k, v in lite.items() if k != "model_type"})
    assert theirs.num_hidden_layers == 8 and theirs.n_routed_experts == 64
    v3 = ModelConfig.from_dict(shape_config("v3"))
    assert (v3.num_hidden_layers, v3.n_routed_experts, v3.q_lora_rank, v3.topk_method) == (
        61,
        256,
        1536,
        "noaux_tc",
    )
    with pytest.raises(ValueError, match="shape='v4' must be one of"):
        shape_config("v4")


def test_the_subcommand_refuses_bad_input_in_one_line(tmp_path, capsys):
    import argparse

    from moemesh.make_checkpoint import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())

    def run(*args: str) -> int:
        parsed = parser.parse_args(["make-checkpoint", *args])
        return parsed.func(parsed)

    assert run("--shape", "tiny", "--out", str(tmp_path / "x"), "--layers", "0") == 2
    assert capsys.readouterr().err.strip() == "error: layers=0 must be >= 1"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    assert run("--shape", "tiny", "--out", str(tmp_path / "full")) == 2
    assert "exists and is not empty" in capsys.readouterr().err
