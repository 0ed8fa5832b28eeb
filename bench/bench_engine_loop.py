"""The engine loop's cost on a GPU-like step, measured on a CPU: does the event loop's streaming slow the engine?

On a GPU a decode step is host work (schedule, batch inputs, launch a CUDA graph: ~0.3-0.8 ms of Python and
short GIL-releasing torch calls), then a wait for the device with the GIL released (~5.5 ms at batch 32 on an
H200, V2-Lite 8 layers). The colocated worker's event loop streams each step's outputs (per-request queues,
protobuf, the session's outbox) in the same process. When it does that during the engine thread's host work,
the two share the GIL and the launch waits: the device idles. issue 10 measured the colocated mesh's TPOT at
1.07x the in-process engine's at concurrency 32.

This bench runs that shape without a GPU: an engine whose step spends `--host-ops` short Python ops of
`--op-us` each, each followed by a GIL-releasing call (as a torch op's dispatch does), then calls
`on_launched`, then sleeps `--device-ms` (GIL released, as `.tolist()` waits for the device), driven three ways:

* alone: `step()` back to back in one thread, as `LLM.generate` / the in-process bench drive it (the peer);
* session, deliver at once: `EngineLoop(overlap=False)` and the decode service's real `Session` path
  (`DecodeServicer`: per-request tasks, `DecodeChunk` / `SessionEvent` protobufs, the outbox, one
  `SessionUpdate` per take, serialized as gRPC would) — the engine loop's CUDA behaviour before overlap;
* session, overlap: `EngineLoop(overlap=True)` (the CUDA default): a step's outputs go to the event loop once
  the next step launched.

Per mode: the wave's wall time and output tokens/s, the mean step period (engine thread), and their ratio to
alone. Writes bench/results/engine-loop-cpu.json (+ .png).

    python -m bench.bench_engine_loop                       # 32 requests x 128 tokens, ~40 s
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import time
from types import SimpleNamespace

from bench.harness import header, print_table, save_plot, write_json

_OP_BUFFER = bytes(4096)


def _hash_bytes_per_us() -> float:
    probe = bytes(1 << 20)
    start = time.perf_counter()
    for _ in range(8):
        hashlib.sha1(probe).digest()
    return 8 * len(probe) / ((time.perf_counter() - start) * 1e6)


class DeviceLikeEngine:
    """The Engine calls the decode service makes, with a step shaped like a CUDA one (see the module doc).
    Every running request gets one token per step; a request's first step also costs `prefill_ms`."""

    def __init__(
        self, host_ops: int, op_us: float, device_ms: float, prefill_ms: float, long_ops: int = 0,
        long_op_us: float = 0.0,
    ) -> None:  # fmt: skip
        self.device = SimpleNamespace(type="cuda")
        self.long_ops = long_ops
        self.long_buffer = bytes(max(4096, int(long_op_us * _hash_bytes_per_us())))
        self.host_ops, self.op_s, self.device_s, self.prefill_s = (
            host_ops,
            op_us / 1e6,
            device_ms / 1e3,
            prefill_ms / 1e3,
        )
        self.requests: dict[str, list] = {}  # id -> [tokens left, output ids]
        self.step_ends: list[float] = []
        self.step_sizes: list[int] = []  # requests per step
        self.host_s: list[float] = []  # each step's host work: from its start to its launch
        self.late_s: list[float] = []  # how late the host took the device's results back (GIL)

    @property
    def num_running(self) -> int:
        return len(self.requests)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def add_request(self, prompt_ids, params, request_id: str, output_ids=()) -> str:
        self.requests[request_id] = [params.max_tokens, [], True]
        return request_id

    def abort(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def stats(self) -> dict[str, int]:
        return {"num_running": len(self.requests), "num_waiting": 0, "pages_free": 0, "pages_cached": 0,
                "pages_total": 0}  # fmt: skip

    def step(self, on_launched=None) -> list:
        from moemesh.engine.engine import RequestOutput
        from moemesh.engine.request import FinishReason

        started = time.perf_counter()
        long_every = self.host_ops // self.long_ops if self.long_ops else 0
        for i in range(self.host_ops):  # schedule, stage, launch: Python between GIL-releasing calls
            spin_until = time.perf_counter() + self.op_s
            while time.perf_counter() < spin_until:
                pass
            # hashes over 2 KiB release the GIL, as a torch op's dispatch does; a few take longer (pinned
            # host-to-device copies, the graph launch): long enough for a waiting thread to take the GIL
            long = long_every and i % long_every == long_every - 1
            hashlib.sha1(self.long_buffer if long else _OP_BUFFER).digest()
        self.host_s.append(time.perf_counter() - started)
        if on_launched is not None:
            on_launched()
        new = sum(state[2] for state in self.requests.values())
        device_s = self.device_s + new * self.prefill_s
        slept = time.perf_counter()
        time.sleep(device_s)  # the device; the host waits with the GIL released
        self.late_s.append(time.perf_counter() - slept - device_s)  # oversleep + waiting for the GIL back
        outputs = []
        for rid, state in list(self.requests.items()):
            state[0] -= 1
            state[2] = False
            state[1].append(len(state[1]) + 1)
            done = state[0] == 0
            if done:
                del self.requests[rid]
            outputs.append(RequestOutput(rid, (state[1][-1],), tuple(state[1]), "", done,
                                         FinishReason.LENGTH if done else None))  # fmt: skip
        self.step_ends.append(time.monotonic())
        self.step_sizes.append(len(outputs))
        return outputs


def _params(new_tokens: int):
    from moemesh.engine.sampling_params import SamplingParams

    return SamplingParams(max_tokens=new_tokens, ignore_eos=True)


def run_alone(engine: DeviceLikeEngine, num_requests: int, new_tokens: int) -> dict:
    start = time.monotonic()
    for i in range(num_requests):
        engine.add_request([1], _params(new_tokens), f"r{i}")
    tokens = 0
    while engine.has_unfinished():
        tokens += len(engine.step())
    return _summary(engine, start, time.monotonic(), tokens)


def run_session(engine: DeviceLikeEngine, num_requests: int, new_tokens: int, overlap: bool) -> dict:
    from moemesh._proto.v1 import common_pb2, worker_pb2
    from moemesh.config.mesh import WorkerConfig
    from moemesh.services.decode.servicer import DecodeServicer
    from moemesh.services.decode.worker import DecodeWorker
    from moemesh.services.engine_loop import EngineLoop

    async def body() -> dict:
        loop = EngineLoop(engine, drain_s=0.0, exclusive=False, overlap=overlap)
        config = WorkerConfig(role="colocated", worker_id="bench", force_local_prefill=True)
        servicer = DecodeServicer(DecodeWorker(config, loop, None, None), max_model_len=4096)  # type: ignore[arg-type]
        runner = asyncio.ensure_future(loop.run())
        await asyncio.sleep(0)

        async def starts():
            for i in range(num_requests):
                yield worker_pb2.SessionRequest(start=worker_pb2.DecodeRequest(
                    request_id=f"r{i}", prompt_token_ids=[1, 2, 3],
                    sampling=common_pb2.SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)))  # fmt: skip

        start, tokens = time.monotonic(), 0
        try:
            async for update in servicer.Session(starts(), None):
                update.SerializeToString()  # what gRPC's write does with it
                tokens += sum(len(event.chunk.token_ids) for event in update.events)
        finally:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        return _summary(engine, start, time.monotonic(), tokens)

    return asyncio.run(body())


