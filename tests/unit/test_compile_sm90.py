"""Every launched Triton kernel of kernels/ compiled for an H200 (sm_90) on a CPU, through Triton's own compiler
and ptxas, without a GPU: what the interpreter cannot see (Triton's typing of loop-carried values, layouts,
register limits, TMA descriptors) fails here, not in a GPU call. The W_UV merge once reused a loop variable's
name with another type; the interpreter ran it, the H200 refused to compile it. (Not in tests/kernels: that lane
runs under the interpreter, which replaces the compiler.)

The arguments are the launch sites' own: each case calls the op's public function on CPU tensors of DeepSeek-V2-
Lite's sizes with Triton's launch replaced by a recorder (nothing runs), then specializes the recorded arguments
as `JITFunction.run` does on the GPU (dtypes, 16-byte divisibility, integers equal to 1, tensor descriptors,
constexprs, num_warps / num_stages) and compiles that for sm_90. Cases pick the constexpr branches with their
own code paths (FP8 / BF16, split / single, TMA / not, W_UV, split-K, masked / contiguous, shared experts...).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import itertools
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

if triton.knobs.runtime.interpret:
    pytest.skip("compiles with Triton's compiler: under TRITON_INTERPRET the kernels are interpreter functions",
                allow_module_level=True)  # fmt: skip

import moemesh.kernels as K  # noqa: E402  (every kernel module imported before the recorder turns on)
from moemesh.kernels.fp8_gemm import pick_config  # noqa: E402
from moemesh.kernels.mla_decode import default_config  # noqa: E402
from moemesh.kernels.mla_prefill import PrefillConfig, Prefix  # noqa: E402
from moemesh.kernels.moe_grouped_gemm import moe_grouped_gemm  # noqa: E402
from moemesh.kernels.paged_kv import fp8_row_bytes  # noqa: E402
from moemesh.kernels.token_format import encode_reference  # noqa: E402

H200 = GPUTarget("cuda", 90, 32)
H200_SMS = 132
mla_decode_module = sys.modules["moemesh.kernels.mla_decode"]  # the package's `mla_decode` is the function
KERNELS_DIR = Path(__file__).resolve().parents[2] / "kernels"
BF16, FP32, FP8 = torch.bfloat16, torch.float32, torch.float8_e4m3fn

# constexprs that hold `interpreting()` (an fp32 fallback for the interpreter): False on the H200 for the bf16 /
# fp8 inputs driven here, and the recorder runs with the interpreter flag on so that the ops take their Triton
# paths on CPU tensors
INTERPRETER_SWITCHES = {
    "mla_decode._mla_decode_tma_kernel": "F32",
    "mla_decode._mla_decode_split_kernel": "COMPUTE_FP32",
    "mla_prefill._mla_prefill_tma_kernel": "F32",
    "mla_prefill._mla_prefill_kernel": "COMPUTE_FP32",  # compute_fp32 = interpreting() or q fp32
    "moe_grouped_gemm._grouped_kernel": "F32",
}


@dataclass
class Launch:
    fn: JITFunction
    args: tuple
    kwargs: dict

    @property
    def kernel(self) -> str:
        """`file.name` of the kernel's definition in kernels/."""
        return f"{self.fn.module.rsplit('.', 1)[-1]}.{self.fn.__name__}"


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Ops take their Triton paths on CPU tensors (the interpreter flag, as tests/kernels run them) while
    `kernel[grid](...)` records its arguments instead of running anything."""
    launches: list[Launch] = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    mp = pytest.MonkeyPatch()
    mp.setattr(triton.knobs.runtime, "interpret", True)
    mp.setattr(mla_decode_module, "_num_sms", lambda device: H200_SMS)  # its W_UV-in-merge choice reads it
    mp.setattr(JITFunction, "run", record)
    try:
        yield launches
    finally:
        mp.undo()


def specialize(launch: Launch) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) that `JITFunction.run` compiles on an sm_90 device for these
    arguments."""
    fn, kwargs = launch.fn, dict(launch.kwargs)
    switch = INTERPRETER_SWITCHES.get(launch.kernel)
    if switch is not None:
        kwargs[switch] = False
    backend = make_backend(H200)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options.__dict__


