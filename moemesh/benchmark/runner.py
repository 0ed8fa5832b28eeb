"""Drives one run: sends each request at its arrival time (at most `max_concurrency` in flight), timestamps
every streamed chunk, and returns what each request saw plus the run's wall time."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass

from moemesh.benchmark.backends import Backend
from moemesh.benchmark.metrics import RequestResult
from moemesh.benchmark.workload import RequestSpec


@dataclass(frozen=True)
class RunResult:
    results: list[RequestResult]  # in request order
    duration_s: float  # first send -> last completion


async def measure(backend: Backend, spec: RequestSpec) -> RequestResult:
    """One request, timed from its send; a failure is recorded in `error`, never raised."""
    result = RequestResult(prompt_len=spec.prompt_len, expected_output_len=spec.output_len)
    start = time.perf_counter()
    try:
        async for event in backend.stream(spec):
            result.add_chunk(time.perf_counter() - start, event.num_tokens)
            if event.prompt_tokens:
                result.prompt_len = event.prompt_tokens
            if event.completion_tokens is not None:
                result.output_len = event.completion_tokens
        result.latency_s = time.perf_counter() - start
        if result.output_len != spec.output_len:
            result.error = f"got {result.output_len} tokens, asked for output_len={spec.output_len}"
    except Exception as err:  # noqa: BLE001 - a failed request is a measurement, the run goes on
        result.latency_s = time.perf_counter() - start
        result.error = f"{type(err).__name__}: {err}"
    return result


async def run(
    backend: Backend,
    specs: list[RequestSpec],
    arrivals_s: list[float],
    max_concurrency: int | None = None,
    progress: bool = True,
) -> RunResult:
    if len(arrivals_s) != len(specs):
        raise ValueError(f"{len(arrivals_s)} arrival times for {len(specs)} requests")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency={max_concurrency} must be >= 1")
    bar = _progress_bar(len(specs), progress)
    limit = asyncio.Semaphore(max_concurrency or len(specs) or 1)
    results: list[RequestResult | None] = [None] * len(specs)
    start = time.perf_counter()

    async def one(i: int) -> None:
        delay = start + arrivals_s[i] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        async with limit:
            results[i] = await measure(backend, specs[i])
        if bar is not None:
            bar.update(1)

    try:
        async with asyncio.TaskGroup() as group:
            for i in range(len(specs)):
                group.create_task(one(i))
    finally:
        if bar is not None:
            bar.close()
    return RunResult([r for r in results if r is not None], time.perf_counter() - start)


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        print("(no progress bar: pip install tqdm)", file=sys.stderr)
        return None
    return tqdm(total=total, file=sys.stderr, unit="req", dynamic_ncols=True)
