"""The model runner: keeps what it knows of each request, turns a `SchedulerOutput` into forward batches, runs
the model over the paged latent cache and samples.

A step runs as at most two forwards: the rows with one new token (decodes, and one-token prefill tails) take
the absorbed decode path together — on CUDA by replaying a CUDA graph captured for the next larger batch
bucket — and the prefill chunks take the expanded path. Keeping decodes on one path whatever else is in the
step makes a request's tokens independent of its batch-mates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from moemesh.config.engine import EngineConfig
from moemesh.engine.kv_export import ExportRow, ExportStep, KvExporter
from moemesh.engine.request import SchedulerOutput
from moemesh.engine.sampler import SampledToken, Sampler, plain_greedy
from moemesh.engine.sampling_params import SamplingParams
from moemesh.engine.staging import BatchStaging
from moemesh.model.batch import ForwardBatch
from moemesh.model.network import DeepseekForCausalLM

log = logging.getLogger("moemesh.engine")


@dataclass
class RunnerRequest:
    """Also the sampler's row (`sampler.SampleInput`): prompt and output ids are sliced only when asked for
    (penalties), not per step."""

    token_ids: list[int]  # prompt + output; the runner appends what it samples
    num_prompt_tokens: int
    page_ids: list[int]
    num_computed_tokens: int
    params: SamplingParams

    def __post_init__(self):
        self.plain_greedy = plain_greedy(self.params)

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # fp32 [bucket, vocab], written by each replay


class ModelRunner:
    def __init__(
        self,
        model: DeepseekForCausalLM,
        kv_caches: list[torch.Tensor],
        config: EngineConfig,
        max_model_len: int,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.config = config
        self.page_size = config.page_size
        self.device = kv_caches[0].device
        self.max_pages_per_seq = -(-max_model_len // config.page_size)
        self.sampler = Sampler(model.config.vocab_size)
        self.requests: dict[str, RunnerRequest] = {}
        self.graphs: dict[int, _Graph] = {}
        max_seqs = config.max_num_seqs
        max_tokens = max(config.max_num_batched_tokens, max_seqs)
        # persistent host buffers (pinned on CUDA): the decode forward's (whose device side the CUDA graphs
        # read) and the eager forwards' (prefill chunks, decodes past the largest graph)
        self.decode_staging = BatchStaging(max_seqs, max_seqs, self.max_pages_per_seq, self.device)
        self.eager_staging = BatchStaging(max_tokens, max_seqs, self.max_pages_per_seq, self.device)
        self._static = self.decode_staging.dev  # the graphs' inputs
        self.host_prepare_s = 0.0  # the last step's host time before its forwards run (batch building)
        self.tokens_at = 0.0  # perf_counter() when the last step's sampled tokens reached the host
        self.num_pingpong_steps = 0
        self.kv_export: KvExporter | None = None  # a prefill worker's: pages packed as forwards write them

    # -- one step -------------------------------------------------------------------------------------------

    def execute(
        self, out: SchedulerOutput, on_launched: Callable[[], None] | None = None
    ) -> dict[str, SampledToken]:
        """Runs the step; returns a token for each request whose tokens are all computed after it.
        on_launched: called once the device has this step's work and before the host waits for it: right after
        the first forward's launches (a decode step's CUDA graph replay, or an eager forward's launches). Firing
        before an eager forward's launches was once intended but never live (`run is self._run_eager` compared
        two bound-method objects, always False); the mesh's measurements were made with this order.
        The caller does other host work then."""
        self.host_prepare_s = 0.0
        t0 = time.perf_counter()
        self._update_states(out)
        decode, prefill = [], []
        for request_id, n in out.num_scheduled_tokens:
            (decode if n == 1 else prefill).append((request_id, n))
        sample_ids: list[str] = []
        logits_parts = []
        if self.kv_export is not None:
            self.kv_export.order_before_forward()
        self.host_prepare_s += time.perf_counter() - t0
        requests = self.requests
        for group, run in ((decode, self._run_decode), (prefill, self._run_eager)):
            if not group:
                continue
            wants = [(r := requests[rid]).num_computed_tokens + n == len(r.token_ids) for rid, n in group]
            export = self._export_step(group)
            if export is None:
                logits_parts.append(run(group, wants))
            else:
                if group is prefill:
                    logits_parts.append(self._run_eager(group, wants, export.layer_written))
                else:
                    logits_parts.append(run(group, wants))
                export.finish()
            sample_ids += [rid for (rid, _), w in zip(group, wants, strict=True) if w]
            if on_launched is not None:
                on_launched, fire = None, on_launched
                fire()
        for request_id, n in out.num_scheduled_tokens:
            requests[request_id].num_computed_tokens += n
        if not sample_ids:
            self.tokens_at = time.perf_counter()
            return {}
        logits = torch.cat(logits_parts) if len(logits_parts) > 1 else logits_parts[0]
        rows = [requests[rid] for rid in sample_ids]
        sampled = self.sampler(logits, rows)
        self.tokens_at = time.perf_counter()  # the step's tokens are on the host (the sampler synced)
        for r, tok in zip(rows, sampled, strict=True):
            r.token_ids.append(tok.token_id)
        return dict(zip(sample_ids, sampled, strict=True))

    def _update_states(self, out: SchedulerOutput) -> None:
        for request_id in out.finished_request_ids:
            self.requests.pop(request_id, None)
        for new in out.new_requests:
            self.requests[new.request_id] = RunnerRequest(
                list(new.token_ids),
                new.num_prompt_tokens,
                list(new.page_ids),
                new.num_computed_tokens,
                new.params,
            )
        for cached in out.cached_requests:
            self.requests[cached.request_id].page_ids += cached.new_page_ids

    def _export_step(self, group: list[tuple[str, int]]) -> ExportStep | None:
        if self.kv_export is None:
            return None
        rows = []
        for rid, n in group:
            r = self.requests[rid]
            rows.append(ExportRow(rid, r.page_ids, r.num_computed_tokens, r.num_computed_tokens + n,
                                  r.num_prompt_tokens))  # fmt: skip
        return self.kv_export.begin(rows)

    # -- batches --------------------------------------------------------------------------------------------

    def _stage(self, staging: BatchStaging, group: list[tuple[str, int]], wants: list[bool], pad_to: int):
        """Writes one forward's inputs into `staging`'s host buffers (rows past the group up to `pad_to`
        attend to nothing and write nothing: seq_len 0, slot -1) and issues the copies.
        -> (device views, query starts)."""
        t0 = time.perf_counter()
        staging.wait()
        h = staging.np
        ids, pos, slots, rows, seq_lens = (
            h["input_ids"], h["positions"], h["slot_mapping"], h["logits_rows"], h["seq_lens"]
        )  # fmt: skip
        ps = self.page_size
        reqs = [self.requests[rid] for rid, _ in group]
        if all(n == 1 for _, n in group):  # decodes (the graphs' batches): one bulk write per input
            b = len(group)
            cs = [r.num_computed_tokens for r in reqs]
            ids[:b] = [r.token_ids[c] for r, c in zip(reqs, cs, strict=True)]
            pos[:b] = cs
            slots[:b] = [r.page_ids[c // ps] * ps + c % ps for r, c in zip(reqs, cs, strict=True)]
            seq_lens[:b] = pos[:b] + 1
            starts = list(range(b + 1))
            if all(wants):
                rows[:b] = starts[:b]
                num_rows = b
            else:
                picked = [i for i, w in enumerate(wants) if w]
                rows[: len(picked)] = picked
                num_rows = len(picked)
        else:
            starts, num_rows = [0], 0
            for i, (r, (_, n)) in enumerate(zip(reqs, group, strict=True)):
                c, t = r.num_computed_tokens, starts[-1]
                ids[t : t + n] = r.token_ids[c : c + n]
                p = np.arange(c, c + n)
                pos[t : t + n] = p
                slots[t : t + n] = np.asarray(r.page_ids, dtype=np.int64)[p // ps] * ps + p % ps
                seq_lens[i] = c + n
                starts.append(t + n)
                if wants[i]:
                    rows[num_rows] = t + n - 1
                    num_rows += 1
        width = staging.write_page_table(reqs)
        b, t = len(group), starts[-1]
        if pad_to > b:
            ids[t : t + pad_to - b] = 0
            pos[t : t + pad_to - b] = 0
            slots[t : t + pad_to - b] = -1
            seq_lens[b:pad_to] = 0
        staged = staging.copy(t + pad_to - b, pad_to, width, num_rows)
        self.host_prepare_s += time.perf_counter() - t0
        return staged, starts

    def _run_eager(
        self, group: list[tuple[str, int]], wants: list[bool], kv_written: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        batch = self._eager_batch(self.eager_staging, group, wants)
        if kv_written is None:
            return self.model(batch, self.kv_caches)
        return self.model(batch, self.kv_caches, kv_written=kv_written)

    def _run_pingpong(self, group: list[tuple[str, int]], wants: list[bool]) -> torch.Tensor:
        """An eager decode batch as two micro-batches interleaved at the remote MoE layers
        (`forward_pingpong`); the second half stages in the decode buffers, which no graph reads this step."""
        half = len(group) // 2
        batches = [
            self._eager_batch(self.eager_staging, group[:half], wants[:half]),
            self._eager_batch(self.decode_staging, group[half:], wants[half:]),
        ]
        self.num_pingpong_steps += 1
        return torch.cat(self.model.forward_pingpong(batches, self.kv_caches))

    def _eager_batch(
        self, staging: BatchStaging, group: list[tuple[str, int]], wants: list[bool]
    ) -> ForwardBatch:
        staged, starts = self._stage(staging, group, wants, len(group))
        return ForwardBatch(
            input_ids=staged.input_ids,
            positions=staged.positions,
            query_start=tuple(starts),
            seq_lens=staged.seq_lens,
            page_table=staged.page_table,
            slot_mapping=staged.slot_mapping,
            logits_rows=staged.logits_rows,
            seq_lens_host=tuple(self.requests[rid].num_computed_tokens + n for rid, n in group),
        )

    def _run_decode(self, group: list[tuple[str, int]], wants: list[bool]) -> torch.Tensor:
        bucket = next((b for b in sorted(self.graphs) if b >= len(group)), None)
        if bucket is None:
            if self.config.pingpong and len(group) >= 2:
                return self._run_pingpong(group, wants)
            return self._run_eager(group, wants)
        # straight into the graph's inputs; only the live width of the page table moves (entries past a
        # sequence's pages are never read), padding rows up to the bucket attend to nothing
        staged, _ = self._stage(self.decode_staging, group, wants, bucket)
        self.graphs[bucket].graph.replay()
        b = len(group)
        logits = self.graphs[bucket].logits
        if staged.logits_rows.shape[0] == b:
            return logits[:b]
        return logits[staged.logits_rows]

    # -- CUDA graphs ----------------------------------------------------------------------------------------

    def capture_decode_graphs(self) -> None:
        """Captures one decode forward per bucket of `config.cuda_graph_batch_sizes` (largest first, one
        shared memory pool). Padding rows carry seq_len 0 and slot -1. A model that cannot be captured (a host
        sync somewhere in its decode forward) runs eagerly, with a warning."""
        try:
            self._capture()
        except RuntimeError as exc:
            self.graphs.clear()
            torch.cuda.synchronize()
            log.warning("decode CUDA graphs disabled, the forward could not be captured: %s", exc)

    def _capture(self) -> None:
        sizes = [b for b in self.config.cuda_graph_batch_sizes if b <= self.config.max_num_seqs]
        if self.device.type != "cuda" or not sizes:
            return
        self._static["slot_mapping"].fill_(-1)  # capture writes nothing
        self._static["seq_lens"].zero_()
        pool = None
        for b in sorted(sizes, reverse=True):
            s = self._static
            batch = ForwardBatch(
                input_ids=s["input_ids"][:b],
                positions=s["positions"][:b],
                query_start=tuple(range(b + 1)),
                seq_lens=s["seq_lens"][:b],
                page_table=s["page_table"][:b],
                slot_mapping=s["slot_mapping"][:b],
                logits_rows=None,
            )
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: Triton compiles, cuBLAS picks algorithms
                    self.model(batch, self.kv_caches)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.model(batch, self.kv_caches)
            pool = graph.pool()
            self.graphs[b] = _Graph(graph, logits)
        torch.cuda.synchronize()
