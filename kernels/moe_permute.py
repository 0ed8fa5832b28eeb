"""Expert-sorted layout for the routed experts, and back: `moe_permute` and `moe_combine`, no host sync.

`moe_permute(x [T, H], ids [T, k], num_experts, x_scale=None, max_m=None) -> Permuted`:
every assignment (token t, slot j) with `0 <= ids[t, j] < num_experts` gets a row of the expert-sorted buffer,
experts in order and, within an expert, assignments in (t, j) order (stable, deterministic):

* contiguous layout (`max_m=None`, for `fp8_grouped_gemm`): `x [T*k, H]`, expert e owning rows
  `offsets[e] : offsets[e + 1]`; rows past `offsets[E]` (assignments with an out-of-range id) are unwritten.
* masked layout (`max_m` given, for `fp8_grouped_gemm_masked`): `x [E, max_m, H]`, expert e's rows
  `0 : min(counts[e], max_m)`; assignments past `max_m` are dropped (their `slot_rows` is -1).

`counts int32 [E]`, `offsets int32 [E + 1]` (exclusive prefix of counts), `slot_rows int32 [T*k]` (the row of
assignment t*k + j in the flattened buffer, -1 if it has none).
With `num_shared=S`, every token also has S assignments to the shared experts, numbered `num_experts ..
num_experts + S - 1` after the routed ones (SGLang's shared-expert fusion: the grouped GEMMs compute them with
the routed experts): each token's slots are its k routed ones then the S shared ones, so `slot_rows` is
`[T*(k+S)]` and `counts` / `offsets` cover `E + S` experts. `x_scale [T, G]` (FP8 activations) travels
along into `Permuted.x_scale`.

`moe_combine(y, weights [T, k], slot_rows, shared=None, num_shared=0) -> [T, N]`: `out[t] = shared[t] + sum_j
weights[t, j] * y[slot_rows[t*k + j]]` over the slots that have a row, in fp32, stored in y's dtype (`shared`,
the shared experts' output, is optional); with `num_shared=S` (slots as `moe_permute` lays them out) the S
shared slots' rows are added unweighted first, in place of `shared`; `y` is the expert output in either layout
(`[rows, N]` or `[E, max_m, N]`). A gather per token: no atomics, so the sum is deterministic.

Permute is one launch for up to SMALL_N (512) assignments — a decode step's up to 85 tokens at k = 6 — and three above (histogram per
block of assignments, positions, row copy); combine is one launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moemesh.kernels.dispatch import use_triton

BLOCK_A = 128  # assignments per program in the histogram / position kernels
SMALL_N = 512  # up to this many assignments the permute is one launch (`_permute_small_kernel`)


@dataclass(frozen=True)
class Permuted:
    x: torch.Tensor  # [T*k, H] or [E, max_m, H], expert-sorted rows
    x_scale: torch.Tensor | None  # rows of x_scale alike, or None
    counts: torch.Tensor  # int32 [E]
    offsets: torch.Tensor  # int32 [E + 1]
    slot_rows: torch.Tensor  # int32 [T*k], -1 where an assignment has no row


# ------------------------------------------------------------------------------------------------ references


def with_shared(ids: torch.Tensor, num_experts: int, num_shared: int) -> torch.Tensor:
    """ids [T, k] -> [T, k + S]: each token's routed ids, then the shared experts num_experts .. + S - 1."""
    shared = torch.arange(num_experts, num_experts + num_shared, dtype=ids.dtype, device=ids.device)
    return torch.cat([ids, shared.expand(ids.shape[0], num_shared)], dim=1)


