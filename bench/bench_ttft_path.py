"""Where a lone request's TTFT goes between the client and the worker's engine (issue 10: the colocated mesh's
TTFT was 30.9 ms on the H200 against 22.2 ms in process, with the worker's own queue + prefill at 24.7 ms).

A colocated mesh (`moemesh up`, tiny model on CPU by default, or `--model DIR --device cuda`) gets `--requests`
requests one at a time, `max_tokens=1`. Per request, on one host's wall clock (every process reads the same
`time.time_ns()`): the client's send and first chunk; from the gateway's trace view (`/traces/{id}?format=json`)
its arrival, its first token and D's `decode.first_token` span (D's arrival -> the first token out of
`DecodeWorker.generate`); from `usage.ttft` D's queue and prefill. The hops, medians over the requests:

    client<->gateway  the client's send -> the gateway's servicer has it, plus its first token's way back
    gateway->decode   the gateway (validate, route, session write) -> D's servicer has it
    decode: queue     D's arrival -> the engine took the request (usage.ttft.queue_ms; the gathering wait)
    decode: prefill   the engine took it -> its first output reached D's event loop (usage.ttft.prefill_ms)
    decode: rest      what else decode.first_token holds (protobufs, tasks)
    decode->gateway   D's first token out -> the gateway has it
    outside_engine    TTFT - queue - prefill: everything but the engine

    python -m bench.bench_ttft_path [--requests 60] [--prompt-tokens 32] [--max-tokens 1] [--spans] [--json]
                                    [--model DIR --device cuda]

This box (or the GPU host) may be loaded: compare runs made side by side, and read the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.harness import header, print_table, write_json

HOPS = ("client_gateway_both", "gateway_to_decode", "queue", "prefill", "decode_rest", "decode_to_gateway",
        "ttft", "outside_engine")  # fmt: skip


def fetch_trace(http_port: int, request_id: str) -> dict:
    url = f"http://127.0.0.1:{http_port}/traces/{request_id}?format=json"
    deadline = time.monotonic() + 10
    while True:  # D's spans reach the gateway's view shortly after the request ends
        with urllib.request.urlopen(url, timeout=10) as reply:
            trace = json.load(reply)
        if any(s["name"] == "decode.first_token" for s in trace["spans"]) or time.monotonic() > deadline:
            return trace
        time.sleep(0.05)


def hops(sent_ns: int, first_ns: int, trace: dict, ttft) -> dict[str, float]:
    """ms per hop of one request (see the module's docstring). Spans' start/end are ms after the gateway's
    arrival; the trace's own start is whole ms only, so the client's two hops are given as one."""
    d = next(s for s in trace["spans"] if s["name"] == "decode.first_token")
    total_ms = (first_ns - sent_ns) / 1e6
    gw_first_ms = trace["ttft_ms"]  # the gateway's arrival -> its first token
    return {
        "client_gateway_both": total_ms - gw_first_ms,
        "gateway_to_decode": d["start_ms"],
        "queue": ttft.queue_ms,
        "prefill": ttft.prefill_ms,
        "decode_rest": (d["end_ms"] - d["start_ms"]) - ttft.queue_ms - ttft.prefill_ms,
        "decode_to_gateway": gw_first_ms - d["end_ms"],
        "ttft": total_ms,
        "outside_engine": total_ms - ttft.queue_ms - ttft.prefill_ms,
    }


async def drive(
    address: str,
    http_port: int,
    prompts: list[list[int]],
    warmup: int,
    max_tokens: int,
    show: bool,
    traced: bool = True,
) -> list[dict[str, float]]:
    from moemesh.sdk import AsyncClient

    rows = []
    async with AsyncClient(address, timeout_s=120) as client:
        for i, prompt in enumerate(prompts):
            rid = f"ttft-{i}"
            sent_ns, first_ns, usage = time.time_ns(), 0, None
            async for chunk in client.generate(token_ids=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True,
                                               request_id=rid):  # fmt: skip
                first_ns = first_ns or time.time_ns()
                usage = chunk.usage or usage
            if i < warmup:
                continue
            assert usage is not None and usage.ttft is not None, "no usage.ttft on the last chunk"
            if not traced:  # TTFT and the engine's part only
                total_ms = (first_ns - sent_ns) / 1e6
                engine_ms = usage.ttft.queue_ms + usage.ttft.prefill_ms
                rows.append({"queue": usage.ttft.queue_ms, "prefill": usage.ttft.prefill_ms, "ttft": total_ms,
                             "outside_engine": total_ms - engine_ms})  # fmt: skip
                continue
            trace = await asyncio.to_thread(fetch_trace, http_port, rid)
            rows.append(hops(sent_ns, first_ns, trace, usage.ttft))
            if show and i == len(prompts) - 1:
                print(
                    f"the last request's spans (ms after the gateway's arrival; client TTFT {rows[-1]['ttft']:.3f}):"
                )
                for span in trace["spans"]:
                    print(
                        f"  {span['name']:20s} {span['worker']:12s} {span['start_ms']:8.3f} {span['end_ms']:8.3f}"
                    )
                print(f"  gateway first token at {trace['ttft_ms']} ms")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument(
        "--max-tokens", type=int, default=1, help="new tokens per request (TTFT is the first)"
    )
    parser.add_argument("--spans", action="store_true", help="print the last request's spans")
    parser.add_argument("--no-tracing", action="store_true",
                        help="the mesh with tracing off (MOEMESH_TRACE_BUFFER=0): TTFT, queue and prefill only")  # fmt: skip
    parser.add_argument("--model", default="", help="a checkpoint dir (default: the tiny test model, built)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="write bench/results/ttft_path-<device>.json")
    args = parser.parse_args()

    from tests.integration.mesh_tiny import TINY_ENV, build_tiny, start_mesh

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else build_tiny(Path(tmp) / "tiny")
        knobs = (
            {}
            if args.model
            else {**TINY_ENV, "MOEMESH_MAX_NUM_BATCHED_TOKENS": str(max(64, args.prompt_tokens))}
        )
        if args.no_tracing:
            knobs["MOEMESH_TRACE_BUFFER"] = "0"
        mesh = start_mesh(model, "colocated", knobs=knobs, device=args.device, timeout_s=600)
        try:
            prompts = [
                [(7 * i + j) % 250 + 1 for j in range(args.prompt_tokens)] for i in range(args.requests)
            ]
            rows = asyncio.run(
                drive(
                    mesh.address,
                    mesh.http_port,
                    prompts,
                    args.warmup,
                    args.max_tokens,
                    args.spans,
                    not args.no_tracing,
                )  # fmt: skip
            )
        finally:
            mesh.stop()
    medians = {h: statistics.median(r[h] for r in rows) for h in HOPS if h in rows[0]}
    print_table([{"hop": h, "median_ms": v} for h, v in medians.items()], ["hop", "median_ms"])
    if args.json:
        payload = {**header(), "config": vars(args), "requests": len(rows), "median_ms": medians, "rows": rows,
                   "host_load_avg_1_5_15": os.getloadavg()}  # fmt: skip
        print(write_json(f"ttft_path-{args.device}", payload))


if __name__ == "__main__":
    main()
