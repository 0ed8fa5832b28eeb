"""The paged latent KV cache: store new tokens into pages, pack a request's pages for transfer, unpack them.

Layout of one layer's cache: `[num_pages, page_size, kv_lora_rank + rope_dim]` — the first kv_lora_rank values
of a row are the RMS-normed latent, the last rope_dim the roped k_pe (576 = 512 + 64 at DeepSeek-V3 shapes).
Token slot `s = page * page_size + row`.

FP8 layout (dtype float8_e4m3fn, used as raw bytes): each row holds `fp8_row_bytes(kv_lora_rank, rope_dim)`
bytes — the e4m3 latent, then one fp32 scale per `fp8_group_size(kv_lora_rank)` latent values (128 at V3
shapes), then k_pe in bf16 (656 bytes per token at V3 shapes). `latent ≈ e4m3 * scale` groupwise.

* `store_kv(kv_cache, latent, k_pe, slot_mapping, rope=None)`: in place; `latent [T, kv_lora_rank]`, `k_pe [T,
  rope_dim]` (any float dtype, last dim contiguous), `slot_mapping int64 [T]`, −1 skips the token. With
  `rope=RopeTables(positions, cos_cache, sin_cache)` it first rotates k_pe (as `rope.rope` does), writes the
  rotated k_pe back into `k_pe` (every token, skipped ones too) and stores it: one pass instead of two. With
  `extras=StoreExtras(norm_weight, eps, q_pe, q_out)` the same pass RMS-normalizes the latent first and rotates
  the query's q_pe heads into q_out (MLA's kv_a_layernorm and the query RoPE: three launches become one).
* `pack_kv(kv_cache, page_ids) -> buffer`: the listed pages, in order, into one contiguous buffer. kv_cache
  is one layer `[P, S, D]` (buffer `[n, S, D]`), all layers as one tensor `[L, P, S, D]` or a list of L layers
  (buffer `[L, n, S, D]`).
* `unpack_kv(buffer, kv_cache, page_ids)`: the inverse, in place: buffer page i goes to page `page_ids[i]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moemesh.kernels.dispatch import use_triton
from moemesh.kernels.rms_norm import reference as rms_norm_reference
from moemesh.kernels.rope import RopeTables, check_tables, rotate_pairs
from moemesh.kernels.rope import reference as rope_reference

FP8_E4M3_MAX = 448.0


def fp8_group_size(kv_lora_rank: int) -> int:
    """Latent values per fp32 scale in the FP8 layout: 128, or the whole latent when it is not a multiple."""
    return 128 if kv_lora_rank % 128 == 0 else kv_lora_rank


def fp8_row_bytes(kv_lora_rank: int, rope_dim: int) -> int:
    """Bytes per token of the FP8 layout: e4m3 latent + fp32 scales + bf16 k_pe."""
    return kv_lora_rank + 4 * (kv_lora_rank // fp8_group_size(kv_lora_rank)) + 2 * rope_dim


def fp8_quant_rows(latent: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
    """Reference FP8 encoding: `latent [T, R]`, `k_pe [T, r]` -> float8_e4m3fn [T, fp8_row_bytes(R, r)]."""
    t, rank = latent.shape
    group = fp8_group_size(rank)
    x = latent.float().view(t, rank // group, group)
    scale = x.abs().amax(dim=-1).clamp_min(1e-12) / FP8_E4M3_MAX  # [T, groups]
    e4m3 = (x / scale[..., None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).view(t, rank)
    parts = (
        e4m3.view(torch.uint8),
        scale.contiguous().view(torch.uint8),
        k_pe.to(torch.bfloat16).view(torch.uint8),
    )
    return torch.cat(parts, dim=-1).view(torch.float8_e4m3fn)


def fp8_dequant_rows(rows: torch.Tensor, kv_lora_rank: int, rope_dim: int) -> torch.Tensor:
    """FP8 rows [T, fp8_row_bytes] -> fp32 [T, kv_lora_rank + rope_dim] (latent | k_pe)."""
    t = rows.shape[0]
    group = fp8_group_size(kv_lora_rank)
    num_groups = kv_lora_rank // group
    raw = rows.reshape(t, -1).view(torch.uint8)
    e4m3 = raw[:, :kv_lora_rank].contiguous().view(torch.float8_e4m3fn).float()
    scale = raw[:, kv_lora_rank : kv_lora_rank + 4 * num_groups].contiguous().view(torch.float32)
    k_pe = raw[:, kv_lora_rank + 4 * num_groups :].contiguous().view(torch.bfloat16).float()
    latent = (e4m3.view(t, num_groups, group) * scale[..., None]).view(t, kv_lora_rank)
    return torch.cat((latent, k_pe), dim=-1)


# ---------------------------------------------------------------------------------------------------- store


@triton.jit
def _store_kv_kernel(
    kv_ptr,
    latent_ptr,
    k_pe_ptr,
    slot_ptr,
    kv_lora_rank,
    rope_dim,
    stride_slot,  # elements (bytes for FP8) between consecutive slots
    stride_latent,
    stride_pe,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    stride_rope_cache,
    norm_w_ptr,  # NORM: the latent's RMSNorm weight [kv_lora_rank]
    eps,
    q_ptr,  # Q_ROPE: q_pe [T, H, rope_dim] (any token / head strides), rotated into q_out
    q_out_ptr,
    num_heads,
    stride_qt,
    stride_qh,
    stride_qot,
    stride_qoh,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    FP8: tl.constexpr,
    GROUP: tl.constexpr,
    ROPE: tl.constexpr,
    NORM: tl.constexpr,
    Q_ROPE: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0)
    if Q_ROPE:  # every token's query heads, padding rows too (as `rope` would)
        offs_qi = tl.arange(0, BLOCK_R // 2)
        offs_qh = tl.arange(0, BLOCK_H)
        mask_q = (offs_qh[:, None] < num_heads) & (offs_qi[None, :] < rope_dim // 2)
        q_row = q_ptr + t.to(tl.int64) * stride_qt + offs_qh[:, None] * stride_qh + 2 * offs_qi[None, :]
        qe = tl.load(q_row, mask=mask_q, other=0.0).to(tl.float32)
        qo = tl.load(q_row + 1, mask=mask_q, other=0.0).to(tl.float32)
        q_pos = tl.load(pos_ptr + t)
        re, ro = rotate_pairs(qe, qo, cos_ptr, sin_ptr, q_pos, offs_qi[None, :], offs_qi[None, :] < rope_dim // 2,
                              stride_rope_cache)  # fmt: skip
        o_row = q_out_ptr + t.to(tl.int64) * stride_qot + offs_qh[:, None] * stride_qoh + 2 * offs_qi[None, :]
        tl.store(o_row, re.to(q_out_ptr.dtype.element_ty), mask=mask_q)
        tl.store(o_row + 1, ro.to(q_out_ptr.dtype.element_ty), mask=mask_q)
    slot = tl.load(slot_ptr + t)
    # A padding row (slot -1) stores nothing: its masks are all false. Written as `offs < where(slot >= 0, n,
    # 0)`, not `(offs < n) & (slot >= 0)`: Triton 3.9's interpreter refuses a block & scalar mask ("mask has
    # unsupported dtype"), and both read the same on the GPU.
    valid = slot >= 0
    dst = kv_ptr + tl.maximum(slot, 0) * stride_slot
    offs_d = tl.arange(0, BLOCK_D)
    offs_r = tl.arange(0, BLOCK_R)
    mask_d = offs_d < tl.where(valid, kv_lora_rank, 0)
    mask_r = offs_r < tl.where(valid, rope_dim, 0)
    x = tl.load(latent_ptr + t.to(tl.int64) * stride_latent + offs_d, mask=mask_d, other=0.0)
    if NORM:  # rms_norm's numerics: normed rounded to the latent's dtype, times the weight, rounded again
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / kv_lora_rank + eps)
        w = tl.load(norm_w_ptr + offs_d, mask=offs_d < kv_lora_rank, other=0.0).to(tl.float32)
        x = ((xf * rstd).to(latent_ptr.dtype.element_ty).to(tl.float32) * w).to(latent_ptr.dtype.element_ty)
    pe_row = k_pe_ptr + t.to(tl.int64) * stride_pe
    if ROPE:
        # rotate pairs (2i, 2i+1) in fp32, write them back to k_pe, then re-interleave for the cache store
        offs_i = tl.arange(0, BLOCK_R // 2)
        mask_i = offs_i < rope_dim // 2
        xe = tl.load(pe_row + 2 * offs_i, mask=mask_i, other=0.0).to(tl.float32)
        xo = tl.load(pe_row + 2 * offs_i + 1, mask=mask_i, other=0.0).to(tl.float32)
        pos = tl.load(pos_ptr + t)
        ye, yo = rotate_pairs(xe, xo, cos_ptr, sin_ptr, pos, offs_i, mask_i, stride_rope_cache)
        ye = ye.to(k_pe_ptr.dtype.element_ty)
        yo = yo.to(k_pe_ptr.dtype.element_ty)
        tl.store(pe_row + 2 * offs_i, ye, mask=mask_i)
        tl.store(pe_row + 2 * offs_i + 1, yo, mask=mask_i)
        pe = tl.reshape(tl.join(ye, yo), [BLOCK_R])
    else:
        pe = tl.load(pe_row + offs_r, mask=mask_r, other=0.0)
    if FP8:
        num_groups: tl.constexpr = BLOCK_D // GROUP
        xf = x.to(tl.float32)
        amax = tl.max(tl.reshape(tl.abs(xf), [num_groups, GROUP]), axis=1)
        scale = tl.maximum(amax, 1e-12) / 448.0  # [num_groups]
        xg = tl.reshape(xf, [num_groups, GROUP]) / scale[:, None]
        xg = tl.minimum(tl.maximum(xg, -448.0), 448.0)
        q8 = tl.reshape(xg, [BLOCK_D]).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        tl.store(dst + offs_d, q8, mask=mask_d)
        offs_g = tl.arange(0, num_groups)
        scale_ptr = (dst + kv_lora_rank + 4 * offs_g).to(tl.pointer_type(tl.float32))
        tl.store(scale_ptr, scale, mask=offs_g < tl.where(valid, kv_lora_rank // GROUP, 0))
        pe_ptr = (dst + kv_lora_rank + 4 * (kv_lora_rank // GROUP) + 2 * offs_r).to(
            tl.pointer_type(tl.bfloat16)
        )
        tl.store(pe_ptr, pe.to(tl.bfloat16), mask=mask_r)
    else:
        tl.store(dst + offs_d, x.to(kv_ptr.dtype.element_ty), mask=mask_d)
        tl.store(dst + kv_lora_rank + offs_r, pe.to(kv_ptr.dtype.element_ty), mask=mask_r)


def _check_store(kv_cache, latent, k_pe, slot_mapping, rope, extras=None) -> bool:
    if latent.dim() != 2 or k_pe.dim() != 2 or latent.shape[0] != k_pe.shape[0]:
        raise ValueError(
            f"latent must be [T, kv_lora_rank] and k_pe [T, rope_dim], got {tuple(latent.shape)} and "
            f"{tuple(k_pe.shape)}"
        )
    num_tokens, kv_lora_rank = latent.shape
    rope_dim = k_pe.shape[1]
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    want = fp8_row_bytes(kv_lora_rank, rope_dim) if fp8 else kv_lora_rank + rope_dim
    if kv_cache.dim() != 3 or kv_cache.shape[-1] != want or not kv_cache.is_contiguous():
        raise ValueError(
            f"kv_cache must be a contiguous [num_pages, page_size, {want}] for kv_lora_rank={kv_lora_rank}, "
            f"rope_dim={rope_dim}, got shape {tuple(kv_cache.shape)} strides {kv_cache.stride()}"
        )
    if tuple(slot_mapping.shape) != (num_tokens,) or slot_mapping.dtype != torch.int64:
        raise ValueError(
            f"slot_mapping must be int64 [{num_tokens}], got {slot_mapping.dtype} {tuple(slot_mapping.shape)}"
        )
    if latent.stride(-1) != 1 or k_pe.stride(-1) != 1:
        raise ValueError(
            f"latent and k_pe need a contiguous last dim, strides {latent.stride()} {k_pe.stride()}"
        )
    for name, t in (("latent", latent), ("k_pe", k_pe), ("slot_mapping", slot_mapping)):
        if t.device != kv_cache.device:
            raise ValueError(f"{name} is on {t.device}, kv_cache on {kv_cache.device}")
    if rope is not None:
        if rope_dim % 2:
            raise ValueError(f"rope needs an even rope_dim, got k_pe of shape {tuple(k_pe.shape)}")
        check_tables(rope, num_tokens, rope_dim, kv_cache.device)
    if extras is not None:
        _check_extras(extras, latent, rope_dim, rope)
    return fp8


def _check_extras(extras: StoreExtras, latent: torch.Tensor, rope_dim: int, rope) -> None:
    w = extras.norm_weight
    if w is not None and (tuple(w.shape) != (latent.shape[1],) or w.dtype != latent.dtype):
        raise ValueError(
            f"norm_weight must be {latent.dtype} [{latent.shape[1]}], got {w.dtype} {tuple(w.shape)}"
        )
    if w is not None and latent.stride(-1) != 1:
        raise ValueError(f"latent needs a contiguous last dim, strides {latent.stride()}")
    q, out = extras.q_pe, extras.q_out
    if q is None:
        return
    want = (latent.shape[0], q.shape[1] if q.dim() == 3 else -1, rope_dim)
    if rope is None or q.dim() != 3 or tuple(q.shape) != want or out is None or out.shape != q.shape:
        raise ValueError(
            f"q_pe and q_out must be [T={latent.shape[0]}, H, {rope_dim}] with rope tables, got "
            f"{None if q is None else tuple(q.shape)} and {None if out is None else tuple(out.shape)}"
        )
    if q.stride(-1) != 1 or out.stride(-1) != 1 or q.device != latent.device or out.device != latent.device:
        raise ValueError(f"q_pe and q_out need a contiguous last dim on {latent.device}")


@dataclass(frozen=True)
class StoreExtras:
    """What `store_kv` also does in its one pass (the decode step's small per-token ops):

    * `norm_weight`, `eps`: RMS-normalizes the latent first (`rms_norm`'s numerics; weight in the latent's dtype);
    * `q_pe [T, H, rope_dim]`, `q_out` alike (any token / head strides): rotates every token's query heads by
      the same `rope` tables into `q_out` (as `rope(q_pe, ..., out=q_out)` does; needs `rope`)."""

    norm_weight: torch.Tensor | None = None
    eps: float = 1e-6
    q_pe: torch.Tensor | None = None
    q_out: torch.Tensor | None = None


def store_kv_reference(
    kv_cache, latent, k_pe, slot_mapping, rope: RopeTables | None = None, extras=None
) -> None:
    fp8 = _check_store(kv_cache, latent, k_pe, slot_mapping, rope, extras)
    if extras is not None and extras.q_pe is not None:
        extras.q_out.copy_(rope_reference(extras.q_pe, rope.positions, rope.cos_cache, rope.sin_cache))
    if extras is not None and extras.norm_weight is not None:
        latent = rms_norm_reference(latent, extras.norm_weight, extras.eps)[0]
    if rope is not None:
        k_pe.copy_(rope_reference(k_pe, rope.positions, rope.cos_cache, rope.sin_cache))
    flat = kv_cache.view(-1, kv_cache.shape[-1])
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    if fp8:
        flat[slots] = fp8_quant_rows(latent[keep], k_pe[keep])
    else:
        flat[slots] = torch.cat((latent[keep], k_pe[keep]), dim=-1).to(kv_cache.dtype)


def store_kv(
    kv_cache: torch.Tensor,
    latent: torch.Tensor,
    k_pe: torch.Tensor,
    slot_mapping: torch.Tensor,
    rope: RopeTables | None = None,
    extras: StoreExtras | None = None,
) -> None:
    """Writes token t's `latent[t] | k_pe[t]` into slot `slot_mapping[t]` of `kv_cache` (−1 skips); with `rope`,
    rotates k_pe in place first (see module doc); `extras` fuses the latent's norm and the query's RoPE into
    the same launch."""
    if not use_triton(kv_cache):
        return store_kv_reference(kv_cache, latent, k_pe, slot_mapping, rope, extras)
    fp8 = _check_store(kv_cache, latent, k_pe, slot_mapping, rope, extras)
    num_tokens, kv_lora_rank = latent.shape
    rope_dim = k_pe.shape[1]
    if num_tokens == 0:
        return None
    norm = extras is not None and extras.norm_weight is not None
    q = extras.q_pe if extras is not None and extras.q_pe is not None else None
    kv = kv_cache.view(torch.uint8) if fp8 else kv_cache
    _store_kv_kernel[(num_tokens,)](
        kv,
        latent,
        k_pe,
        slot_mapping,
        kv_lora_rank,
        rope_dim,
        kv.stride(1),
        latent.stride(0),
        k_pe.stride(0),
        rope.positions if rope is not None else slot_mapping,
        rope.cos_cache if rope is not None else latent,
        rope.sin_cache if rope is not None else latent,
        rope.cos_cache.stride(0) if rope is not None else 0,
        extras.norm_weight if norm else latent,
        extras.eps if norm else 0.0,
        q if q is not None else latent,
        extras.q_out if q is not None else latent,
        q.shape[1] if q is not None else 0,
        q.stride(0) if q is not None else 0,
        q.stride(1) if q is not None else 0,
        extras.q_out.stride(0) if q is not None else 0,
        extras.q_out.stride(1) if q is not None else 0,
        BLOCK_D=triton.next_power_of_2(kv_lora_rank),
        BLOCK_R=max(2, triton.next_power_of_2(rope_dim)),
        FP8=fp8,
        GROUP=fp8_group_size(kv_lora_rank) if fp8 else 1,
        ROPE=rope is not None,
        NORM=norm,
        Q_ROPE=q is not None,
        BLOCK_H=max(2, triton.next_power_of_2(q.shape[1])) if q is not None else 2,
        num_warps=4,
    )
    return None


# ---------------------------------------------------------------------------------------------- pack/unpack


# num_ids is not specialized: Triton would otherwise compile one variant for 1 page, one for multiples of 16 and
# one for the other counts, and a prefill worker would meet each new one at its first prompt of such a size,
# compiling inside that request's prefill (a Triton compile takes 0.1 s or more).
@triton.jit(do_not_specialize=["num_ids"])
def _copy_pages_kernel(
    src_ptr,
    dst_ptr,
    src_ids_ptr,
    dst_ids_ptr,
    num_ids,
    page_words,
    src_layer_stride,
    dst_layer_stride,
    HAS_SRC_IDS: tl.constexpr,
    HAS_DST_IDS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Program (layer * num_ids + i, chunk) copies words [chunk*BLOCK, +BLOCK) of page i of one layer."""
    pid = tl.program_id(0)
    layer = pid // num_ids
    i = pid % num_ids
    src_page = tl.load(src_ids_ptr + i).to(tl.int64) if HAS_SRC_IDS else i.to(tl.int64)
    dst_page = tl.load(dst_ids_ptr + i).to(tl.int64) if HAS_DST_IDS else i.to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < page_words
    src = src_ptr + layer.to(tl.int64) * src_layer_stride + src_page * page_words
    dst = dst_ptr + layer.to(tl.int64) * dst_layer_stride + dst_page * page_words
    tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


def _layers(kv_cache) -> tuple[list[torch.Tensor], bool]:
    """-> (list of 3-D layer caches, whether the caller passed several layers)."""
    if isinstance(kv_cache, torch.Tensor):
        if kv_cache.dim() == 4:
            return list(kv_cache.unbind(0)), True
        if kv_cache.dim() == 3:
            return [kv_cache], False
        raise ValueError(f"kv_cache must be [P, S, D] or [L, P, S, D], got shape {tuple(kv_cache.shape)}")
    layers = list(kv_cache)
    if not layers:
        raise ValueError("kv_cache is an empty list of layers")
    return layers, True


def _check_pages(layers: list[torch.Tensor], page_ids: torch.Tensor) -> None:
    first = layers[0]
    for j, layer in enumerate(layers):
        if layer.dim() != 3 or layer.shape[1:] != first.shape[1:] or layer.dtype != first.dtype:
            raise ValueError(
                f"layer {j} has shape {tuple(layer.shape)} {layer.dtype}, "
                f"layer 0 {tuple(first.shape)} {first.dtype}"
            )
        if not layer.is_contiguous():
            raise ValueError(f"layer {j} must be contiguous, strides {layer.stride()}")
        if layer.device != page_ids.device:
            raise ValueError(f"layer {j} is on {layer.device}, page_ids on {page_ids.device}")
    if page_ids.dim() != 1 or page_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"page_ids must be int32/int64 [n], got {page_ids.dtype} {tuple(page_ids.shape)}")


