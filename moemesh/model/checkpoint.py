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
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from moemesh.kernels import weight_dequant, weight_quant
from moemesh.model.attention import MLAttention
from moemesh.model.config import ModelConfig
from moemesh.model.fp8 import to_fp8
from moemesh.model.layers import MLP
from moemesh.model.moe_fused import stack_gate_up
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


def is_fp8_checkpoint(model_dir: str | Path) -> bool:
    """Whether config.json declares DeepSeek's FP8 block quantization."""
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    return (raw.get("quantization_config") or {}).get("quant_method") == "fp8"


def default_fp8(device: torch.device, model_dir: str | Path) -> bool:
    """Whether to keep a checkpoint's weights in FP8 and run FP8 GEMMs when the caller does not say: on CUDA,
    for DeepSeek FP8 checkpoints (elsewhere FP8 weights are dequantized exactly). `LLM` and the mesh workers
    both decide with this, so a worker computes as the in-process engine does."""
    return device.type == "cuda" and is_fp8_checkpoint(model_dir)


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


def build_empty(
    config: ModelConfig, device: torch.device, dtype: torch.dtype, fp8: bool = False
) -> DeepseekForCausalLM:
    """The network with uninitialized parameters on `device`: router weights and biases in fp32; with `fp8`,
    the projections and experts DeepSeek quantizes hold e4m3 weights and block scales. Projections that read one
    input (every MLP's gate and up; MLA's q_proj / q_a_proj and kv_a_proj_with_mqa) are views into one stacked
    weight (`stacked.stack_linears`), so one GEMM computes them."""
    with torch.device("meta"):
        model = DeepseekForCausalLM(config).to(dtype)
        if fp8:
            to_fp8(model)
    model = model.to_empty(device=device)
    for moe in model.moe_layers():
        moe.gate.float()
    for module in model.modules():  # projections of one input as views into one weight: one GEMM each
        if isinstance(module, MLP):
            stack_gate_up(module)
        elif isinstance(module, MLAttention):
            module.stack_input_projections()
    model.rotary = type(model.rotary)(config).to(device)
    return model


@dataclass
class _Fp8Pair:
    """A checkpoint weight still in DeepSeek's FP8 layout."""

    weight: torch.Tensor  # float8_e4m3fn [N, K]
    scale_inv: torch.Tensor  # fp32 [ceil(N/128), ceil(K/128)]


def load_model(
    model_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress=True,
    fp8: bool = False,
) -> DeepseekForCausalLM:
    """Loads a checkpoint directory. `fp8=False`: every weight in `dtype` (FP8 tensors dequantized exactly).
    `fp8=True`: projections and experts stay (or become, from a BF16 checkpoint) FP8 blocks and run FP8 GEMMs."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_file(model_dir / "config.json")
    device = torch.device(device)
    model = build_empty(config, device, dtype, fp8)
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
                value = f.get_tensor(name)
                if value.dtype in FP8_DTYPES:
                    value = _Fp8Pair(value, _scale_of(name, files, f, file))
                loaded |= _assign(name, value, params, file, dtype)
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
    """What a complete checkpoint provides: every parameter, each stacked expert's projections one by one
    (block scales come with their weights)."""
    required = []
    for name, param in params.items():
        if name.endswith(".experts.w13"):
            required += [f"{name}[{e}].{p}" for e in range(param.shape[0]) for p in ("gate_proj", "up_proj")]
        elif name.endswith(".experts.w2"):
            required += [f"{name}[{e}].down_proj" for e in range(param.shape[0])]
        elif not name.endswith(("e_score_correction_bias", "_scale_inv")):  # V2-era checkpoints: zero bias
            required.append(name)
    return required


def _scale_of(name: str, files: dict[str, Path], f, file: Path) -> torch.Tensor:
    scale_name = name + "_scale_inv"
    if scale_name not in files:
        raise CheckpointError(f"{file.name}: FP8 tensor {name} has no {scale_name}")
    if files[scale_name] == file:
        return f.get_tensor(scale_name)
    with safe_open(files[scale_name], "pt") as other:
        return other.get_tensor(scale_name)


def _assign(
    name: str, value, params: dict[str, torch.nn.Parameter], file: Path, dtype: torch.dtype
) -> set[str]:
    """Copies one checkpoint tensor (or FP8 pair) into its parameter, converting between layouts when the
    checkpoint and the model differ; returns the completed entries of `_required`."""
    m = _EXPERT.match(name)
    if m:
        prefix, expert, proj = m.group(1), int(m.group(2)), m.group(3)
        target_name = f"{prefix}.w2" if proj == "down_proj" else f"{prefix}.w13"
        if target_name not in params:
            raise CheckpointError(f"{file.name}: unexpected tensor {name} (no parameter {target_name})")
        rows = None
        if proj != "down_proj":
            half = params[target_name].shape[1] // 2
            rows = slice(0, half) if proj == "gate_proj" else slice(half, 2 * half)
        index, done = (expert, rows), f"{target_name}[{expert}].{proj}"
    else:
        if name not in params:
            raise CheckpointError(f"{file.name}: unexpected tensor {name} for this config")
        target_name, index, done = name, None, name
    weight = _view(params[target_name].data, index)
    scale_param = params.get(target_name + "_scale_inv")
    try:
        if scale_param is None:  # the model computes in `dtype`
            if isinstance(value, _Fp8Pair):
                value = weight_dequant(
                    value.weight.to(weight.device), value.scale_inv.to(weight.device), dtype
                )
            _copy(name, weight, value, file)
        else:  # the model keeps FP8 blocks
            if not isinstance(value, _Fp8Pair):
                value = _Fp8Pair(*weight_quant(value.to(weight.device).float()))
            _copy(name, weight, value.weight, file)
            scale_index = None if index is None else (index[0], _block_rows(index[1]))
            _copy(name + "_scale_inv", _view(scale_param.data, scale_index), value.scale_inv, file)
    except ValueError as e:
        raise CheckpointError(f"{file.name}: {name}: {e}") from None
    return {done}


def _view(t: torch.Tensor, index) -> torch.Tensor:
    if index is None:
        return t
    expert, rows = index
    return t[expert] if rows is None else t[expert][rows]


def _block_rows(rows: slice | None) -> slice | None:
    """Weight rows of a stacked expert projection -> rows of its block scales (halves are 128-aligned)."""
    return None if rows is None else slice(rows.start // 128, -(-rows.stop // 128))


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
    if any(p.dtype in FP8_DTYPES for p in model.parameters()):
        raise ValueError("save_checkpoint writes models loaded with fp8=False (it quantizes them itself)")
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
