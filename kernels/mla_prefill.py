"""MLA prefill attention: ragged causal attention over a chunk of new tokens, plus attention over a cached prefix.

Prefill attends with expanded heads (DESIGN §4): `q, k [T, H, qk_nope + qk_rope]` (192 at V3 shapes), `v [T, H,
v_head_dim]` (128). Sequence b owns rows `cu_seqlens[b] : cu_seqlens[b + 1]`; its query i attends the chunk's keys
0..i (causal) and, when a prefix is given, every key of its cached prefix (the model expands those keys and values
from the latent cache with kv_b_proj and passes them as `Prefix`).

* `mla_prefill(q, k, v, cu_seqlens, softmax_scale, max_seqlen, prefix=None) -> (out, lse)`: `out [T, H, Dv]`
  in q's dtype, `lse fp32 [T, H]` (natural log of the softmax denominator over prefix and chunk keys, scale
  applied). `max_seqlen` is the longest chunk (a host int: it sizes the grid without a sync).
* `merge_attn_states(out_a, lse_a, out_b, lse_b) -> (out, lse)`: two partial attentions over disjoint key sets
  merged by their LSEs (for callers that attend the prefix and the chunk separately).

The kernel walks the prefix keys, then the chunk's keys, in one online softmax: that is the LSE merge of the two
parts, computed without writing either part out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moemesh.kernels.dispatch import interpreting, use_triton

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class Prefix:
    """Cached keys/values of each sequence, expanded to heads: `k [Tp, H, Dqk]`, `v [Tp, H, Dv]`,
    `cu_seqlens int32 [B + 1]` (sequence b's prefix is rows cu_seqlens[b] : cu_seqlens[b + 1])."""

    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor


@dataclass(frozen=True)
class PrefillConfig:
    """Launch shape: queries and keys per tile, warps, pipeline depth."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3
    tma: bool = True  # TMA tiles where the layout allows (Hopper, BF16/FP16, 16-byte aligned strides)
    lazy_rescale: bool = False  # TMA kernel: rescale only when a row max grows by > 2^8 (FA3); measured
    # slower on H200 (the branch stops the MMA pipelining), kept for comparison
    warp_specialize: bool = False  # TMA kernel: Triton's automatic warp specialisation of the main loops


@triton.jit
def _attend(
    q1, q2, k_base, v_base, stride_kt, stride_vt, n_start, n_end, causal_limit, offs_m,
    m_i, l_i, acc, scale_log2, qk_dim, v_dim,
    BLOCK_N: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, COMPUTE_FP32: tl.constexpr,
):  # fmt: skip
    """Online softmax over keys [n_start, n_end) of one (sequence, head); with CAUSAL, key j is visible to
    query row r only when j <= offs_m[r] (and j < causal_limit bounds the loop)."""
    offs_d1 = tl.arange(0, BLOCK_D1)
    offs_d2 = BLOCK_D1 + tl.arange(0, BLOCK_D2)
    offs_dv = tl.arange(0, BLOCK_DV)
    hi = tl.minimum(n_end, causal_limit) if CAUSAL else n_end
    for n0 in range(n_start, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        k_rows = k_base + offs_n[:, None].to(tl.int64) * stride_kt
        k1 = tl.load(k_rows + offs_d1[None, :], mask=mask_n[:, None] & (offs_d1[None, :] < qk_dim), other=0.0)
        v = tl.load(
            v_base + offs_n[:, None].to(tl.int64) * stride_vt + offs_dv[None, :],
            mask=mask_n[:, None] & (offs_dv[None, :] < v_dim),
            other=0.0,
        )
        if COMPUTE_FP32:
            k1 = k1.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q1, tl.trans(k1))
        if BLOCK_D2 > 0:
            k2 = tl.load(
                k_rows + offs_d2[None, :], mask=mask_n[:, None] & (offs_d2[None, :] < qk_dim), other=0.0
            )
            if COMPUTE_FP32:
                k2 = k2.to(tl.float32)
            qk = tl.dot(q2, tl.trans(k2), qk)
        qk = qk * scale_log2
        visible = mask_n[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None])
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _mla_prefill_kernel(
    q_ptr, k_ptr, v_ptr, cu_ptr, pk_ptr, pv_ptr, pcu_ptr, out_ptr, lse_ptr,
    scale_log2, num_heads, qk_dim, v_dim,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_pkt, stride_pkh, stride_pvt, stride_pvh, stride_ot, stride_oh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr,
    BLOCK_DV: tl.constexpr, HAS_PREFIX: tl.constexpr, COMPUTE_FP32: tl.constexpr,
):  # fmt: skip
    m_block = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the chunk
    mask_m = offs_m < q_len
    offs_d1 = tl.arange(0, BLOCK_D1)
    offs_d2 = BLOCK_D1 + tl.arange(0, BLOCK_D2)
    q_rows = q_ptr + (q_start + offs_m[:, None]).to(tl.int64) * stride_qt + h * stride_qh
    q1 = tl.load(q_rows + offs_d1[None, :], mask=mask_m[:, None] & (offs_d1[None, :] < qk_dim), other=0.0)
    q2 = tl.load(q_rows + offs_d2[None, :], mask=mask_m[:, None] & (offs_d2[None, :] < qk_dim), other=0.0)
    if COMPUTE_FP32:
        q1 = q1.to(tl.float32)
        q2 = q2.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if HAS_PREFIX:
        p_start = tl.load(pcu_ptr + b)
        p_len = tl.load(pcu_ptr + b + 1) - p_start
        pk_base = pk_ptr + p_start.to(tl.int64) * stride_pkt + h * stride_pkh
        pv_base = pv_ptr + p_start.to(tl.int64) * stride_pvt + h * stride_pvh
        m_i, l_i, acc = _attend(
            q1, q2, pk_base, pv_base, stride_pkt, stride_pvt, 0, p_len, p_len, offs_m, m_i, l_i, acc,
            scale_log2, qk_dim, v_dim, BLOCK_N, BLOCK_D1, BLOCK_D2, BLOCK_DV, False, COMPUTE_FP32,
        )  # fmt: skip
    k_base = k_ptr + q_start.to(tl.int64) * stride_kt + h * stride_kh
    v_base = v_ptr + q_start.to(tl.int64) * stride_vt + h * stride_vh
    # keys below the block's first query are all visible: no causal mask there
    full_end = m_block * BLOCK_M // BLOCK_N * BLOCK_N
    m_i, l_i, acc = _attend(
        q1, q2, k_base, v_base, stride_kt, stride_vt, 0, full_end, full_end, offs_m, m_i, l_i, acc,
        scale_log2, qk_dim, v_dim, BLOCK_N, BLOCK_D1, BLOCK_D2, BLOCK_DV, False, COMPUTE_FP32,
    )  # fmt: skip
    causal_limit = tl.minimum((m_block + 1) * BLOCK_M, q_len)
    m_i, l_i, acc = _attend(
        q1, q2, k_base, v_base, stride_kt, stride_vt, full_end, q_len, causal_limit, offs_m, m_i, l_i, acc,
        scale_log2, qk_dim, v_dim, BLOCK_N, BLOCK_D1, BLOCK_D2, BLOCK_DV, True, COMPUTE_FP32,
    )  # fmt: skip

    out = acc / l_i[:, None]  # every query sees at least itself
    offs_dv = tl.arange(0, BLOCK_DV)
    o_ptr = out_ptr + (q_start + offs_m[:, None]).to(tl.int64) * stride_ot + h * stride_oh + offs_dv[None, :]
    tl.store(o_ptr, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_dv[None, :] < v_dim))
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(lse_ptr + (q_start + offs_m).to(tl.int64) * num_heads + h, lse, mask=mask_m)


@triton.jit
def _tma_tile(
    q1, q2, k1_desc, k2_desc, v_desc, row0, h, n0, n_end, offs_m, m_i, l_i, acc, scale_log2,
    BLOCK_N: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, MASK_N: tl.constexpr, LAZY: tl.constexpr, F32: tl.constexpr,
):  # fmt: skip
    """Keys n0..n0+BLOCK_N of one (sequence, head), rows row0 + n of the buffers, loaded by TMA."""
    k1 = k1_desc.load([row0 + n0, h, 0]).reshape(BLOCK_N, BLOCK_D1)
    v = v_desc.load([row0 + n0, h, 0]).reshape(BLOCK_N, BLOCK_DV)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if MASK_N:  # rows past the sequence belong to others (or to nobody: NaN); keep 0 * row at 0
        v = tl.where((offs_n < n_end)[:, None], v, 0.0)
    if F32:  # the interpreter: compute in fp32
        k1, v = k1.to(tl.float32), v.to(tl.float32)
    qk = tl.dot(q1, tl.trans(k1))
    if BLOCK_D2 > 0:
        k2 = k2_desc.load([row0 + n0, h, 0]).reshape(BLOCK_N, BLOCK_D2)
        if F32:
            k2 = k2.to(tl.float32)
        qk = tl.dot(q2, tl.trans(k2), qk)
    if CAUSAL:
        qk = tl.where((offs_n[None, :] <= offs_m[:, None]) & (offs_n < n_end)[None, :], qk, float("-inf"))
    elif MASK_N:
        qk = tl.where((offs_n < n_end)[None, :], qk, float("-inf"))
    # m_i is in scaled log2 units: qk * scale_log2 - m is one FMA per score
    m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
    if LAZY:  # rescale only when a row max grew by more than 2^8 (FA3); a stale max keeps p <= 256
        if tl.max(m_new - m_i, 0) > 8.0:
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha
            acc = acc * alpha[:, None]
            m_i = m_new
        p = tl.exp2(qk * scale_log2 - m_i[:, None])
        l_i = l_i + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc)
        return m_i, l_i, acc
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk * scale_log2 - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _mla_prefill_tma_kernel(
    q1_desc, q2_desc, k1_desc, k2_desc, v_desc, pk1_desc, pk2_desc, pv_desc,
    cu_ptr, pcu_ptr, out_ptr, lse_ptr, scale_log2, num_heads, v_dim, stride_ot, stride_oh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_D2: tl.constexpr,
    BLOCK_DV: tl.constexpr, HAS_PREFIX: tl.constexpr, LAZY: tl.constexpr, WS: tl.constexpr, F32: tl.constexpr,
):  # fmt: skip
    """The Hopper path: q/k/v tiles by TMA (3-D descriptors over [T, H, D] views, one head per tile), the
    heaviest query blocks first (causal work grows with the block index)."""
    m_block = tl.num_programs(0) - 1 - tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    q1 = q1_desc.load([q_start + m_block * BLOCK_M, h, 0]).reshape(BLOCK_M, BLOCK_D1)
    q2 = q1
    if BLOCK_D2 > 0:
        q2 = q2_desc.load([q_start + m_block * BLOCK_M, h, 0]).reshape(BLOCK_M, BLOCK_D2)
    if F32:
        q1, q2 = q1.to(tl.float32), q2.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if HAS_PREFIX:
        p_start = tl.load(pcu_ptr + b)
        p_len = tl.load(pcu_ptr + b + 1) - p_start
        p_even = p_len // BLOCK_N * BLOCK_N
        for n0 in range(0, p_even, BLOCK_N):
            m_i, l_i, acc = _tma_tile(
                q1, q2, pk1_desc, pk2_desc, pv_desc, p_start, h, n0, p_len, offs_m, m_i, l_i, acc, scale_log2,
                BLOCK_N, BLOCK_D1, BLOCK_D2, BLOCK_DV, False, False, LAZY, F32,
            )  # fmt: skip
        if p_even < p_len:
            m_i, l_i, acc = _tma_tile(
                q1, q2, pk1_desc, pk2_desc, pv_desc, p_start, h, p_even, p_len, offs_m, m_i, l_i, acc,
                scale_log2, BLOCK_N, BLOCK_D1, BLOCK_D2, BLOCK_DV, False, True, LAZY, F32,
            )  # fmt: skip
    full_end = m_block * BLOCK_M // BLOCK_N * BLOCK_N  # keys every query of the block sees
    for n0 in tl.range(0, full_end, BLOCK_N, warp_specialize=WS):
        m_i, l_i, acc = _tma_tile(
            q1, q2, k1_desc, k2_desc, v_desc, q_start, h, n0, q_len, offs_m, m_i, l_i, acc, scale_log2,
            BLOCK_N, BLOCK_D1, BLOCK_D2, BLOCK_DV, False, False, LAZY, F32,
        )  # fmt: skip
    causal_end = tl.minimum((m_block + 1) * BLOCK_M, q_len)
    for n0 in range(full_end, causal_end, BLOCK_N):
        m_i, l_i, acc = _tma_tile(
            q1, q2, k1_desc, k2_desc, v_desc, q_start, h, n0, q_len, offs_m, m_i, l_i, acc, scale_log2,
            BLOCK_N, BLOCK_D1, BLOCK_D2, BLOCK_DV, True, True, LAZY, F32,
        )  # fmt: skip
    mask_m = offs_m < q_len
    offs_dv = tl.arange(0, BLOCK_DV)
    o_ptr = out_ptr + (q_start + offs_m[:, None]).to(tl.int64) * stride_ot + h * stride_oh + offs_dv[None, :]
    tl.store(o_ptr, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=mask_m[:, None])
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(lse_ptr + (q_start + offs_m).to(tl.int64) * num_heads + h, lse, mask=mask_m)


def _use_tma(q, k, v, prefix, block_d1, block_d2, cfg) -> bool:
    qk_dim, v_dim = q.shape[-1], v.shape[-1]
    tensors = [q, k, v] + ([prefix.k, prefix.v] if prefix is not None else [])
    hopper = interpreting() or (q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9)
    return (
        cfg.tma
        and hopper
        and q.dtype in (torch.bfloat16, torch.float16)
        and block_d1 + block_d2 == qk_dim
        and triton.next_power_of_2(v_dim) == v_dim
        and v_dim >= 16
        and all(
            t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
            for t in tensors
        )  # fmt: skip
    )


def _launch_tma(q, k, v, cu_seqlens, prefix, out, lse, softmax_scale, max_seqlen, block_d1, block_d2, cfg):
    from triton.tools.tensor_descriptor import TensorDescriptor

    def descs(t, block_rows):
        """(first block_d1 dims, the next block_d2 dims) of a [T, H, D] tensor as TMA descriptors."""
        first = TensorDescriptor(t, list(t.shape), list(t.stride()), [block_rows, 1, block_d1])
        if block_d2 == 0:
            return first, first
        rest = t[..., block_d1:]
        return first, TensorDescriptor(rest, list(rest.shape), list(rest.stride()), [block_rows, 1, block_d2])

    def vdesc(t):
        return TensorDescriptor(t, list(t.shape), list(t.stride()), [cfg.block_n, 1, t.shape[-1]])

    q1, q2 = descs(q, cfg.block_m)
    k1, k2 = descs(k, cfg.block_n)
    vd = vdesc(v)
    if prefix is not None:
        pk1, pk2 = descs(prefix.k, cfg.block_n)
        pv, pcu = vdesc(prefix.v), prefix.cu_seqlens
    else:
        pk1, pk2, pv, pcu = k1, k2, vd, cu_seqlens
    num_heads, v_dim = q.shape[1], v.shape[-1]
    grid = (triton.cdiv(max_seqlen, cfg.block_m), cu_seqlens.shape[0] - 1, num_heads)
    _mla_prefill_tma_kernel[grid](
        q1, q2, k1, k2, vd, pk1, pk2, pv, cu_seqlens, pcu, out, lse, softmax_scale * LOG2E, num_heads, v_dim,
        out.stride(0), out.stride(1),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D1=block_d1, BLOCK_D2=block_d2, BLOCK_DV=v_dim,
        HAS_PREFIX=prefix is not None, LAZY=cfg.lazy_rescale, WS=cfg.warp_specialize, F32=interpreting(),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip


def _check(q, k, v, cu_seqlens, prefix) -> None:
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"q, k must be [T, H, qk_dim] and v [T, H, v_dim], got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens must be int32 [B + 1], got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
        )
    if prefix is not None:
        pk, pv, pcu = prefix.k, prefix.v, prefix.cu_seqlens
        if (
            pk.dim() != 3
            or pk.shape[1:] != q.shape[1:]
            or pv.shape[1:] != v.shape[1:]
            or pv.shape[0] != pk.shape[0]
        ):
            raise ValueError(
                f"prefix k must be [Tp, {q.shape[1]}, {q.shape[2]}] and v [Tp, {v.shape[1]}, {v.shape[2]}], "
                f"got {tuple(pk.shape)}, {tuple(pv.shape)}"
            )
        if pcu.shape != cu_seqlens.shape or pcu.dtype != torch.int32:
            raise ValueError(
                f"prefix cu_seqlens must be int32 {tuple(cu_seqlens.shape)}, got {tuple(pcu.shape)}"
            )
        if pk.stride(-1) != 1 or pv.stride(-1) != 1 or pk.dtype != q.dtype or pv.dtype != q.dtype:
            raise ValueError("prefix k, v must have q's dtype and a contiguous last dim")


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    softmax_scale: float,
    max_seqlen: int | None = None,
    prefix: Prefix | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, one sequence at a time in fp32: [prefix keys | chunk keys] with a causal mask on the chunk."""
    _check(q, k, v, cu_seqlens, prefix)
    out = torch.empty(*q.shape[:2], v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    cu = cu_seqlens.tolist()
    pcu = prefix.cu_seqlens.tolist() if prefix is not None else [0] * len(cu)
    for b in range(len(cu) - 1):
        s, e = cu[b], cu[b + 1]
        if e == s:
            continue
        ks, vs = k[s:e].float(), v[s:e].float()
        num_prefix = pcu[b + 1] - pcu[b]
        if prefix is not None:
            ks = torch.cat((prefix.k[pcu[b] : pcu[b + 1]].float(), ks))
            vs = torch.cat((prefix.v[pcu[b] : pcu[b + 1]].float(), vs))
        scores = softmax_scale * torch.einsum("thd,shd->hts", q[s:e].float(), ks)  # [H, n, prefix + n]
        n = e - s
        visible = torch.ones(n, num_prefix + n, dtype=torch.bool, device=q.device)
        visible[:, num_prefix:] = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
        lse[s:e] = torch.logsumexp(scores, dim=-1).T
        out[s:e] = torch.einsum("hts,shd->thd", torch.softmax(scores, dim=-1), vs).to(q.dtype)
    return out, lse


def mla_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    softmax_scale: float,
    max_seqlen: int | None = None,
    prefix: Prefix | None = None,
    config: PrefillConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged causal prefill attention (+ a cached prefix); see the module docstring for shapes. `config`
    overrides the launch shape (benchmarks)."""
    if not use_triton(q):
        return reference(q, k, v, cu_seqlens, softmax_scale, max_seqlen, prefix)
    _check(q, k, v, cu_seqlens, prefix)
    num_tokens, num_heads, qk_dim = q.shape
    v_dim = v.shape[-1]
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())  # a host sync: pass it where you can
    out = torch.empty(num_tokens, num_heads, v_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(num_tokens, num_heads, dtype=torch.float32, device=q.device)
    if num_tokens == 0 or max_seqlen == 0:
        return out, lse
    compute_fp32 = interpreting() or q.dtype == torch.float32
    block_d1 = max(16, 1 << (qk_dim.bit_length() - 1))  # the largest power of two <= qk_dim
    rest = qk_dim - block_d1
    block_d2 = 0 if rest <= 0 else max(16, triton.next_power_of_2(rest))
    cfg = config or (PrefillConfig(16, 16, 4, 1) if interpreting() else PrefillConfig())
    if _use_tma(q, k, v, prefix, block_d1, block_d2, cfg):
        _launch_tma(q, k, v, cu_seqlens, prefix, out, lse, softmax_scale, max_seqlen, block_d1, block_d2, cfg)
        return out, lse
    block_m, block_n, num_warps, num_stages = cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages
    pk, pv, pcu = (prefix.k, prefix.v, prefix.cu_seqlens) if prefix is not None else (k, v, cu_seqlens)
    grid = (triton.cdiv(max_seqlen, block_m), cu_seqlens.shape[0] - 1, num_heads)
    _mla_prefill_kernel[grid](
        q, k, v, cu_seqlens, pk, pv, pcu, out, lse,
        softmax_scale * LOG2E, num_heads, qk_dim, v_dim,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        pk.stride(0), pk.stride(1), pv.stride(0), pv.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D1=block_d1, BLOCK_D2=block_d2,
        BLOCK_DV=max(16, triton.next_power_of_2(v_dim)), HAS_PREFIX=prefix is not None,
        COMPUTE_FP32=compute_fp32, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out, lse


@triton.jit
def _merge_kernel(
    out_a_ptr, lse_a_ptr, out_b_ptr, lse_b_ptr, out_ptr, lse_ptr, v_dim, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # one (token, head)
    la = tl.load(lse_a_ptr + row)
    lb = tl.load(lse_b_ptr + row)
    m = tl.maximum(la, lb)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    wa = tl.exp(la - m_safe)
    wb = tl.exp(lb - m_safe)
    total = wa + wb
    inv = 1.0 / tl.where(total > 0, total, 1.0)
    offs = tl.arange(0, BLOCK_DV)
    mask = offs < v_dim
    oa = tl.load(out_a_ptr + row * v_dim + offs, mask=mask, other=0.0).to(tl.float32)
    ob = tl.load(out_b_ptr + row * v_dim + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(
        out_ptr + row * v_dim + offs, ((oa * wa + ob * wb) * inv).to(out_ptr.dtype.element_ty), mask=mask
    )
    tl.store(
        lse_ptr + row, tl.where(total > 0, m_safe + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    )


def merge_attn_states_reference(out_a, lse_a, out_b, lse_b):
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    wa = torch.exp(lse_a - safe)[..., None]
    wb = torch.exp(lse_b - safe)[..., None]
    return (out_a.float() * wa + out_b.float() * wb).to(out_a.dtype), lse


def merge_attn_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`out_* [T, H, Dv]`, `lse_* fp32 [T, H]` (natural log; -inf for an empty key set) -> the attention
    over both key sets."""
    if out_a.shape != out_b.shape or lse_a.shape != out_a.shape[:-1] or lse_b.shape != lse_a.shape:
        raise ValueError(
            f"out_a/out_b must be [T, H, Dv] and lse_a/lse_b [T, H], got {tuple(out_a.shape)}, "
            f"{tuple(out_b.shape)}, {tuple(lse_a.shape)}, {tuple(lse_b.shape)}"
        )
    if not use_triton(out_a):
        return merge_attn_states_reference(out_a, lse_a, out_b, lse_b)
    out_a, out_b = out_a.contiguous(), out_b.contiguous()
    lse_a, lse_b = lse_a.contiguous().float(), lse_b.contiguous().float()
    out = torch.empty_like(out_a)
    lse = torch.empty_like(lse_a)
    if lse.numel():
        v_dim = out.shape[-1]
        _merge_kernel[(lse.numel(),)](
            out_a, lse_a, out_b, lse_b, out, lse, v_dim, BLOCK_DV=triton.next_power_of_2(v_dim)
        )
    return out, lse


__all__ = ["PrefillConfig", "Prefix", "merge_attn_states", "mla_prefill", "reference"]
