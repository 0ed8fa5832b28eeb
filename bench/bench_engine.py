"""The engine's decode step at DeepSeek-V2-Lite shapes (random BF16 weights) against transformers'
DeepseekV3ForCausalLM with the same config on the same card, and against the memory floor of the same run.

* peer: transformers, eager, DynamicCache; one decode step = one forward of B new tokens after a 32-token
  prompt per sequence (median of timed steps).
* ours: `Engine.step()` end to end (schedule, batch building, CUDA-graph replay of the decode forward,
  sampling, postprocess) with B requests decoding after the same prompts; plus the bare graph replay and the
  eager decode forward, to show where the time goes.
* floor: bytes of weights one decode step touches (every non-expert weight, the lm_head, and the routed experts
  the step's tokens pick — 6 per MoE layer at batch 1, in expectation nearly all 64 at batch 64) plus the KV
  read, over the device-to-device copy bandwidth measured in this run (bytes read + written).

    python -m bench.bench_engine [--out DIR] [--quick]
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
PROMPT_LEN = 32
BATCHES = (1, 64)
TARGETS = {"speedup_b1": 20.0, "speedup_b64": 10.0, "floor_ratio_b1": 2.0}


def hf_config():
    import transformers

    return transformers.DeepseekV3Config(**V2_LITE)


def peer_step_ms(batches: tuple[int, ...], steps: int) -> dict[int, float]:
    """transformers' decode step per batch size: median wall time of `steps` single-token forwards with a
    DynamicCache, after a 32-token prompt per sequence."""
    import transformers

    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = transformers.DeepseekV3ForCausalLM(hf_config()).eval()
    torch.set_default_dtype(prev)
    result = {}
    for batch in batches:
        ids = torch.randint(2, V2_LITE["vocab_size"], (batch, PROMPT_LEN), device="cuda")
        times = []
        with torch.inference_mode():
            out = model(ids, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for i in range(steps + 2):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = model(nxt, past_key_values=past, use_cache=True)
                nxt = out.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
                if i >= 2:
                    times.append((time.perf_counter() - t0) * 1e3)
        result[batch] = sorted(times)[len(times) // 2]
        del out, past
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return result


def build_ours(fp8: bool = False):
    """Our network at V2-Lite shapes with random weights: BF16, or with DeepSeek's FP8 projections and experts
    (random BF16 matrices quantized to 128x128 blocks, as an FP8 checkpoint would load)."""
    from moemesh.kernels import weight_quant
    from moemesh.model.checkpoint import build_empty
    from moemesh.model.config import ModelConfig
    from moemesh.model.fp8 import Fp8Experts, Fp8Linear

    with tempfile.TemporaryDirectory() as d:
        hf_config().save_pretrained(d)
        config = ModelConfig.from_file(Path(d) / "config.json")
    model = build_empty(config, torch.device("cuda"), torch.bfloat16, fp8=fp8)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def quantized_into(weight, scale_inv):
        w = torch.empty(weight.shape, dtype=torch.bfloat16, device="cuda").normal_(0.0, 0.02, generator=gen)
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


def build_engine(model):
    from moemesh.config.engine import EngineConfig
    from moemesh.engine.engine import Engine

    config = EngineConfig(
        page_size=64,
        max_num_seqs=max(BATCHES),
        max_num_batched_tokens=2048,
        max_model_len=1024,
        cuda_graph_batch_sizes=(1, 2, 4, 8, 16, 32, 64),
    )
    t0 = time.perf_counter()
    engine = Engine(model, config)
    return engine, time.perf_counter() - t0


def ours(engine, batch: int, steps: int) -> dict:
    from moemesh.engine.sampling_params import SamplingParams
    from moemesh.model.batch import ForwardBatch

    model = engine.model
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=900, ignore_eos=True)
    ids = [
        engine.add_request(
            torch.randint(2, V2_LITE["vocab_size"], (PROMPT_LEN,), generator=gen).tolist(), params
        )
        for _ in range(batch)
    ]
    t0 = time.perf_counter()
    engine.step()  # the prompts' prefill (one step: batch * 32 <= 2048 tokens) and the first tokens
    torch.cuda.synchronize()
    prefill_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(3):
        engine.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()  # ends in the sampled tokens' copy to the host: synchronous
        times.append((time.perf_counter() - t0) * 1e3)
    step_ms = sorted(times)[len(times) // 2]
    graph = engine.runner.graphs[batch]
    replay_ms = median_ms(graph.graph.replay)
    s = engine.runner._static
    eager_batch = ForwardBatch(
        input_ids=s["input_ids"][:batch],
        positions=s["positions"][:batch],
        query_start=tuple(range(batch + 1)),
        seq_lens=s["seq_lens"][:batch],
        page_table=s["page_table"][:batch],
        slot_mapping=torch.full((batch,), -1, dtype=torch.int64, device="cuda"),  # write nothing
        logits_rows=None,
    )
    eager_ms = median_ms(lambda: model(eager_batch, engine.kv_caches))
    context = PROMPT_LEN + 4 + steps
    stats_before = engine.stats()
    for rid in ids:
        engine.abort(rid)
    leaked = engine.stats()["pages_leased"]
    result = dict(
        step_ms=step_ms,
        graph_replay_ms=replay_ms,
        eager_forward_ms=eager_ms,
        prefill_step_ms=prefill_ms,
        context=context,
        kv_pages_total=stats_before["pages_total"],
        pages_leaked_after_abort=leaked,
        memory_plan=engine.memory_plan.__dict__,
    )
    return result


def kernel_profile(engine, batch: int, top: int = 18) -> list[dict]:
    """CUDA time per kernel name of one decode forward at `batch`, run eagerly but with the experts' graph path
    (`forward_static`, the code the captured graph runs): where the graph replay's time goes."""
    from torch.profiler import ProfilerActivity, profile

    from moemesh.model.batch import ForwardBatch
    from moemesh.model.moe import LocalExperts

    s = engine.runner._static
    batch_ = ForwardBatch(
        input_ids=s["input_ids"][:batch],
        positions=s["positions"][:batch],
        query_start=tuple(range(batch + 1)),
        seq_lens=s["seq_lens"][:batch],
        page_table=s["page_table"][:batch],
        slot_mapping=torch.full((batch,), -1, dtype=torch.int64, device="cuda"),
        logits_rows=None,
    )
    sparse = LocalExperts.forward
    LocalExperts.forward = LocalExperts.forward_static
    try:
        engine.model(batch_, engine.kv_caches)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            engine.model(batch_, engine.kv_caches)
            torch.cuda.synchronize()
    finally:
        LocalExperts.forward = sparse
    rows = []
    for e in prof.key_averages():
        device_us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if device_us > 0 and e.key not in ("cudaDeviceSynchronize",):
            rows.append(dict(kernel=e.key[:70], calls=e.count, device_ms=device_us / 1e3))
    rows.sort(key=lambda r: -r["device_ms"])
    total = sum(r["device_ms"] for r in rows)
    kernels = sum(r["calls"] for r in rows)
    print(f"\nbatch {batch}: {kernels} kernels, {total:.2f} ms of device time in one eager decode forward")
    print_table(rows[:top], ["kernel", "calls", "device_ms"])
    return [dict(kernel="(total)", calls=kernels, device_ms=total)] + rows[:top]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--profile", action="store_true", help="kernel breakdown of one decode forward")
    parser.add_argument("--fp8", action="store_true", help="also run ours with FP8 projections and experts")
    args = parser.parse_args()
    steps = 8 if args.quick else 20
    bw_gbs = copy_bandwidth_gbs()
    peer = {} if args.skip_peer else peer_step_ms(BATCHES, 4 if args.quick else 8)
    rows, startup_s = [], {}
    for weights in ("bf16", "fp8") if args.fp8 else ("bf16",):
        model = build_ours(fp8=weights == "fp8")
        engine, startup_s[weights] = build_engine(model)
        for b in BATCHES:
            r = ours(engine, b, steps)
            wbytes, ebytes = weight_bytes_per_step(model, b)
            kv = kv_bytes_per_step(model, b, r["context"])
            floor_ms = (wbytes + kv) / (bw_gbs * 1e6)
            row = dict(weights=weights, batch=b, peer_ms=peer.get(b), **r)
            row.update(weight_bytes=wbytes, expert_bytes=ebytes, kv_bytes=kv, floor_ms=floor_ms)
            row["graphs"] = sorted(engine.runner.graphs)
            row["tok_s"] = b / r["step_ms"] * 1e3
            row["peer_tok_s"] = b / peer[b] * 1e3 if b in peer else None
            row["speedup"] = peer[b] / r["step_ms"] if b in peer else None
            row["step_over_floor"] = r["step_ms"] / floor_ms
            if args.profile:
                row["kernel_profile"] = kernel_profile(engine, b)
            rows.append(row)
        del model, engine
        gc.collect()
        torch.cuda.empty_cache()
    payload = {
        **header(),
        "model": "DeepSeek-V2-Lite shapes, random weights (bf16; fp8 rows: DeepSeek FP8 blocks)",
        "config": V2_LITE,
        "copy_bandwidth_gbs": bw_gbs,
        "engine_startup_s": startup_s,
        "targets": TARGETS,
        "rows": rows,
    }
    name = f"bench_engine-{payload['card'].replace(' ', '_')}"
    path = write_json(name, payload, args.out)
    print(json.dumps({k: v for k, v in payload.items() if k not in ("config", "rows")}, indent=1))
    print_table(
        rows,
        [
            "weights",
            "batch",
            "peer_ms",
            "step_ms",
            "graph_replay_ms",
            "eager_forward_ms",
            "floor_ms",
            "speedup",
            "step_over_floor",
            "tok_s",
            "peer_tok_s",
        ],
    )
    series = {}
    for weights in sorted({r["weights"] for r in rows}):
        mine = [r for r in rows if r["weights"] == weights]
        xs = [r["batch"] for r in mine]
        series[f"moemesh Engine.step ({weights})"] = (xs, [r["step_ms"] for r in mine])
        series[f"moemesh graph replay ({weights})"] = (xs, [r["graph_replay_ms"] for r in mine])
        series[f"memory floor ({weights})"] = (xs, [r["floor_ms"] for r in mine])
    if peer:
        series["transformers (bf16)"] = (list(peer), list(peer.values()))
    save_plot(
        name,
        [
            {
                "title": f"decode step, V2-Lite shapes ({payload['card']})",
                "xlabel": "batch",
                "ylabel": "ms per step",
                "series": series,
                "logx": True,
            }
        ],
        args.out,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
