"""FP8 e4m3 quantization in DeepSeek's layouts.

* `weight_quant(w)`: 128x128 blocks, the checkpoint layout: `w_fp8 [N, K]` float8_e4m3fn and `scale_inv fp32
  [ceil(N/128), ceil(K/128)]` with `w ≈ w_fp8 * scale_inv` blockwise. Edge blocks are partial (no padding is
  stored), so N and K need not be multiples of 128 (DeepSeek-V3's 576-row `kv_a_proj_with_mqa`).
* `weight_dequant(w_fp8, scale_inv, dtype)`: the exact inverse map, fp8 value x block scale in `dtype`.
"""

from __future__ import annotations

import torch

FP8_E4M3_MAX = 448.0
BLOCK = 128


def _expand_blocks(scale: torch.Tensor, n: int, k: int, block: int = BLOCK) -> torch.Tensor:
    """[ceil(n/block), ceil(k/block)] -> [n, k], each block's scale repeated over its elements."""
    return scale.repeat_interleave(block, dim=0)[:n].repeat_interleave(block, dim=1)[:, :k]


def weight_quant_reference(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise e4m3 quantization in plain torch. `w [N, K]` any float dtype."""
    if w.dim() != 2:
        raise ValueError(f"weight_quant expects a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    padded = w.new_zeros(nb * block, kb * block, dtype=torch.float32)
    padded[:n, :k] = w.float()
    blocks = padded.view(nb, block, kb, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12)  # [nb, kb]
    scale_inv = amax / FP8_E4M3_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    w_fp8 = q.view(nb * block, kb * block)[:n, :k].to(torch.float8_e4m3fn)
    return w_fp8.contiguous(), scale_inv.contiguous()


def weight_quant(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight into DeepSeek's 128x128-block FP8 checkpoint layout."""
    return weight_quant_reference(w, block)


def weight_dequant(
    w_fp8: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32, block: int = BLOCK
) -> torch.Tensor:
    """fp8 value x its block's scale, computed in `dtype`. `w_fp8 [N, K]`, `scale_inv [ceil(N/128), ceil(K/128)]`."""
    n, k = w_fp8.shape
    expected = (-(-n // block), -(-k // block))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a weight of shape {(n, k)}"
        )
    return w_fp8.to(dtype) * _expand_blocks(scale_inv.to(dtype), n, k, block)