# ---------------------------------------------------------------------------------------------------------
# drivers: one op call each, DeepSeek-V2-Lite sizes (hidden 2048, 16 heads, kv_lora_rank 512, rope 64,
# qk_nope 128, v 128, 64 routed experts of 1408, top-6, 2 shared, vocab 102400)
# ---------------------------------------------------------------------------------------------------------
HIDDEN, HEADS, RANK, ROPE, NOPE, VDIM = 2048, 16, 512, 64, 128, 128
EXPERTS, TOPK, INTER, SHARED, VOCAB = 64, 6, 1408, 2, 102400


def _fp8(*shape):
    return torch.zeros(*shape, dtype=FP8)


def _scales(*shape):
    return torch.ones(*shape, dtype=FP32)


def _decode(fp8: bool, splits: int, uv: bool = False, tma: bool = True, lazy: bool = False):
    batch, page, pages = 4, 64, 8
    q = torch.zeros(batch, HEADS, RANK + ROPE, dtype=BF16)
    row = fp8_row_bytes(RANK, ROPE) if fp8 else RANK + ROPE
    cache = torch.zeros(batch * pages, page, row, dtype=torch.uint8 if fp8 else BF16)
    if fp8:
        cache = cache.view(FP8)
    table = torch.arange(batch * pages, dtype=torch.int32).view(batch, pages)
    lens = torch.full((batch,), page * pages, dtype=torch.int32)
    cfg = dataclasses.replace(default_config(HEADS, RANK, fp8), tma=tma, lazy_rescale=lazy)
    w_uv = torch.zeros(HEADS, VDIM, RANK, dtype=BF16) if uv else None
    K.mla_decode(q, cache, table, lens, 0.1, RANK, num_splits=splits, config=cfg, w_uv=w_uv)


def _prefill(tma: bool, prefix: bool):
    lens = [37, 100]
    t = sum(lens)
    cu = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)
    q = torch.zeros(t, HEADS, NOPE + ROPE, dtype=BF16)
    k = torch.zeros(t, HEADS, NOPE + ROPE, dtype=BF16)
    v = torch.zeros(t, HEADS, VDIM, dtype=BF16)
    pre = None
    if prefix:
        pre = Prefix(
            torch.zeros(30, HEADS, NOPE + ROPE, dtype=BF16),
            torch.zeros(30, HEADS, VDIM, dtype=BF16),
            torch.tensor([0, 10, 30], dtype=torch.int32),
        )
    cfg = PrefillConfig(tma=tma)
    K.mla_prefill(q, k, v, cu, 0.1, max(lens), prefix=pre, config=cfg)


def _merge_states():
    t = 64
    K.merge_attn_states(
        torch.zeros(t, HEADS, VDIM, dtype=BF16),
        torch.zeros(t, HEADS),
        torch.zeros(t, HEADS, VDIM, dtype=BF16),
        torch.zeros(t, HEADS),
    )


def _gemm(m: int, n: int, k: int, split_k: int = 0):
    cfg = dataclasses.replace(pick_config(m, n), split_k=split_k)  # 0: by occupancy (one split on a CPU)
    K.fp8_gemm(
        _fp8(m, k),
        _scales(m, math.ceil(k / 128)),
        _fp8(n, k),
        _scales(math.ceil(n / 128), math.ceil(k / 128)),
        config=cfg,
    )


def _grouped(kind: str):
    rows = 4 * EXPERTS
    offsets = torch.arange(0, rows + 1, 4, dtype=torch.int32)
    n, k = (2 * INTER, HIDDEN) if kind != "down" else (HIDDEN, INTER)
    a, a_s = _fp8(rows, k), _scales(rows, math.ceil(k / 128))
    b, b_s = _fp8(EXPERTS, n, k), _scales(EXPERTS, math.ceil(n / 128), math.ceil(k / 128))
    if kind == "silu_quant":
        K.fp8_grouped_gemm_silu_quant(a, a_s, b, b_s, offsets)
    elif kind == "masked":
        counts = torch.full((EXPERTS,), 4, dtype=torch.int32)
        K.fp8_grouped_gemm_masked(
            _fp8(EXPERTS, 16, k), _scales(EXPERTS, 16, math.ceil(k / 128)), b, b_s, counts
        )
    else:
        K.fp8_grouped_gemm(a, a_s, b, b_s, offsets)


