"""`moemesh bench serve`: a load generator against a live endpoint — a moemesh gateway over gRPC (the SDK) or
an OpenAI-compatible HTTP server — reporting TTFT, ITL, TPOT and E2E latency percentiles, throughput and
goodput under SLOs, with vLLM's metric names; `--sweep` over request rates draws the latency-throughput curve.

    moemesh bench serve --target 127.0.0.1:50051 --num-prompts 200 --request-rate 8 \\
        --input-len 512 --output-len 128 --result-file results/serve.json
"""

from __future__ import annotations

import asyncio
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from moemesh.benchmark.backends import Backend, GrpcBackend, OpenAIBackend
from moemesh.benchmark.metrics import RequestResult, Slo, compute_metrics
from moemesh.benchmark.report import (
    fmt_rate,
    header,
    plot_run,
    plot_sweep,
    print_table,
    sanitize,
    write_json,
)
from moemesh.benchmark.runner import measure, run
from moemesh.benchmark.workload import (
    RequestSpec,
    SyntheticConfig,
    arrival_times_s,
    load_jsonl,
    synthetic,
)

WARMUP_REQUESTS = 4


class BenchError(Exception):
    """A run that cannot start (bad target, bad workload): the message says why."""


@dataclass(frozen=True)
class Schedule:
    """How requests arrive: at each of `request_rates` in turn (Poisson; inf = all at once), at most
    `max_concurrency` in flight (None = unbounded)."""

    request_rates: tuple[float, ...]
    max_concurrency: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.request_rates:
            raise ValueError("request_rates=() needs at least one rate")
        for rate in self.request_rates:
            if not (isinstance(rate, int | float) and rate > 0):
                raise ValueError(f"request rate {rate!r} must be > 0 (inf: all at once)")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"concurrency={self.max_concurrency} must be >= 1")


def samples_ms(results: list[RequestResult]) -> dict[str, list[float]]:
    ok = [r for r in results if r.success]
    return {
        "TTFT": [1000 * r.ttft_s for r in ok],
        "TPOT": [1000 * r.tpot_s for r in ok if r.tpot_s is not None],
        "ITL": [1000 * g for r in ok for g in r.itls_s],
        "E2E": [1000 * r.latency_s for r in ok],
    }


async def run_schedule(
    backend: Backend,
    specs: list[RequestSpec],
    schedule: Schedule,
    slo: Slo | None = None,
    progress: bool = True,
) -> list[tuple[dict, list[RequestResult]]]:
    """Every rate of the schedule in turn, after a warm-up: (metrics, per-request results) per rate.

    The warm-up sends the first WARMUP_REQUESTS prompts together, 4 new tokens each (first-use compilation and
    lazy set-up stay out of the numbers); BenchError when any fails (nothing is measured against a target that
    cannot answer)."""
    warm = await asyncio.gather(
        *(measure(backend, replace(s, output_len=min(s.output_len, 4))) for s in specs[:WARMUP_REQUESTS])
    )
    failed = [r.error for r in warm if not r.success]
    if failed:
        raise BenchError(f"the warm-up request failed: {failed[0]}")
    out = []
    for rate in schedule.request_rates:
        arrivals = arrival_times_s(len(specs), rate, schedule.seed)
        result = await run(backend, specs, arrivals, schedule.max_concurrency, progress)
        metrics = compute_metrics(result.results, result.duration_s, slo)
        errors = sorted({r.error for r in result.results if not r.success})
        metrics = {"request_rate": rate, "max_concurrency": schedule.max_concurrency, **metrics,
                   "errors": errors[:5]}  # fmt: skip
        out.append((metrics, result.results))
    return out


# --- the command ------------------------------------------------------------------------------------------


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="load-test a running endpoint: latency percentiles, throughput, goodput",
        description=__doc__.split("\n\n")[0],
    )  # fmt: skip
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", metavar="HOST:PORT", help="a moemesh gateway (gRPC, through the SDK)")
    where.add_argument("--openai-url", metavar="URL",
                       help="an OpenAI-compatible server, http://HOST:PORT[/v1]: streaming /v1/completions "
                            "with token-id prompts (needs aiohttp: pip install 'moemesh[bench]')")  # fmt: skip
    p.add_argument("--model", default="", help="model name to request (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=100, metavar="N")
    p.add_argument("--request-rate", type=float, default=math.inf, metavar="R",
                   help="Poisson arrivals at R requests/s (default inf: all at once)")  # fmt: skip
    p.add_argument("--concurrency", type=int, default=None, metavar="C", help="at most C requests in flight")
    p.add_argument("--sweep", default="", metavar="R1,R2,...",
                   help="run once per request rate (inf allowed) and draw the latency-throughput curve")  # fmt: skip
    p.add_argument("--input-len", type=int, default=512, metavar="N", help="prompt tokens (synthetic)")
    p.add_argument("--output-len", type=int, default=128, metavar="N", help="new tokens per request")
    p.add_argument("--range-ratio", type=float, default=0.0, metavar="F",
                   help="lengths uniform in [len*(1-F), len*(1+F)] (synthetic)")  # fmt: skip
    p.add_argument("--dataset", default=None, metavar="FILE.jsonl",
                   help="prompts from a file: one JSON object per line with 'prompt' or 'prompt_token_ids', "
                        "optional 'output_len'")  # fmt: skip
    p.add_argument("--vocab-size", type=int, default=None, metavar="N",
                   help="for synthetic token ids (default: asked from the server)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft-ms", type=float, default=None, metavar="MS", help="goodput: TTFT <= MS")
    p.add_argument("--slo-tpot-ms", type=float, default=None, metavar="MS", help="goodput: TPOT <= MS")
    p.add_argument("--result-file", default=None, metavar="PATH",
                   help="write the JSON here and the PNG beside it (PATH with .png)")  # fmt: skip
    p.add_argument("--name", default="serve", help="the result's `name`")
    p.add_argument("--card", default="unknown",
                   help="the server's accelerator, recorded in the JSON (the client cannot see it)")  # fmt: skip
    p.add_argument("--timeout-s", type=float, default=600.0, help="per-request deadline")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=cmd_serve)


