"""Why the prefill worker's prefill is slower than the same prompt's prefill in a colocated worker (issue 10's
first GPU run: 1.4x-3.6x). One run that separates the candidate causes, every request recorded on its own (a
mean of three hides a first-request compile):

1. kernels: the first and second `pack_kv` of 1, 8, 32 and 64 pages of every layer (a compile shows as a slow
   first call) and the Triton variants compiled; the host syncs in one prefill forward, counted with torch's
   CUDA sync debug mode (a fresh 2048-token prompt, and a 2048-token chunk after a 2048-token prefix).
2. engine: the in-process engine with P's engine config (its share of the card), prefill-only requests, each
   request's add -> KV handoff: what P's forward costs with nothing else in the process.
3. worker: the same engine in P's `PrefillWorker` + `EngineLoop(exclusive=False)`, the KV "sent" by a device
   copy into a buffer on the same card (no UCX, no D): P's loop, hooks, packing and GIL on top of 2. Twice:
   Python's default GIL switch interval (5 ms) and 0.5 ms.
4. mesh: `moemesh up --topology pd` (and colocated), warmed as bench_mesh_gpu warms (one 32-token prompt; or
   also one prompt of each length: --mesh-warm-up shapes); each request's TTFT and `usage.ttft` spans at x1
   (D idle while P prefills) and at x32 with 1 new token (D never decodes while P prefills) and with
   --new-tokens (D decodes meanwhile: two CUDA contexts time-slice the card).

    python -m bench.bench_prefill_gap                    # CUDA: V2-Lite 8 layers BF16 (bench/results/prefill-gap.json)
    python -m bench.bench_prefill_gap --device cpu --shape tiny --layers 1 --prompt-tokens 40,72 \\
        --concurrency 3 --new-tokens 3                   # the reduced CPU form (prefill-gap-cpu.json)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from bench.bench_mesh_gpu import SPANS, Mesh, prompts
from bench.harness import header, write_json


def _stats(values: list[float]) -> dict:
    return {"first": values[0], "median": statistics.median(values), "max": max(values), "all": values}


# -- 1. kernels --------------------------------------------------------------------------------------------------


def _variants(kernel, device: int) -> int | None:
    """How many specializations of a Triton kernel this process compiled (None: this Triton keeps them
    elsewhere)."""
    try:
        return len(kernel.device_caches[device][0])
    except (AttributeError, KeyError, IndexError, TypeError):
        return None


def phase_kernels(llm) -> dict:
    from moemesh.kernels import pack_kv
    from moemesh.kernels.paged_kv import _copy_pages_kernel
    from moemesh.model.batch import ForwardBatch

    caches, dev = llm.engine.kv_caches, torch.cuda.current_device()
    packs = {}
    for n in (1, 8, 32, 64):
        ids = torch.arange(n, device="cuda")
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            pack_kv(caches, ids)
            torch.cuda.synchronize()
            times.append(1000 * (time.perf_counter() - start))
        packs[n] = {
            "first_ms": times[0],
            "second_ms": times[1],
            "variants": _variants(_copy_pages_kernel, dev),
        }
    ps = llm.engine.config.page_size
    syncs = {}
    for name, cached in (("fresh_2048", 0), ("chunk_2048_after_2048", 2048)):
        ids = [i % 4000 + 1 for i in range(2048)]
        batch = ForwardBatch.build([ids], [cached], [list(range((cached + 2048) // ps))], ps, "cuda")
        llm.model(batch, caches)  # warm
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.model(batch, caches)
        torch.cuda.synchronize()
        wall_ms = 1000 * (time.perf_counter() - start)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                llm.model(batch, caches)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        found = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
        syncs[name] = {"forward_ms": wall_ms, "host_syncs": len(found), "first": found[:3]}
    return {"pack_kv": packs, "prefill_forward": syncs}


# -- 2. engine ------------------------------------------------------------------------------------------------------


def run_engine_wave(engine, work: list[list[int]]) -> list[float]:
    """Prefill-only requests in the engine as P runs them: ms from the wave's start to each one's KV handoff."""
    from moemesh import SamplingParams

    start = time.monotonic()
    ids = [engine.add_request(p, SamplingParams(max_tokens=1), prefill_only=True) for p in work]
    done: dict[str, float] = {}
    while len(done) < len(ids):
        for out in engine.step():
            if out.kv is not None:
                done[out.request_id] = 1000 * (time.monotonic() - start)
                engine.release_handoff(out.request_id)
    return [{"ms": done[i]} for i in ids]


# -- 3. worker ------------------------------------------------------------------------------------------------------


class CopySender:
    """KV 'sent' into a buffer on the same device (what cuda_ipc does, without UCX): each chunk copied on a side
    stream once P's pack is done, its completion awaited off the event loop."""

    def __init__(self, device: torch.device) -> None:
        from moemesh.transport.kv_wire import MAX_CHUNK_BYTES

        self.dst = torch.empty(MAX_CHUNK_BYTES, dtype=torch.uint8, device=device)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    async def connect(self, address: str) -> None:
        pass

    async def send(self, target, layer, first_page, pages, num_layers=1) -> int:
        data = pages.reshape(-1).view(torch.uint8)
        if self.stream is None:
            self.dst[: data.numel()].copy_(data)
            return data.numel()
        with torch.cuda.stream(self.stream):
            self.dst[: data.numel()].copy_(data, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        await asyncio.to_thread(done.synchronize)
        return data.numel()


def run_worker(engine, waves: list[tuple[str, list[list[int]]]]) -> list[dict]:
    """Each wave through a PrefillWorker on `engine`: per request P's prefill_ms and kv_transfer_ms, and the
    wall time from the wave's start to prefill()'s return."""
    from moemesh import SamplingParams
    from moemesh.services.engine_loop import EngineLoop
    from moemesh.services.prefill.worker import PrefillWorker
    from moemesh.transport.kv import KvLayout, KvTarget, LeaseKey

    cache = engine.kv_caches[0]
    layout = KvLayout("bf16" if cache.dtype == torch.bfloat16 else "fp32", engine.config.page_size,
                      cache.shape[2] * cache.element_size(), len(engine.kv_caches))  # fmt: skip
    loop = EngineLoop(engine, exclusive=False)
    worker = PrefillWorker("bench-p", loop, CopySender(cache.device))
    worker.warm_up()
    counter = iter(range(1, 1 << 30))

    async def one(prompt, start) -> dict:
        n = next(counter)
        pages = tuple(range(-(-len(prompt) // layout.page_size)))
        target = KvTarget(f"w{n}", LeaseKey(n, 1), "bench", pages, 0, layout)
        out = await worker.prefill(prompt, SamplingParams(max_tokens=1), target)
        return {"wall_ms": 1000 * (time.monotonic() - start), "prefill_ms": out.prefill_ms,
                "kv_transfer_ms": out.kv_transfer_ms}  # fmt: skip

    async def body() -> list[dict]:
        rows = []
        async with asyncio.TaskGroup() as group:
            runner = group.create_task(loop.run())
            for label, work in waves:
                start = time.monotonic()
                rows.append({"case": label, "requests": await asyncio.gather(*(one(p, start) for p in work))})
            runner.cancel()
        return rows

    return asyncio.run(body())


# -- 4. mesh --------------------------------------------------------------------------------------------------------


def run_mesh_waves(address: str, waves: list[tuple[str, list[list[int]], int]]) -> list[dict]:
    from moemesh.sdk import AsyncClient

    async def one(client, prompt, max_tokens, start) -> dict:
        first, spans = None, None
        async for chunk in client.generate(
            token_ids=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True
        ):
            if first is None and chunk.token_ids:
                first = 1000 * (time.monotonic() - start)
            if chunk.usage is not None and chunk.usage.ttft is not None:
                spans = chunk.usage.ttft
        row = {"ttft_ms": first, "remote": bool(spans and spans.remote_prefill)}
        return {**row, **{s: getattr(spans, s) for s in SPANS}} if spans else row

    async def body() -> list[dict]:
        rows = []
        async with AsyncClient(address, timeout_s=600) as client:
            for label, work, max_tokens in waves:
                start = time.monotonic()
                got = await asyncio.gather(*(one(client, p, max_tokens, start) for p in work))
                rows.append({"case": label, "max_tokens": max_tokens, "requests": got})
        return rows

    return asyncio.run(body())


# -- the run --------------------------------------------------------------------------------------------------------


def plan(args, salt: int) -> list[tuple[str, list[list[int]], int]]:
    """(label, prompts, new tokens) per wave: x1 several times per length, then xC with 1 new token and with
    --new-tokens. `salt` makes each phase's prompts its own (no prefix-cache hit on an earlier phase's)."""
    lengths = [int(n) for n in args.prompt_tokens.split(",")]
    waves = []
    for n in lengths:
        for i in range(args.repeats if n == lengths[0] else max(1, args.repeats - 2)):
            waves.append((f"{n}x1#{i}", prompts(1, n, seed=salt + 100 * n + i), args.new_tokens))
    for n in lengths:
        for j, new_tokens in enumerate((1, args.new_tokens)):
            work = prompts(args.concurrency, n, seed=salt + 7 * n + j)
            waves.append((f"{n}x{args.concurrency}", work, new_tokens))
    return waves


def prefill_waves(args, salt: int) -> list[tuple[str, list[list[int]]]]:
    """plan()'s waves for the engine and worker phases (no decoding there: each xC wave once)."""
    return [(label, work) for label, work, new in plan(args, salt) if new == 1 or "#" in label]


def warm_prompts(args, salt: int) -> list[list[int]]:
    """One prompt of each length: the shapes of the measured waves, compiled before they are timed."""
    return [prompts(1, int(n), seed=salt * 1000 + int(n))[0] for n in args.prompt_tokens.split(",")]


def summarize(rows: list[dict]) -> list[str]:
    """Per phase and wave: median / max / first of each span over the wave's requests."""
    lines = []
    for r in rows:
        for key in ("ms", "wall_ms", "prefill_ms", "kv_transfer_ms", "ttft_ms", "handoff_ms"):
            values = [q[key] for q in r["requests"] if q.get(key) is not None]
            if values:
                lines.append(f"{r['phase']:>24} {r['case']:>10} {key:>15}: first {values[0]:8.1f}  "
                             f"median {statistics.median(values):8.1f}  max {max(values):8.1f}")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--shape", default="v2-lite")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--model", default="", help="an existing checkpoint dir instead of a made one")
    parser.add_argument("--phases", default="kernels,engine,worker,mesh")
    parser.add_argument("--modes", default="pd,colocated", help="meshes of the mesh phase")
    parser.add_argument("--prompt-tokens", default="512,4096")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="x1 waves of the first length (2 fewer after)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--mesh-warm-up", default="short", choices=("short", "shapes"),
                        help="short: one 32-token prompt as bench_mesh_gpu (a first-request cost shows in the x1 "
                        "rows); shapes: also one prompt of each length")  # fmt: skip
    parser.add_argument("--memory-fraction", type=float, default=0.45, help="the engine phases' share (P's)")
    parser.add_argument("--work", default="", help="where the checkpoint is made (default: a temp dir)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but CUDA is not available")
    phases = set(args.phases.split(","))
    if args.model:
        model = Path(args.model)
    else:
        from moemesh.make_checkpoint import shape_config, write_random_checkpoint

        model = (
            Path(args.work or tempfile.mkdtemp(prefix="moemesh-gap-")) / f"{args.shape}-{args.layers}-bf16"
        )
        if not (model / "config.json").is_file():
            write_random_checkpoint(shape_config(args.shape, args.layers), model, device=args.device)
    name = "prefill-gap" if args.device == "cuda" else "prefill-gap-cpu"
    payload = {
        **header(),
        "model": str(model),
        "shape": args.shape,
        "layers": args.layers,
        "args": vars(args),
    }
    rows: list[dict] = []

    def save(partial: bool) -> Path:
        return write_json(name, {**payload, "partial": partial, "rows": rows}, args.out)

    if phases & {"kernels", "engine", "worker"}:
        from moemesh import LLM
        from moemesh.config.engine import EngineConfig

        config = EngineConfig(gpu_memory_utilization=args.memory_fraction)
        if args.device == "cpu":
            config = EngineConfig(kv_cache_memory_bytes=64 << 20)
        llm = LLM(model, device=args.device, engine_config=config)
        if "kernels" in phases and args.device == "cuda":
            payload["kernels"] = phase_kernels(llm)
            print("kernels:", payload["kernels"], flush=True)
        if "engine" in phases:
            run_engine_wave(llm.engine, warm_prompts(args, salt=1))
            for label, work in prefill_waves(args, salt=10_000):
                rows.append({"phase": "engine", "case": label, "requests": run_engine_wave(llm.engine, work)})
            save(True)
        if "worker" in phases:
            default_interval = sys.getswitchinterval()
            for k, interval in enumerate((default_interval, 0.0005)):
                waves = [
                    ("warm", warm_prompts(args, salt=2 + k)),
                    *prefill_waves(args, salt=20_000 * (k + 1)),
                ]
                sys.setswitchinterval(interval)
                try:
                    got = run_worker(llm.engine, waves)[1:]
                finally:
                    sys.setswitchinterval(default_interval)
                rows += [{"phase": f"worker-switch{1000 * interval:g}ms", **r} for r in got]
            save(True)
        del llm
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if "mesh" in phases:
        for topology in args.modes.split(","):
            mesh = Mesh(model, topology, args.device)
            try:
                warm = prompts(1, 32, seed=5) + (
                    warm_prompts(args, salt=6) if args.mesh_warm_up == "shapes" else []
                )
                run_mesh_waves(mesh.address, [("warm", [w], 2) for w in warm])
                rows += [{"phase": f"mesh-{topology}-new{r['max_tokens']}", **r}
                         for r in run_mesh_waves(mesh.address, plan(args, salt=50_000))]  # fmt: skip
                payload[f"{topology}_prefill_fallbacks"] = mesh.fallbacks()
            finally:
                mesh.stop()
            save(True)
    payload["summary"] = summarize(rows)
    print("\n".join(payload["summary"]))
    print("wrote", save(False))


if __name__ == "__main__":
    main()