def _words(t: torch.Tensor) -> torch.Tensor:
    """A contiguous [..., P, S, D] tensor as [..., P, page_words] of the widest word dividing a page."""
    page_bytes = t.shape[-2] * t.shape[-1] * t.element_size()
    flat = t.reshape(*t.shape[:-2], -1).view(torch.uint8)
    for word in (torch.int32, torch.int16):
        if page_bytes % torch.empty((), dtype=word).element_size() == 0:
            return flat.view(word)
    return flat


def _copy_pages(src, dst, src_ids, dst_ids, num_ids) -> None:
    """src, dst: lists of layers, or one [L, P, S, D] tensor each (one launch for every layer)."""
    if num_ids == 0:
        return
    if isinstance(src, torch.Tensor):
        pairs = [(_words(src), _words(dst), src.shape[0])]
    else:
        pairs = [(_words(s), _words(d), 1) for s, d in zip(src, dst, strict=True)]
    page_words = pairs[0][0].shape[-1]
    block = min(4096, triton.next_power_of_2(page_words))
    for s, d, num_layers in pairs:
        _copy_pages_kernel[(num_layers * num_ids, triton.cdiv(page_words, block))](
            s,
            d,
            src_ids if src_ids is not None else s,
            dst_ids if dst_ids is not None else d,
            num_ids,
            page_words,
            s.stride(0) if s.dim() == 3 else 0,
            d.stride(0) if d.dim() == 3 else 0,
            HAS_SRC_IDS=src_ids is not None,
            HAS_DST_IDS=dst_ids is not None,
            BLOCK=block,
            num_warps=8,
        )


