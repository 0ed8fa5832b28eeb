"""rms_norm / add_rms_norm against DeepseekV3RMSNorm semantics, and interleaved RoPE (plain and fused into the
latent-cache store) against DeepSeek's complex-multiply reference."""

from __future__ import annotations

import pytest
import torch

from moemesh.kernels import add_rms_norm, rms_norm, rope, store_kv
from moemesh.kernels.dispatch import interpreting
from moemesh.kernels.paged_kv import store_kv_reference
from moemesh.kernels.rms_norm import reference as norm_reference
from moemesh.kernels.rope import RopeTables
from moemesh.kernels.rope import reference as rope_reference
from tests.kernels.checks import assert_close


def _hf_rmsnorm(h, weight, eps):
    """transformers' DeepseekV3RMSNorm.forward, verbatim in meaning."""
    input_dtype = h.dtype
    hf = h.to(torch.float32)
    variance = hf.pow(2).mean(-1, keepdim=True)
    hf = hf * torch.rsqrt(variance + eps)
    return weight * hf.to(input_dtype)


@pytest.mark.parametrize("shape,hidden", [((7,), 96), ((2, 3), 200), ((1,), 7168)])
def test_rms_norm(shape, hidden, device="cpu"):
    gen = torch.Generator().manual_seed(hidden)
    x = (3 * torch.randn(*shape, hidden, generator=gen)).bfloat16().to(device)
    res = torch.randn(*shape, hidden, generator=gen).bfloat16().to(device)
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).bfloat16().to(device)
    y = rms_norm(x, w, 1e-6)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    assert_close(y, _hf_rmsnorm(x, w, 1e-6))
    y2, new_res = add_rms_norm(x, res, w, 1e-6)
    if interpreting():  # the interpreter truncates fp32 -> bf16 instead of rounding to nearest
        assert_close(new_res, res + x)
    else:
        assert torch.equal(new_res, res + x)
    assert_close(y2, _hf_rmsnorm(res + x, w, 1e-6))
    ref, ref_res = norm_reference(x, w, 1e-6, res)
    assert torch.equal(ref_res, res + x)
    assert_close(y2, ref)


@pytest.mark.parametrize("hidden,residual", [(300, True), (64, False), (2048, True)])
def test_rms_norm_outputs_fp32_and_fp8_in_the_same_pass(hidden, residual, device="cpu"):
    """The norm's extra outputs equal the conversions they replace: y.float() and act_quant(y)."""
    from moemesh.kernels import act_quant, rms_norm_outputs
    from tests.kernels.checks import assert_fp8_equal

    gen = torch.Generator().manual_seed(hidden)
    x = (3 * torch.randn(4, hidden, generator=gen)).bfloat16().to(device)
    res = torch.randn(4, hidden, generator=gen).bfloat16().to(device) if residual else None
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).bfloat16().to(device)
    out = rms_norm_outputs(x, w, 1e-6, res, fp32=True, fp8=True)
    y, new_res = add_rms_norm(x, res, w, 1e-6) if residual else (rms_norm(x, w, 1e-6), None)
    assert torch.equal(out.y, y)
    assert (out.residual is None) == (not residual) and (not residual or torch.equal(out.residual, new_res))
    assert out.y_fp32.dtype == torch.float32 and torch.equal(out.y_fp32, y.float())
    q, scale = act_quant(y)
    assert out.y_scale.shape == scale.shape == (4, -(-hidden // 128))
    assert_close(out.y_scale, scale)
    assert_fp8_equal(out.y_fp8, q, interpreted=interpreting())
    only_fp8 = rms_norm_outputs(x, w, 1e-6, res, fp8=True)
    assert only_fp8.y_fp32 is None and torch.equal(only_fp8.y_scale, out.y_scale)


def test_rms_norm_strided_rows_and_fp32_weight():
    x = torch.randn(5, 2 * 48).bfloat16()[:, :48]  # row stride 96
    w = torch.rand(48)
    y = rms_norm(x, w, 1e-5)
    assert y.dtype == torch.float32
    assert_close(y, _hf_rmsnorm(x, w, 1e-5), dtype=torch.bfloat16)


def test_rms_norm_rejects_bad_weight():
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(torch.zeros(3, 8), torch.ones(7))


def _tables(num_tokens, rope_dim, max_pos=300, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rope_dim, 2).float() / rope_dim))
    angles = torch.arange(max_pos).float()[:, None] * inv_freq[None]
    mscale = 1.3  # a folded-in attention factor
    positions = torch.randint(0, max_pos, (num_tokens,), generator=gen)
    return RopeTables(
        positions.to(device), (angles.cos() * mscale).to(device), (angles.sin() * mscale).to(device)
    )


