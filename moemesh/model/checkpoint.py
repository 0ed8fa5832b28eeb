"""Hugging Face checkpoint directories: load into `DeepseekForCausalLM`, and write ours in the same format.

Loading goes shard by shard and tensor by tensor into parameters allocated once on the target device, so the
weights never exist twice in memory. DeepSeek FP8 weights (`weight` in e4m3 plus fp32 `weight_scale_inv` per
128x128 block, partial edge blocks) are dequantized exactly: fp8 value x block scale in the compute dtype.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from moemesh.kernels import weight_dequant, weight_quant
from moemesh.model.config import ModelConfig
from moemesh.model.network import DeepseekForCausalLM

log = logging.getLogger("moemesh")

INDEX_FILE = "model.safetensors.index.json"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")
_FP8_PROJ = re.compile(
    r"\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$"
)
FP8_DTYPES = (torch.float8_e4m3fn,)


class CheckpointError(ValueError):
    """A checkpoint that does not match its config: the message names the file, tensor and shapes."""


def shard_files(model_dir: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: model_dir / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise FileNotFoundError(f"{index} lists {file.name}, which is missing from {model_dir}")
        return files
    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors files and no {INDEX_FILE} in {model_dir}")
    files = {}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            files.update(dict.fromkeys(f.keys(), shard))
    return files


def build_empty(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> DeepseekForCausalLM:
    """The network with uninitialized parameters on `device`: router weights and biases in fp32."""
    with torch.device("meta"):
        model = DeepseekForCausalLM(config)
    model = model.to(dtype).to_empty(device=device)
    for moe in model.moe_layers():
        moe.gate.float()
    model.rotary = type(model.rotary)(config).to(device)
    return model


def load_model(
    model_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress=True,
) -> DeepseekForCausalLM:
    model_dir = Path(model_dir)
    config = ModelConfig.from_file(model_dir / "config.json")
    device = torch.device(device)
    model = build_empty(config, device, dtype)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    files = shard_files(model_dir)
    skipped_mtp = set()
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    bar = tqdm(total=len(files), desc=f"loading {model_dir.name}", unit="tensor", disable=not progress)
    for file, names in by_file.items():
        with safe_open(file, "pt", device="cpu") as f:
            for name in names:
                bar.update(1)
                m = _LAYER.match(name)
                if m and int(m.group(1)) >= config.num_hidden_layers:
                    skipped_mtp.add(int(m.group(1)))
                    continue
                if name.endswith("_scale_inv") or _IGNORED.search(name):
                    continue
                tensor = f.get_tensor(name)
                if tensor.dtype in FP8_DTYPES:
                    tensor = _dequant(name, tensor, files, f, file, device, dtype)
                loaded |= _assign(name, tensor, params, file)
    bar.close()
    if skipped_mtp:
        log.info("skipped multi-token-prediction layers %s: moemesh does not run MTP", sorted(skipped_mtp))
    if config.tie_word_embeddings and "lm_head.weight" not in loaded:
        model.lm_head.weight = model.model.embed_tokens.weight
        loaded.add("lm_head.weight")
    missing = [n for n in _required(params) if n not in loaded]
    if missing:
        raise CheckpointError(
            f"{model_dir}: {len(missing)} tensors missing from the checkpoint, e.g. {missing[:5]}"
        )
    for name in params:
        if name.endswith("e_score_correction_bias") and name not in loaded:
            params[name].data.zero_()
    return model.eval()


def _required(params: dict[str, torch.nn.Parameter]) -> list[str]:
    """What a complete checkpoint provides: every parameter, each stacked expert's projections one by one."""
    required = []
    for name, param in params.items():
        if name.endswith(".experts.w13"):
            required += [f"{name}[{e}].{p}" for e in range(param.shape[0]) for p in ("gate_proj", "up_proj")]
        elif name.endswith(".experts.w2"):
            required += [f"{name}[{e}].down_proj" for e in range(param.shape[0])]
        elif not name.endswith("e_score_correction_bias"):  # V2-era checkpoints have none: zeros
            required.append(name)
    return required


