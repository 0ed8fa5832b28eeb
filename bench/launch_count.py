"""Kernel launches of one decode step, per layer, counted on a CPU: attention part and MLP / MoE part.

Run under Triton's interpreter (`TRITON_INTERPRET=1`, set by `main` before anything imports triton), with the
model arranged as on CUDA (`set_fused(model, True)`: the fused MoE and MLP path): every Triton kernel our
launchers start counts one (`InterpretedFunction.run`, patched for the count), and every aten op that would
launch a CUDA kernel counts one (a `TorchDispatchMode` over the forward: views, allocations and metadata ops do
not launch; an in-place or `out=` op does). `dry=True` (the CLI's default) skips running the Triton kernels
themselves, so full V2-Lite shapes count in seconds: a decode step has no host sync, so which kernels launch
does not depend on the values they would compute. Host syncs (`aten._local_scalar_dense`, `.item()`,
`.tolist()` of a device tensor) are counted apart: a decode step should have none.

What a CPU cannot reproduce: choices made from the GPU's multiprocessor count (`mla_decode`'s split count, with
its merge launch; `fp8_gemm`'s split-K, with its sum launch) follow the CPU's nominal count here, and cuBLAS /
CUTLASS may run more than one kernel for one aten GEMM (`torch._grouped_mm` among them). `bench_engine` counts
the kernels of a CUDA graph replay with the profiler on a GPU.

    TRITON_INTERPRET=1 python -m bench.launch_count [--layers 3] [--batch 1] [--fp8] [--moe fused|reference]
        [--shapes v2-lite|tiny] [--context 64] [--run-kernels]
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# aten ops that allocate or describe tensors without launching a kernel
_NO_KERNEL = {
    "empty.memory_format",
    "empty_strided.default",
    "empty_like.default",
    "new_empty.default",
    "new_empty_strided.default",
    "lift_fresh.default",
    "set_.source_Storage_storage_offset",
}
_SYNC = {"_local_scalar_dense.default", "item.default"}


def _op_name(func) -> str:
    return func.__name__ if "." in func.__name__ else f"{func.__name__}.default"


def launches_kernel(func, args, kwargs, out) -> bool:
    """Whether an aten op would launch a CUDA kernel: it writes into an argument (in place, `out=`), or it
    returns a non-empty tensor in memory none of its inputs owns (views and a no-op `.to()` share an input's
    storage; allocations are listed apart)."""
    if _op_name(func) in _NO_KERNEL or _op_name(func) in _SYNC:
        return False
    if any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments):
        return True
    inputs = {
        t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
    }
    outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.numel()]
    return any(t.untyped_storage().data_ptr() not in inputs for t in outputs)


@dataclass
class LaunchCounts:
    """Launches and host syncs by scope: ("embed",), (layer, "attention"), (layer, "mlp"), ("head",)."""

    launches: Counter = field(default_factory=Counter)
    syncs: Counter = field(default_factory=Counter)
    names: dict = field(default_factory=dict)  # scope -> [kernel or op name, ...] in launch order

    def add(self, scope, name: str) -> None:
        self.launches[scope] += 1
        self.names.setdefault(scope, []).append(name)

    @property
    def total(self) -> int:
        return sum(self.launches.values())


class _Counter(TorchDispatchMode):
    def __init__(self, counts: LaunchCounts):
        super().__init__()
        self.counts = counts
        self.scope = ("embed",)
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.paused:
            if _op_name(func) in _SYNC:
                self.counts.syncs[self.scope] += 1
            elif launches_kernel(func, args, kwargs, out):
                self.counts.add(self.scope, f"aten.{func.__name__}")
        return out


@contextlib.contextmanager
def _count_triton(counter: _Counter, dry: bool):
    """Counts (and with `dry` skips) every Triton kernel launch while active; the interpreter's own tensor
    copies are not counted."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return None
        counter.counts.add(counter.scope, self.__name__)
        if dry:
            return None
        counter.paused += 1
        try:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            counter.paused -= 1

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = original


def _scoped(model, counter: _Counter):
    """Forward hooks that tell the counter which layer part runs."""
    handles = []
    for i, layer in enumerate(model.model.layers):

        def enter(scope):
            return lambda *_: setattr(counter, "scope", scope)

        handles.append(layer.register_forward_pre_hook(enter((i, "attention"))))
        handles.append(layer.mlp.register_forward_pre_hook(enter((i, "mlp"))))
        handles.append(layer.register_forward_hook(enter(("head",))))
    return handles