def _model_rope(x, cos, sin):
    """The model's interleaved formula (moemesh.model.rope.RotaryEmbedding.apply), written out."""
    shape = [x.shape[0]] + [1] * (x.dim() - 2) + [cos.shape[-1]]
    c, s = cos.view(shape), sin.view(shape)
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2).to(x.dtype)


@pytest.mark.parametrize("heads", [None, 3, 20])
def test_rope(heads, device="cpu"):
    num_tokens, rope_dim = 11, 16
    t = _tables(num_tokens, rope_dim, device=device)
    # q_pe as a slice of wider q rows [T, H, nope + rope]
    full = torch.randn(num_tokens, heads or 1, 24 + rope_dim).bfloat16().to(device)
    x = full[..., 24:] if heads else full[:, 0, 24:]
    want = _model_rope(x.cpu(), t.cos_cache.cpu()[t.positions.cpu()], t.sin_cache.cpu()[t.positions.cpu()])
    assert_close(rope_reference(x.cpu(), t.positions.cpu(), t.cos_cache.cpu(), t.sin_cache.cpu()), want)
    y = rope(x, t.positions, t.cos_cache, t.sin_cache)
    assert_close(y, want)
    before = full.clone()
    rope(x, t.positions, t.cos_cache, t.sin_cache, out=x)
    assert_close(x, want)
    assert torch.equal(full[..., :24], before[..., :24])  # the nope part untouched


def test_rope_rejects_bad_positions():
    t = _tables(4, 8)
    with pytest.raises(ValueError, match="positions must be int64"):
        rope(torch.zeros(4, 8), t.positions.int(), t.cos_cache, t.sin_cache)


@pytest.mark.parametrize("fp8", [False, True])
def test_store_kv_with_rope(fp8, device="cpu", kv_lora_rank=32, rope_dim=16, page_size=4):
    num_tokens = 9
    t = _tables(num_tokens, rope_dim, device=device)
    gen = torch.Generator().manual_seed(5)
    latent = torch.randn(num_tokens, kv_lora_rank, generator=gen).bfloat16().to(device)
    k_pe = torch.randn(num_tokens, rope_dim, generator=gen).bfloat16().to(device)
    slots = torch.tensor([3, -1, 0, 7, 12, 19, 1, -1, 5], device=device)
    if fp8:
        from moemesh.kernels.paged_kv import fp8_row_bytes

        cache = torch.zeros(5, page_size, fp8_row_bytes(kv_lora_rank, rope_dim), dtype=torch.float8_e4m3fn)
    else:
        cache = torch.full((5, page_size, kv_lora_rank + rope_dim), float("nan"), dtype=torch.bfloat16)
    cache = cache.to(device)
    expected, expected_pe = cache.clone(), k_pe.clone()
    store_kv_reference(expected, latent, expected_pe, slots, rope=t)
    store_kv(cache, latent, k_pe, slots, rope=t)
    assert_close(k_pe, expected_pe)
    rows = cache.view(-1, cache.shape[-1])[slots[slots >= 0]]
    want_rows = expected.view(-1, cache.shape[-1])[slots[slots >= 0]]
    if fp8:
        pe_bytes = slice(-2 * rope_dim, None)
        got = rows.view(torch.uint8)[:, pe_bytes].contiguous().view(torch.bfloat16)
        want = want_rows.view(torch.uint8)[:, pe_bytes].contiguous().view(torch.bfloat16)
        assert_close(got, want)
    else:
        assert_close(rows, want_rows)
        assert cache.view(-1, cache.shape[-1]).isnan().all(-1).sum() == 5 * page_size - 7


