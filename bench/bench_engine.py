"""The engine's decode step at DeepSeek-V2-Lite shapes (random BF16 / FP8 weights) against transformers'
DeepseekV3ForCausalLM with the same config on the same card, and against the memory floor of the same run.

Per decode step and batch (1, 8, 64, 256), for each MoE path (`fused`: `moemesh.model.moe_fused`, the CUDA
default; `reference`: the block's own torch path, on request) and weight dtype: `step_ms` (Engine.step end to end), `device_ms` (the
captured decode graph's replay), `host_prepare_ms` (the runner's Python side of building the step's inputs),
`launches` (kernels in one replay of the graph, from the profiler; eager forward where the profiler cannot see
inside graphs; `kernels` in the JSON lists them by name), `floor_ms` and `step_over_floor`; the transformers peer at batch 1 and 64.

* peer: transformers, eager, DynamicCache; one decode step = one forward of B new tokens after a 32-token
  prompt per sequence (median of timed steps).
* ours: `Engine.step()` end to end (schedule, batch building, CUDA-graph replay of the decode forward,
  sampling, postprocess) with B requests decoding after the same prompts, the engine built as workers build
  it (no tokenizer: the gateway detokenizes); plus the bare graph replay and the eager decode forward, to
  show where the time goes. Host time per step in three parts: `host_schedule_ms` (the scheduler's plan),
  `host_prepare_ms` (batch building), `host_after_ms` (from the sampled tokens on the host to `step()`
  returning: scheduler update, postprocess, outputs); `launch_device_sample_ms` is the rest.
* floor: bytes of weights one decode step touches (every non-expert weight, the lm_head, and the routed experts
  the step's tokens pick — 6 per MoE layer at batch 1, in expectation nearly all 64 at batch 64) plus the KV
  read, over the device-to-device copy bandwidth measured in this run (bytes read + written).

    python -m bench.bench_engine [--out DIR] [--quick] [--fp8] [--moe fused[,reference]] [--device cpu]

`--device cpu` runs a reduced form (a tiny config, batches 1 and 8, no graphs: device time is the eager forward,
launches are the profiler's torch ops) so the benchmark itself is tested on a CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.harness import copy_bandwidth_gbs, header, median_ms, print_table, save_plot, write_json

V2_LITE = dict(
    vocab_size=102400,
    hidden_size=2048,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    num_hidden_layers=27,
    num_attention_heads=16,
    num_key_value_heads=16,
    n_routed_experts=64,
    n_shared_experts=2,
    num_experts_per_tok=6,
    kv_lora_rank=512,
    q_lora_rank=None,
    qk_rope_head_dim=64,
    qk_nope_head_dim=128,
    v_head_dim=128,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    max_position_embeddings=4096,
    routed_scaling_factor=1.0,
    norm_topk_prob=False,
    bos_token_id=0,
    eos_token_id=1,
)
# the reduced form for a CPU: V2-Lite's structure at toy sizes
CPU_SHAPES = dict(
    V2_LITE, vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
    kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
)  # fmt: skip
PROMPT_LEN = 32
BATCHES = (1, 8, 64, 256)
PEER_BATCHES = (1, 64)
CPU_BATCHES = (1, 8)
TARGETS = {"floor_ratio_b1": 2.0, "floor_ratio_b64": 1.5}


def hf_config(shapes: dict = V2_LITE):
    import transformers

    return transformers.DeepseekV3Config(**shapes)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peer_step_ms(batches: tuple[int, ...], steps: int, device: str, shapes: dict) -> dict[int, float]:
    """transformers' decode step per batch size: median wall time of `steps` single-token forwards with a
    DynamicCache, after a 32-token prompt per sequence."""
    import transformers

    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = transformers.DeepseekV3ForCausalLM(hf_config(shapes)).eval()
    torch.set_default_dtype(prev)
    result = {}
    for batch in batches:
        ids = torch.randint(2, shapes["vocab_size"], (batch, PROMPT_LEN), device=device)
        times = []
        with torch.inference_mode():
            out = model(ids, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for i in range(steps + 2):
                _sync(device)
                t0 = time.perf_counter()
                out = model(nxt, past_key_values=past, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
                _sync(device)
                if i >= 2:
                    times.append((time.perf_counter() - t0) * 1e3)
        result[batch] = sorted(times)[len(times) // 2]
        del out, past
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def build_ours(fp8: bool = False, device: str = "cuda", shapes: dict = V2_LITE):
    """Our network at V2-Lite shapes with random weights: BF16, or with DeepSeek's FP8 projections and experts
    (random BF16 matrices quantized to 128x128 blocks, as an FP8 checkpoint would load)."""
    from moemesh.kernels import weight_quant
    from moemesh.model.checkpoint import build_empty
    from moemesh.model.config import ModelConfig
    from moemesh.model.fp8 import Fp8Experts, Fp8Linear

    with tempfile.TemporaryDirectory() as d:
        hf_config(shapes).save_pretrained(d)
        config = ModelConfig.from_file(Path(d) / "config.json")
    model = build_empty(config, torch.device(device), torch.bfloat16, fp8=fp8)
    gen = torch.Generator(device=device).manual_seed(0)

    def quantized_into(weight, scale_inv):
        w = torch.empty(weight.shape, dtype=torch.bfloat16, device=device).normal_(0.0, 0.02, generator=gen)
        q, s = weight_quant(w)
        weight.copy_(q)
        scale_inv.copy_(s)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dtype == torch.float8_e4m3fn or name.endswith("_scale_inv"):
                continue
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif "e_score_correction_bias" in name:
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for m in model.modules():
            if isinstance(m, Fp8Linear):
                quantized_into(m.weight, m.weight_scale_inv)
            elif isinstance(m, Fp8Experts):
                for e in range(m.num_experts):
                    quantized_into(m.w13[e], m.w13_scale_inv[e])
                    quantized_into(m.w2[e], m.w2_scale_inv[e])
    return model


def weight_bytes_per_step(model, batch: int) -> tuple[int, int]:
    """(bytes of weights a decode step of `batch` tokens reads, of which routed experts)."""
    c = model.config
    e, k = c.n_routed_experts, c.num_experts_per_tok
    expected_experts = e * (
        1 - (1 - k / e) ** batch
    )  # distinct experts hit by `batch` tokens, uniform routing
    dense, experts = 0, 0
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if name.endswith("embed_tokens.weight"):
            dense += batch * c.hidden_size * p.element_size()  # one row per token
        elif ".experts.w" in name:
            experts += int(nbytes * expected_experts / e)
        else:
            dense += nbytes
    return dense + experts, experts


def kv_bytes_per_step(model, batch: int, context: int) -> int:
    c = model.config
    return batch * context * c.num_hidden_layers * c.kv_cache_dim * 2


def build_engine(model, batches: tuple[int, ...]):
    from moemesh.config.engine import EngineConfig
    from moemesh.engine.engine import Engine

    biggest = max(batches)
    config = EngineConfig(
        page_size=64,
        max_num_seqs=biggest,
        max_num_batched_tokens=max(2048, biggest * PROMPT_LEN),  # every prompt prefilled in one step
        max_model_len=1024,
        cuda_graph_batch_sizes=tuple(sorted(set(batches))),
        kv_cache_memory_bytes=None if model.lm_head.weight.is_cuda else 64 << 20,
    )
    t0 = time.perf_counter()
    engine = Engine(model, config)  # no tokenizer, as workers build it (the gateway detokenizes)
    return engine, time.perf_counter() - t0


def set_moe_path(engine, path: str) -> None:
    """Switches the model's MoE and MLP blocks to `path` (fused: the CUDA default; reference: the block's torch
    path, the previous GPU path) and recaptures the decode graphs with it."""
    from moemesh.model.moe_fused import set_fused

    set_fused(engine.model, path == "fused")
    if engine.runner.graphs:
        engine.runner.graphs.clear()
        gc.collect()
        engine.runner.capture_decode_graphs()


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _time_ms(fn, device: str, reps: int = 3) -> float:
    if device == "cuda":
        return median_ms(fn)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _median(times)


def _decode_batch(engine, batch: int):
    """The decode forward's inputs as the last step staged them (writing nothing into the cache)."""
    from moemesh.model.batch import ForwardBatch

    s = engine.runner.decode_staging.dev if engine.runner.graphs else engine.runner.eager_staging.dev
    return ForwardBatch(
        input_ids=s["input_ids"][:batch],
        positions=s["positions"][:batch],
        query_start=tuple(range(batch + 1)),
        seq_lens=s["seq_lens"][:batch],
        page_table=s["page_table"][:batch],
        slot_mapping=torch.full((batch,), -1, dtype=torch.int64, device=s["input_ids"].device),
        logits_rows=None,
    )


