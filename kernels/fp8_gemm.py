"""FP8 block-scaled GEMM, DeepSeek-V3's linear layer: `out[M, N] = (a * a_scale) @ (b * b_scale_inv).T` in BF16.

* `a_fp8 [M, K]` float8_e4m3fn with `a_scale fp32 [M, ceil(K/128)]` (1x128 groups, from `act_quant`);
* `b_fp8 [N, K]` float8_e4m3fn with `b_scale_inv fp32 [ceil(N/128), ceil(K/128)]` (128x128 blocks, the
  checkpoint layout from `weight_quant`).

Any M (1 included), N and K (no multiple of 128 needed). Each 128-wide K step runs one FP8 tensor-core product
into a fresh fp32 tile, which is scaled by `a_scale[m] * b_scale_inv[n//128]` and added to the fp32 accumulator
(DeepSeek's "promotion"); the result is rounded to BF16 once. `_scaled_tile` is shared with the grouped GEMMs.

Decode-sized M leaves most multiprocessors idle with one program per output tile, so K is split over
programs (`_split_k`, from the GPU's multiprocessor count). Split-K stays one launch and deterministic (a
"serial" reduction, as CUTLASS's split-K with a semaphore, but by the last program to arrive): each program
writes its fp32 slab, counts itself in at its tile's counter (an atomic), and the last of the tile's programs
sums the slabs in split order, writes the BF16 tile and zeroes the counter. Slabs and counters persist in a
`SplitKWorkspace` its owner hands in, so CUDA graphs replay the GEMM with no memset.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moemesh.kernels.dispatch import use_triton

SCALE_BLOCK = 128


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    mode: int = 0  # _scaled_tile's MODE (1 needs block_n == 128)
    split_k: int = 0  # fp8_gemm only: K slices, summed by their last program; 0 = by occupancy


def pick_config(m: int, n: int) -> TileConfig:
    """Tile shape by rows per group (fixed rather than autotuned: the grouped GEMMs build their tile map with
    it). Chosen by `bench.bench_fp8_gemm --sweep` on an H200 (bench/results)."""
    if m <= 16:
        return TileConfig(16, 128, 4, 5, mode=1)
    if m <= 256:
        return TileConfig(64, 128, 4, 4, mode=1)
    return TileConfig(128, 128, 8, 3, mode=1)


@triton.jit
def _load_step(
    a_rows, b_cols, as_rows, bs_cols, row_ok, col_ok, kb, K, stride_ask, EVEN_K: tl.constexpr,
):  # fmt: skip
    """One 128-wide K step: a [BM, 128], b [128, BN] fp8 and the outer product of their scales [BM, BN]."""
    k = kb * 128 + tl.arange(0, 128)
    if EVEN_K:
        a = tl.load(a_rows + k[None, :], mask=row_ok[:, None], other=0.0)
        b = tl.load(b_cols + k[:, None], mask=col_ok[None, :], other=0.0)
    else:
        a = tl.load(a_rows + k[None, :], mask=row_ok[:, None] & (k[None, :] < K), other=0.0)
        b = tl.load(b_cols + k[:, None], mask=col_ok[None, :] & (k[:, None] < K), other=0.0)
    a_s = tl.load(as_rows + kb * stride_ask, mask=row_ok, other=1.0)
    b_s = tl.load(bs_cols + kb, mask=col_ok, other=1.0)
    return a, b, a_s[:, None] * b_s[None, :]


@triton.jit
def _scaled_tile(
    a_ptr, as_ptr, b_ptr, bs_ptr, offs_m, offs_n, row_ok, col_ok, K,
    stride_am, stride_as, stride_ask, stride_bn, stride_bs,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr = 0,
    kb_lo=0, kb_hi=-1,
):  # fmt: skip
    """fp32 [BLOCK_M, BLOCK_N] = sum over 128-wide K steps of (a @ b.T) * a_scale * b_scale, over the steps
    kb_lo .. kb_hi - 1 (default: all; split-K programs take a slice).
    a_ptr / as_ptr point at row 0 of this group's A and its scales, b_ptr / bs_ptr at its B and B's scales.

    Each step's product lands in a fresh fp32 tile, scaled into the accumulator (DeepSeek's promotion).
    MODE 0: any BLOCK_N; the [BM, BN] outer product of the scales is formed each step.
    MODE 1: BLOCK_N == 128 only; one B scale per step, scales prefetched a step ahead.
    (Tried on an H200 and dropped: issuing step k+1's product before promoting step k, and keeping the accumulator
    in scale units rescaled before an in-place product; both ran 3-20x slower.)"""
    a_rows = a_ptr + offs_m[:, None].to(tl.int64) * stride_am
    b_cols = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn
    as_rows = as_ptr + offs_m.to(tl.int64) * stride_as
    bs_cols = bs_ptr + (offs_n // 128) * stride_bs
    if kb_hi < 0:
        kb_hi = tl.cdiv(K, 128)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if MODE == 0:
        for kb in range(kb_lo, kb_hi):
            a, b, s = _load_step(a_rows, b_cols, as_rows, bs_cols, row_ok, col_ok, kb, K, stride_ask, EVEN_K)
            acc += tl.dot(a, b) * s
    else:
        # BLOCK_N == 128 tiles start on a scale block: one B scale per step, so the promotion scales by a
        # vector; both scales are loaded a step ahead, their latency hidden behind the product
        bs_tile = bs_ptr + (tl.min(offs_n, axis=0) // 128) * stride_bs
        first = tl.maximum(tl.minimum(kb_lo, kb_hi - 1), 0)  # an empty K slice must not read past its row
        a_s_next = tl.load(as_rows + first * stride_ask, mask=row_ok, other=1.0)
        b_s_next = tl.load(bs_tile + first)
        for kb in range(kb_lo, kb_hi):
            a_s, b_s = a_s_next, b_s_next
            nxt = tl.minimum(kb + 1, kb_hi - 1)
            a_s_next = tl.load(as_rows + nxt * stride_ask, mask=row_ok, other=1.0)
            b_s_next = tl.load(bs_tile + nxt)
            a, b, _ = _load_step(a_rows, b_cols, as_rows, bs_cols, row_ok, col_ok, kb, K, stride_ask, EVEN_K)
            acc += tl.dot(a, b) * (a_s * b_s)[:, None]
    return acc


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, ws_ptr, count_ptr, M, N, K,
    stride_am, stride_as, stride_ask, stride_bn, stride_bs, stride_cm,
    EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    MODE: tl.constexpr, SPLIT_K: tl.constexpr, REDUCE: tl.constexpr = True,
):  # fmt: skip
    """SPLIT_K > 1: program (tile, s) sums its slice of the K steps into fp32 slab s of the workspace
    ([SPLIT_K, M, N] at ws_ptr), then counts itself in at the tile's counter; the last of the tile's SPLIT_K
    programs to arrive sums the slabs in split order (the order whatever arrival order: deterministic), writes
    the BF16 tile and zeroes the counter for the next GEMM. REDUCE=False stops after the slabs (the tests'
    two-step oracle)."""
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row tiles walk the N tiles together, so B tiles are reused from L2
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = offs_m < M, offs_n < N
    num_k = tl.cdiv(K, 128)
    split = tl.program_id(1)
    per_split = tl.cdiv(num_k, SPLIT_K)
    kb_lo = split * per_split
    kb_hi = tl.minimum(kb_lo + per_split, num_k)
    acc = _scaled_tile(
        a_ptr, as_ptr, b_ptr, bs_ptr, offs_m, offs_n, row_ok, col_ok, K,
        stride_am, stride_as, stride_ask, stride_bn, stride_bs, EVEN_K, BLOCK_M, BLOCK_N, MODE, kb_lo, kb_hi,
    )  # fmt: skip
    mask = row_ok[:, None] & col_ok[None, :]
    c = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask)
    else:
        tile = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]  # this tile in one [M, N] slab
        tl.store(ws_ptr + split.to(tl.int64) * M * N + tile, acc, mask=mask)
        if REDUCE:
            # every thread's slab stores precede the arrival (one thread's gpu-scope release)
            tl.debug_barrier()
            arrived = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:
                total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for s in tl.static_range(SPLIT_K):  # L2 reads (.cg): the other programs' slabs
                    total += tl.load(ws_ptr + s * M * N + tile, mask=mask, other=0.0, cache_modifier=".cg")
                tl.store(c, total.to(c_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(count_ptr + pid, 0, sem="relaxed", scope="gpu")  # ready for the next GEMM


def check_operands(a_fp8, a_scale, b_fp8, b_scale_inv, grouped: bool = False) -> tuple[int, int]:
    """Validate an FP8 GEMM's operands; returns (N, K). `grouped`: B carries a leading expert dimension."""
    lead = 1 if grouped else 0
    if a_fp8.dtype != torch.float8_e4m3fn or b_fp8.dtype != torch.float8_e4m3fn:
        raise ValueError(f"a_fp8 and b_fp8 must be float8_e4m3fn, got {a_fp8.dtype} and {b_fp8.dtype}")
    if b_fp8.dim() != 2 + lead:
        raise ValueError(f"b_fp8 must be {'[E, N, K]' if grouped else '[N, K]'}, got {tuple(b_fp8.shape)}")
    n, k = b_fp8.shape[-2:]
    if a_fp8.shape[-1] != k:
        raise ValueError(f"a_fp8 {tuple(a_fp8.shape)} and b_fp8 {tuple(b_fp8.shape)} disagree on K")
    want_as = (*a_fp8.shape[:-1], -(-k // SCALE_BLOCK))
    if tuple(a_scale.shape) != want_as or a_scale.dtype != torch.float32:
        raise ValueError(f"a_scale is {a_scale.dtype} {tuple(a_scale.shape)}, expected float32 {want_as}")
    want_bs = (*b_fp8.shape[:-2], -(-n // SCALE_BLOCK), -(-k // SCALE_BLOCK))
    if tuple(b_scale_inv.shape) != want_bs or b_scale_inv.dtype != torch.float32:
        raise ValueError(
            f"b_scale_inv is {b_scale_inv.dtype} {tuple(b_scale_inv.shape)}, expected float32 {want_bs}"
        )
    devices = {t.device for t in (a_fp8, a_scale, b_fp8, b_scale_inv)}
    if len(devices) != 1:
        raise ValueError(f"operands on several devices: {sorted(map(str, devices))}")
    return n, k


def _checked(cfg: TileConfig) -> TileConfig:
    if cfg.mode == 1 and cfg.block_n != 128:
        raise ValueError(f"{cfg}: mode 1 needs block_n == 128 (one B scale block per tile)")
    return cfg


def dequant_rows(x_fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 [..., K] from 1x128-group FP8 values and their scales [..., ceil(K/128)]."""
    k = x_fp8.shape[-1]
    return x_fp8.float() * scale.repeat_interleave(SCALE_BLOCK, dim=-1)[..., :k]


def dequant_blocks(w_fp8: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """fp32 [..., N, K] from 128x128-block FP8 values and their scales [..., ceil(N/128), ceil(K/128)]."""
    n, k = w_fp8.shape[-2:]
    s = scale_inv.repeat_interleave(SCALE_BLOCK, dim=-2)[..., :n, :]
    return w_fp8.float() * s.repeat_interleave(SCALE_BLOCK, dim=-1)[..., :k]


def reference(a_fp8, a_scale, b_fp8, b_scale_inv) -> torch.Tensor:
    """fp32 matmul of the dequantized operands, rounded to BF16."""
    check_operands(a_fp8, a_scale, b_fp8, b_scale_inv)
    return (dequant_rows(a_fp8, a_scale) @ dequant_blocks(b_fp8, b_scale_inv).T).to(torch.bfloat16)


class SplitKWorkspace:
    """The split-K GEMMs' fp32 slabs and per-tile arrival counters, one pair per device, reused by every GEMM
    that is handed this workspace. The owner (a model: `moemesh.model.fp8.to_fp8` gives one to all its FP8
    projections) runs those GEMMs one at a time (one stream at a time, as the runner's warm-up, capture and
    replays do): two GEMMs that may run concurrently must not share one. The counters are zeroed once, here,
    and each GEMM's last program leaves its tiles' counters at zero again, so a CUDA graph replays the GEMMs
    without a memset. Buffers outgrown by a larger GEMM stay allocated (a graph captured earlier still reads
    them); the first allocation covers the decode sizes at once."""

    MIN_SLAB = 1 << 20  # fp32 elements: every decode-sized split of a 132-SM GPU (<= 132 * 64 * 128)
    MIN_TILES = 1024

    def __init__(self, min_slab: int = MIN_SLAB, min_tiles: int = MIN_TILES) -> None:
        self.min_slab, self.min_tiles = min_slab, min_tiles
        self._slabs: dict[torch.device, torch.Tensor] = {}
        self._counts: dict[torch.device, torch.Tensor] = {}
        self._outgrown: list[torch.Tensor] = []

    def buffers(self, device: torch.device, slab: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(fp32 [>= slab], int32 [>= tiles] zeros) on `device`."""
        ws, counts = self._slabs.get(device), self._counts.get(device)
        if ws is None or ws.numel() < slab:
            self._outgrown += [] if ws is None else [ws]
            ws = torch.empty(max(slab, self.min_slab), dtype=torch.float32, device=device)
            self._slabs[device] = ws
        if counts is None or counts.numel() < tiles:
            self._outgrown += [] if counts is None else [counts]
            counts = torch.zeros(max(tiles, self.min_tiles), dtype=torch.int32, device=device)
            self._counts[device] = counts
        return ws, counts


def fp8_gemm(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    b_fp8: torch.Tensor,
    b_scale_inv: torch.Tensor,
    *,
    config: TileConfig | None = None,
    workspace: SplitKWorkspace | None = None,
) -> torch.Tensor:
    """BF16 [M, N] = block-scaled `a @ b.T` (layouts in the module docstring). Any M, including 1 and 0.
    `config` overrides the tile shape (benchmarks sweep it). `workspace`: where a split-K GEMM keeps its slabs
    and counters (`SplitKWorkspace`); without one a split-K call allocates its own (one memset more)."""
    if a_fp8.dim() != 2:
        raise ValueError(f"a_fp8 must be [M, K], got {tuple(a_fp8.shape)}")
    n, k = check_operands(a_fp8, a_scale, b_fp8, b_scale_inv)
    if not use_triton(a_fp8):
        return reference(a_fp8, a_scale, b_fp8, b_scale_inv)
    m = a_fp8.shape[0]
    out = torch.empty(m, n, dtype=torch.bfloat16, device=a_fp8.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    return _launch(a_fp8, a_scale, b_fp8, b_scale_inv, out, config, workspace)


def _launch(a_fp8, a_scale, b_fp8, b_scale_inv, out, config, workspace, reduce=True):
    """One launch into `out`; reduce=False (split-K only) returns the unsummed fp32 slabs [split, M, N]."""
    (m, k), n = a_fp8.shape, out.shape[1]
    a_fp8, b_fp8 = a_fp8.contiguous(), b_fp8.contiguous()
    b_scale_inv = b_scale_inv.contiguous()  # a_scale may be K-major or M-major (coalesced per K step)
    cfg = _checked(config or pick_config(m, n))
    tiles = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    split_k = (
        _split_k(tiles, -(-k // 128), a_fp8.device)
        if config is None or config.split_k == 0
        else config.split_k
    )
    # split-K: fp32 slabs in the workspace, summed by the last program of each tile (module docstring)
    if split_k == 1:
        ws = counts = out  # not read
    else:  # without a workspace, one for this call alone, no larger than it needs
        workspace = workspace or SplitKWorkspace(min_slab=0, min_tiles=0)
        ws, counts = workspace.buffers(out.device, split_k * m * n, tiles)
    _fp8_gemm_kernel[(tiles, split_k)](
        a_fp8, a_scale, b_fp8, b_scale_inv, out, ws, counts, m, n, k,
        a_fp8.stride(0), a_scale.stride(0), a_scale.stride(1), b_fp8.stride(0), b_scale_inv.stride(0), n,
        EVEN_K=k % 128 == 0, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, GROUP_M=cfg.group_m, MODE=cfg.mode,
        SPLIT_K=split_k, REDUCE=reduce, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out if reduce else ws[: split_k * m * n].view(split_k, m, n)


def _split_k(tiles: int, k_steps: int, device: torch.device) -> int:
    """Split K when the output tiles alone would leave most multiprocessors idle (decode-sized M)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    if tiles * 2 > sms or k_steps < 8:
        return 1
    return max(1, min(sms // tiles, k_steps // 4, 16))