def _summary(engine: DeviceLikeEngine, start: float, end: float, tokens: int) -> dict:
    ends = [t for t in engine.step_ends if t >= start]
    periods = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    sizes, host_s, late_s = engine.step_sizes, engine.host_s, engine.late_s
    engine.step_ends, engine.step_sizes, engine.host_s, engine.late_s = [], [], [], []
    return {"wall_s": end - start, "out_tok_s": tokens / (end - start), "tokens": tokens,
            "step_ms": 1000 * statistics.median(periods), "mean_step_ms": 1000 * statistics.mean(periods),
            "steps": len(sizes), "first_step_requests": sizes[0],
            "host_ms": 1000 * statistics.mean(host_s), "host_p90_ms": 1000 * statistics.quantiles(host_s, n=10)[-1],
            "late_ms": 1000 * statistics.mean(late_s)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--host-ops", type=int, default=40, help="GIL-releasing calls in a step's host work")
    parser.add_argument("--op-us", type=float, default=10.0, help="Python time before each of them (µs)")
    parser.add_argument("--long-ops", type=int, default=3, help="of those calls, how many release it longer")
    parser.add_argument("--long-op-us", type=float, default=50.0, help="how long (µs)")
    parser.add_argument("--device-ms", type=float, default=5.5, help="the device's time per step")
    parser.add_argument("--prefill-ms", type=float, default=0.5, help="extra device time per new request")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    if min(args.requests, args.new_tokens, args.repeats) < 1:
        parser.error("--requests, --new-tokens and --repeats must be >= 1")

    def engine() -> DeviceLikeEngine:
        return DeviceLikeEngine(
            args.host_ops, args.op_us, args.device_ms, args.prefill_ms, args.long_ops, args.long_op_us
        )

    modes = {
        "alone": lambda: run_alone(engine(), args.requests, args.new_tokens),
        "session, deliver at once": lambda: run_session(
            engine(), args.requests, args.new_tokens, overlap=False
        ),
        "session, overlap": lambda: run_session(engine(), args.requests, args.new_tokens, overlap=True),
    }
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {name: [] for name in modes}
    for _ in range(args.repeats):  # interleaved: a busy moment of a shared box hits every mode alike
        for name, run in modes.items():
            runs[name].append(run())
    rows = []
    for name, done in runs.items():
        assert all(r["tokens"] == args.requests * args.new_tokens for r in done), done
        median = sorted(done, key=lambda r: r["wall_s"])[len(done) // 2]  # the run of median wall time
        rows.append({"mode": name, **{k: round(v, 4) for k, v in median.items()},
                     "wall_s_runs": [round(r["wall_s"], 4) for r in done]})  # fmt: skip
    peer = rows[0]
    for row in rows:
        row["tok_s_vs_alone"] = round(row["out_tok_s"] / peer["out_tok_s"], 3)
        row["step_vs_alone"] = round(row["step_ms"] / peer["step_ms"], 3)
    print_table(rows, ["mode", "wall_s", "out_tok_s", "mean_step_ms", "host_ms", "host_p90_ms", "late_ms", "steps",
                       "first_step_requests", "tok_s_vs_alone", "step_vs_alone"])  # fmt: skip
    payload = {"name": "engine-loop-cpu", **header(), "config": vars(args), "rows": rows, "peer": "alone",
               "host_load_avg_1_5_15": {"before": load_before, "after": os.getloadavg()}}  # fmt: skip
    path = write_json("engine-loop-cpu", payload, args.out_dir)
    panel = {"title": f"{args.requests} requests x {args.new_tokens} tokens, device {args.device_ms} ms/step",
             "xlabel": "step period (ms)", "ylabel": "output tok/s vs alone",
             "series": {r["mode"]: ([r["step_ms"]], [r["tok_s_vs_alone"]]) for r in rows}}  # fmt: skip
    save_plot("engine-loop-cpu", [panel], args.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
