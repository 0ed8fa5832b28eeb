"""mla_decode against its torch reference: shuffled page tables, NaN-poisoned unused pages and rows, ragged
and single-sequence batches, odd page sizes and context lengths; BF16 and FP8 latent caches."""

from __future__ import annotations

import pytest
import torch

from moemesh.kernels import mla_decode
from moemesh.kernels.mla_decode import DecodeConfig, reference
from moemesh.kernels.paged_kv import fp8_row_bytes, store_kv_reference
from tests.kernels.checks import assert_close


def make_case(
    seq_lens, num_heads, kv_lora_rank, rope_dim, page_size, device, fp8=False, seed=0, spare_pages=3
):
    """A paged cache whose used rows hold random values and every other row NaN (bytes 0xFF for FP8: e4m3 NaN,
    fp32/bf16 NaN too), a shuffled page table padded with poisoned pages."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(seq_lens)
    pages_per_seq = [-(-n // page_size) for n in seq_lens]
    max_pages = max(pages_per_seq) + 1
    num_pages = sum(pages_per_seq) + spare_pages + max_pages
    perm = torch.randperm(num_pages, generator=gen)
    page_table = torch.empty(batch, max_pages, dtype=torch.int32)
    slots, nxt = [], 0
    for b, n in enumerate(seq_lens):
        pages = perm[nxt : nxt + pages_per_seq[b]]
        nxt += pages_per_seq[b]
        poison = perm[-(max_pages - pages_per_seq[b]) :] if max_pages > pages_per_seq[b] else perm[:0]
        page_table[b] = torch.cat((pages, poison)).int()
        slots += [int(pages[p // page_size]) * page_size + p % page_size for p in range(n)]
    dim = kv_lora_rank + rope_dim
    latent = torch.randn(len(slots), kv_lora_rank, generator=gen).bfloat16()
    k_pe = torch.randn(len(slots), rope_dim, generator=gen).bfloat16()
    if fp8:
        kv_cache = torch.full(
            (num_pages, page_size, fp8_row_bytes(kv_lora_rank, rope_dim)), 255, dtype=torch.uint8
        )
        kv_cache = kv_cache.view(torch.float8_e4m3fn)
    else:
        kv_cache = torch.full((num_pages, page_size, dim), float("nan"), dtype=torch.bfloat16)
    slot_mapping = torch.tensor(slots, dtype=torch.int64)
    store_kv_reference(kv_cache, latent, k_pe, slot_mapping)  # plain torch: exact on every backend
    q = torch.randn(batch, num_heads, dim, generator=gen).bfloat16()
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    return tuple(t.to(device) for t in (q, kv_cache, page_table, seq))


def check(
    seq_lens,
    num_heads,
    kv_lora_rank,
    rope_dim,
    page_size,
    device,
    fp8=False,
    num_splits=None,
    seed=0,
    config=None,
):
    q, kv_cache, page_table, seq = make_case(
        seq_lens, num_heads, kv_lora_rank, rope_dim, page_size, device, fp8, seed
    )
    scale = (kv_lora_rank + rope_dim) ** -0.5
    out, lse = mla_decode(
        q, kv_cache, page_table, seq, scale, kv_lora_rank, num_splits=num_splits, config=config
    )
    ref_out, ref_lse = reference(q.cpu(), kv_cache.cpu(), page_table.cpu(), seq.cpu(), scale, kv_lora_rank)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    assert_close(out, ref_out, name="out")
    empty = seq.cpu() == 0
    assert torch.isneginf(lse.cpu()[empty]).all()
    assert_close(lse.cpu()[~empty], ref_lse[~empty], dtype=torch.bfloat16, name="lse")


@pytest.mark.parametrize(
    "seq_lens,num_heads,kv_lora_rank,rope_dim,page_size",
    [
        ([37], 5, 32, 16, 4),  # batch 1, odd length, heads not a power of two
        ([1, 19, 64, 7], 16, 16, 8, 16),  # ragged; rope 8 pads to 16
        ([50, 3], 4, 32, 16, 64),  # page bigger than the short sequence
    ],
)
def test_mla_decode_small(seq_lens, num_heads, kv_lora_rank, rope_dim, page_size):
    check(seq_lens, num_heads, kv_lora_rank, rope_dim, page_size, "cpu")


def test_mla_decode_splits_and_empty_sequence():
    check([0, 45, 2], 3, 16, 16, 8, "cpu", num_splits=5)


def test_mla_decode_splits_follow_the_live_length_in_a_wide_table():
    """A CUDA graph's page table is as wide as max_model_len; each sequence splits its own length, so every
    split of a short sequence holds tokens and the result still equals the reference."""
    q, kv_cache, page_table, seq = make_case([9, 33, 1], 4, 16, 16, 8, "cpu")
    wide = torch.cat([page_table, page_table[:, -1:].expand(-1, 30)], dim=1)  # poisoned columns, never read
    scale = 32**-0.5
    ref_out, ref_lse = reference(q, kv_cache, wide, seq, scale, 16)
    for splits in (2, 4, 7):
        out, lse = mla_decode(q, kv_cache, wide, seq, scale, 16, num_splits=splits)
        assert_close(out, ref_out, name=f"out, {splits} splits")
        assert_close(lse, ref_lse, dtype=torch.bfloat16, name=f"lse, {splits} splits")


@pytest.mark.parametrize("tma", [True, False])
def test_mla_decode_tma_and_pointer_kernels(tma):
    """Both kernels on CPU under the interpreter (the TMA one loads page-aligned tiles by descriptor)."""
    check([70, 9, 33], 4, 32, 16, 16, "cpu", num_splits=2, config=DecodeConfig(16, 16, 4, 1, tma=tma))


def test_mla_decode_fp8_small():
    check([33, 5], 4, 32, 16, 8, "cpu", fp8=True)


def test_mla_decode_reference_matches_dense_softmax():
    """The reference itself against attention written densely on contiguous rows."""
    q, kv_cache, page_table, seq = make_case([9], 2, 16, 16, 4, "cpu")
    rows = kv_cache[page_table[0, :3].long()].reshape(-1, 32)[:9].float()
    scores = 0.25 * q[0].float() @ rows.T
    out, lse = reference(q, kv_cache, page_table, seq, 0.25, 16)
    assert_close(out[0], (scores.softmax(-1) @ rows[:, :16]).bfloat16())
    assert_close(lse[0], scores.logsumexp(-1))


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda q, kv, pt, s: (q[0], kv, pt, s), "q must be"),
        (lambda q, kv, pt, s: (q, kv[..., :-1], pt, s), "kv_cache must be"),
        (lambda q, kv, pt, s: (q, kv, pt.long(), s), "page_table must be int32"),
        (lambda q, kv, pt, s: (q, kv, pt, s[:-1]), "seq_lens must be int32"),
    ],
)
def test_mla_decode_rejects_bad_input(bad, match):
    args = bad(*make_case([5, 6], 2, 16, 16, 4, "cpu"))
    with pytest.raises(ValueError, match=match):
        mla_decode(*args, 0.1, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize(
    "seq_lens",
    [[1], [4097], [1, 700, 3000, 129, 64, 65], [2048] * 64],
)
def test_mla_decode_v3_shapes(seq_lens, fp8):
    check(seq_lens, 128, 512, 64, 64, "cuda", fp8=fp8)


@pytest.mark.gpu
def test_mla_decode_v3_small_pages_and_forced_splits():
    check([1000, 17, 333], 16, 512, 64, 16, "cuda", num_splits=7)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("block_h,block_n,num_warps", [(64, 64, 8), (32, 32, 4), (64, 32, 16)])
def test_mla_decode_launch_configs(tma, block_h, block_n, num_warps, fp8):
    """Both kernels (pointer gather, TMA tiles) under several launch shapes, one and several splits."""
    for splits in (1, 3):
        cfg = DecodeConfig(block_h, block_n, num_warps, 2, tma=tma)
        check([777, 64, 1, 130], 128, 512, 64, 64, "cuda", fp8=fp8, num_splits=splits, config=cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_mla_decode_eager_rescale(fp8):
    cfg = DecodeConfig(64, 64, 8, 2, lazy_rescale=False)
    check([777, 64, 1, 130], 128, 512, 64, 64, "cuda", fp8=fp8, num_splits=2, config=cfg)


@pytest.mark.gpu
def test_mla_decode_large_logits():
    """Scores spread far apart (the lazy rescale must still track the max): q scaled up 30x."""
    q, kv_cache, page_table, seq = make_case([3000, 200], 128, 512, 64, 64, "cuda")
    q = q * 30
    out, lse = mla_decode(q, kv_cache, page_table, seq, 576**-0.5, 512)
    ref_out, ref_lse = reference(q.cpu(), kv_cache.cpu(), page_table.cpu(), seq.cpu(), 576**-0.5, 512)
    assert_close(out, ref_out)
    assert_close(lse, ref_lse, dtype=torch.bfloat16)


@pytest.mark.gpu
def test_mla_decode_small_dims_on_gpu():
    """The model's tiny test configs on the GPU (TMA path for rank 32 / rope 16, pointer path for rope 8)."""
    check([37, 5, 64], 5, 32, 16, 16, "cuda")
    check([37, 5, 64], 16, 16, 8, 4, "cuda")
