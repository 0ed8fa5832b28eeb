"""`moemesh make-checkpoint`: a random-weight checkpoint of a DeepSeek-V2/V3 shape, written to disk as the real
ones are (config.json, safetensors shards + index, BF16 or DeepSeek FP8 128x128 blocks with weight_scale_inv,
the demo's tokenizer), so the mesh and the benchmarks run on realistic shapes without downloading weights.

    moemesh make-checkpoint --shape v2-lite --layers 8 --out /tmp/v2lite-8 [--fp8] [--device cuda]

Tensors are made one at a time (names and shapes from our network built on the meta device) and written in
shards of up to `--shard-gb`, so memory holds one shard, never the model. Loadable by `LLM` / `moemesh up`
and, in BF16, by transformers (`AutoModelForCausalLM.from_pretrained`). The demo tokenizer has 4096 tokens;
ids past it decode to nothing, and EOS is id 0 as in the demo.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moemesh.config.mesh import DEMO_DIR

if TYPE_CHECKING:  # torch is imported when the command runs: `moemesh --help` stays light
    import torch

_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
         "beta_slow": 1}  # fmt: skip
SHAPES: dict[str, dict[str, Any]] = {
    # deepseek-ai/DeepSeek-V2-Lite config.json (27 layers, 64 routed experts, 6 per token, no q LoRA)
    "v2-lite": dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, routed_scaling_factor=1.0,
        kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
        topk_method="greedy", n_group=1, topk_group=1, first_k_dense_replace=1, moe_layer_freq=1,
        norm_topk_prob=False, scoring_func="softmax", max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling={**_YARN, "mscale": 0.707, "mscale_all_dim": 0.707}, rms_norm_eps=1e-6,
    ),
    # deepseek-ai/DeepSeek-V3 config.json (61 layers, 256 routed experts, 8 per token, q LoRA 1536)
    "v3": dict(
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
        n_shared_experts=1, n_routed_experts=256, num_experts_per_tok=8, routed_scaling_factor=2.5,
        kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
        topk_method="noaux_tc", n_group=8, topk_group=4, first_k_dense_replace=3, moe_layer_freq=1,
        norm_topk_prob=True, scoring_func="sigmoid", max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling={**_YARN, "mscale": 1.0, "mscale_all_dim": 1.0}, rms_norm_eps=1e-6,
    ),
    # small enough for a CPU test, every feature of V3 (groups, correction bias, a dense first layer)
    "tiny": dict(
        model_type="deepseek_v3", vocab_size=4096, hidden_size=128, intermediate_size=256,
        moe_intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, routed_scaling_factor=2.5,
        kv_lora_rank=64, q_lora_rank=None, qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=32,
        topk_method="noaux_tc", n_group=2, topk_group=1, first_k_dense_replace=1, moe_layer_freq=1,
        norm_topk_prob=True, scoring_func="sigmoid", max_position_embeddings=2048, rope_theta=10000.0,
        rms_norm_eps=1e-6,
    ),
}  # fmt: skip


def shape_config(shape: str, num_layers: int | None = None) -> dict[str, Any]:
    """The config.json of `shape` (num_layers overrides its depth); EOS is the demo tokenizer's id 0."""
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r} must be one of {', '.join(SHAPES)}")
    raw = dict(SHAPES[shape])
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"layers={num_layers} must be >= 1")
        raw["num_hidden_layers"] = num_layers
        raw["first_k_dense_replace"] = min(raw["first_k_dense_replace"], num_layers - 1)
    arch = "DeepseekV3ForCausalLM" if raw["model_type"] == "deepseek_v3" else "DeepseekV2ForCausalLM"
    raw.update(architectures=[arch], bos_token_id=None, eos_token_id=0, hidden_act="silu", attention_bias=False,
               tie_word_embeddings=False, torch_dtype="bfloat16", num_nextn_predict_layers=0)  # fmt: skip
    return raw


