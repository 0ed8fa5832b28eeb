"""The serving benchmark across deployments: the same requests at the same Poisson arrival schedule against the
in-process engine (the peer on CPU), a colocated mesh and a pd mesh (`moemesh up`, gRPC + UCX over loopback,
client through the SDK), each workload swept over request rates. Metrics as `moemesh bench serve` reports them
(vLLM's names); `ratio` = each deployment's metric / the peer's at the same rate.

* CPU (default): the demo model, 32 prompts of 64 tokens, 64 new tokens each, rates 4, 8, 16 and inf; the
  engine's default knobs on every side, one torch thread in every process (`--torch-threads`).
* CUDA (`--device cuda`): V2-Lite shapes with random weights (`--model DIR`, built there when empty; `--fp8`
  for DeepSeek FP8 blocks), colocated and pd with both processes on the one GPU (16 GB of KV each), 512-token
  prompts with 128 new tokens swept over rates, and a prefill-heavy mix; the peer is colocated.

    python -m bench.bench_serve [--device cpu|cuda] [--model demo|DIR] [--fp8] [--layers N]
        [--topologies in-process,colocated,pd] [--peer in-process] [--workload NAME:IN:OUT:N:R1/R2/...]...
        [--name serve-cpu] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moemesh.benchmark.backends import GrpcBackend
from moemesh.benchmark.metrics import Slo
from moemesh.benchmark.report import fmt_rate, header, plot_sweep, print_table, ratios, sanitize, write_json
from moemesh.benchmark.serve import Schedule, run_schedule
from moemesh.benchmark.workload import SyntheticConfig, synthetic

RESULTS = Path(__file__).resolve().parent / "results"
CPU_WORKLOADS = ("chat:64:64:32:4/8/16/inf",)
GPU_WORKLOADS = ("512in-128out:512:128:64:8/32/inf", "prefill-heavy:2048:16:32:4/inf")
GPU_KNOBS = {  # two processes on one GPU: a fixed KV pool each; UCX picks its transports (cuda_copy / ipc)
    "MOEMESH_KV_CACHE_BYTES": str(16 * 10**9),
    "MOEMESH_UCX_TRANSPORTS": "",
    "MOEMESH_UCX_NET_DEVICES": "",
    "UCX_TLS": "all",
    "UCX_NET_DEVICES": "all",
}


@dataclass(frozen=True)
class Workload:
    name: str
    synth: SyntheticConfig
    rates: tuple[float, ...]

    @staticmethod
    def parse(text: str, seed: int) -> Workload:
        try:
            name, inp, out, num, rates = text.split(":")
            return Workload(name, SyntheticConfig(int(num), int(inp), int(out), 0.0, seed),
                            tuple(float(r) for r in rates.split("/")))  # fmt: skip
        except ValueError as err:
            raise ValueError(f"--workload {text!r}: want NAME:IN:OUT:N:R1/R2/... ({err})") from None


async def _measure(make_backend, workloads: list[Workload], vocab: int) -> dict[str, list[dict]]:
    """make_backend: called inside the event loop (grpc.aio channels belong to the loop that makes them)."""
    out = {}
    backend = make_backend()
    try:
        for w in workloads:
            runs = await run_schedule(backend, synthetic(w.synth, vocab), Schedule(w.rates, None, w.synth.seed),
                                      Slo(), progress=True)  # fmt: skip
            out[w.name] = [m for m, _ in runs]
    finally:
        await backend.aclose()
    return out


def run_in_process(model: str, device: str, workloads: list[Workload]) -> dict:
    from bench.serve_in_process import InProcessBackend
    from moemesh import LLM

    llm = LLM(model, device=device)
    result = asyncio.run(_measure(functools.partial(InProcessBackend, llm), workloads, llm.config.vocab_size))
    del llm
    if device == "cuda":
        torch.cuda.empty_cache()  # the meshes that follow need the memory
    return result


def run_mesh(model: str, topology: str, device: str, workloads: list[Workload], knobs: dict,
             threads: int | None) -> dict:  # fmt: skip
    from moemesh.sdk import Client
    from tests.integration.mesh_tiny import start_mesh

    mesh = start_mesh(model, topology, knobs=knobs, device=device, timeout_s=600, torch_threads=threads)
    try:
        with Client(mesh.address) as client:
            vocab = client.models()[0].vocab_size
        result = asyncio.run(_measure(lambda: GrpcBackend(mesh.address, timeout_s=600), workloads, vocab))
        result["leased_pages_after"] = mesh.wait_settled()  # every page back in every pool: all zeros
        return result
    finally:
        code = mesh.stop()
        if code != 0:
            print(f"{topology} mesh exited {code}:\n" + "\n".join(mesh.lines[-20:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--model", default=None, help="checkpoint dir; cpu default demo, cuda: built when empty"
    )
    parser.add_argument(
        "--fp8", action="store_true", help="cuda: build the checkpoint in DeepSeek FP8 blocks"
    )
    parser.add_argument(
        "--layers", type=int, default=None, help="cuda: keep the first N of V2-Lite's 27 layers"
    )
    parser.add_argument("--topologies", default=None, help="comma-separated: in-process, colocated, pd")
    parser.add_argument("--peer", default=None, help="the deployment the ratios divide by")
    parser.add_argument("--workload", action="append", default=None, metavar="NAME:IN:OUT:N:R1/R2/...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=None, metavar="N",
                        help="torch threads of every process (in-process and each worker); cpu default 1: on a "
                             "shared or small box more threads spin in OpenMP barriers")  # fmt: skip
    parser.add_argument("--name", default=None)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    cuda = args.device == "cuda"
    topologies = (args.topologies or ("colocated,pd" if cuda else "in-process,colocated,pd")).split(",")
    peer = args.peer or topologies[0]
    if peer not in topologies:
        parser.error(f"--peer {peer!r} must be one of --topologies {topologies}")
    workloads = [
        Workload.parse(w, args.seed) for w in (args.workload or (GPU_WORKLOADS if cuda else CPU_WORKLOADS))
    ]
    name = args.name or (f"serve-{'fp8' if args.fp8 else 'bf16'}-gpu" if cuda else "serve-cpu")
    model = args.model or "demo"
    if cuda:
        from bench.serve_checkpoint import ensure

        model = str(
            ensure(Path(args.model or f"/tmp/v2-lite-{'fp8' if args.fp8 else 'bf16'}"), args.fp8, args.layers)
        )
    knobs = GPU_KNOBS if cuda else {}
    threads = args.torch_threads or (None if cuda else 1)
    if threads:
        torch.set_num_threads(threads)
    card = torch.cuda.get_device_name() if cuda else "cpu"
    meta = header(name, card)  # the load average before the run
    metrics, seconds = {}, {}
    for topology in topologies:
        start = time.monotonic()
        try:
            if topology == "in-process":
                metrics[topology] = run_in_process(model, args.device, workloads)
            else:
                metrics[topology] = run_mesh(model, topology, args.device, workloads, knobs, threads)
        except Exception as err:  # noqa: BLE001 - one failed deployment must not lose the others' numbers
            metrics[topology] = {"error": f"{type(err).__name__}: {err}"}
            print(f"{topology}: FAILED: {metrics[topology]['error']}")
        seconds[topology] = time.monotonic() - start
    report(args, meta, name, model, topologies, peer, workloads, metrics, seconds)


def report(args, meta, name, model, topologies, peer, workloads, metrics, seconds) -> None:
    ratio = {}
    for topology in topologies:
        if topology == peer or "error" in metrics[topology] or "error" in metrics[peer]:
            continue
        ratio[topology] = {w.name: [{"request_rate": m["request_rate"], **ratios(m, p)}
                                    for m, p in zip(metrics[topology][w.name], metrics[peer][w.name], strict=True)]
                           for w in workloads}  # fmt: skip
    for w in workloads:
        rows = [{"label": f"{t} @{fmt_rate(m['request_rate'])}", **m}
                for t in topologies if "error" not in metrics[t] for m in metrics[t][w.name]]  # fmt: skip
        print(
            f"\n== {w.name}: {w.synth.num_prompts} prompts of {w.synth.input_len} tokens, {w.synth.output_len} new"
        )
        print_table(rows)
    config = {"model": model, "device": args.device, "fp8_checkpoint": args.fp8, "layers": args.layers,
              "topologies": topologies, "knobs": GPU_KNOBS if args.device == "cuda" else "engine defaults",
              "torch_threads_per_process": torch.get_num_threads(), "seed": args.seed,
              "workloads": [{"name": w.name, "num_prompts": w.synth.num_prompts, "input_len": w.synth.input_len,
                             "output_len": w.synth.output_len, "request_rates": list(w.rates)} for w in workloads],
              "seconds_per_topology": seconds, "client": "SDK (grpc.aio) in this process; sampling greedy, ignore_eos"}  # fmt: skip
    load_after = [round(x, 2) for x in os.getloadavg()]
    payload = {**meta, "client_host_load_avg_after": load_after, "config": config,
               "metrics": {t: metrics[t] for t in topologies if t != peer}, "peer": {"name": peer, "metrics": metrics[peer]},
               "ratio": ratio}  # fmt: skip
    path = write_json(Path(args.out) / f"{name}.json", sanitize(payload))
    print("wrote", path)
    for i, w in enumerate(workloads):
        curves = {t: sanitize(metrics[t][w.name]) for t in topologies if "error" not in metrics[t]}
        png = Path(args.out) / (f"{name}.png" if i == 0 else f"{name}-{w.name}.png")
        title = (f"{w.name}: {w.synth.num_prompts} x ({w.synth.input_len} in, {w.synth.output_len} new), {model}, "
                 f"{meta['card']}, {meta['commit']}, load avg {meta['client_host_load_avg_1_5_15'][0]} -> "
                 f"{load_after[0]}")  # fmt: skip
        print("wrote", plot_sweep(png, curves, title))


if __name__ == "__main__":
    main()