def _moe_gemm(silu: bool):
    rows = 4 * EXPERTS
    offsets = torch.arange(0, rows + 1, 4, dtype=torch.int32)
    n, k = (2 * INTER, HIDDEN) if silu else (HIDDEN, INTER)
    moe_grouped_gemm(
        torch.zeros(rows, k, dtype=BF16), torch.zeros(EXPERTS, n, k, dtype=BF16), offsets, silu_mul=silu
    )


def _permute(fp8: bool, masked: bool, shared: int, tokens: int):
    x = _fp8(tokens, HIDDEN) if fp8 else torch.zeros(tokens, HIDDEN, dtype=BF16)
    scale = _scales(tokens, HIDDEN // 128) if fp8 else None
    ids = (torch.arange(tokens * TOPK, dtype=torch.int32) % EXPERTS).view(tokens, TOPK)
    K.moe_permute(x, ids, EXPERTS, x_scale=scale, max_m=tokens if masked else None, num_shared=shared)


def _combine(shared_out: bool, num_shared: int):
    t = 8
    rows = t * (TOPK + num_shared)
    K.moe_combine(
        torch.zeros(rows, HIDDEN, dtype=BF16),
        torch.ones(t, TOPK),
        torch.arange(rows, dtype=torch.int64),
        shared=torch.zeros(t, HIDDEN, dtype=BF16) if shared_out else None,
        num_shared=num_shared,
    )


V2_ROUTE = dict(
    num_experts_per_tok=TOPK,
    n_routed_experts=EXPERTS,
    scoring_func="softmax",
    topk_method="greedy",
    norm_topk_prob=False,
)
V3_ROUTE = dict(
    num_experts_per_tok=8, n_routed_experts=256, n_group=8, topk_group=4, routed_scaling_factor=2.5
)


def _route(v3: bool):
    cfg = K.RouteConfig(**(V3_ROUTE if v3 else V2_ROUTE))
    e = cfg.n_routed_experts
    bias = torch.zeros(e) if v3 else None
    K.moe_route(torch.zeros(8, e), cfg, e_score_correction_bias=bias)


def _route_gemm(v3: bool):
    cfg = K.RouteConfig(**(V3_ROUTE if v3 else V2_ROUTE))
    e, hidden = cfg.n_routed_experts, 7168 if v3 else HIDDEN
    bias = torch.zeros(e) if v3 else None
    K.moe_route_gemm(
        torch.zeros(4, hidden, dtype=BF16),
        torch.zeros(e, hidden, dtype=BF16),
        cfg,
        e_score_correction_bias=bias,
        counters=K.route_counters("cpu"),
    )


def _store(fp8: bool, extras: bool):
    t, pages, page = 4, 8, 64
    row = fp8_row_bytes(RANK, ROPE) if fp8 else RANK + ROPE
    cache = torch.zeros(pages, page, row, dtype=torch.uint8 if fp8 else BF16)
    if fp8:
        cache = cache.view(FP8)
    tables = K.RopeTables(torch.arange(t), torch.zeros(4096, ROPE // 2), torch.zeros(4096, ROPE // 2))
    ex = None
    if extras:
        q_pe = torch.zeros(t, HEADS, NOPE + ROPE, dtype=BF16)[..., NOPE:]
        ex = K.StoreExtras(norm_weight=torch.ones(RANK, dtype=BF16), q_pe=q_pe, q_out=torch.zeros_like(q_pe))
    K.store_kv(
        cache,
        torch.zeros(t, RANK, dtype=BF16),
        torch.zeros(t, ROPE, dtype=BF16),
        torch.arange(t, dtype=torch.int64),
        rope=tables if extras else None,
        extras=ex,
    )


def _pages(pack: bool):
    cache = [torch.zeros(8, 64, RANK + ROPE, dtype=BF16) for _ in range(3)]
    ids = torch.tensor([1, 4, 6], dtype=torch.int64)
    if pack:
        K.pack_kv(cache, ids)
    else:
        K.unpack_kv(torch.zeros(3, 3, 64, RANK + ROPE, dtype=BF16), cache, ids)


def _norm(residual: bool, fp32: bool = False, fp8: bool = False):
    x = torch.zeros(8, HIDDEN, dtype=BF16)
    res = torch.zeros(8, HIDDEN, dtype=BF16) if residual else None
    K.rms_norm_outputs(x, torch.ones(HIDDEN, dtype=BF16), 1e-6, res, fp32=fp32, fp8=fp8)


def _rope():
    q = torch.zeros(8, HEADS, ROPE, dtype=BF16)
    K.rope(q, torch.arange(8), torch.zeros(4096, ROPE // 2), torch.zeros(4096, ROPE // 2))


def _sample(penalties: bool):
    b = 4
    logits = torch.zeros(b, VOCAB)
    params = K.SamplingTensors.filled(b, temperature=0.7, top_p=0.9)
    counts = torch.zeros(b, VOCAB, dtype=torch.int32) if penalties else None
    prompt = torch.zeros(b, VOCAB, dtype=torch.bool) if penalties else None
    K.sample(logits, params, counts, prompt)


def _encode(fmt):
    K.encode_tokens(torch.zeros(8, HIDDEN, dtype=BF16), fmt)


def _nvfp4_decode():
    buf = encode_reference(torch.zeros(8, HIDDEN, dtype=BF16), K.TokenFormat.NVFP4)
    K.decode_tokens(buf, K.TokenLayout(K.TokenFormat.NVFP4, 8, HIDDEN))


@dataclass(frozen=True)
class Case:
    """`drive` launches `kernel` with (at least once) the constexprs in `expect`: the variant's code path."""

    kernel: str
    variant: str
    drive: Callable[[], None]
    expect: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"{self.kernel}-{self.variant}"


F = K.TokenFormat
CASES = [
    Case("mla_decode._mla_decode_tma_kernel", "bf16-split", lambda: _decode(False, 4), dict(FP8=False, SINGLE=False)),
    Case("mla_decode._mla_decode_tma_kernel", "bf16-single", lambda: _decode(False, 1), dict(FP8=False, SINGLE=True)),
    Case("mla_decode._mla_decode_tma_kernel", "fp8-split", lambda: _decode(True, 4), dict(FP8=True, SINGLE=False)),
    Case("mla_decode._mla_decode_tma_kernel", "fp8-single", lambda: _decode(True, 1), dict(FP8=True, SINGLE=True)),
    Case("mla_decode._mla_decode_tma_kernel", "bf16-lazy", lambda: _decode(False, 4, lazy=True), dict(LAZY=True)),
    Case("mla_decode._mla_decode_split_kernel", "bf16-split", lambda: _decode(False, 4, tma=False), dict(FP8=False, SINGLE=False)),
    Case("mla_decode._mla_decode_split_kernel", "fp8-single", lambda: _decode(True, 1, tma=False), dict(FP8=True, SINGLE=True)),
    Case("mla_decode._mla_decode_merge_kernel", "latent", lambda: _decode(False, 4), dict(UV=False, BLOCK_D=RANK)),
    Case("mla_decode._mla_decode_merge_kernel", "uv", lambda: _decode(False, 4, uv=True), dict(UV=True, BLOCK_D=RANK)),
    Case("mla_prefill._mla_prefill_tma_kernel", "chunk", lambda: _prefill(True, False), dict(HAS_PREFIX=False)),
    Case("mla_prefill._mla_prefill_tma_kernel", "prefix", lambda: _prefill(True, True), dict(HAS_PREFIX=True)),
    Case("mla_prefill._mla_prefill_kernel", "chunk", lambda: _prefill(False, False), dict(HAS_PREFIX=False)),
    Case("mla_prefill._mla_prefill_kernel", "prefix", lambda: _prefill(False, True), dict(HAS_PREFIX=True)),
    Case("mla_prefill._merge_kernel", "v128", _merge_states, dict(BLOCK_DV=VDIM)),
    Case("fp8_gemm._fp8_gemm_kernel", "prefill", lambda: _gemm(512, 2048, 2048), dict(EVEN_K=True, SPLIT_K=1, BLOCK_M=128)),
    Case("fp8_gemm._fp8_gemm_kernel", "decode", lambda: _gemm(4, 2048, 10944), dict(EVEN_K=False, SPLIT_K=1)),
    Case("fp8_gemm._fp8_gemm_kernel", "split-k", lambda: _gemm(4, 2048, 10944, split_k=8), dict(SPLIT_K=8)),
    Case("fp8_grouped_gemm._grouped_contiguous_kernel", "gemm", lambda: _grouped("down"), dict(SILU_QUANT=False)),
    Case("fp8_grouped_gemm._grouped_contiguous_kernel", "silu-quant", lambda: _grouped("silu_quant"), dict(SILU_QUANT=True)),
    Case("fp8_grouped_gemm._grouped_masked_kernel", "gemm", lambda: _grouped("masked")),
    Case("fp8_quant._weight_quant_kernel", "bf16", lambda: K.weight_quant(torch.zeros(2 * INTER, HIDDEN, dtype=BF16))),
    Case("fp8_quant._act_quant_kernel", "bf16", lambda: K.act_quant(torch.zeros(8, HIDDEN, dtype=BF16)), dict(POW2=False)),
    Case("fp8_quant._act_quant_kernel", "pow2", lambda: K.act_quant(torch.zeros(8, HIDDEN, dtype=BF16), scale_pow2=True),
         dict(POW2=True)),
    Case("moe_grouped_gemm._grouped_kernel", "silu", lambda: _moe_gemm(True), dict(SILU=True)),
    Case("moe_grouped_gemm._grouped_kernel", "down", lambda: _moe_gemm(False), dict(SILU=False)),
    Case("moe_permute._histogram_kernel", "v2", lambda: _permute(False, False, 0, 512)),
    Case("moe_permute._position_kernel", "contiguous", lambda: _permute(False, False, 0, 512), dict(MASKED=False)),
    Case("moe_permute._position_kernel", "masked", lambda: _permute(True, True, 0, 512), dict(MASKED=True)),
    Case("moe_permute._copy_rows_kernel", "bf16", lambda: _permute(False, False, 0, 512)),
    Case("moe_permute._copy_rows_kernel", "fp8", lambda: _permute(True, False, 0, 512)),
    Case("moe_permute._permute_small_kernel", "bf16-shared", lambda: _permute(False, False, SHARED, 4),
         dict(HAS_SCALE=False, MASKED=False)),
    Case("moe_permute._permute_small_kernel", "fp8-masked", lambda: _permute(True, True, 0, 4), dict(HAS_SCALE=True, MASKED=True)),
    Case("moe_permute._combine_kernel", "routed", lambda: _combine(False, 0), dict(HAS_SHARED=False, S=0)),
    Case("moe_permute._combine_kernel", "shared-out", lambda: _combine(True, 0), dict(HAS_SHARED=True)),
    Case("moe_permute._combine_kernel", "shared-slots", lambda: _combine(False, SHARED), dict(S=SHARED)),
    Case("moe_route._route_kernel", "v2-softmax", lambda: _route(False), dict(V3=False, GROUPED=False)),
    Case("moe_route._route_kernel", "v3-grouped", lambda: _route(True), dict(V3=True, GROUPED=True, HAS_BIAS=True)),
    Case("moe_route_gemm._route_gemm_kernel", "v2-softmax", lambda: _route_gemm(False), dict(V3=False, GROUPED=False)),
    Case("moe_route_gemm._route_gemm_kernel", "v3-grouped", lambda: _route_gemm(True), dict(V3=True, GROUPED=True)),
    Case("paged_kv._store_kv_kernel", "bf16", lambda: _store(False, False), dict(FP8=False, ROPE=False, NORM=False)),
    Case("paged_kv._store_kv_kernel", "fp8-fused", lambda: _store(True, True), dict(FP8=True, ROPE=True, NORM=True, Q_ROPE=True)),
    Case("paged_kv._copy_pages_kernel", "pack", lambda: _pages(True), dict(HAS_SRC_IDS=True, HAS_DST_IDS=False)),
    Case("paged_kv._copy_pages_kernel", "unpack", lambda: _pages(False), dict(HAS_SRC_IDS=False, HAS_DST_IDS=True)),
    Case("rms_norm._rms_norm_kernel", "plain", lambda: _norm(False), dict(HAS_RESIDUAL=False, QUANT=False, F32=False)),
    Case("rms_norm._rms_norm_kernel", "residual-fp8", lambda: _norm(True, fp8=True), dict(HAS_RESIDUAL=True, QUANT=True)),
    Case("rms_norm._rms_norm_kernel", "residual-fp32", lambda: _norm(True, fp32=True), dict(HAS_RESIDUAL=True, F32=True)),
    Case("rope._rope_kernel", "bf16", _rope),
    Case("sample._segment_kernel", "plain", lambda: _sample(False), dict(HAS_COUNTS=False, HAS_PROMPT=False)),
    Case("sample._segment_kernel", "penalties", lambda: _sample(True), dict(HAS_COUNTS=True, HAS_PROMPT=True)),
    Case("sample._finish_kernel", "plain", lambda: _sample(False), dict(HAS_COUNTS=False, HAS_PROMPT=False)),
    Case("sample._finish_kernel", "penalties", lambda: _sample(True), dict(HAS_COUNTS=True, HAS_PROMPT=True)),
    Case("silu_mul._silu_mul_kernel", "bf16", lambda: K.silu_mul(torch.zeros(8, 2 * INTER, dtype=BF16)), dict(QUANT=False)),
    Case("silu_mul._silu_mul_kernel", "quant", lambda: K.silu_mul_quant(torch.zeros(8, 2 * INTER, dtype=BF16)),
         dict(QUANT=True)),
    Case("token_format._header_kernel", "fp8", lambda: _encode(F.FP8)),
    Case("token_format._bf16_copy_kernel", "bf16", lambda: _encode(F.BF16)),
    Case("fp8_quant._act_quant_kernel", "tokens-fp8", lambda: _encode(F.FP8)),
    Case("token_format._nvfp4_encode_kernel", "nvfp4", lambda: _encode(F.NVFP4)),
    Case("token_format._nvfp4_decode_kernel", "nvfp4", _nvfp4_decode),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kernel_compiles_for_sm90(case):
    with recording() as launches:
        case.drive()
    mine = [x for x in launches if x.kernel == case.kernel]
    assert mine, f"{case.id}: the op launched {[x.kernel for x in launches]}, not {case.kernel}"
    chosen = [x for x in mine if all(x.kwargs.get(k) == v for k, v in case.expect.items())]
    assert chosen, f"{case.id}: no launch with {case.expect}, got {[x.kwargs for x in mine]}"
    variants = {}  # one compile per distinct specialization (per-layer launches repeat)
    for launch in chosen:
        spec = specialize(launch)
        variants.setdefault(repr(spec), (launch.fn, *spec))
    for fn, signature, constexprs, attrs, options in variants.values():
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=H200, options=options)
        assert compiled.metadata.target.arch == 90
        assert len(compiled.asm["cubin"]) > 1000, f"{case.id}: no cubin for {constexprs}"


def _launch_calls() -> Iterator[tuple[str, ast.Call]]:
    """(`file.name` where the kernel is defined, call) of every `name[grid](...)` in kernels/."""
    for path in KERNELS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            call = isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
            if call and isinstance(node.func.value, ast.Name):
                fn = getattr(sys.modules[f"moemesh.kernels.{path.stem}"], node.func.value.id)
                yield f"{fn.module.rsplit('.', 1)[-1]}.{fn.__name__}", node


def test_every_launched_kernel_has_a_case():
    """A new kernel in kernels/ needs a case above, or this lane would silently not compile it."""
    missing = {name for name, _ in _launch_calls()} - {c.kernel for c in CASES}
    assert not missing, f"no sm_90 compile case for {sorted(missing)}"


def test_interpreter_switches_are_known():
    """A constexpr set from `interpreting()` at a launch is True while recording; the H200 compiles it False."""
    for name, call in _launch_calls():
        for kw in call.keywords:
            if "interpreting()" in ast.unparse(kw.value):
                assert INTERPRETER_SWITCHES.get(name) == kw.arg, (
                    f"{name}: add {kw.arg} to INTERPRETER_SWITCHES"
                )