def count_decode_step(model, batch, kv_caches, dry: bool = True) -> LaunchCounts:
    """Launches of `model(batch, kv_caches)` (one decode forward, after a warm-up forward as the runner's graph
    capture has) by scope. Needs `TRITON_INTERPRET=1`."""
    from moemesh.kernels.dispatch import interpreting

    if not interpreting():
        raise RuntimeError("count_decode_step needs TRITON_INTERPRET=1 set before triton is imported")
    counts = LaunchCounts()
    counter = _Counter(counts)
    with _count_triton(_Counter(LaunchCounts()), dry):  # warm-up: once-only work (weight stacking, caches)
        model(batch, kv_caches)
    handles = _scoped(model, counter)
    try:
        with _count_triton(counter, dry), counter:
            model(batch, kv_caches)
    finally:
        for h in handles:
            h.remove()
    return counts


def decode_batch(model, batch: int, context: int, page_size: int = 64):
    """A decode batch of `batch` sequences, each with `context - 1` cached tokens and one new token, over
    per-layer caches (uninitialized: the counts do not depend on their values). -> (ForwardBatch, kv_caches)"""
    from moemesh.model.batch import ForwardBatch

    c = model.config
    pages_per_seq = -(-context // page_size)
    tables = [list(range(b * pages_per_seq, (b + 1) * pages_per_seq)) for b in range(batch)]
    fwd = ForwardBatch.build([[2]] * batch, [context - 1] * batch, tables, page_size, logits="all")
    dtype = model.model.embed_tokens.weight.dtype
    caches = [
        torch.zeros(batch * pages_per_seq, page_size, c.kv_cache_dim, dtype=dtype)
        for _ in range(c.num_hidden_layers)
    ]
    return fwd, caches


def build_model(shapes: str, layers: int, fp8: bool, moe: str, **overrides):
    """A model at `shapes` ("v2-lite", or "tiny": V2-Lite's structure at toy sizes) with `layers` layers (the
    first dense) and constant weights, arranged as on CUDA (`moe="fused"`) or on the reference path;
    `overrides` replace config fields."""
    from bench.bench_engine import CPU_SHAPES, V2_LITE, hf_config
    from moemesh.model.checkpoint import build_empty
    from moemesh.model.config import ModelConfig
    from moemesh.model.moe_fused import set_fused

    base = V2_LITE if shapes == "v2-lite" else CPU_SHAPES
    config = ModelConfig.from_dict(hf_config(dict(base, num_hidden_layers=layers, **overrides)).to_dict())
    model = build_empty(config, torch.device("cpu"), torch.bfloat16, fp8=fp8)
    with torch.no_grad():  # finite values where the forward's torch ops read them (experts are kernel-only)
        for name, p in model.named_parameters():
            if p.dtype != torch.float8_e4m3fn and ".experts." not in name:
                p.fill_(0.01 if "norm" not in name else 1.0)
    set_fused(model, moe == "fused")
    return model.eval()


def table(counts: LaunchCounts, num_layers: int) -> list[dict]:
    rows = [dict(part="embed", launches=counts.launches[("embed",)], syncs=counts.syncs[("embed",)])]
    for i in range(num_layers):
        attn, mlp = counts.launches[(i, "attention")], counts.launches[(i, "mlp")]
        syncs = counts.syncs[(i, "attention")] + counts.syncs[(i, "mlp")]
        rows.append(dict(part=f"layer {i}", attention=attn, mlp=mlp, launches=attn + mlp, syncs=syncs))
    rows.append(
        dict(part="final norm + lm_head", launches=counts.launches[("head",)], syncs=counts.syncs[("head",)])
    )
    return rows


def main(argv: list[str] | None = None) -> LaunchCounts:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=3, help="decoder layers (the first is dense)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=64, help="tokens per sequence after this step")
    parser.add_argument("--fp8", action="store_true", help="DeepSeek FP8 projections and experts")
    parser.add_argument("--moe", choices=("fused", "reference"), default="fused")
    parser.add_argument("--shapes", choices=("v2-lite", "tiny"), default="v2-lite")
    parser.add_argument("--run-kernels", action="store_true", help="run the Triton kernels (slow at v2-lite)")
    parser.add_argument("--names", action="store_true", help="list each part's launches by name")
    args = parser.parse_args(argv)
    if args.layers < 1 or args.batch < 1 or args.context < 1:
        parser.error(f"--layers={args.layers} --batch={args.batch} --context={args.context} must all be >= 1")
    model = build_model(args.shapes, args.layers, args.fp8, args.moe)
    fwd, caches = decode_batch(model, args.batch, args.context)
    counts = count_decode_step(model, fwd, caches, dry=not args.run_kernels)
    rows = table(counts, args.layers)
    print(f"{'part':<22}{'attention':>10}{'mlp/moe':>9}{'launches':>10}{'syncs':>7}")
    for r in rows:
        print(
            f"{r['part']:<22}{r.get('attention', ''):>10}{r.get('mlp', ''):>9}{r['launches']:>10}{r['syncs']:>7}"
        )
    print(f"{'total':<22}{'':>10}{'':>9}{counts.total:>10}{sum(counts.syncs.values()):>7}")
    if args.names:
        for scope, names in counts.names.items():
            print(scope, ", ".join(names))
    return counts


if __name__ == "__main__":
    main()