def count_launches(engine, batch: int) -> tuple[int, str, dict[str, int], dict[str, float]]:
    """(kernels one decode step's forward launches, how they were counted, kernels by name — most frequent
    first, device microseconds by kernel name — none on a CPU): the profiler over one graph replay; where it sees no kernel inside the graph, over one eager
    forward; on a CPU, the torch ops of one eager forward."""
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.kv_caches[0].is_cuda
    graph = engine.runner.graphs.get(batch)
    if cuda and graph is not None:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            graph.graph.replay()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        names = _kernel_names(e.name for e in kernels)
        if names:
            return sum(names.values()), "graph replay (profiler)", names, _kernel_us(kernels)
    fwd = _decode_batch(engine, batch)
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        engine.model(fwd, engine.kv_caches)
        _sync("cuda" if cuda else "cpu")
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        names = _kernel_names(e.name for e in kernels)
        return sum(names.values()), "eager (profiler)", names, _kernel_us(kernels)
    ops = [e for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None]
    return (
        sum(_kernel_names(e.name for e in ops).values()),
        "cpu torch ops",
        _kernel_names(e.name for e in ops),
        {},
    )


def _kernel_us(kernels) -> dict[str, float]:
    """Kernel name (cut to 80 characters) -> its device microseconds summed over the profiled forward, the
    longest first: where a step's device time goes."""
    total: dict[str, float] = {}
    for e in kernels:
        total[e.name[:80]] = total.get(e.name[:80], 0.0) + e.time_range.elapsed_us()
    return {k: round(v, 1) for k, v in sorted(total.items(), key=lambda kv: -kv[1])}