def reference_permute(x, ids, num_experts, x_scale=None, max_m=None, num_shared=0) -> Permuted:
    _validate(x, ids, num_experts, x_scale, max_m, num_shared)
    if num_shared:
        ids, num_experts = with_shared(ids, num_experts, num_shared), num_experts + num_shared
    t, k = ids.shape
    flat = ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, num_experts)
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(flat[valid], minlength=num_experts).to(torch.int32)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=x.device)
    offsets[1:] = torch.cumsum(counts, 0)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=x.device)
    if max_m is None:
        rows = torch.where(valid, pos, -1)
        shape = (t * k,)
    else:
        rank = pos - offsets.long()[key.clamp(max=num_experts - 1)]
        rows = torch.where(valid & (rank < max_m), key * max_m + rank, -1)
        shape = (num_experts, max_m)
    src = torch.arange(t * k, device=x.device) // k
    keep = rows >= 0

    def scatter(v):
        out = torch.zeros(int(torch.tensor(shape).prod()), v.shape[1], dtype=v.dtype, device=v.device)
        out[rows[keep]] = v[src[keep]]
        return out.view(*shape, v.shape[1])

    return Permuted(
        scatter(x), scatter(x_scale) if x_scale is not None else None, counts, offsets, rows.to(torch.int32)
    )


def reference_combine(y, weights, slot_rows, shared=None, num_shared=0) -> torch.Tensor:
    t, k = weights.shape
    y2 = y.reshape(-1, y.shape[-1]).float()
    all_rows = slot_rows.long().view(t, k + num_shared)
    rows = all_rows[:, :k]
    gathered = torch.where((rows >= 0)[..., None], y2[rows.clamp(min=0)], 0.0)
    out = (gathered * weights.float()[..., None]).sum(1)
    if shared is not None:
        out = out + shared.float()
    for j in range(num_shared):
        row = all_rows[:, k + j]
        out = out + torch.where((row >= 0)[:, None], y2[row.clamp(min=0)], 0.0)
    return out.to(y.dtype)


# ------------------------------------------------------------------------------------------------ kernels


