"""Token formats of the expert wire: hidden states `[T, H]` as one contiguous byte buffer with a small header.

Layout (little-endian; every section starts on a 16-byte boundary):

    header   32 B  eight int32: magic "MMTK", version | format << 8, num_tokens, hidden, values offset,
                   scales offset (0: none), global-scale offset (0: none), total bytes
    values         BF16: T*H bf16 · FP8: T*H e4m3 · NVFP4: T*ceil(H/2) bytes, two e2m1 codes a byte, the even
                   element in the low nibble
    scales         FP8: fp32 [T, ceil(H/128)] (act_quant's 1x128 groups) · NVFP4: e4m3 [T, ceil(H/16)]
    global scale   NVFP4: one fp32

* BF16: exact.
* FP8: `act_quant` (1x128 groups, scale = amax / 448); `fp8_views` hands the values and scales to the expert
  GEMM without a copy.
* NVFP4: global scale `g = amax(x) / (448 * 6)`; per 16 values `s = e4m3(amax16 / (6 g))`; each value
  `x / (s g)` rounded to the nearest e2m1 {0, 0.5, 1, 1.5, 2, 3, 4, 6} (ties to even code, saturating);
  decodes as `e2m1 * s * g`.

The encoders write the header themselves (no host sync); reading a header back from a device buffer
(`TokenLayout.from_buffer`) syncs, so a receiver that knows the layout passes it to `decode_tokens`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moemesh.kernels.dispatch import use_triton
from moemesh.kernels.fp8_quant import _act_quant_kernel, act_quant_reference

MAGIC = 0x4B544D4D  # b"MMTK"
VERSION = 1
HEADER_BYTES = 32
E2M1_MAX, E4M3_MAX = 6.0, 448.0


class TokenFormat(enum.IntEnum):
    BF16 = 1
    FP8 = 2
    NVFP4 = 3


def _align(n: int) -> int:
    return (n + 15) // 16 * 16


@dataclass(frozen=True)
class TokenLayout:
    """Where each section of a buffer of `num_tokens` x `hidden` values in `format` lies."""

    format: TokenFormat
    num_tokens: int
    hidden: int

    @property
    def values_bytes(self) -> int:
        t, h = self.num_tokens, self.hidden
        return {TokenFormat.BF16: 2 * t * h, TokenFormat.FP8: t * h, TokenFormat.NVFP4: t * -(-h // 2)}[
            self.format
        ]

    @property
    def scale_groups(self) -> int:
        return {
            TokenFormat.BF16: 0,
            TokenFormat.FP8: -(-self.hidden // 128),
            TokenFormat.NVFP4: -(-self.hidden // 16),
        }[self.format]

    @property
    def values_offset(self) -> int:
        return HEADER_BYTES

    @property
    def scales_offset(self) -> int:
        return 0 if self.format == TokenFormat.BF16 else _align(self.values_offset + self.values_bytes)

    @property
    def global_scale_offset(self) -> int:
        if self.format != TokenFormat.NVFP4:
            return 0
        return _align(self.scales_offset + self.num_tokens * self.scale_groups)

    @property
    def nbytes(self) -> int:
        if self.format == TokenFormat.BF16:
            return _align(self.values_offset + self.values_bytes)
        if self.format == TokenFormat.FP8:
            return _align(self.scales_offset + 4 * self.num_tokens * self.scale_groups)
        return self.global_scale_offset + 16

    def words(self) -> list[int]:
        return [
            MAGIC, VERSION | int(self.format) << 8, self.num_tokens, self.hidden,
            self.values_offset, self.scales_offset, self.global_scale_offset, self.nbytes,
        ]  # fmt: skip

    @classmethod
    def from_buffer(cls, buf: torch.Tensor) -> TokenLayout:
        """Parse and check a buffer's header (copies 32 bytes to the host: a sync for device buffers)."""
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() < HEADER_BYTES:
            raise ValueError(
                f"token buffer must be uint8 [>= {HEADER_BYTES}], got {buf.dtype} {tuple(buf.shape)}"
            )
        words = buf[:HEADER_BYTES].cpu().view(torch.int32).tolist()
        if words[0] != MAGIC or words[1] & 0xFF != VERSION:
            raise ValueError(f"not a token buffer of version {VERSION}: header words {words[:2]}")
        layout = cls(TokenFormat(words[1] >> 8), words[2], words[3])
        if words != layout.words() or buf.numel() < layout.nbytes:
            raise ValueError(f"inconsistent token header {words} for a buffer of {buf.numel()} bytes")
        return layout