def _random(name: str, shape: torch.Size, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """fp32: norms near 1, the router's correction bias small, everything else N(0, 1/fan_in)."""
    import torch

    if "norm" in name:
        return 1.0 + 0.1 * torch.randn(shape, generator=g, device=device)
    if name.endswith("e_score_correction_bias"):
        return 0.2 * torch.randn(shape, generator=g, device=device)
    fan_in = shape[-1] if len(shape) > 1 else 1
    std = 1.0 if "embed_tokens" in name else fan_in**-0.5
    return std * torch.randn(shape, generator=g, device=device)


def write_random_checkpoint(
    raw_config: dict[str, Any],
    out_dir: str | Path,
    fp8: bool = False,
    seed: int = 0,
    device: str = "cpu",
    max_shard_bytes: int = 4 << 30,
    log=print,
) -> Path:
    """Writes the checkpoint described by `raw_config` (a config.json dict) with random weights; returns
    out_dir. FP8: every projection inside the layers in e4m3 with fp32 128x128 block scales, as DeepSeek ships."""
    import torch
    from safetensors.torch import save_file

    from moemesh.kernels import weight_quant
    from moemesh.model.checkpoint import INDEX_FILE, _is_fp8_weight, hf_tensors
    from moemesh.model.config import ModelConfig
    from moemesh.model.network import DeepseekForCausalLM

    config = ModelConfig.from_dict(raw_config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.device("meta"):
        meta = DeepseekForCausalLM(config)
    shard: dict[str, torch.Tensor] = {}
    names_per_shard: list[list[str]] = []
    size = total = 0
    started = time.monotonic()

    def flush() -> None:
        nonlocal shard, size
        if shard:
            file = out_dir / f"model-{len(names_per_shard) + 1:05d}.safetensors"
            save_file(shard, file, metadata={"format": "pt"})
            names_per_shard.append(list(shard))
            log(f"  wrote {file.name} ({size / 2**30:.2f} GiB, {time.monotonic() - started:.0f} s)")
        shard, size = {}, 0

    for name, param in hf_tensors(meta):
        value = _random(name, param.shape, g, dev)
        if fp8 and _is_fp8_weight(name):
            weight, scale = weight_quant(value)
            items = {name: weight.cpu(), name + "_scale_inv": scale.cpu()}
        elif ".mlp.gate." in name:
            items = {name: value.float().cpu()}  # the router stays in fp32 as DeepSeek ships it
        else:
            items = {name: value.to(torch.bfloat16).cpu()}
        nbytes = sum(t.numel() * t.element_size() for t in items.values())
        if size + nbytes > max_shard_bytes:
            flush()
        shard.update(items)
        size += nbytes
        total += nbytes
    flush()
    num = len(names_per_shard)
    weight_map = {}
    for i, names in enumerate(names_per_shard):  # final names: model-0000i-of-0000n.safetensors
        final = f"model-{i + 1:05d}-of-{num:05d}.safetensors"
        (out_dir / f"model-{i + 1:05d}.safetensors").rename(out_dir / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    raw = dict(raw_config)
    if fp8:
        raw["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}  # fmt: skip
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2))
    _copy_tokenizer(out_dir, int(raw["max_position_embeddings"]))
    log(f"{out_dir}: {total / 2**30:.2f} GiB in {num} shard(s), {time.monotonic() - started:.0f} s")
    return out_dir


def _copy_tokenizer(out_dir: Path, max_len: int) -> None:
    shutil.copy(DEMO_DIR / "tokenizer.json", out_dir / "tokenizer.json")
    tok_config = json.loads((DEMO_DIR / "tokenizer_config.json").read_text())
    tok_config["model_max_length"] = max_len
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 0, "do_sample": False}))


# --- the subcommand ---------------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "make-checkpoint", help="write a random-weight DeepSeek-V2/V3-shaped checkpoint"
    )
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument(
        "--layers", type=int, default=None, metavar="N", help="decoder layers (default: the shape's)"
    )
    p.add_argument("--fp8", action="store_true", help="DeepSeek FP8: e4m3 projections, 128x128 block scales")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where the random tensors are made (cuda is faster)")
    p.add_argument("--shard-gb", type=float, default=4.0, metavar="GB")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    import torch

    try:
        raw = shape_config(args.shape, args.layers)
        if args.shard_gb <= 0:
            raise ValueError(f"shard-gb={args.shard_gb} must be > 0")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device={args.device!r} but CUDA is not available")
        torch.device(args.device)
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: out={str(out)!r} exists and is not empty", file=sys.stderr)
        return 2
    write_random_checkpoint(raw, out, args.fp8, args.seed, args.device, int(args.shard_gb * 2**30))
    return 0
