"""The architecture of a DeepSeek-V2/V3-family checkpoint, read from its `config.json`.

Both spellings load: DeepSeek's own (`rope_scaling`, `rope_theta`, `torch_dtype`, extra keys such as
`num_nextn_predict_layers`) and the one transformers 5 writes (`rope_parameters`). Field names are those of
config.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "kimi_k2")


class ConfigError(ValueError):
    """A config.json that moemesh cannot serve; the message names the key and value."""


@dataclass(frozen=True)
class RopeConfig:
    rope_type: str = "default"  # "default" or "yarn"
    rope_theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    @classmethod
    def from_config(cls, raw: dict[str, Any]) -> RopeConfig:
        params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ("default", "yarn"):
            raise ConfigError(f"rope type {rope_type!r} is not supported (expected 'default' or 'yarn')")
        if rope_type == "default":
            return cls(rope_theta=float(theta))
        return cls(
            rope_type="yarn",
            rope_theta=float(theta),
            factor=float(params.get("factor") or 1.0),
            original_max_position_embeddings=params.get("original_max_position_embeddings"),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            attention_factor=params.get("attention_factor"),
            truncate=bool(params.get("truncate", True)),
        )


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    q_lora_rank: int | None
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    # MoE
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    scoring_func: str = "softmax"  # "softmax" (V2) or "sigmoid" (V3)
    topk_method: str = "greedy"  # V2: "greedy" | "group_limited_greedy"; V3: "noaux_tc"
    hidden_act: str = "silu"
    attention_bias: bool = False
    rope_interleave: bool = True
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    torch_dtype: str | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type={self.model_type!r} is not supported (expected one of {SUPPORTED_MODEL_TYPES})"
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported (expected 'silu')")
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ConfigError(f"scoring_func={self.scoring_func!r} must be 'softmax' or 'sigmoid'")
        if self.n_routed_experts:
            groups = self.n_group or 1
            if self.n_routed_experts % groups:
                raise ConfigError(
                    f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={groups}"
                )
            if self.num_experts_per_tok is None or not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                raise ConfigError(
                    f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..{self.n_routed_experts}"
                )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values per token per layer in the latent cache: kv_lora_rank + qk_rope_head_dim (576 in V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def num_groups(self) -> int:
        return self.n_group or 1

    @property
    def group_topk(self) -> int:
        return self.topk_group or self.num_groups

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            bool(self.n_routed_experts)
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type is None:
            raise ConfigError("config.json has no 'model_type'")
        v3 = model_type in ("deepseek_v3", "kimi_k2")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        try:
            return cls(
                model_type=model_type,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=int(raw["hidden_size"]),
                intermediate_size=int(raw["intermediate_size"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                num_attention_heads=int(raw["num_attention_heads"]),
                kv_lora_rank=int(raw["kv_lora_rank"]),
                q_lora_rank=raw.get("q_lora_rank"),
                qk_nope_head_dim=int(raw["qk_nope_head_dim"]),
                qk_rope_head_dim=int(raw["qk_rope_head_dim"]),
                v_head_dim=int(raw["v_head_dim"]),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
                n_routed_experts=raw.get("n_routed_experts"),
                n_shared_experts=raw.get("n_shared_experts"),
                num_experts_per_tok=raw.get("num_experts_per_tok"),
                moe_intermediate_size=raw.get("moe_intermediate_size"),
                first_k_dense_replace=int(raw.get("first_k_dense_replace") or 0),
                moe_layer_freq=int(raw.get("moe_layer_freq") or 1),
                n_group=raw.get("n_group"),
                topk_group=raw.get("topk_group"),
                norm_topk_prob=bool(raw.get("norm_topk_prob", v3)),
                routed_scaling_factor=float(raw.get("routed_scaling_factor") or 1.0),
                scoring_func=raw.get("scoring_func", "sigmoid" if v3 else "softmax"),
                topk_method=raw.get("topk_method", "noaux_tc" if v3 else "greedy"),
                hidden_act=raw.get("hidden_act", "silu"),
                attention_bias=bool(raw.get("attention_bias", False)),
                rope_interleave=bool(raw.get("rope_interleave", True)),
                rope=RopeConfig.from_config(raw),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                num_nextn_predict_layers=int(raw.get("num_nextn_predict_layers") or 0),
                bos_token_id=raw.get("bos_token_id"),
                eos_token_id=eos_ids,
                torch_dtype=raw.get("torch_dtype", raw.get("dtype")),
            )
        except KeyError as e:
            raise ConfigError(f"config.json is missing the required key {e.args[0]!r}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        return cls.from_dict(json.loads(path.read_text()))

    def to_dict(self) -> dict[str, Any]:
        """The DeepSeek config.json spelling (what our checkpoint writer saves)."""
        d: dict[str, Any] = {
            "architectures": [
                "DeepseekV3ForCausalLM" if self.scoring_func == "sigmoid" else "DeepseekV2ForCausalLM"
            ],
        }
        for name in self.__dataclass_fields__:
            if name in ("rope", "eos_token_id"):
                continue
            d[name] = getattr(self, name)
        d["eos_token_id"] = list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0]
        d["rope_theta"] = self.rope.rope_theta
        if self.rope.rope_type == "yarn":
            r = self.rope
            d["rope_scaling"] = {
                "type": "yarn",
                "factor": r.factor,
                "original_max_position_embeddings": r.original_max_position_embeddings,
                "beta_fast": r.beta_fast,
                "beta_slow": r.beta_slow,
                "mscale": r.mscale,
                "mscale_all_dim": r.mscale_all_dim,
            }
        return d