def parse_rates(text: str) -> tuple[float, ...]:
    rates = []
    for part in text.split(","):
        try:
            rates.append(float(part))
        except ValueError:
            raise ValueError(f"--sweep: {part!r} is not a number (or inf)") from None
    return tuple(rates)


def cmd_serve(args) -> int:
    try:
        rates = parse_rates(args.sweep) if args.sweep else (args.request_rate,)
        schedule = Schedule(rates, args.concurrency, args.seed)
        slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms)
        if args.num_prompts < 1:
            raise ValueError(f"--num-prompts={args.num_prompts} must be >= 1")
        if args.dataset is None:
            synth = SyntheticConfig(
                args.num_prompts, args.input_len, args.output_len, args.range_ratio, args.seed
            )
        if args.vocab_size is not None and args.vocab_size < 1:
            raise ValueError(f"--vocab-size={args.vocab_size} must be >= 1")
        runs = asyncio.run(_serve(args, schedule, slo, None if args.dataset else synth))
    except (ValueError, OSError, BenchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = [{"label": f"rate {fmt_rate(m['request_rate'])}", **m} for m, _ in runs]
    print_table(rows)
    for m, _ in runs:
        for e in m["errors"]:
            print(f"rate {fmt_rate(m['request_rate'])}: failed request: {e}", file=sys.stderr)
    if args.result_file:
        _write_results(args, schedule, slo, runs)
    return 0 if all(m["failed"] == 0 for m, _ in runs) else 1


def _backend(args) -> Backend:
    if args.target:
        return GrpcBackend(args.target, model=args.model, timeout_s=args.timeout_s, api_key=args.api_key)
    return OpenAIBackend(args.openai_url, model=args.model, timeout_s=args.timeout_s, api_key=args.api_key)


async def _serve(args, schedule: Schedule, slo: Slo, synth: SyntheticConfig | None):
    try:
        backend = _backend(args)
    except RuntimeError as err:
        raise BenchError(str(err)) from None
    try:
        if synth is None:
            specs = load_jsonl(args.dataset, args.num_prompts, args.output_len)
        else:
            specs = synthetic(synth, await _vocab_size(backend, args.vocab_size))
        return await run_schedule(backend, specs, schedule, slo, progress=not args.no_progress)
    finally:
        await backend.aclose()


async def _vocab_size(backend: Backend, given: int | None) -> int:
    if given is not None:
        return given
    try:
        vocab = await backend.vocab_size()
    except Exception as err:  # noqa: BLE001 - any failure to reach the server is reported the same way
        raise BenchError(
            f"cannot ask the server for its vocabulary size: {type(err).__name__}: {err}"
        ) from None
    if not vocab:
        raise BenchError("the server does not report its vocabulary size: pass --vocab-size")
    return vocab


def _write_results(args, schedule: Schedule, slo: Slo, runs) -> None:
    config = {
        "endpoint": args.target or args.openai_url, "backend": "grpc" if args.target else "openai",
        "model": args.model, "num_prompts": args.num_prompts, "dataset": args.dataset,
        "input_len": None if args.dataset else args.input_len, "output_len": args.output_len,
        "range_ratio": args.range_ratio, "seed": args.seed, "request_rates": list(schedule.request_rates),
        "max_concurrency": schedule.max_concurrency, "slo_ttft_ms": slo.ttft_ms, "slo_tpot_ms": slo.tpot_ms,
    }  # fmt: skip
    metrics = runs[0][0] if len(runs) == 1 else [m for m, _ in runs]
    payload = {**header(args.name, args.card), "config": config, "metrics": metrics,
               "peer": None, "ratio": None,
               "note": "peer and ratio: none for a single endpoint; bench/bench_serve_*.py compare endpoints"}  # fmt: skip
    path = write_json(args.result_file, sanitize(payload))
    png = Path(path).with_suffix(".png")
    title = f"{config['endpoint']}, {args.num_prompts} prompts"
    if len(runs) == 1:
        drawn = plot_run(png, samples_ms(runs[0][1]), f"{title}, rate {fmt_rate(runs[0][0]['request_rate'])}")
    else:
        drawn = plot_sweep(png, {args.name: sanitize([m for m, _ in runs])}, title)
    print(f"wrote {path}" + (f" and {drawn}" if drawn else ""), file=sys.stderr)
