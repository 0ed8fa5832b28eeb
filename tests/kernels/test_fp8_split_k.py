"""`fp8_gemm`'s split-K in one launch (the last program of each tile sums the fp32 slabs in split order) against
the two-launch form it replaced (the same slabs, summed by a second kernel): bit-identical outputs, counters
left at zero, one workspace reused by every shape and call as a model's projections reuse it."""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
import triton
import triton.language as tl

from moemesh.kernels.dispatch import interpreting
from tests.kernels.test_fp8_gemm import DEV, _a, _b

dense = importlib.import_module("moemesh.kernels.fp8_gemm")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_kernels = pytest.mark.skipif(
    DEV == "cpu" and not interpreting(), reason="runs the Triton kernel: CUDA or TRITON_INTERPRET=1"
)

# V2-Lite's FP8 GEMMs (N, K): q_proj and kv_a_proj_with_mqa stacked, o_proj, the shared experts' gate/up and
# down, the dense MLP's down (K = 10944: a partial last K step)
V2_LITE = {
    "q_kv_a": (3648, 2048),
    "o_proj": (2048, 2048),
    "shared_gate_up": (5632, 2048),
    "shared_down": (2048, 2816),
    "dense_down": (2048, 10944),
}
# the same GEMMs at an eighth of N and K (the interpreter's sizes), N and K tails kept
SMALL = {name: (n // 8, k // 8) for name, (n, k) in V2_LITE.items()}


@triton.jit
def _sum_slabs_kernel(ws_ptr, out_ptr, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """The second launch the split-K GEMM had: slab 0 + slab 1 + ... in fp32, rounded once."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * numel + offs, mask=offs < numel, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=offs < numel)


def two_launch(a, a_s, b, b_s, config: dense.TileConfig | None) -> torch.Tensor:
    """The GEMM as it ran before: the slabs (the same kernel, stopped before its reduction), then the sum."""
    m, n = a.shape[0], b.shape[0]
    out = torch.empty(m, n, dtype=torch.bfloat16, device=a.device)
    slabs = dense._launch(a, a_s, b, b_s, out, config, None, reduce=False)
    _sum_slabs_kernel[(triton.cdiv(m * n, 1024),)](slabs, out, m * n, SPLIT_K=slabs.shape[0], BLOCK=1024)
    return out


@contextlib.contextmanager
def launches():
    """The names of the Triton kernels launched inside; None on CUDA (counted under the interpreter only)."""
    from bench.launch_count import LaunchCounts, _count_triton, _Counter

    counter = _Counter(LaunchCounts())
    if not interpreting():
        yield None
        return
    with _count_triton(counter, dry=False):
        yield counter.counts.names.setdefault(counter.scope, [])


@needs_kernels
@pytest.mark.parametrize("m", [1, 8, 64])
def test_one_launch_split_k_equals_the_two_launch_sum(m):
    """Every model GEMM at batch 1, 8 and 64, K split 3 ways (the 2-step Ks leave an empty slice) through one
    shared workspace, twice: bit-identical to the two-launch sum, and the counters back at zero."""
    workspace = dense.SplitKWorkspace(min_slab=0, min_tiles=0)
    for i, (name, (n, k)) in enumerate(SMALL.items()):
        a, a_s = _a((m, k), seed=m + i)
        b, b_s = _b(1, n, k, seed=i)
        cfg = dense.pick_config(m, n)
        cfg = dense.TileConfig(
            cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages, mode=cfg.mode, split_k=3
        )
        want = two_launch(a, a_s, b[0], b_s[0], cfg)
        for _ in range(2):
            with launches() as names:
                got = dense.fp8_gemm(a, a_s, b[0], b_s[0], config=cfg, workspace=workspace)
            assert torch.equal(got, want), f"{name} at batch {m}"
            assert names is None or names == ["_fp8_gemm_kernel"]  # one launch, no sum kernel
        counts = workspace.buffers(got.device, 0, 0)[1]
        assert counts.count_nonzero().item() == 0, f"{name}: counters left at {counts.tolist()}"
    assert dense.SplitKWorkspace().buffers(got.device, 0, 0)[1].count_nonzero().item() == 0


@needs_kernels
def test_workspace_grows_and_keeps_what_it_outgrew():
    workspace = dense.SplitKWorkspace(min_slab=16, min_tiles=2)
    small, counts = workspace.buffers(torch.device(DEV), 10, 2)
    big, more = workspace.buffers(torch.device(DEV), 100, 5)
    assert (small.numel(), counts.numel(), big.numel(), more.numel()) == (16, 2, 100, 5)
    assert workspace.buffers(torch.device(DEV), 50, 3) == (big, more)  # reused while large enough
    assert len(workspace._outgrown) == 2  # a graph captured with the small ones still reads them


# ---------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("m", [1, 8, 64])
def test_gpu_one_launch_split_k_v2_lite(m):
    """V2-Lite's GEMMs with the split the H200 chooses and a forced 5-way split: bit-identical to the
    two-launch sum whatever order the programs arrive in, over repeated calls and CUDA graph replays."""
    workspace = dense.SplitKWorkspace()
    for i, (name, (n, k)) in enumerate(V2_LITE.items()):
        a, a_s = _a((m, k), seed=m + i)
        b, b_s = _b(1, n, k, seed=i)
        base = dense.pick_config(m, n)
        for split in (0, 5):
            cfg = dense.TileConfig(
                base.block_m, base.block_n, base.num_warps, base.num_stages, mode=1, split_k=split
            )
            want = two_launch(a, a_s, b[0], b_s[0], cfg)
            for _ in range(3):
                got = dense.fp8_gemm(a, a_s, b[0], b_s[0], config=cfg, workspace=workspace)
                assert torch.equal(got, want), f"{name} batch {m} split {split}"
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = dense.fp8_gemm(a, a_s, b[0], b_s[0], config=cfg, workspace=workspace)
            for _ in range(20):
                out.zero_()
                graph.replay()
                assert torch.equal(out, want), f"{name} batch {m} split {split}, graph replay"
    assert workspace.buffers(torch.device("cuda"), 0, 0)[1].count_nonzero().item() == 0
