"""Kernels compiled for an H200 (sm_90) on a CPU, through Triton's own compiler and ptxas, without a GPU: what
the interpreter cannot see (Triton's typing of loop-carried values, layouts, register limits) fails here, not in
a GPU call. The W_UV merge once reused a loop variable's name with another type; the interpreter ran it, the
H200 refused to compile it. (Not in tests/kernels: that lane runs under the interpreter, which replaces the
compiler.)"""

from __future__ import annotations

import importlib

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

H200 = GPUTarget("cuda", 90, 32)


def _compile(fn, signature: dict[str, str], constexprs: dict[str, object]):
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=H200)


@pytest.mark.parametrize("uv", [False, True])
def test_mla_decode_merge_compiles_for_sm90(uv):
    mla = importlib.import_module("moemesh.kernels.mla_decode")
    signature = {
        "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": "*bf16", "lse_ptr": "*fp32",
        "num_heads": "i32", "num_splits": "i32", "kv_lora_rank": "i32", "stride_ob": "i32", "stride_oh": "i32",
        "w_uv_ptr": "*bf16", "V": "i32", "stride_wh": "i32", "stride_wv": "i32", "BLOCK_S": "constexpr",
        "BLOCK_D": "constexpr", "UV": "constexpr", "BLOCK_V": "constexpr",
    }  # fmt: skip
    compiled = _compile(
        mla._mla_decode_merge_kernel, signature, {"BLOCK_S": 8, "BLOCK_D": 512, "UV": uv, "BLOCK_V": 16}
    )
    assert len(compiled.asm["cubin"]) > 1000
