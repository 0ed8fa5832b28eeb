"""moemesh GPU kernels: one op per file (Triton kernel, launcher, torch reference).

CUDA tensors take the Triton kernel, CPU tensors the torch reference (see `dispatch`). Importing this package
imports triton but touches no GPU.
"""

from moemesh.kernels.fp8_quant import weight_dequant, weight_quant

__all__ = ["weight_dequant", "weight_quant"]
