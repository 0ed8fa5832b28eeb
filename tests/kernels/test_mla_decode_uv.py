"""`mla_decode(..., w_uv=)`: the up-projection to the values applied in the split merge (one launch less) or by
one batched GEMM after an unsplit kernel, against the reference attention followed by the per-head GEMM."""

from __future__ import annotations

import pytest
import torch

from moemesh.kernels import mla_decode
from moemesh.kernels.mla_decode import reference
from tests.kernels.checks import assert_close
from tests.kernels.test_mla_decode import make_case

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def launched(fn):
    """(the kernels and aten ops `fn` launches, counted under the interpreter only: None on CUDA; its result)"""
    from bench.launch_count import LaunchCounts, _count_triton, _Counter
    from moemesh.kernels.dispatch import interpreting

    if not interpreting():
        return None, fn()
    counter = _Counter(LaunchCounts())
    with _count_triton(counter, dry=False), counter:
        result = fn()
    return [n for n in counter.counts.names.get(counter.scope, []) if "mla_decode" in n or "bmm" in n], result


def check_uv(seq_lens, num_heads, kv_lora_rank, rope_dim, page_size, v_dim, device, num_splits=None):
    q, kv_cache, page_table, seq = make_case(seq_lens, num_heads, kv_lora_rank, rope_dim, page_size, device)
    gen = torch.Generator().manual_seed(v_dim)
    # W_UV as the model slices it out of kv_b_proj: [H, nope + v, rank][:, nope:] (a strided view)
    kv_b = (torch.randn(num_heads, 8 + v_dim, kv_lora_rank, generator=gen) * 0.1).bfloat16().to(device)
    w_uv = kv_b[:, 8:]
    scale = (kv_lora_rank + rope_dim) ** -0.5
    names, (out, lse) = launched(
        lambda: mla_decode(
            q, kv_cache, page_table, seq, scale, kv_lora_rank, num_splits=num_splits, w_uv=w_uv
        )
    )
    latent, ref_lse = reference(q.cpu(), kv_cache.cpu(), page_table.cpu(), seq.cpu(), scale, kv_lora_rank)
    want = torch.einsum("bhd,hvd->bhv", latent.float(), w_uv.cpu().float())
    assert out.shape == (len(seq_lens), num_heads, v_dim) and out.dtype == q.dtype
    assert_close(out, want.to(out.dtype))
    live = seq.cpu() > 0
    assert_close(lse.cpu()[live], ref_lse[live], dtype=torch.bfloat16, name="lse")
    return names


@pytest.mark.parametrize(
    "num_splits, heads, path",
    [
        (3, 2, ["_mla_decode_merge_kernel"]),  # W_UV in the merge
        (3, 3, ["_mla_decode_merge_kernel", "aten.bmm.out"]),  # 9 programs > two waves of 4 SMs
        (1, 2, ["aten.bmm.out"]),  # unsplit: the batched GEMM
    ],
)
def test_w_uv_in_the_merge_or_a_batched_gemm(num_splits, heads, path):
    """v = 24: a partial last 16-row block of W_UV in the merge. On a CPU (the interpreter's nominal 4 SMs)
    batch x heads up to 8 takes the merge."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    names = check_uv([37, 0, 70], heads, 32, 16, 16, 24, device, num_splits)
    assert names is None or names == ["_mla_decode_tma_kernel", *path]  # the interpreter takes the TMA kernel


def test_w_uv_bad_shape():
    q, kv_cache, page_table, seq = make_case([5], 2, 32, 16, 16, "cpu")
    with pytest.raises(ValueError, match=r"w_uv must be \[H=2, V, kv_lora_rank=32\]"):
        mla_decode(q, kv_cache, page_table, seq, 0.1, 32, w_uv=torch.zeros(2, 8, 16, dtype=torch.bfloat16))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_splits", [None, 4])
def test_gpu_w_uv_v2_lite_shapes(num_splits):
    """V2-Lite's 16 heads, rank 512, v 128: batch 1 and 8 at a long context (split by the heuristic, or 4)."""
    check_uv([3000], 16, 512, 64, 64, 128, "cuda", num_splits)
    check_uv([900, 17, 3000, 64, 1, 555, 2048, 300], 16, 512, 64, 64, 128, "cuda", num_splits)
