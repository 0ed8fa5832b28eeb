"""The one comparison helper every kernel test uses, with tolerances in one table keyed by dtype."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float
    min_cosine: float


# Keyed by the dtype the kernel computes or stores its output in.
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: Tolerance(atol=1e-4, rtol=1e-4, min_cosine=0.99999),
    torch.bfloat16: Tolerance(atol=2e-2, rtol=2e-2, min_cosine=0.9999),
    torch.float16: Tolerance(atol=2e-3, rtol=2e-3, min_cosine=0.99995),
    torch.float8_e4m3fn: Tolerance(atol=0.13, rtol=0.13, min_cosine=0.999),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, name: str = "out"):
    """Compare a kernel's output with its reference: no NaN/inf, shapes equal, abs/rel and cosine within the
    tolerance of `dtype` (default: `actual.dtype`)."""
    tol = TOLERANCES[dtype or actual.dtype]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{name}: {(~torch.isfinite(a)).sum().item()} non-finite values"
    diff = (a - e).abs()
    bound = tol.atol + tol.rtol * e.abs()
    bad = diff > bound
    assert not bad.any(), (
        f"{name}: {bad.sum().item()} of {a.numel()} values off; max abs diff {diff.max().item():.3e} "
        f"at {tuple(torch.nonzero(bad)[0].tolist())}"
    )
    if a.numel() > 1 and e.norm() > 0:
        cos = torch.nn.functional.cosine_similarity(a.flatten(), e.flatten(), dim=0).item()
        assert cos >= tol.min_cosine, f"{name}: cosine {cos:.6f} < {tol.min_cosine}"
