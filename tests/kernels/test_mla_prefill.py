"""mla_prefill against its torch reference: ragged batches (an empty sequence, odd lengths), causal masking,
a cached prefix of uneven lengths, NaN in buffer rows no sequence owns; and the LSE merge."""

from __future__ import annotations

import pytest
import torch

from moemesh.kernels import merge_attn_states, mla_prefill
from moemesh.kernels.mla_prefill import PrefillConfig, Prefix, reference
from tests.kernels.checks import assert_close


def make_case(lens, prefix_lens, num_heads, qk_dim, v_dim, device, spare=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lens)

    def rows(n, d):  # NaN in `spare` trailing rows that no sequence owns
        t = torch.randn(n + spare, num_heads, d, generator=gen).bfloat16()
        t[n:] = float("nan")
        return t

    # q and k as slices of one wider projection output, as the model produces them
    qk = torch.cat((rows(total, qk_dim), rows(total, qk_dim)), dim=-1)
    q, k = qk[..., :qk_dim], qk[..., qk_dim:]
    v = rows(total, v_dim)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    prefix = None
    if prefix_lens is not None:
        pcu = torch.tensor([0, *torch.tensor(prefix_lens).cumsum(0).tolist()], dtype=torch.int32)
        ptotal = sum(prefix_lens)
        prefix = Prefix(rows(ptotal, qk_dim).to(device), rows(ptotal, v_dim).to(device), pcu.to(device))
    return q.to(device), k.to(device), v.to(device), cu.to(device), max(lens), prefix


def check(lens, prefix_lens, num_heads, qk_dim, v_dim, device, config=None):
    q, k, v, cu, max_len, prefix = make_case(lens, prefix_lens, num_heads, qk_dim, v_dim, device)
    scale = qk_dim**-0.5
    out, lse = mla_prefill(q, k, v, cu, scale, max_len, prefix, config=config)
    cpu = None if prefix is None else Prefix(prefix.k.cpu(), prefix.v.cpu(), prefix.cu_seqlens.cpu())
    ref_out, ref_lse = reference(q.cpu(), k.cpu(), v.cpu(), cu.cpu(), scale, max_len, cpu)
    n = sum(lens)
    assert out.dtype == q.dtype and out.shape == (q.shape[0], num_heads, v_dim)
    assert_close(out[:n], ref_out[:n], name="out")
    assert_close(lse[:n], ref_lse[:n], dtype=torch.bfloat16, name="lse")


@pytest.mark.parametrize(
    "lens,prefix_lens",
    [([37], None), ([5, 0, 17, 33], None), ([5, 0, 17, 33], [3, 9, 0, 20]), ([1], [40])],
)
def test_mla_prefill_small(lens, prefix_lens):
    check(lens, prefix_lens, 3, 24, 16, "cpu")


@pytest.mark.parametrize("tma", [True, False])
def test_mla_prefill_tma_and_pointer_kernels(tma):
    """qk 48 = 32 + 16 and v 32 fit the TMA kernel; both kernels on CPU under the interpreter."""
    check([5, 0, 23, 40], [3, 9, 0, 20], 2, 48, 32, "cpu", config=PrefillConfig(16, 16, 4, 1, tma=tma))


def test_mla_prefill_reference_is_causal_softmax():
    q, k, v, cu, _, _ = make_case([6], None, 2, 16, 16, "cpu")
    out, lse = reference(q, k, v, cu, 0.5)
    s = 0.5 * torch.einsum("thd,shd->hts", q[:6].float(), k[:6].float())
    s = s.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
    assert_close(out[:6], torch.einsum("hts,shd->thd", s.softmax(-1), v[:6].float()).bfloat16())
    assert_close(lse[:6], s.logsumexp(-1).T)


def test_merge_attn_states_equals_attention_over_the_union(device="cpu"):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(7, 2, 16, generator=gen)
    keys = torch.randn(11, 2, 16, generator=gen)
    vals = torch.randn(11, 2, 16, generator=gen)

    def attend(ks, vs):
        s = torch.einsum("thd,shd->ths", q, ks)
        return torch.einsum("ths,shd->thd", s.softmax(-1), vs), s.logsumexp(-1)

    out_a, lse_a = attend(keys[:4], vals[:4])
    out_b, lse_b = attend(keys[4:], vals[4:])
    lse_b[3, 1] = float("-inf")  # an empty key set on one side
    out_b[3, 1] = 0.0
    want, want_lse = attend(keys, vals)
    want[3, 1], want_lse[3, 1] = out_a[3, 1], lse_a[3, 1]
    out, lse = merge_attn_states(out_a.to(device), lse_a.to(device), out_b.to(device), lse_b.to(device))
    assert_close(out, want)
    assert_close(lse, want_lse)


def test_mla_prefill_rejects_bad_input():
    q, k, v, cu, _, _ = make_case([4], None, 2, 16, 16, "cpu")
    with pytest.raises(ValueError, match="cu_seqlens must be int32"):
        mla_prefill(q, k, v, cu.long(), 0.1, 4)
    with pytest.raises(ValueError, match="q, k must be"):
        mla_prefill(q, k[:, :1], v, cu, 0.1, 4)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "lens,prefix_lens", [([1000, 1, 129, 3000], None), ([300, 77], [2048, 5]), ([4096], [0])]
)
def test_mla_prefill_v3_shapes(lens, prefix_lens):
    check(lens, prefix_lens, 16, 192, 128, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "config",
    [
        PrefillConfig(tma=False),
        PrefillConfig(64, 64, 4, 2),
        PrefillConfig(128, 128, 8, 2),
        PrefillConfig(lazy_rescale=False),
    ],
)
def test_mla_prefill_launch_configs(config):
    check([300, 77, 1], [129, 0, 64], 4, 192, 128, "cuda", config=config)


@pytest.mark.gpu
def test_mla_prefill_large_logits():
    """Scores spread far apart: the lazy rescale must still track each row's max."""
    q, k, v, cu, max_len, prefix = make_case([700, 3], [300, 1], 4, 192, 128, "cuda")
    q = q * 20
    out, lse = mla_prefill(q, k, v, cu, 192**-0.5, max_len, prefix)
    cpu = Prefix(prefix.k.cpu(), prefix.v.cpu(), prefix.cu_seqlens.cpu())
    ref_out, ref_lse = reference(q.cpu(), k.cpu(), v.cpu(), cu.cpu(), 192**-0.5, max_len, cpu)
    assert_close(out[:703], ref_out[:703])
    assert_close(lse[:703], ref_lse[:703], dtype=torch.bfloat16)


@pytest.mark.gpu
def test_mla_prefill_small_dims_on_gpu():
    check([5, 0, 17, 33], [3, 9, 0, 20], 3, 24, 16, "cuda")
    check([40, 7], [8, 1], 2, 48, 32, "cuda")  # 32 + 16: the TMA kernel


@pytest.mark.gpu
def test_merge_attn_states_gpu():
    test_merge_attn_states_equals_attention_over_the_union("cuda")