def _kernel_names(names) -> dict[str, int]:
    """Kernel name (cut to 80 characters: CUTLASS names are templates) -> launches, most frequent first."""
    counts: dict[str, int] = {}
    for name in names:
        counts[name[:80]] = counts.get(name[:80], 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def ours(engine, batch: int, steps: int) -> dict:
    """Decode steps of `batch` requests after their prompts: step, device, host and launch figures."""
    from moemesh.engine.sampling_params import SamplingParams

    device = "cuda" if engine.kv_caches[0].is_cuda else "cpu"
    vocab = engine.model.config.vocab_size
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=900, ignore_eos=True)
    ids = [
        engine.add_request(torch.randint(2, vocab, (PROMPT_LEN,), generator=gen).tolist(), params)
        for _ in range(batch)
    ]
    t0 = time.perf_counter()
    engine.step()  # the prompts' prefill (one step) and the first tokens
    _sync(device)
    prefill_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(3):
        engine.step()
    times, host, sched, after = [], [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()  # ends in the sampled tokens' copy to the host: synchronous
        times.append((time.perf_counter() - t0) * 1e3)
        host.append(engine.runner.host_prepare_s * 1e3)
        sched.append(engine.host_schedule_s * 1e3)
        after.append(engine.host_after_s * 1e3)
    graph = engine.runner.graphs.get(batch)
    if graph is not None:
        device_ms, device_source = median_ms(graph.graph.replay), "graph replay"
    else:
        fwd = _decode_batch(engine, batch)
        device_ms, device_source = (
            _time_ms(lambda: engine.model(fwd, engine.kv_caches), device),
            "eager forward",
        )
    launches, launch_source, kernels, kernel_us = count_launches(engine, batch)
    context = PROMPT_LEN + 4 + steps
    for rid in ids:
        engine.abort(rid)
    return dict(
        step_ms=_median(times),
        device_ms=device_ms,
        device_source=device_source,
        host_prepare_ms=_median(host),
        host_schedule_ms=_median(sched),
        host_after_ms=_median(after),
        # the rest of a step: the forward's launch (a graph replay), the device, and the sampler up to its
        # tokens on the host (the step's one sync)
        launch_device_sample_ms=_median(
            [t - h - s - a for t, h, s, a in zip(times, host, sched, after, strict=True)]
        ),
        launches=launches,
        launch_source=launch_source,
        kernels=kernels,
        kernel_us=kernel_us,
        prefill_step_ms=prefill_ms,
        context=context,
        pages_leaked_after_abort=engine.stats()["pages_leased"],
    )


def cpu_copy_bandwidth_gbs(num_bytes: int = 64 << 20) -> float:
    src = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * num_bytes / _time_ms(lambda: dst.copy_(src), "cpu", reps=5) / 1e6


def run(args) -> dict:
    cuda = args.device == "cuda"
    shapes = V2_LITE if cuda else CPU_SHAPES
    batches = BATCHES if cuda else CPU_BATCHES
    steps = (6 if args.quick else 20) if cuda else 3
    bw_gbs = copy_bandwidth_gbs() if cuda else cpu_copy_bandwidth_gbs()
    peer_batches = tuple(b for b in PEER_BATCHES if b in batches) or batches[:1]
    peer = {} if args.skip_peer else peer_step_ms(peer_batches, 3 if args.quick else 8, args.device, shapes)
    rows, startup_s = [], {}
    for weights in ("bf16", "fp8") if args.fp8 else ("bf16",):
        model = build_ours(fp8=weights == "fp8", device=args.device, shapes=shapes)
        engine, startup_s[weights] = build_engine(model, batches)
        for path in args.moe:
            set_moe_path(engine, path)
            for b in batches:
                r = ours(engine, b, steps)
                wbytes, ebytes = weight_bytes_per_step(model, b)
                kv = kv_bytes_per_step(model, b, r["context"])
                floor_ms = (wbytes + kv) / (bw_gbs * 1e6)
                row = dict(weights=weights, moe=path, batch=b, peer_ms=peer.get(b), **r)
                row.update(weight_bytes=wbytes, expert_bytes=ebytes, kv_bytes=kv, floor_ms=floor_ms)
                row["graphs"] = sorted(engine.runner.graphs)
                row["tok_s"] = b / r["step_ms"] * 1e3
                row["speedup"] = peer[b] / r["step_ms"] if b in peer else None
                row["step_over_floor"] = r["step_ms"] / floor_ms
                row["device_over_floor"] = r["device_ms"] / floor_ms
                rows.append(row)
                print_table([row], COLUMNS)
        del model, engine
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return {
        **header(),
        "model": f"DeepSeek-V2-Lite {'shapes' if cuda else 'structure at toy sizes (CPU)'}, random weights "
        "(bf16; fp8 rows: DeepSeek FP8 blocks)",
        "config": shapes,
        "engine": "as workers build it (services/model_loading.py): no tokenizer, no detokenizing per step; "
        "each step = host_schedule + host_prepare + launch_device_sample + host_after; the columns are medians",
        "copy_bandwidth_gbs": bw_gbs,
        "engine_startup_s": startup_s,
        "peer_ms": peer,
        "targets": TARGETS,
        "rows": rows,
    }


COLUMNS = [
    "weights",
    "moe",
    "batch",
    "peer_ms",
    "step_ms",
    "device_ms",
    "host_prepare_ms",
    "host_after_ms",
    "launches",
    "floor_ms",
    "step_over_floor",
    "device_over_floor",
    "speedup",
]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="fewer timed steps (about 3 minutes on an H200)")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--fp8", action="store_true", help="also run ours with FP8 projections and experts")
    parser.add_argument(
        "--moe", default="fused", help="MoE paths to measure, comma-separated: fused (default), reference"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    args.moe = [m.strip() for m in args.moe.split(",") if m.strip()]
    bad = [m for m in args.moe if m not in ("reference", "fused")] or ([] if args.moe else ["(none)"])
    if bad:
        parser.error(f"--moe={','.join(bad)}: each path must be 'reference' or 'fused'")
    if args.device not in ("cuda", "cpu") or (args.device == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device={args.device}: must be 'cpu', or 'cuda' on a machine with a CUDA GPU")
    payload = run(args)
    rows = payload["rows"]
    name = f"bench_engine-{payload['card'].replace(' ', '_')}"
    path = write_json(name, payload, args.out)
    print(json.dumps({k: v for k, v in payload.items() if k not in ("config", "rows")}, indent=1))
    print_table(rows, COLUMNS)
    series = {}
    for weights in sorted({r["weights"] for r in rows}):
        for moe in args.moe:
            mine = [r for r in rows if r["weights"] == weights and r["moe"] == moe]
            xs = [r["batch"] for r in mine]
            series[f"Engine.step ({weights}, {moe})"] = (xs, [r["step_ms"] for r in mine])
            series[f"device ({weights}, {moe})"] = (xs, [r["device_ms"] for r in mine])
        floor = [r for r in rows if r["weights"] == weights and r["moe"] == args.moe[0]]
        series[f"memory floor ({weights})"] = ([r["batch"] for r in floor], [r["floor_ms"] for r in floor])
    if payload["peer_ms"]:
        series["transformers (bf16)"] = (list(payload["peer_ms"]), list(payload["peer_ms"].values()))
    launches = {
        f"launches ({w}, {m})": (
            [r["batch"] for r in rows if r["weights"] == w and r["moe"] == m],
            [r["launches"] for r in rows if r["weights"] == w and r["moe"] == m],
        )
        for w in sorted({r["weights"] for r in rows})
        for m in args.moe
    }
    save_plot(
        name,
        [
            dict(title=f"decode step ({payload['card']})", xlabel="batch", ylabel="ms per step", series=series, logx=True),
            dict(title="kernels per decode step", xlabel="batch", ylabel="launches", series=launches, logx=True),
        ],
        args.out,
    )  # fmt: skip
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
