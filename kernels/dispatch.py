"""How an op chooses between its Triton kernel and its torch reference.

CUDA tensors take the Triton kernel. CPU tensors take the torch reference, except while Triton's interpreter is
on (`TRITON_INTERPRET=1`, read by Triton itself before it is imported): then the kernel runs on CPU tensors,
which is how CPU CI checks the kernels themselves.
"""

from __future__ import annotations

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    import triton

    return bool(triton.knobs.runtime.interpret)


def use_triton(t: torch.Tensor) -> bool:
    """Whether an op whose main input is `t` should launch its Triton kernel."""
    return t.is_cuda or (t.device.type == "cpu" and interpreting())