def pack_kv_reference(kv_cache, page_ids: torch.Tensor) -> torch.Tensor:
    layers, several = _layers(kv_cache)
    _check_pages(layers, page_ids)
    packed = torch.stack([layer[page_ids.long()] for layer in layers])
    return packed if several else packed[0]


def pack_kv(kv_cache, page_ids: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Gathers pages `page_ids` (of one layer or of every layer) into one contiguous buffer."""
    if not use_triton(page_ids):
        packed = pack_kv_reference(kv_cache, page_ids)
        if out is not None:
            out.copy_(packed)
            return out
        return packed
    layers, several = _layers(kv_cache)
    _check_pages(layers, page_ids)
    shape = ((len(layers),) if several else ()) + (page_ids.shape[0],) + tuple(layers[0].shape[1:])
    if out is None:
        out = torch.empty(shape, dtype=layers[0].dtype, device=page_ids.device)
    elif tuple(out.shape) != shape or out.dtype != layers[0].dtype or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {shape} {layers[0].dtype}, got {tuple(out.shape)} {out.dtype}"
        )
    if isinstance(kv_cache, torch.Tensor) and kv_cache.dim() == 4 and kv_cache.is_contiguous():
        _copy_pages(kv_cache, out, page_ids, None, page_ids.shape[0])
    else:
        _copy_pages(layers, list(out.unbind(0)) if several else [out], page_ids, None, page_ids.shape[0])
    return out


def unpack_kv_reference(buffer: torch.Tensor, kv_cache, page_ids: torch.Tensor) -> None:
    layers, several = _layers(kv_cache)
    _check_pages(layers, page_ids)
    bufs = list(buffer.unbind(0)) if several else [buffer]
    for layer, buf in zip(layers, bufs, strict=True):
        layer[page_ids.long()] = buf


def unpack_kv(buffer: torch.Tensor, kv_cache, page_ids: torch.Tensor) -> None:
    """Scatters a packed buffer (as `pack_kv` makes it) into pages `page_ids` of `kv_cache`, in place."""
    layers, several = _layers(kv_cache)
    _check_pages(layers, page_ids)
    shape = ((len(layers),) if several else ()) + (page_ids.shape[0],) + tuple(layers[0].shape[1:])
    if tuple(buffer.shape) != shape or buffer.dtype != layers[0].dtype or not buffer.is_contiguous():
        raise ValueError(f"buffer must be a contiguous {shape} {layers[0].dtype}, got {tuple(buffer.shape)}")
    if not use_triton(page_ids):
        return unpack_kv_reference(buffer, kv_cache, page_ids)
    if isinstance(kv_cache, torch.Tensor) and kv_cache.dim() == 4 and kv_cache.is_contiguous():
        _copy_pages(buffer, kv_cache, None, page_ids, page_ids.shape[0])
    else:
        _copy_pages(
            list(buffer.unbind(0)) if several else [buffer], layers, None, page_ids, page_ids.shape[0]
        )
    return None


__all__ = [
    "fp8_dequant_rows",
    "fp8_group_size",
    "fp8_quant_rows",
    "fp8_row_bytes",
    "pack_kv",
    "store_kv",
    "unpack_kv",
]
