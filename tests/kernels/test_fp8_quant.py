"""`act_quant` and `weight_quant`: kernels vs references (exact on a GPU), layouts, edge groups, pow2 scales."""

from __future__ import annotations

import pytest
import torch

from moemesh.kernels.dispatch import interpreting
from moemesh.kernels.fp8_quant import (
    act_quant,
    act_quant_reference,
    weight_dequant,
    weight_quant,
    weight_quant_reference,
)
from tests.kernels.checks import assert_close, assert_fp8_equal

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _act(m, k, seed=0, device=DEV):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-3, 2, k)[torch.randperm(k, generator=gen)]
    x[0, : min(k, 128)] = 0.0  # an all-zero group
    return x.to(torch.bfloat16).to(device)


@pytest.mark.parametrize("m, k", [(1, 128), (5, 200), (3, 7), (4, 640)])
@pytest.mark.parametrize("pow2", [False, True])
def test_act_quant_matches_reference(m, k, pow2):
    x = _act(m, k)
    q, s = act_quant(x, scale_pow2=pow2)
    q_ref, s_ref = act_quant_reference(x.cpu(), scale_pow2=pow2)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (m, k) and s.shape == (m, -(-k // 128))
    assert torch.equal(s.cpu(), s_ref)
    assert_fp8_equal(q, q_ref, interpreted=interpreting(), name="x_fp8")
    if pow2:
        assert torch.equal(s_ref, torch.exp2(torch.log2(s_ref).round()))
    deq = (q_ref.float().view(m, -1) * s_ref.repeat_interleave(128, 1)[:, :k]).view(m, k)
    assert_close(deq, x.float().cpu(), dtype=torch.float8_e4m3fn, name="dequantized")


def test_act_quant_leading_dims_and_group_size():
    x = _act(6, 96).view(2, 3, 96)
    q, s = act_quant(x, group_size=32)
    q_ref, s_ref = act_quant_reference(x.cpu(), group_size=32)
    assert q.shape == (2, 3, 96) and s.shape == (2, 3, 3)
    assert torch.equal(s.cpu(), s_ref)
    assert_fp8_equal(q, q_ref, interpreted=interpreting())


@pytest.mark.parametrize("n, k", [(128, 128), (200, 130), (576, 64), (1, 1)])
def test_weight_quant_matches_reference(n, k):
    w = _act(n, k, seed=n).T.contiguous().T  # a non-contiguous view
    q, s = weight_quant(w)
    q_ref, s_ref = weight_quant_reference(w.cpu())
    assert torch.equal(s.cpu(), s_ref)
    assert_fp8_equal(q, q_ref, interpreted=interpreting(), name="w_fp8")
    assert_close(weight_dequant(q_ref, s_ref), w.float().cpu(), dtype=torch.float8_e4m3fn)


def test_bad_inputs():
    with pytest.raises(ValueError, match="group_size"):
        act_quant(torch.zeros(2, 8), group_size=3)
    with pytest.raises(ValueError, match="act_quant"):
        act_quant(torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="2-D"):
        weight_quant(torch.zeros(2, 3, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_v3_shapes_exact():
    x = _act(4096, 7168, device="cuda")
    q, s = act_quant(x)
    # the reference runs on the CPU: torch's CUDA division by a scalar multiplies by its reciprocal instead
    q_ref, s_ref = act_quant_reference(x.cpu())
    assert torch.equal(s.cpu(), s_ref) and torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))
    w = _act(2112, 7168, seed=1, device="cuda")  # q_a_proj + kv_a_proj_with_mqa rows: not a multiple of 128
    q, s = weight_quant(w)
    q_ref, s_ref = weight_quant_reference(w.cpu())
    assert torch.equal(s.cpu(), s_ref) and torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))