@pytest.mark.parametrize("fp8", [False, True])
def test_store_kv_fuses_the_latent_norm_and_the_query_rope(
    fp8, device="cpu", kv_lora_rank=32, rope_dim=16, num_heads=3, page_size=4
):
    """MLA's decode prep in one launch: the latent's RMSNorm, k_pe's and every query head's RoPE, the cache
    store — against the three ops one after the other (the model's strided views: latent and k_pe slices of
    one kv row, q_pe a slice of q, q_out the rope columns of a head-major absorbed query)."""
    from moemesh.kernels import StoreExtras
    from moemesh.kernels.paged_kv import fp8_dequant_rows, fp8_row_bytes

    num_tokens, nope = 6, 8
    t = _tables(num_tokens, rope_dim, device=device)
    gen = torch.Generator().manual_seed(11)
    kv = (3 * torch.randn(num_tokens, kv_lora_rank + rope_dim, generator=gen)).bfloat16().to(device)
    latent, k_pe = kv.split([kv_lora_rank, rope_dim], dim=-1)
    q = torch.randn(num_tokens, num_heads, nope + rope_dim, generator=gen).bfloat16().to(device)
    q_pe = q[..., nope:]
    weight = (1 + 0.1 * torch.randn(kv_lora_rank, generator=gen)).bfloat16().to(device)
    q_full = torch.full((num_heads, num_tokens, kv_lora_rank + rope_dim), float("nan"), dtype=torch.bfloat16)
    q_out = q_full.to(device).transpose(0, 1)[..., kv_lora_rank:]
    slots = torch.tensor([5, -1, 0, 9, 2, 14], device=device)
    row = fp8_row_bytes(kv_lora_rank, rope_dim) if fp8 else kv_lora_rank + rope_dim
    cache = torch.zeros(4, page_size, row, dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16).to(device)
    expected, expected_pe = cache.clone(), k_pe.clone()
    normed = norm_reference(latent, weight, 1e-6)[0]
    store_kv_reference(expected, normed, expected_pe, slots, rope=t)
    expected_q = rope_reference(q_pe, t.positions, t.cos_cache, t.sin_cache)
    store_kv(cache, latent, k_pe, slots, rope=t, extras=StoreExtras(weight, 1e-6, q_pe, q_out))
    assert_close(q_out, expected_q)
    assert_close(k_pe, expected_pe)
    keep = slots[slots >= 0]
    got, want = cache.view(-1, row)[keep], expected.view(-1, row)[keep]
    if fp8:  # the e4m3 latent within its quantization step; k_pe's bf16 bytes exact
        g, w = fp8_dequant_rows(got, kv_lora_rank, rope_dim), fp8_dequant_rows(want, kv_lora_rank, rope_dim)
        step = (
            normed.float().abs().max().item() / 8
        )  # e4m3 keeps 3 mantissa bits (the interpreter drops a carry)
        torch.testing.assert_close(g.cpu(), w.cpu(), atol=step, rtol=0.07)
    else:
        assert_close(got, want)
    with pytest.raises(ValueError, match="norm_weight must be"):
        store_kv(cache, latent, k_pe, slots, rope=t, extras=StoreExtras(weight.float()))
    with pytest.raises(ValueError, match="q_pe and q_out must be"):
        store_kv(cache, latent, k_pe, slots, rope=None, extras=StoreExtras(q_pe=q_pe, q_out=q_out))


@pytest.mark.gpu
def test_norm_rope_v3_shapes():
    test_rms_norm((257,), 7168, device="cuda")
    test_rms_norm((33,), 1536, device="cuda")
    test_rms_norm_outputs_fp32_and_fp8_in_the_same_pass(7168, True, device="cuda")
    test_rope(128, device="cuda")
    test_store_kv_with_rope(False, device="cuda", kv_lora_rank=512, rope_dim=64, page_size=64)
    test_store_kv_with_rope(True, device="cuda", kv_lora_rank=512, rope_dim=64, page_size=64)
    for fp8 in (False, True):
        test_store_kv_fuses_the_latent_norm_and_the_query_rope(
            fp8, device="cuda", kv_lora_rank=512, rope_dim=64, num_heads=128, page_size=64
        )
