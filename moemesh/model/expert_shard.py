"""An expert-pool worker's part of a checkpoint: the routed experts it hosts, for every MoE layer, and nothing
else (no attention, no embeddings, no shared experts, no other worker's experts).

Reads only the `model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight` tensors of its experts (plus
their `weight_scale_inv` in a DeepSeek FP8 checkpoint, dequantized exactly as `load_model` does), shard by
shard, into one `LocalExperts` per MoE layer whose local index i is the i-th hosted expert in ascending order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from moemesh.kernels import weight_dequant
from moemesh.model.checkpoint import FP8_DTYPES, CheckpointError, shard_files
from moemesh.model.config import ModelConfig
from moemesh.model.moe import LocalExperts

_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


@dataclass(frozen=True)
class ExpertShard:
    """layers: MoE layer index -> the hosted experts of that layer; expert_ids: global ids, ascending (local
    index i is expert_ids[i] in every layer)."""

    config: ModelConfig
    expert_ids: tuple[int, ...]
    layers: dict[int, LocalExperts]

    def local_index(self, device: torch.device) -> torch.Tensor:
        """int64 [n_routed_experts]: the local index of each global expert id, -1 where not hosted."""
        lut = torch.full((self.config.n_routed_experts,), -1, dtype=torch.int64)
        lut[list(self.expert_ids)] = torch.arange(len(self.expert_ids))
        return lut.to(device)


def load_expert_shard(
    model_dir: str | Path, expert_ids: Sequence[int], device: torch.device | str, dtype: torch.dtype
) -> ExpertShard:
    """The hosted experts' weights in `dtype` on `device`. Raises CheckpointError naming what is missing."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_file(model_dir / "config.json")
    ids = tuple(sorted(set(expert_ids)))
    bad = [e for e in ids if not 0 <= e < config.n_routed_experts]
    if not ids or bad:
        raise ValueError(
            f"expert_ids={list(expert_ids)} must name experts in 0..{config.n_routed_experts - 1}"
        )
    device = torch.device(device)
    local = {e: i for i, e in enumerate(ids)}
    inter = config.moe_intermediate_size
    layers = {
        layer: LocalExperts(len(ids), config.hidden_size, inter).to(device=device, dtype=dtype)
        for layer in range(config.num_hidden_layers)
        if config.is_moe_layer(layer)
    }
    files = shard_files(model_dir)
    wanted: dict[Path, list[tuple[str, int, int, str]]] = {}
    for name, file in files.items():
        m = _EXPERT.match(name)
        if m and int(m.group(1)) in layers and int(m.group(2)) in local:
            wanted.setdefault(file, []).append((name, int(m.group(1)), local[int(m.group(2))], m.group(3)))
    loaded = set()
    with torch.no_grad():
        for file, entries in wanted.items():
            with safe_open(file, "pt", device="cpu") as f:
                for name, layer, index, proj in entries:
                    value = f.get_tensor(name)
                    if value.dtype in FP8_DTYPES:
                        value = weight_dequant(value.to(device), _scale(name, files), dtype)
                    experts = layers[layer]
                    if proj == "down_proj":
                        target = experts.w2[index]
                    else:
                        target = (
                            experts.w13[index, :inter] if proj == "gate_proj" else experts.w13[index, inter:]
                        )
                    if tuple(target.shape) != tuple(value.shape):
                        raise CheckpointError(
                            f"{file.name}: tensor {name} has shape {tuple(value.shape)}, "
                            f"expected {tuple(target.shape)}"
                        )
                    target.copy_(value)
                    loaded.add((layer, index, proj))
    expected = {
        (layer, i, p)
        for layer in layers
        for i in range(len(ids))
        for p in ("gate_proj", "up_proj", "down_proj")
    }
    missing = sorted(expected - loaded)
    if missing:
        layer, index, proj = missing[0]
        raise CheckpointError(
            f"{model_dir}: {len(missing)} expert tensors missing, e.g. "
            f"model.layers.{layer}.mlp.experts.{ids[index]}.{proj}.weight"
        )
    for experts in layers.values():
        experts.requires_grad_(False)
    return ExpertShard(config, ids, layers)


def _scale(name: str, files: dict[str, Path]) -> torch.Tensor:
    scale_name = name + "_scale_inv"
    if scale_name not in files:
        raise CheckpointError(f"FP8 tensor {name} has no {scale_name}")
    with safe_open(files[scale_name], "pt", device="cpu") as f:
        return f.get_tensor(scale_name)


def merge_shards(a: ExpertShard, b: ExpertShard) -> ExpertShard:
    """The experts of both (disjoint sets, same layers) in one shard, ascending ids. Copies the weights: the
    caller drops `a` and `b` afterwards."""
    overlap = set(a.expert_ids) & set(b.expert_ids)
    if overlap or a.layers.keys() != b.layers.keys():
        raise ValueError(f"cannot merge shards: experts {sorted(overlap)[:8]} in both, or other layers")
    ids = a.expert_ids + b.expert_ids
    order = sorted(range(len(ids)), key=ids.__getitem__)
    return _stacked(a.config, tuple(ids[i] for i in order), a.layers, b.layers, order)


def select_experts(shard: ExpertShard, expert_ids: Sequence[int]) -> ExpertShard:
    """A shard of `expert_ids` (all hosted by `shard`), the weights copied out of it."""
    ids = tuple(sorted(set(expert_ids)))
    missing = sorted(set(ids) - set(shard.expert_ids))
    if not ids or missing:
        raise ValueError(
            f"expert_ids={list(expert_ids)} must be non-empty and hosted; not hosted: {missing[:8]}"
        )
    local = {e: i for i, e in enumerate(shard.expert_ids)}
    empty = {layer: None for layer in shard.layers}
    return _stacked(shard.config, ids, shard.layers, empty, [local[e] for e in ids])


def _stacked(config: ModelConfig, ids: tuple[int, ...], a: dict, b: dict, order: list[int]) -> ExpertShard:
    """Per layer, the rows `order` of a's experts followed by b's (b may map layers to None)."""
    layers = {}
    with torch.no_grad():
        for layer, experts in a.items():
            w13 = experts.w13 if b[layer] is None else torch.cat([experts.w13, b[layer].w13])
            w2 = experts.w2 if b[layer] is None else torch.cat([experts.w2, b[layer].w2])
            index = torch.tensor(order, dtype=torch.int64, device=w13.device)
            merged = LocalExperts(0, config.hidden_size, config.moe_intermediate_size)
            merged.w13 = torch.nn.Parameter(w13.index_select(0, index), requires_grad=False)
            merged.w2 = torch.nn.Parameter(w2.index_select(0, index), requires_grad=False)
            layers[layer] = merged
    return ExpertShard(config, ids, layers)