def _dequant(name, tensor, files, f, file, device, dtype) -> torch.Tensor:
    scale_name = name + "_scale_inv"
    if scale_name not in files:
        raise CheckpointError(f"{file.name}: FP8 tensor {name} has no {scale_name}")
    if files[scale_name] == file:
        scale = f.get_tensor(scale_name)
    else:
        with safe_open(files[scale_name], "pt") as other:
            scale = other.get_tensor(scale_name)
    try:
        return weight_dequant(tensor.to(device), scale.to(device), dtype)
    except ValueError as e:
        raise CheckpointError(f"{file.name}: {name}: {e}") from None


def _assign(name: str, tensor: torch.Tensor, params: dict[str, torch.nn.Parameter], file: Path) -> set[str]:
    """Copies one checkpoint tensor into its parameter; returns the parameter names it completes."""
    m = _EXPERT.match(name)
    if m:
        prefix, expert, proj = m.group(1), int(m.group(2)), m.group(3)
        if proj == "down_proj":
            target_name, rows = f"{prefix}.w2", None
        else:
            target_name = f"{prefix}.w13"
            half = params[target_name].shape[1] // 2 if target_name in params else 0
            rows = slice(0, half) if proj == "gate_proj" else slice(half, 2 * half)
        if target_name not in params:
            raise CheckpointError(f"{file.name}: unexpected tensor {name} (no parameter {target_name})")
        target = params[target_name].data[expert]
        if rows is not None:
            target = target[rows]
        _copy(name, target, tensor, file)
        return {f"{target_name}[{expert}].{proj}"}
    if name not in params:
        raise CheckpointError(f"{file.name}: unexpected tensor {name} for this config")
    _copy(name, params[name].data, tensor, file)
    return {name}


def _copy(name: str, target: torch.Tensor, tensor: torch.Tensor, file: Path) -> None:
    if tuple(target.shape) != tuple(tensor.shape):
        raise CheckpointError(
            f"{file.name}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}"
        )
    target.copy_(tensor)


# ---------------------------------------------------------------------------------------------- writing


def _is_fp8_weight(name: str) -> bool:
    """DeepSeek's FP8 checkpoints quantize every projection inside the layers; embeddings, the LM head, norms
    and the router stay in BF16."""
    return name.startswith("model.layers.") and _FP8_PROJ.search(name) is not None


def hf_tensors(model: DeepseekForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """Our parameters under their Hugging Face names, experts unstacked."""
    for name, param in model.state_dict().items():
        if name.startswith("rotary."):
            continue
        if name.endswith(".experts.w13"):
            prefix = name[: -len(".w13")]
            half = param.shape[1] // 2
            for e in range(param.shape[0]):
                yield f"{prefix}.{e}.gate_proj.weight", param[e, :half]
                yield f"{prefix}.{e}.up_proj.weight", param[e, half:]
        elif name.endswith(".experts.w2"):
            prefix = name[: -len(".w2")]
            for e in range(param.shape[0]):
                yield f"{prefix}.{e}.down_proj.weight", param[e]
        else:
            yield name, param


def save_checkpoint(
    model: DeepseekForCausalLM,
    out_dir: str | Path,
    fp8: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 2 << 30,
) -> Path:
    """Writes config.json and (sharded) safetensors; with `fp8`, projections become e4m3 + weight_scale_inv."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in hf_tensors(model):
        tensor = tensor.detach().cpu()
        items = {}
        if fp8 and _is_fp8_weight(name):
            w, scale = weight_quant(tensor.float())
            items[name], items[name + "_scale_inv"] = w, scale
        elif ".mlp.gate." in name:
            items[name] = tensor.float().contiguous()  # the router stays in fp32 as DeepSeek ships it
        else:
            items[name] = tensor.to(dtype).contiguous()
        nbytes = sum(t.numel() * t.element_size() for t in items.values())
        if size + nbytes > max_shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1].update(items)
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = (
            "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        save_file(shard, out_dir / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    if len(shards) > 1:
        (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    config = model.config.to_dict()
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if fp8:
        config["quantization_config"] = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir
