"""DeepSeek's rotary position embedding: interleaved pairs, optional YaRN scaling with mscale.

The math follows DeepSeek's reference (and transformers, which matches it): YaRN blends interpolated and
extrapolated inverse frequencies with a linear ramp, multiplies cos/sin by `attention_factor`
(mscale / mscale_all_dim), and the softmax scale by mscale_all_dim's mscale squared.
"""

from __future__ import annotations

import math

import torch

from moemesh.kernels import RopeTables
from moemesh.model.config import ModelConfig, RopeConfig


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def inv_freq_and_attention_factor(rope: RopeConfig, dim: int, max_position_embeddings: int):
    """Returns (inv_freq fp32 [dim/2], attention_factor applied to cos/sin)."""
    base = rope.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if rope.rope_type == "default":
        return 1.0 / pos_freqs, 1.0
    orig = rope.original_max_position_embeddings or max_position_embeddings
    factor = rope.factor
    if rope.attention_factor is not None:
        attention_factor = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention_factor = yarn_get_mscale(factor, rope.mscale) / yarn_get_mscale(factor, rope.mscale_all_dim)
    else:
        attention_factor = yarn_get_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


def softmax_scale(config: ModelConfig) -> float:
    scale = config.qk_head_dim**-0.5
    rope = config.rope
    if rope.rope_type == "yarn" and rope.mscale_all_dim:
        m = yarn_get_mscale(rope.factor, rope.mscale_all_dim)
        scale = scale * m * m
    return scale


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables fp32 [max_position_embeddings, rope_dim / 2] with YaRN's attention factor folded in, as
    the fused kernels read them (`moemesh.kernels.rope`, `store_kv(..., rope=...)`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self.attention_factor = inv_freq_and_attention_factor(
            config.rope, config.qk_rope_head_dim, config.max_position_embeddings
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleaved = config.rope_interleave
        cos, sin = self.cos_sin(torch.arange(config.max_position_embeddings))
        self.register_buffer("cos_cache", cos, persistent=False)
        self.register_buffer("sin_cache", sin, persistent=False)

    def tables(self, positions: torch.Tensor) -> RopeTables:
        """positions int64 [T] (< max_position_embeddings) with this model's tables."""
        return RopeTables(positions, self.cos_cache, self.sin_cache)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions int64 [T] -> cos, sin fp32 [T, rope_dim/2]."""
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, ..., rope_dim] -> same shape and dtype.

        Interleaved (DeepSeek): pairs (x0, x1), (x2, x3)... rotate by one frequency and stay interleaved.
        Otherwise the halves (x[:d/2], x[d/2:]) pair up (rotate_half)."""
        shape = [x.shape[0]] + [1] * (x.dim() - 2) + [cos.shape[-1]]
        c, s = cos.view(shape), sin.view(shape)
        xf = x.float()
        if self.interleaved:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
        else:
            half = xf.shape[-1] // 2
            x1, x2 = xf[..., :half], xf[..., half:]
            out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
        return out.to(x.dtype)