# ------------------------------------------------------------------------------------------------ torch views


def _section(buf: torch.Tensor, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]):
    return buf[offset : offset + nbytes].view(dtype).view(shape)


def fp8_views(buf: torch.Tensor, layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-copy (`x_fp8 [T, H]` e4m3, `scale fp32 [T, ceil(H/128)]`) of an FP8 buffer, for the expert GEMM."""
    if layout.format != TokenFormat.FP8:
        raise ValueError(f"fp8_views needs an FP8 buffer, got {layout.format.name}")
    t, h, g = layout.num_tokens, layout.hidden, layout.scale_groups
    values = _section(buf, layout.values_offset, t * h, torch.float8_e4m3fn, (t, h))
    return values, _section(buf, layout.scales_offset, 4 * t * g, torch.float32, (t, g))


def _header_tensor(layout: TokenLayout) -> torch.Tensor:
    return torch.tensor(layout.words(), dtype=torch.int32).view(torch.uint8)


# ------------------------------------------------------------------------------------------------ references


def _e2m1_code(a: torch.Tensor) -> torch.Tensor:
    """|v| -> e2m1 magnitude code 0..7, nearest with ties to the even code, saturating at 6."""
    return (
        (a > 0.25).int() + (a >= 0.75).int() + (a > 1.25).int() + (a >= 1.75).int()
        + (a > 2.5).int() + (a >= 3.5).int() + (a > 5.0).int()
    )  # fmt: skip


def _e2m1_value(code: torch.Tensor) -> torch.Tensor:
    mag, e, m = code & 7, (code & 7) >> 1, (code & 1).float()
    val = torch.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * torch.exp2((e - 1).float()))
    return torch.where(mag == 0, 0.0, torch.where(code >= 8, -val, val))


def _global_scale(x: torch.Tensor) -> torch.Tensor:
    """amax / (448 * 6) as a 0-d fp32 tensor; divided by a tensor, which CUDA divides exactly (a scalar divisor
    becomes a reciprocal multiply there)."""
    amax = (
        x.abs().reshape(-1).float().amax(0, keepdim=True).clamp_min(1e-12)[0]
        if x.numel()
        else x.new_full((), 1e-12)
    )
    return amax / amax.new_full((), E4M3_MAX * E2M1_MAX)


def encode_reference(x: torch.Tensor, fmt: TokenFormat) -> torch.Tensor:
    layout = _check(x, fmt)
    t, h = x.shape
    buf = torch.zeros(layout.nbytes, dtype=torch.uint8, device=x.device)
    buf[:HEADER_BYTES] = _header_tensor(layout).to(x.device)
    if fmt == TokenFormat.BF16:
        _section(buf, layout.values_offset, layout.values_bytes, torch.bfloat16, (t, h)).copy_(x)
    elif fmt == TokenFormat.FP8:
        q, s = act_quant_reference(x)
        values, scales = fp8_views(buf, layout)
        values.copy_(q)
        scales.copy_(s)
    else:
        g = layout.scale_groups
        xf = torch.zeros(t, g * 16, device=x.device)
        xf[:, :h] = x.float()
        gscale = _global_scale(xf)
        blocks = xf.view(t, g, 16)
        s8 = (blocks.abs().amax(-1) / (gscale * E2M1_MAX)).to(torch.float8_e4m3fn)
        denom = s8.float()[..., None] * gscale
        v = torch.where(denom > 0, blocks / torch.where(denom > 0, denom, 1.0), 0.0)
        code = _e2m1_code(v.abs()) | torch.where(v < 0, 8, 0)
        code = code.view(t, g * 16)[:, : 2 * -(-h // 2)]
        if h % 2:
            code[:, h] = 0
        packed = (code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8)
        _section(buf, layout.values_offset, layout.values_bytes, torch.uint8, packed.shape).copy_(packed)
        _section(buf, layout.scales_offset, t * g, torch.float8_e4m3fn, (t, g)).copy_(s8)
        _section(buf, layout.global_scale_offset, 4, torch.float32, (1,)).copy_(gscale.view(1))
    return buf


def decode_reference(
    buf: torch.Tensor, layout: TokenLayout, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    t, h = layout.num_tokens, layout.hidden
    if layout.format == TokenFormat.BF16:
        return _section(buf, layout.values_offset, layout.values_bytes, torch.bfloat16, (t, h)).to(dtype)
    if layout.format == TokenFormat.FP8:
        q, s = fp8_views(buf, layout)
        return (q.float() * s.repeat_interleave(128, dim=1)[:, :h]).to(dtype)
    g = layout.scale_groups
    packed = _section(buf, layout.values_offset, layout.values_bytes, torch.uint8, (t, -(-h // 2))).int()
    code = torch.stack([packed & 0xF, packed >> 4], dim=-1).view(t, 2 * packed.shape[1])[:, :h]
    s8 = _section(buf, layout.scales_offset, t * g, torch.float8_e4m3fn, (t, g)).float()
    gscale = _section(buf, layout.global_scale_offset, 4, torch.float32, (1,))
    return (_e2m1_value(code) * (s8 * gscale).repeat_interleave(16, dim=1)[:, :h]).to(dtype)


# ------------------------------------------------------------------------------------------------ kernels


@triton.jit
def _store_header(buf_ptr, w1, T, H, w4, w5, w6, w7):
    w = tl.arange(0, 8)
    vals = tl.where(w == 0, 0x4B544D4D, 0)
    vals = tl.where(w == 1, w1, vals)
    vals = tl.where(w == 2, T, vals)
    vals = tl.where(w == 3, H, vals)
    vals = tl.where(w == 4, w4, vals)
    vals = tl.where(w == 5, w5, vals)
    vals = tl.where(w == 6, w6, vals)
    vals = tl.where(w == 7, w7, vals)
    tl.store(buf_ptr.to(tl.pointer_type(tl.int32)) + w, vals)


@triton.jit
def _header_kernel(buf_ptr, w1, T, H, w4, w5, w6, w7):
    _store_header(buf_ptr, w1, T, H, w4, w5, w6, w7)


@triton.jit
def _nvfp4_encode_kernel(
    x_ptr, v_ptr, s_ptr, g_ptr, H, stride_x, row_bytes, G,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """One program per (token, BLOCK values): block scales, e2m1 codes, nibble packing."""
    row = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1) * BLOCK
    cols = c0 + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < H, other=0.0).to(tl.float32)
    gscale = tl.load(g_ptr)
    xb = tl.reshape(x, (BLOCK // 16, 16))
    amax = tl.max(tl.abs(xb), axis=1)
    s8 = tl.math.div_rn(amax, gscale * 6.0).to(tl.float8e4nv)
    grp = c0 // 16 + tl.arange(0, BLOCK // 16)
    tl.store(s_ptr + row * G + grp, s8, mask=grp < G)
    denom = s8.to(tl.float32)[:, None] * gscale
    v = tl.where(denom > 0, tl.math.div_rn(xb, tl.where(denom > 0, denom, 1.0)), 0.0)
    a = tl.abs(v)
    code = (
        (a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32) + (a >= 1.75).to(tl.int32)
        + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32)
    )  # fmt: skip
    code = code | tl.where(v < 0, 8, 0)
    code = tl.where(tl.reshape(cols, (BLOCK // 16, 16)) < H, code, 0)
    lo, hi = tl.split(tl.reshape(code, (BLOCK // 2, 2)))
    byte = c0 // 2 + tl.arange(0, BLOCK // 2)
    tl.store(v_ptr + row * row_bytes + byte, (lo | (hi << 4)).to(tl.uint8), mask=byte < row_bytes)


@triton.jit
def _nvfp4_decode_kernel(
    v_ptr, s_ptr, g_ptr, out_ptr, H, row_bytes, G, stride_o,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1) * BLOCK
    byte = c0 // 2 + tl.arange(0, BLOCK // 2)
    packed = tl.load(v_ptr + row * row_bytes + byte, mask=byte < row_bytes, other=0).to(tl.int32)
    code = tl.reshape(tl.join(packed & 0xF, packed >> 4), (BLOCK,))
    mag = code & 7
    e = mag >> 1
    m = (mag & 1).to(tl.float32)
    val = tl.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * tl.exp2((e - 1).to(tl.float32)))
    val = tl.where(code >= 8, -val, val)
    cols = c0 + tl.arange(0, BLOCK)
    scale = tl.load(s_ptr + row * G + cols // 16, mask=cols < H, other=0.0).to(tl.float32) * tl.load(g_ptr)
    tl.store(out_ptr + row * stride_o + cols, (val * scale).to(out_ptr.dtype.element_ty), mask=cols < H)


@triton.jit
def _bf16_copy_kernel(x_ptr, out_ptr, H, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + row * H + cols, tl.load(x_ptr + row * stride_x + cols, mask=cols < H), mask=cols < H)


# ------------------------------------------------------------------------------------------------ launchers


def _check(x: torch.Tensor, fmt) -> TokenLayout:
    if x.dim() != 2 or not x.is_floating_point() or x.dtype == torch.float8_e4m3fn:
        raise ValueError(f"x must be float [T, H], got {x.dtype} {tuple(x.shape)}")
    return TokenLayout(TokenFormat(fmt), x.shape[0], x.shape[1])


def encode_tokens(x: torch.Tensor, fmt: TokenFormat) -> torch.Tensor:
    """`x [T, H]` (bf16, or fp32 for FP8 / NVFP4) -> uint8 buffer of `TokenLayout(fmt, T, H).nbytes`."""
    layout = _check(x, fmt)
    if fmt == TokenFormat.BF16 and x.dtype != torch.bfloat16:
        raise ValueError(f"the BF16 format carries bf16 values exactly; got {x.dtype}")
    if not use_triton(x) or x.numel() == 0:  # nothing to quantize: the reference writes header and scale
        return encode_reference(x, fmt)
    t, h = x.shape
    buf = torch.zeros(layout.nbytes, dtype=torch.uint8, device=x.device)
    w = layout.words()
    _header_kernel[(1,)](buf, w[1], w[2], w[3], w[4], w[5], w[6], w[7])
    if x.stride(1) != 1:
        x = x.contiguous()
    if fmt == TokenFormat.BF16:
        out = _section(buf, layout.values_offset, layout.values_bytes, torch.bfloat16, (t, h))
        _bf16_copy_kernel[(t, triton.cdiv(h, 1024))](x, out, h, x.stride(0), BLOCK=1024)
    elif fmt == TokenFormat.FP8:
        values, scales = fp8_views(buf, layout)
        g = layout.scale_groups
        per_prog = min(triton.next_power_of_2(g), 8)
        _act_quant_kernel[(t, triton.cdiv(g, per_prog))](
            x, values, scales, t, h, x.stride(0), h, g, GROUP=128, GROUPS_PER_PROG=per_prog, POW2=False
        )
    else:
        g = layout.scale_groups
        gscale = _section(buf, layout.global_scale_offset, 4, torch.float32, (1,))
        gscale.copy_(_global_scale(x).view(1))
        values = _section(buf, layout.values_offset, layout.values_bytes, torch.uint8, (t, -(-h // 2)))
        scales = _section(buf, layout.scales_offset, t * g, torch.float8_e4m3fn, (t, g))
        block = min(1024, max(32, triton.next_power_of_2(h)))
        _nvfp4_encode_kernel[(t, triton.cdiv(h, block))](
            x, values, scales, gscale, h, x.stride(0), values.shape[1], g, BLOCK=block
        )
    return buf


def decode_tokens(
    buf: torch.Tensor, layout: TokenLayout | None = None, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """uint8 buffer -> `[T, H]` in `dtype`. Pass the `layout` where it is known: parsing the header syncs."""
    layout = layout or TokenLayout.from_buffer(buf)
    if buf.numel() < layout.nbytes:
        raise ValueError(f"token buffer of {buf.numel()} bytes is shorter than its layout's {layout.nbytes}")
    t, h = layout.num_tokens, layout.hidden
    if not use_triton(buf) or layout.format != TokenFormat.NVFP4 or t * h == 0:
        return decode_reference(buf, layout, dtype)
    g = layout.scale_groups
    out = torch.empty(t, h, dtype=dtype, device=buf.device)
    values = _section(buf, layout.values_offset, layout.values_bytes, torch.uint8, (t, -(-h // 2)))
    scales = _section(buf, layout.scales_offset, t * g, torch.float8_e4m3fn, (t, g))
    gscale = _section(buf, layout.global_scale_offset, 4, torch.float32, (1,))
    block = min(1024, max(32, triton.next_power_of_2(h)))
    _nvfp4_decode_kernel[(t, triton.cdiv(h, block))](
        values, scales, gscale, out, h, values.shape[1], g, out.stride(0), BLOCK=block
    )
    return out
