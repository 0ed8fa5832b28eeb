"""Absorbed MLA decode over the paged latent KV cache (split-K flash-decoding).

Every query head attends in the latent space: keys are the cached rows `[latent | k_pe]` (kv_lora_rank +
rope_dim values), values are their first kv_lora_rank values (the latent). One new token per sequence.

* `mla_decode(q, kv_cache, page_table, seq_lens, softmax_scale, kv_lora_rank=512) -> (out, lse)`
  - `q [B, H, kv_lora_rank + rope_dim]` (absorbed q_nope | roped q_pe), bf16/fp16/fp32
  - `kv_cache [num_pages, page_size, kv_lora_rank + rope_dim]` bf16/fp16/fp32, or the FP8 layout of
    `paged_kv.fp8_row_bytes` (float8_e4m3fn bytes: e4m3 latent | fp32 scale per 128 | bf16 k_pe)
  - `page_table int32 [B, max_pages]`: token p of sequence b sits in page `page_table[b, p // page_size]`,
    row `p % page_size`; entries past a sequence's pages are never read.
  - `seq_lens int32 [B]`: KV length of each sequence (0 gives out = 0, lse = -inf).
  - returns `out [B, H, kv_lora_rank]` in q's dtype and `lse fp32 [B, H]`: natural log of the softmax
    denominator `sum_j exp(softmax_scale * q.k_j)`.

Kernel: stage 1 gives each (sequence, block of heads, split of the context) program a contiguous token range
and writes a partial output and log2-sum-exp; stage 2 merges the splits. The split count is chosen from the
page table's width (no host sync), so CUDA graphs can capture it; each program then cuts its own sequence's
live length (`seq_lens[b]`) into that many whole-tile splits, so a short context in a wide table still uses
every split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moemesh.kernels.dispatch import interpreting, use_triton
from moemesh.kernels.paged_kv import fp8_dequant_rows, fp8_group_size, fp8_row_bytes

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


SPLIT_MIN_TILES = 4  # tiles a split covers at least (the heuristic below sizes splits alike)
MIN_SPLIT_BLOCKS = tl.constexpr(SPLIT_MIN_TILES)


@triton.jit
def _load_kv_tile(
    kv_ptr,
    row,  # int64 [BLOCK_N]: element (or byte) offset of each token's row
    mask_n,
    offs_d,
    offs_r,
    kv_lora_rank,
    rope_dim,
    FP8: tl.constexpr,
    GROUP: tl.constexpr,
    COMPUTE_FP32: tl.constexpr,
):
    """Loads k_nope [BLOCK_N, BLOCK_D] and k_pe [BLOCK_N, BLOCK_R] of one block of tokens."""
    mask_d = offs_d < kv_lora_rank
    mask_r = offs_r < rope_dim
    if FP8:
        # Row bytes: e4m3 latent [kv_lora_rank] | fp32 scales [kv_lora_rank / GROUP] | bf16 k_pe [rope_dim].
        k8 = tl.load(kv_ptr + row[:, None] + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0)
        k8 = k8.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        num_groups = kv_lora_rank // GROUP
        BLOCK_N: tl.constexpr = k8.shape[0]
        BLOCK_D: tl.constexpr = k8.shape[1]
        if BLOCK_D % GROUP == 0:
            # whole groups: one fp32 scale per (token, group), broadcast over the group by a reshape
            NG: tl.constexpr = BLOCK_D // GROUP
            offs_g = tl.arange(0, NG)
            scale_ptr = (kv_ptr + row[:, None] + kv_lora_rank + 4 * offs_g[None, :]).to(
                tl.pointer_type(tl.float32)
            )
            scale = tl.load(scale_ptr, mask=mask_n[:, None] & (offs_g[None, :] < num_groups), other=0.0)
            k_nope = tl.reshape(tl.reshape(k8, [BLOCK_N, NG, GROUP]) * scale[:, :, None], [BLOCK_N, BLOCK_D])
        else:
            scale_ptr = (kv_ptr + row[:, None] + kv_lora_rank + 4 * (offs_d[None, :] // GROUP)).to(
                tl.pointer_type(tl.float32)
            )
            k_nope = k8 * tl.load(scale_ptr, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        k_nope = k_nope.to(tl.bfloat16)
        pe_ptr = (kv_ptr + row[:, None] + kv_lora_rank + 4 * num_groups + 2 * offs_r[None, :]).to(
            tl.pointer_type(tl.bfloat16)
        )
        k_pe = tl.load(pe_ptr, mask=mask_n[:, None] & mask_r[None, :], other=0.0)
    else:
        k_nope = tl.load(
            kv_ptr + row[:, None] + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0
        )
        k_pe = tl.load(
            kv_ptr + row[:, None] + kv_lora_rank + offs_r[None, :],
            mask=mask_n[:, None] & mask_r[None, :],
            other=0,
        )
    if COMPUTE_FP32:
        k_nope = k_nope.to(tl.float32)
        k_pe = k_pe.to(tl.float32)
    return k_nope, k_pe


@triton.jit
def _mla_decode_split_kernel(
    q_ptr,
    kv_ptr,
    page_table_ptr,
    seq_lens_ptr,
    part_out_ptr,  # fp32 [B, H, num_splits, BLOCK_D]; with SINGLE: out [B, H, kv_lora_rank] in q's dtype
    part_lse_ptr,  # fp32 [B, H, num_splits], log2 domain; with SINGLE: lse [B, H], natural log
    scale_log2,  # softmax_scale * log2(e)
    num_heads,
    kv_lora_rank,
    rope_dim,
    page_size,
    num_splits,
    stride_qb,
    stride_qh,
    stride_kv_page,
    stride_kv_row,
    stride_pt,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    FP8: tl.constexpr,
    GROUP: tl.constexpr,
    COMPUTE_FP32: tl.constexpr,
    SINGLE: tl.constexpr,
):
    b = tl.program_id(0)
    hb = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    # this sequence's live length over the splits, whole tiles each: short sequences in a wide page table
    # (a CUDA graph captured for max_model_len) still spread over every split
    # at least MIN_SPLIT_BLOCKS tiles a split: a short context stays in few splits, so eager (a batch-wide table)
    # and a CUDA graph (a max_model_len-wide table, perhaps more splits) sum it in the same order
    split_len = tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N), MIN_SPLIT_BLOCKS) * BLOCK_N
    start = s * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    mask_h = offs_h < num_heads
    q_row = q_ptr + b.to(tl.int64) * stride_qb + offs_h[:, None] * stride_qh
    q_nope = tl.load(
        q_row + offs_d[None, :], mask=mask_h[:, None] & (offs_d[None, :] < kv_lora_rank), other=0.0
    )
    q_pe = tl.load(
        q_row + kv_lora_rank + offs_r[None, :], mask=mask_h[:, None] & (offs_r[None, :] < rope_dim), other=0.0
    )
    if COMPUTE_FP32:
        q_nope = q_nope.to(tl.float32)
        q_pe = q_pe.to(tl.float32)
    elif FP8:
        q_nope = q_nope.to(tl.bfloat16)
        q_pe = q_pe.to(tl.bfloat16)
    else:
        q_nope = q_nope.to(kv_ptr.dtype.element_ty)
        q_pe = q_pe.to(kv_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    pt_row = page_table_ptr + b.to(tl.int64) * stride_pt
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        page = tl.load(pt_row + offs_n // page_size, mask=mask_n, other=0)
        row = page.to(tl.int64) * stride_kv_page + (offs_n % page_size) * stride_kv_row
        k_nope, k_pe = _load_kv_tile(
            kv_ptr, row, mask_n, offs_d, offs_r, kv_lora_rank, rope_dim, FP8, GROUP, COMPUTE_FP32
        )
        qk = tl.dot(q_nope, tl.trans(k_nope))
        qk += tl.dot(q_pe, tl.trans(k_pe))
        qk = tl.where(mask_n[None, :], qk * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(k_nope.dtype), k_nope)
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    if SINGLE:
        row = b.to(tl.int64) * num_heads + offs_h
        mask = mask_h[:, None] & (offs_d[None, :] < kv_lora_rank)
        o_ptr = part_out_ptr + row[:, None] * kv_lora_rank + offs_d[None, :]
        tl.store(o_ptr, out.to(part_out_ptr.dtype.element_ty), mask=mask)
        tl.store(part_lse_ptr + row, lse * 0.6931471805599453, mask=mask_h)
    else:
        part_row = (b.to(tl.int64) * num_heads + offs_h) * num_splits + s  # [BLOCK_H]
        tl.store(part_out_ptr + part_row[:, None] * BLOCK_D + offs_d[None, :], out, mask=mask_h[:, None])
        tl.store(part_lse_ptr + part_row, lse, mask=mask_h)


@triton.jit
def _dequant_half(k8, scale_row_ptr, first_group, D_HALF: tl.constexpr, GROUP: tl.constexpr):
    """e4m3 [BLOCK_N, D_HALF] times its fp32 group scales (read at scale_row_ptr [BLOCK_N]) -> bf16."""
    BLOCK_N: tl.constexpr = k8.shape[0]
    NG: tl.constexpr = D_HALF // GROUP
    offs_g = first_group + tl.arange(0, NG)
    scale = tl.load((scale_row_ptr[:, None] + 4 * offs_g[None, :]).to(tl.pointer_type(tl.float32)))
    k = tl.reshape(k8.to(tl.float32), [BLOCK_N, NG, GROUP]) * scale[:, :, None]
    return tl.reshape(k, [BLOCK_N, D_HALF]).to(tl.bfloat16)


@triton.jit
def _tma_tile(
    q0, q1, q_pe, nope_desc, pe_desc, kv_bytes_ptr, row_bytes, row0, n0, end, m_i, l_i, acc0, acc1, scale_log2,
    D_HALF: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, FP8: tl.constexpr, GROUP: tl.constexpr,
    PE_COL: tl.constexpr, LAZY: tl.constexpr, F32: tl.constexpr,
):  # fmt: skip
    """One page-aligned tile of BLOCK_N tokens (rows row0.. of the flattened cache): online-softmax update."""
    k0 = nope_desc.load([row0, 0])  # [BLOCK_N, D_HALF]
    k1 = nope_desc.load([row0, D_HALF])
    k_pe = pe_desc.load([row0, PE_COL])  # [BLOCK_N, BLOCK_R]
    if FP8:
        scale_rows = kv_bytes_ptr + (row0 + tl.arange(0, BLOCK_N)).to(tl.int64) * row_bytes + 2 * D_HALF
        k0 = _dequant_half(k0, scale_rows, 0, D_HALF, GROUP)
        k1 = _dequant_half(k1, scale_rows, D_HALF // GROUP, D_HALF, GROUP)
    if F32:  # the interpreter: compute in fp32
        k0, k1, k_pe = k0.to(tl.float32), k1.to(tl.float32), k_pe.to(tl.float32)
    mask_n = (n0 + tl.arange(0, BLOCK_N)) < end
    if MASKED:  # rows past the sequence may hold anything (NaN): zero them so 0 * row stays 0
        k0 = tl.where(mask_n[:, None], k0, 0.0)
        k1 = tl.where(mask_n[:, None], k1, 0.0)
        k_pe = tl.where(mask_n[:, None], k_pe, 0.0)
    qk = tl.dot(q0, tl.trans(k0))
    qk = tl.dot(q1, tl.trans(k1), qk)
    qk = tl.dot(q_pe, tl.trans(k_pe), qk)
    if MASKED:
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
    # m_i is in scaled log2 units; qk * scale_log2 - m folds into one FMA per score
    m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
    if LAZY:
        # FA3's trick: rescale the [BLOCK_H, 512] accumulators only when some row's max grew by more than
        # 2^8; a stale max keeps every p <= 256, harmless in fp32 and bf16.
        if tl.max(m_new - m_i, 0) > 8.0:
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha
            acc0 = acc0 * alpha[:, None]
            acc1 = acc1 * alpha[:, None]
            m_i = m_new
        p = tl.exp2(qk * scale_log2 - m_i[:, None])
        l_i = l_i + tl.sum(p, 1)
        p = p.to(k0.dtype)
        acc0 = tl.dot(p, k0, acc0)
        acc1 = tl.dot(p, k1, acc1)
        return m_i, l_i, acc0, acc1
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk * scale_log2 - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(k0.dtype)
    acc0 = tl.dot(p, k0, acc0 * alpha[:, None])
    acc1 = tl.dot(p, k1, acc1 * alpha[:, None])
    return m_new, l_i, acc0, acc1


@triton.jit
def _mla_decode_tma_kernel(
    q_ptr,
    nope_desc,  # TMA descriptor over the cache as [num_pages * page_size, row], block [BLOCK_N, D_HALF]
    pe_desc,  # the same rows, block [BLOCK_N, rope_dim] at column PE_COL (a bf16 view for the FP8 layout)
    kv_bytes_ptr,  # the cache as bytes (FP8: the scales are read from here)
    row_bytes,
    page_table_ptr,
    seq_lens_ptr,
    part_out_ptr,
    part_lse_ptr,
    scale_log2,
    num_heads,
    page_size,
    num_splits,
    stride_qb,
    stride_qh,
    stride_pt,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D_HALF: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SINGLE: tl.constexpr,
    FP8: tl.constexpr,
    GROUP: tl.constexpr,
    PE_COL: tl.constexpr,
    LAZY: tl.constexpr,
    WS: tl.constexpr,
    F32: tl.constexpr,
):
    """The split kernel for the V3-style layout (kv_lora_rank = 2 * D_HALF, rope_dim = BLOCK_R, BLOCK_N divides
    page_size): K/V tiles arrive by TMA, the latent in two halves so each accumulator half is [BLOCK_H, D_HALF]."""
    b = tl.program_id(0)
    hb = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    # this sequence's live length over the splits, whole tiles each: short sequences in a wide page table
    # (a CUDA graph captured for max_model_len) still spread over every split
    # at least MIN_SPLIT_BLOCKS tiles a split: a short context stays in few splits, so eager (a batch-wide table)
    # and a CUDA graph (a max_model_len-wide table, perhaps more splits) sum it in the same order
    split_len = tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N), MIN_SPLIT_BLOCKS) * BLOCK_N
    start = s * split_len
    end = tl.minimum(start + split_len, seq_len)
    end_full = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N

    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < num_heads
    offs_d = tl.arange(0, D_HALF)
    q_row = q_ptr + b.to(tl.int64) * stride_qb + offs_h[:, None] * stride_qh
    kv_dtype = tl.float32 if F32 else (tl.bfloat16 if FP8 else nope_desc.dtype)
    q0 = tl.load(q_row + offs_d[None, :], mask=mask_h[:, None], other=0.0).to(kv_dtype)
    q1 = tl.load(q_row + D_HALF + offs_d[None, :], mask=mask_h[:, None], other=0.0).to(kv_dtype)
    q_pe = tl.load(q_row + 2 * D_HALF + tl.arange(0, BLOCK_R)[None, :], mask=mask_h[:, None], other=0.0)
    q_pe = q_pe.to(kv_dtype)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc0 = tl.zeros([BLOCK_H, D_HALF], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_H, D_HALF], dtype=tl.float32)
    pt_row = page_table_ptr + b.to(tl.int64) * stride_pt
    for n0 in tl.range(start, end_full, BLOCK_N, warp_specialize=WS):
        page = tl.load(pt_row + n0 // page_size)
        row0 = page * page_size + n0 % page_size
        m_i, l_i, acc0, acc1 = _tma_tile(
            q0, q1, q_pe, nope_desc, pe_desc, kv_bytes_ptr, row_bytes, row0, n0, end, m_i, l_i, acc0, acc1,
            scale_log2, D_HALF, BLOCK_N, False, FP8, GROUP, PE_COL, LAZY, F32,
        )  # fmt: skip
    if end_full < end:
        page = tl.load(pt_row + end_full // page_size)
        row0 = page * page_size + end_full % page_size
        m_i, l_i, acc0, acc1 = _tma_tile(
            q0, q1, q_pe, nope_desc, pe_desc, kv_bytes_ptr, row_bytes, row0, end_full, end, m_i, l_i, acc0, acc1,
            scale_log2, D_HALF, BLOCK_N, True, FP8, GROUP, PE_COL, LAZY, F32,
        )  # fmt: skip

    has = l_i > 0
    inv_l = 1.0 / tl.where(has, l_i, 1.0)
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    if SINGLE:
        row = b.to(tl.int64) * num_heads + offs_h
        o_ptr = part_out_ptr + row[:, None] * (2 * D_HALF) + offs_d[None, :]
        tl.store(o_ptr, (acc0 * inv_l[:, None]).to(part_out_ptr.dtype.element_ty), mask=mask_h[:, None])
        tl.store(
            o_ptr + D_HALF, (acc1 * inv_l[:, None]).to(part_out_ptr.dtype.element_ty), mask=mask_h[:, None]
        )
        tl.store(part_lse_ptr + row, lse * 0.6931471805599453, mask=mask_h)
    else:
        part_row = (b.to(tl.int64) * num_heads + offs_h) * num_splits + s
        o_ptr = part_out_ptr + part_row[:, None] * (2 * D_HALF) + offs_d[None, :]
        tl.store(o_ptr, acc0 * inv_l[:, None], mask=mask_h[:, None])
        tl.store(o_ptr + D_HALF, acc1 * inv_l[:, None], mask=mask_h[:, None])
        tl.store(part_lse_ptr + part_row, lse, mask=mask_h)


@triton.jit
def _mla_decode_merge_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    lse_ptr,
    num_heads,
    num_splits,
    kv_lora_rank,
    stride_ob,
    stride_oh,
    w_uv_ptr,
    V,
    stride_wh,
    stride_wv,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UV: tl.constexpr = False,
    BLOCK_V: tl.constexpr = 16,
):
    """UV: out[b, h] is the merged latent (rounded to out's dtype, as a separate GEMM would read it) times
    W_UV[h]^T [kv_lora_rank -> V], fp32 sums, instead of the latent itself."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    part_row = (b.to(tl.int64) * num_heads + h) * num_splits
    offs_s = tl.arange(0, BLOCK_S)
    lse_s = tl.load(part_lse_ptr + part_row + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse_s - m_safe)
    total = tl.sum(w, 0)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s in range(0, num_splits):
        ls = tl.load(part_lse_ptr + part_row + s)
        ws = tl.exp2(ls - m_safe)
        acc += ws * tl.load(part_out_ptr + (part_row + s) * BLOCK_D + offs_d)
    out = acc / tl.where(total > 0, total, 1.0)
    if UV:
        latent = out.to(out_ptr.dtype.element_ty).to(tl.float32)
        w_head = w_uv_ptr + h.to(tl.int64) * stride_wh
        for v0 in range(0, V, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            w_tile = (
                tl.load(  # not `w`: that name holds the splits' weights above (Triton types loop variables)
                    w_head + offs_v[:, None] * stride_wv + offs_d[None, :],
                    mask=(offs_v[:, None] < V) & (offs_d[None, :] < kv_lora_rank),
                    other=0.0,
                )
            )
            o = tl.sum(w_tile.to(tl.float32) * latent[None, :], axis=1)
            o_ptr = out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_v
            tl.store(o_ptr, o.to(out_ptr.dtype.element_ty), mask=offs_v < V)
    else:
        o_ptr = out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d
        tl.store(o_ptr, out.to(out_ptr.dtype.element_ty), mask=offs_d < kv_lora_rank)
    total_safe = tl.where(total > 0, total, 1.0)
    lse = tl.where(total > 0, (m_safe + tl.log2(total_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptr + b * num_heads + h, lse)


def _validate(q, kv_cache, page_table, seq_lens, kv_lora_rank) -> tuple[int, bool]:
    """Checks shapes and dtypes; returns (rope_dim, fp8)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, num_heads, kv_lora_rank + rope_dim], got shape {tuple(q.shape)}")
    batch, _, q_dim = q.shape
    rope_dim = q_dim - kv_lora_rank
    if rope_dim <= 0:
        raise ValueError(f"q has last dim {q_dim}, must exceed kv_lora_rank={kv_lora_rank}")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"q dtype {q.dtype} not supported (bf16, fp16, fp32)")
    if q.stride(-1) != 1:
        raise ValueError(f"q must be contiguous in its last dim, got strides {q.stride()}")
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    want = fp8_row_bytes(kv_lora_rank, rope_dim) if fp8 else q_dim
    if kv_cache.dim() != 3 or kv_cache.shape[-1] != want:
        raise ValueError(
            f"kv_cache must be [num_pages, page_size, {want}] for kv_lora_rank={kv_lora_rank}, "
            f"rope_dim={rope_dim}{' (fp8 layout)' if fp8 else ''}, got shape {tuple(kv_cache.shape)}"
        )
    if not fp8 and kv_cache.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"kv_cache dtype {kv_cache.dtype} not supported (bf16, fp16, fp32, float8_e4m3fn)")
    if kv_cache.stride(-1) != 1 or kv_cache.stride(1) != kv_cache.shape[-1]:
        raise ValueError(f"kv_cache pages must be contiguous, got strides {kv_cache.stride()}")
    if page_table.dim() != 2 or page_table.shape[0] != batch or page_table.dtype != torch.int32:
        raise ValueError(
            f"page_table must be int32 [{batch}, max_pages], got {page_table.dtype} {tuple(page_table.shape)}"
        )
    if tuple(seq_lens.shape) != (batch,) or seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens must be int32 [{batch}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    for name, t in (("kv_cache", kv_cache), ("page_table", page_table), ("seq_lens", seq_lens)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    return rope_dim, fp8


def reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    kv_lora_rank: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, one sequence at a time, in fp32: gather the sequence's rows, softmax, weighted latents."""
    rope_dim, fp8 = _validate(q, kv_cache, page_table, seq_lens, kv_lora_rank)
    batch, num_heads, _ = q.shape
    page_size = kv_cache.shape[1]
    out = q.new_zeros(batch, num_heads, kv_lora_rank, dtype=torch.float32)
    lse = torch.full((batch, num_heads), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(batch):
        n = int(seq_lens[b])
        if n == 0:
            continue
        pages = page_table[b, : -(-n // page_size)].long()
        rows = kv_cache[pages].reshape(-1, kv_cache.shape[-1])[:n]
        kv = (
            fp8_dequant_rows(rows, kv_lora_rank, rope_dim) if fp8 else rows.float()
        )  # [n, kv_lora_rank + rope]
        scores = softmax_scale * (q[b].float() @ kv.T)  # [H, n]
        lse[b] = torch.logsumexp(scores, dim=-1)
        out[b] = torch.softmax(scores, dim=-1) @ kv[:, :kv_lora_rank]
    return out.to(q.dtype), lse


@dataclass(frozen=True)
class DecodeConfig:
    """Launch shape of the split kernel: heads and tokens per program, warps, pipeline depth, context splits
    (None: enough for about one wave of programs)."""

    block_h: int
    block_n: int
    num_warps: int
    num_stages: int
    num_splits: int | None = None
    tma: bool = True  # page-aligned TMA tiles where the layout allows (Hopper, BF16/FP16/FP8 cache)
    lazy_rescale: bool = False  # TMA kernel: rescale accumulators only when a row max grows by > 2^8 (FA3);
    # measured slower on H200 (the branch stops the MMA pipelining), kept for comparison
    warp_specialize: bool = False  # TMA kernel: Triton's automatic warp specialisation of the main loop


def default_config(num_heads: int, kv_lora_rank: int, fp8: bool) -> DecodeConfig:
    block_h = min(64, max(16, triton.next_power_of_2(num_heads)))
    if kv_lora_rank >= 256:
        return DecodeConfig(block_h=block_h, block_n=64, num_warps=8, num_stages=2)
    return DecodeConfig(block_h=block_h, block_n=16, num_warps=4, num_stages=2)


def _tma_block_n(q, kv_cache, kv_lora_rank: int, rope_dim: int, cfg: DecodeConfig) -> int:
    """BLOCK_N for the TMA kernel, or 0 where it does not apply."""
    page_size = kv_cache.shape[1]
    half = kv_lora_rank // 2
    fp8_ok = True
    if kv_cache.dtype == torch.float8_e4m3fn:
        group = fp8_group_size(kv_lora_rank)
        pe_byte = kv_lora_rank + 4 * (kv_lora_rank // group)
        fp8_ok = half % group == 0 and pe_byte % 16 == 0 and kv_cache.shape[-1] % 16 == 0
    hopper = interpreting() or (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9)
    ok = (
        cfg.tma
        and hopper
        and kv_cache.dtype in (torch.bfloat16, torch.float16, torch.float8_e4m3fn)
        and fp8_ok
        and kv_lora_rank % 2 == 0
        and 16 <= half <= 256
        and triton.next_power_of_2(half) == half
        and 16 <= rope_dim <= 256
        and triton.next_power_of_2(rope_dim) == rope_dim
        and page_size >= 16
        and triton.next_power_of_2(page_size) == page_size
    )
    return min(cfg.block_n, page_size) if ok else 0


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _num_splits(batch: int, num_head_blocks: int, max_ctx: int, block_n: int, device: torch.device) -> int:
    """Enough splits that about one wave of programs covers the GPU (rounded, not ceiled: 128 programs on 132
    SMs stay one split, measured faster than a second partial wave plus the merge), each split a few blocks."""
    want = max(1, round(_num_sms(device) / (batch * num_head_blocks)))
    max_useful = max(1, -(-max_ctx // (SPLIT_MIN_TILES * block_n)))
    return min(want, max_useful, 64)


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
    kv_lora_rank: int = 512,
    num_splits: int | None = None,
    config: DecodeConfig | None = None,
    w_uv: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA decode attention; see the module docstring for shapes. `num_splits` and `config`
    override the launch heuristics (tests and benchmarks). `w_uv [H, V, kv_lora_rank]`: the output is
    `out[b, h] @ W_UV[h]^T` [B, H, V] instead (the up-projection to the values); when the context is split
    and batch x heads fits two waves of the GPU, the merge applies it (no launch of its own), else one batched
    GEMM after the kernels."""
    if w_uv is not None and (
        w_uv.dim() != 3 or w_uv.shape[0] != q.shape[1] or w_uv.shape[2] != kv_lora_rank or w_uv.stride(2) != 1
    ):
        raise ValueError(
            f"w_uv must be [H={q.shape[1]}, V, kv_lora_rank={kv_lora_rank}] with unit last stride, got "
            f"{tuple(w_uv.shape)} strides {w_uv.stride()}"
        )
    if not use_triton(q):
        out, lse = reference(q, kv_cache, page_table, seq_lens, softmax_scale, kv_lora_rank)
        return (out, lse) if w_uv is None else (_up(out, w_uv), lse)
    rope_dim, fp8 = _validate(q, kv_cache, page_table, seq_lens, kv_lora_rank)
    batch, num_heads, _ = q.shape
    page_size = kv_cache.shape[1]
    cfg = config or default_config(num_heads, kv_lora_rank, fp8)
    block_d = max(16, triton.next_power_of_2(kv_lora_rank))
    num_head_blocks = triton.cdiv(num_heads, cfg.block_h)
    max_ctx = page_table.shape[1] * page_size
    num_splits = (
        num_splits or cfg.num_splits or _num_splits(batch, num_head_blocks, max_ctx, cfg.block_n, q.device)
    )
    out = torch.empty(batch, num_heads, kv_lora_rank, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, num_heads, dtype=torch.float32, device=q.device)
    single = num_splits == 1
    if single:
        part_out, part_lse = out, lse
    else:
        part_out = torch.empty(batch, num_heads, num_splits, block_d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    tma_block_n = _tma_block_n(q, kv_cache, kv_lora_rank, rope_dim, cfg)
    if tma_block_n:
        from triton.tools.tensor_descriptor import TensorDescriptor

        row = kv_cache.shape[-1]
        kv2d = kv_cache.view(-1, row)  # [num_pages * page_size, row]
        group = fp8_group_size(kv_lora_rank) if fp8 else 1
        if fp8:  # k_pe through a bf16 view of the same bytes
            pe2d = kv2d.view(torch.uint8).view(torch.bfloat16)
            pe_col = (kv_lora_rank + 4 * (kv_lora_rank // group)) // 2
        else:
            pe2d, pe_col = kv2d, kv_lora_rank
        _mla_decode_tma_kernel[(batch, num_head_blocks, num_splits)](
            q,
            TensorDescriptor.from_tensor(kv2d, [tma_block_n, kv_lora_rank // 2]),
            TensorDescriptor.from_tensor(pe2d, [tma_block_n, rope_dim]),
            kv2d.view(torch.uint8),
            row * kv2d.element_size(),
            page_table,
            seq_lens,
            part_out,
            part_lse,
            softmax_scale * LOG2E,
            num_heads,
            page_size,
            num_splits,
            q.stride(0),
            q.stride(1),
            page_table.stride(0),
            BLOCK_H=cfg.block_h,
            BLOCK_N=tma_block_n,
            D_HALF=kv_lora_rank // 2,
            BLOCK_R=rope_dim,
            SINGLE=single,
            FP8=fp8,
            GROUP=group,
            PE_COL=pe_col,
            LAZY=cfg.lazy_rescale,
            WS=cfg.warp_specialize,
            F32=interpreting(),
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    else:
        _launch_split(q, kv_cache, page_table, seq_lens, part_out, part_lse, softmax_scale, kv_lora_rank,
                      rope_dim, num_splits, cfg, single)  # fmt: skip
    if single:
        return (out, lse) if w_uv is None else (_up(out, w_uv), lse)
    # W_UV in the merge while its programs (one a head and sequence, each reading the head's W_UV) fit in
    # two waves; above, the per-head re-reads of W_UV cost more than the batched GEMM's launch
    if w_uv is None or batch * num_heads > 2 * _num_sms(q.device):
        _merge(part_out, part_lse, out, lse, num_splits, kv_lora_rank)
        return (out, lse) if w_uv is None else (_up(out, w_uv), lse)
    out = torch.empty(batch, num_heads, w_uv.shape[1], dtype=q.dtype, device=q.device)
    _merge(part_out, part_lse, out, lse, num_splits, kv_lora_rank, w_uv)
    return out, lse


def _up(latent: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """[B, H, kv_lora_rank] -> [B, H, V]: each head's latent times its W_UV^T (one batched GEMM)."""
    out = torch.empty(*latent.shape[:2], w_uv.shape[1], dtype=latent.dtype, device=latent.device)
    torch.bmm(latent.transpose(0, 1), w_uv.transpose(1, 2).to(latent.dtype), out=out.transpose(0, 1))
    return out


def _launch_split(
    q, kv_cache, page_table, seq_lens, part_out, part_lse, softmax_scale, kv_lora_rank, rope_dim, num_splits,
    cfg, single,
):  # fmt: skip
    batch, num_heads, _ = q.shape
    page_size = kv_cache.shape[1]
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    kv = kv_cache.view(torch.uint8) if fp8 else kv_cache
    _mla_decode_split_kernel[(batch, triton.cdiv(num_heads, cfg.block_h), num_splits)](
        q,
        kv,
        page_table,
        seq_lens,
        part_out,
        part_lse,
        softmax_scale * LOG2E,
        num_heads,
        kv_lora_rank,
        rope_dim,
        page_size,
        num_splits,
        q.stride(0),
        q.stride(1),
        kv.stride(0),
        kv.stride(1),
        page_table.stride(0),
        BLOCK_H=cfg.block_h,
        BLOCK_N=cfg.block_n,
        BLOCK_D=max(16, triton.next_power_of_2(kv_lora_rank)),
        BLOCK_R=max(16, triton.next_power_of_2(rope_dim)),
        FP8=fp8,
        GROUP=fp8_group_size(kv_lora_rank) if fp8 else 1,
        COMPUTE_FP32=interpreting() or kv_cache.dtype == torch.float32,
        SINGLE=single,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )


def _merge(part_out, part_lse, out, lse, num_splits, kv_lora_rank, w_uv=None):
    batch, num_heads, _ = out.shape
    uv = w_uv if w_uv is not None else out
    _mla_decode_merge_kernel[(batch, num_heads)](
        part_out,
        part_lse,
        out,
        lse,
        num_heads,
        num_splits,
        kv_lora_rank,
        out.stride(0),
        out.stride(1),
        uv,
        uv.shape[1] if w_uv is not None else 0,
        uv.stride(0),
        uv.stride(1),
        BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
        BLOCK_D=part_out.shape[-1],
        UV=w_uv is not None,
        BLOCK_V=16,
        num_warps=4,
    )


__all__ = ["DecodeConfig", "mla_decode", "reference"]
