"""The BF16 grouped GEMM for decode-sized expert batches (`kernels/moe_grouped_gemm.py`), plain and with SiLU-and-mul
fused, against the expert-by-expert fp32 reference: empty experts, an expert spanning several row tiles, K not a
multiple of the K tile, rows past the last expert untouched."""

from __future__ import annotations

import pytest
import torch

from moemesh.kernels.moe_grouped_gemm import moe_grouped_gemm, reference
from moemesh.kernels.silu_mul import silu_mul
from tests.kernels.checks import assert_close


def _case(counts, k, n, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = sum(counts)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    x = torch.randn(m + 3, k, generator=gen).bfloat16()  # 3 rows past offsets[E]: nobody's
    w = (torch.randn(len(counts), n, k, generator=gen) / k**0.5).bfloat16()
    return x.to(device), w.to(device), offsets.to(device)


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("counts,k", [([3, 0, 20, 1], 160), ([1, 0, 0, 2, 0, 1], 64)])
def test_grouped_gemm_matches_the_reference(counts, k, silu, device="cpu", n=96):
    x, w, offsets = _case(counts, k, n, device)
    m = sum(counts)
    got = moe_grouped_gemm(x, w, offsets, silu_mul=silu)
    assert got.shape == (m + 3, n // 2 if silu else n) and got.dtype == torch.bfloat16
    assert_close(got[:m], reference(x, w, offsets, silu)[:m])
    if not silu:  # the fused epilogue equals GEMM then silu_mul, up to the BF16 rounding it skips
        assert_close(moe_grouped_gemm(x, w, offsets, silu_mul=True)[:m], silu_mul(got[:m]))


def test_grouped_gemm_rejects_bad_operands():
    x, w, offsets = _case([2, 1], 32, 16)
    with pytest.raises(ValueError, match="offsets is"):
        moe_grouped_gemm(x, w, offsets.long())
    with pytest.raises(ValueError, match="one dtype"):
        moe_grouped_gemm(x.float(), w, offsets)
    with pytest.raises(ValueError, match="silu_mul needs"):
        moe_grouped_gemm(x, w[:, :15], offsets, silu_mul=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_gemm_v2_lite_expert_shapes():
    """64 experts, K 2048, w13 N 2816 and w2 N 2048 over K 1408: decode batches of 1, 8, 64 and 256 tokens
    (6 experts each, uniform), against torch._grouped_mm (+ silu_mul)."""
    gen = torch.Generator().manual_seed(0)
    w13 = (torch.randn(64, 2816, 2048, generator=gen) / 45).bfloat16().cuda()
    w2 = (torch.randn(64, 2048, 1408, generator=gen) / 38).bfloat16().cuda()
    for tokens in (1, 8, 64, 256):
        ids = torch.stack([torch.randperm(64, generator=gen)[:6] for _ in range(tokens)]).flatten()
        counts = torch.bincount(ids, minlength=64)
        offsets = torch.zeros(65, dtype=torch.int32)
        offsets[1:] = counts.cumsum(0)
        offsets = offsets.cuda()
        x = torch.randn(ids.numel(), 2048, generator=gen).bfloat16().cuda()
        h = torch._grouped_mm(x, w13.transpose(1, 2), offs=offsets[1:])
        a = moe_grouped_gemm(x, w13, offsets, silu_mul=True)
        assert_close(a, silu_mul(h))
        assert_close(
            moe_grouped_gemm(a, w2, offsets), torch._grouped_mm(a, w2.transpose(1, 2), offs=offsets[1:])
        )