@triton.jit
def _load_ids(ids_ptr, a, N, K, S, E):
    """The expert of flat assignment a (-1 past N): token a // K's slot a % K, read from ids [T, K - S], or
    for the last S slots the shared experts E - S .. E - 1."""
    j = a % K
    routed = tl.load(ids_ptr + (a // K) * (K - S) + j, mask=(a < N) & (j < K - S), other=-1).to(tl.int32)
    return tl.where(a < N, tl.where(j < K - S, routed, E - K + j), -1)


@triton.jit
def _histogram_kernel(ids_ptr, hist_ptr, N, E, K, S, E_PAD: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = b * BLOCK + tl.arange(0, BLOCK)
    ids = _load_ids(ids_ptr, offs, N, K, S, E)
    experts = tl.arange(0, E_PAD)
    hist = tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tl.store(hist_ptr + b * E_PAD + experts, hist)


@triton.jit
def _position_kernel(
    ids_ptr, hist_ptr, rows_ptr, counts_ptr, offsets_ptr, N, E, K, S, num_blocks, max_m,
    MASKED: tl.constexpr, E_PAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    total = tl.zeros([E_PAD], dtype=tl.int32)
    before = tl.zeros([E_PAD], dtype=tl.int32)
    for bb in range(0, num_blocks):
        h = tl.load(hist_ptr + bb * E_PAD + experts)
        total += h
        before += tl.where(bb < b, h, 0)
    starts = tl.cumsum(total, 0) - total  # exclusive prefix: each expert's first row
    if b == 0:
        tl.store(counts_ptr + experts, total, mask=experts < E)
        tl.store(offsets_ptr + experts, starts, mask=experts < E)
        tl.store(offsets_ptr + E, tl.sum(tl.where(experts < E, total, 0), 0))
    offs = b * BLOCK + tl.arange(0, BLOCK)
    ids = _load_ids(ids_ptr, offs, N, K, S, E)
    valid = (ids >= 0) & (ids < E)
    # rank among the earlier assignments of this block with the same expert
    j = tl.arange(0, BLOCK)
    same = (ids[:, None] == ids[None, :]) & (j[None, :] < j[:, None])
    rank = tl.sum(same.to(tl.int32), axis=1)
    onehot = ids[:, None] == experts[None, :]
    rank += tl.sum(tl.where(onehot, before[None, :], 0), axis=1)  # earlier blocks
    if MASKED:
        row = tl.where(valid & (rank < max_m), ids * max_m + rank, -1)
    else:
        row = tl.where(valid, tl.sum(tl.where(onehot, starts[None, :], 0), axis=1) + rank, -1)
    tl.store(rows_ptr + offs, row, mask=offs < N)


@triton.jit
def _copy_row(src, dst, H, BLOCK_H: tl.constexpr):
    """H elements from src to dst, BLOCK_H at a time."""
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        tl.store(dst + h, tl.load(src + h, mask=h < H), mask=h < H)


@triton.jit
def _copy_rows_kernel(
    x_ptr, out_ptr, rows_ptr, H, K, stride_x, stride_o, BLOCK_H: tl.constexpr,
):  # fmt: skip
    a = tl.program_id(0)
    row = tl.load(rows_ptr + a)
    if row >= 0:
        _copy_row(x_ptr + (a // K).to(tl.int64) * stride_x, out_ptr + row.to(tl.int64) * stride_o, H, BLOCK_H)


@triton.jit
def _permute_small_kernel(
    ids_ptr, x_ptr, xs_ptr, out_ptr, outs_ptr, rows_ptr, counts_ptr, offsets_ptr,
    N, E, K, S, H, HS, max_m, stride_x, stride_o, stride_xs, stride_os,
    MASKED: tl.constexpr, HAS_SCALE: tl.constexpr, E_PAD: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HS: tl.constexpr,
):  # fmt: skip
    """The whole permute in one launch for a decode step's assignments: program a recounts all N ids (N x E_PAD
    compares, cheap at N <= SMALL_N), places assignment a and copies its row (and scales); program 0 also
    writes counts and offsets. Same placement as the histogram / position kernels."""
    a = tl.program_id(0)
    mine = _load_ids(ids_ptr, a, N, K, S, E)
    experts = tl.arange(0, E_PAD)
    total = tl.zeros([E_PAD], dtype=tl.int32)
    rank = tl.sum(
        tl.zeros([BLOCK], dtype=tl.int32), 0
    )  # an int32 scalar (a loop-carried value keeps its type)
    for c in range(0, N, BLOCK):  # every assignment's expert, BLOCK at a time
        j = c + tl.arange(0, BLOCK)
        ids = _load_ids(ids_ptr, j, N, K, S, E)
        total += tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
        rank += tl.sum(((ids == mine) & (j < a)).to(tl.int32), 0)
    starts = tl.cumsum(total, 0) - total
    if a == 0:
        tl.store(counts_ptr + experts, total, mask=experts < E)
        tl.store(offsets_ptr + experts, starts, mask=experts < E)
        tl.store(offsets_ptr + E, tl.sum(tl.where(experts < E, total, 0), 0))
    valid = (mine >= 0) & (mine < E)
    if MASKED:
        row = tl.where(valid & (rank < max_m), mine * max_m + rank, -1)
    else:
        row = tl.where(valid, tl.sum(tl.where(experts == mine, starts, 0), 0) + rank, -1)
    tl.store(rows_ptr + a, row)
    if row >= 0:
        _copy_row(x_ptr + (a // K).to(tl.int64) * stride_x, out_ptr + row.to(tl.int64) * stride_o, H, BLOCK_H)
        if HAS_SCALE:
            hs = tl.arange(0, BLOCK_HS)
            v = tl.load(xs_ptr + (a // K).to(tl.int64) * stride_xs + hs, mask=hs < HS)
            tl.store(outs_ptr + row.to(tl.int64) * stride_os + hs, v, mask=hs < HS)


@triton.jit
def _combine_kernel(
    y_ptr, w_ptr, rows_ptr, out_ptr, shared_ptr, N, stride_y, stride_o, stride_s,
    K: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SHARED: tl.constexpr, S: tl.constexpr = 0,
):  # fmt: skip
    """S: shared-expert slots after each token's K routed ones, added unweighted (first)."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    if HAS_SHARED:
        acc += tl.load(shared_ptr + t * stride_s + cols, mask=cols < N, other=0.0).to(tl.float32)
    for j in tl.static_range(S):
        row = tl.load(rows_ptr + t * (K + S) + K + j)
        y = tl.load(  # a masked layout may have dropped it (row -1)
            y_ptr + tl.maximum(row, 0).to(tl.int64) * stride_y + cols,
            mask=cols < tl.where(row >= 0, N, 0),
            other=0.0,
        )
        acc += y.to(tl.float32)
    for j in tl.static_range(K):
        row = tl.load(rows_ptr + t * (K + S) + j)
        w = tl.load(w_ptr + t * K + j).to(tl.float32)
        y = tl.load(  # cols < N and row >= 0 (a block & scalar mask fails in Triton 3.9's interpreter)
            y_ptr + tl.maximum(row, 0).to(tl.int64) * stride_y + cols,
            mask=cols < tl.where(row >= 0, N, 0),
            other=0.0,
        )
        acc += w * y.to(tl.float32)
    tl.store(out_ptr + t * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < N)


# ------------------------------------------------------------------------------------------------ launchers


def _validate(x, ids, num_experts, x_scale, max_m, num_shared=0):
    if num_shared < 0:
        raise ValueError(f"num_shared={num_shared} must be >= 0")
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got {tuple(x.shape)}")
    if ids.dim() != 2 or ids.shape[0] != x.shape[0] or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids must be int32/int64 [T={x.shape[0]}, k], got {ids.dtype} {tuple(ids.shape)}")
    if num_experts < 0 or num_experts + num_shared < 1:
        raise ValueError(f"num_experts={num_experts} (and num_shared={num_shared}) must give >= 1 expert")
    if x_scale is not None and (x_scale.dim() != 2 or x_scale.shape[0] != x.shape[0]):
        raise ValueError(f"x_scale must be [T={x.shape[0]}, G], got {tuple(x_scale.shape)}")
    if max_m is not None and max_m < 1:
        raise ValueError(f"max_m={max_m} must be >= 1")
    if ids.device != x.device:
        raise ValueError(f"ids on {ids.device}, x on {x.device}")


def _copy_rows(v: torch.Tensor, rows: torch.Tensor, k: int, shape: tuple[int, ...]) -> torch.Tensor:
    out = torch.empty(*shape, v.shape[1], dtype=v.dtype, device=v.device)
    if rows.numel() and v.shape[1]:
        v = v.contiguous()
        src, dst = (v.view(torch.uint8), out.view(torch.uint8)) if v.element_size() == 1 else (v, out)
        block_h = min(1024, triton.next_power_of_2(v.shape[1]))
        _copy_rows_kernel[(rows.numel(),)](
            src, dst, rows, v.shape[1], k, v.stride(0), v.shape[1], BLOCK_H=block_h
        )
    return out


def moe_permute(
    x: torch.Tensor,
    ids: torch.Tensor,
    num_experts: int,
    x_scale: torch.Tensor | None = None,
    max_m: int | None = None,
    num_shared: int = 0,
) -> Permuted:
    """Expert-sorted rows of `x` (module docstring), everything computed on the device; `num_shared` shared
    experts after the `num_experts` routed ones, assigned every token."""
    _validate(x, ids, num_experts, x_scale, max_m, num_shared)
    if not use_triton(x):
        return reference_permute(x, ids, num_experts, x_scale, max_m, num_shared)
    t, k = ids.shape
    s = num_shared
    num_experts, k = num_experts + s, k + s  # the layout's experts, each token's slots
    n = t * k
    dev = x.device
    e_pad = triton.next_power_of_2(num_experts)
    num_blocks = max(1, triton.cdiv(n, BLOCK_A))
    rows = torch.empty(n, dtype=torch.int32, device=dev)
    flat = ids.reshape(-1).contiguous() if ids.numel() else rows  # no routed ids (k = 0): never read
    counts = torch.empty(num_experts, dtype=torch.int32, device=dev)
    offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=dev)
    if 0 < n <= SMALL_N:
        return _permute_small(x, x_scale, flat, rows, counts, offsets, n, k, s, num_experts, max_m)
    hist = torch.empty(num_blocks, e_pad, dtype=torch.int32, device=dev)
    _histogram_kernel[(num_blocks,)](flat, hist, n, num_experts, k, s, E_PAD=e_pad, BLOCK=BLOCK_A)
    _position_kernel[(num_blocks,)](
        flat, hist, rows, counts, offsets, n, num_experts, k, s, num_blocks, max_m or 0,
        MASKED=max_m is not None, E_PAD=e_pad, BLOCK=BLOCK_A,
    )  # fmt: skip
    shape = (n,) if max_m is None else (num_experts, max_m)
    out = _copy_rows(x, rows, k, shape)
    out_scale = _copy_rows(x_scale, rows, k, shape) if x_scale is not None else None
    return Permuted(out, out_scale, counts, offsets, rows)


def _permute_small(x, x_scale, flat, rows, counts, offsets, n, k, s, num_experts, max_m) -> Permuted:
    shape = (n,) if max_m is None else (num_experts, max_m)
    out = torch.empty(*shape, x.shape[1], dtype=x.dtype, device=x.device)
    out_scale = None
    if x_scale is not None:
        x_scale = x_scale.contiguous()
        out_scale = torch.empty(*shape, x_scale.shape[1], dtype=x_scale.dtype, device=x.device)
    x = x.contiguous()
    src, dst = (x.view(torch.uint8), out.view(torch.uint8)) if x.element_size() == 1 else (x, out)
    scale_src = x_scale if x_scale is not None else src
    scale_dst = out_scale if out_scale is not None else dst
    hs = x_scale.shape[1] if x_scale is not None else 0
    _permute_small_kernel[(n,)](
        flat, src, scale_src, dst, scale_dst, rows, counts, offsets,
        n, num_experts, k, s, x.shape[1], hs, max_m or 0, x.shape[1], x.shape[1], max(hs, 1), max(hs, 1),
        MASKED=max_m is not None, HAS_SCALE=x_scale is not None, E_PAD=triton.next_power_of_2(num_experts),
        BLOCK=min(BLOCK_A, triton.next_power_of_2(n)), BLOCK_H=min(1024, triton.next_power_of_2(max(x.shape[1], 1))),
        BLOCK_HS=triton.next_power_of_2(max(hs, 1)),
    )  # fmt: skip
    return Permuted(out, out_scale, counts, offsets, rows)


def moe_combine(
    y: torch.Tensor,
    weights: torch.Tensor,
    slot_rows: torch.Tensor,
    shared: torch.Tensor | None = None,
    num_shared: int = 0,
) -> torch.Tensor:
    """Weighted sum of each token's expert outputs (module docstring) -> `[T, N]` in y's dtype; with `shared
    [T, N]` (the shared experts' output) added into the same fp32 sum, rounded once; with `num_shared`, the
    shared experts' slots of `moe_permute(..., num_shared=)` added unweighted."""
    if num_shared < 0:
        raise ValueError(f"num_shared={num_shared} must be >= 0")
    want = weights.shape[0] * (weights.shape[-1] + num_shared) if weights.dim() == 2 else -1
    if weights.dim() != 2 or slot_rows.shape != (want,):
        raise ValueError(
            f"weights must be [T, k] and slot_rows [T*(k+{num_shared})], got {tuple(weights.shape)} and "
            f"{tuple(slot_rows.shape)}"
        )
    if y.dim() not in (2, 3):
        raise ValueError(f"y must be [rows, N] or [E, max_m, N], got {tuple(y.shape)}")
    if shared is not None and (
        tuple(shared.shape) != (weights.shape[0], y.shape[-1]) or shared.device != y.device
    ):
        raise ValueError(
            f"shared must be [T={weights.shape[0]}, N={y.shape[-1]}] on {y.device}, "
            f"got {tuple(shared.shape)} on {shared.device}"
        )
    if not use_triton(y):
        return reference_combine(y, weights, slot_rows, shared, num_shared)
    t, k = weights.shape
    n = y.shape[-1]
    y2 = y.reshape(-1, n)
    if y2.stride(-1) != 1:
        y2 = y2.contiguous()
    out = torch.empty(t, n, dtype=y.dtype, device=y.device)
    if shared is not None and shared.stride(-1) != 1:
        shared = shared.contiguous()
    if t and n:
        block_n = min(1024, triton.next_power_of_2(n))
        _combine_kernel[(t, triton.cdiv(n, block_n))](
            y2, weights.contiguous(), slot_rows.contiguous(), out, shared if shared is not None else out,
            n, y2.stride(0), out.stride(0), shared.stride(0) if shared is not None else 0,
            K=k, BLOCK_N=block_n, HAS_SHARED=shared is not None, S=num_shared,
        )  # fmt: skip
    return out
