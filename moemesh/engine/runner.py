"""The model runner: keeps what it knows of each request, turns a `SchedulerOutput` into forward batches, runs
the model over the paged latent cache and samples.

A step runs as at most two forwards: the rows with one new token (decodes, and one-token prefill tails) take
the absorbed decode path together — on CUDA by replaying a CUDA graph captured for the next larger batch
bucket — and the prefill chunks take the expanded path. Keeping decodes on one path whatever else is in the
step makes a request's tokens independent of its batch-mates.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from moemesh.config.engine import EngineConfig
from moemesh.engine.request import SchedulerOutput
from moemesh.engine.sampler import SampledToken, Sampler, SampleRow
from moemesh.engine.sampling_params import SamplingParams
from moemesh.model.batch import ForwardBatch
from moemesh.model.network import DeepseekForCausalLM

log = logging.getLogger("moemesh.engine")


@dataclass
class RunnerRequest:
    token_ids: list[int]  # prompt + output; the runner appends what it samples
    num_prompt_tokens: int
    page_ids: list[int]
    num_computed_tokens: int
    params: SamplingParams

    def sample_row(self) -> SampleRow:
        return SampleRow(
            self.params, self.token_ids[: self.num_prompt_tokens], self.token_ids[self.num_prompt_tokens :]
        )


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
        self._static: dict[str, torch.Tensor] = {}

    # -- one step -------------------------------------------------------------------------------------------

    def execute(self, out: SchedulerOutput) -> dict[str, SampledToken]:
        """Runs the step; returns a token for each request whose tokens are all computed after it."""
        self._update_states(out)
        decode, prefill = [], []
        for request_id, n in out.num_scheduled_tokens:
            (decode if n == 1 else prefill).append((request_id, n))
        sample_ids: list[str] = []
        logits_parts = []
        for group, run in ((decode, self._run_decode), (prefill, self._run_eager)):
            if not group:
                continue
            wants = [self._completes(rid, n) for rid, n in group]
            logits_parts.append(run(group, wants))
            sample_ids += [rid for (rid, _), w in zip(group, wants, strict=True) if w]
        for request_id, n in out.num_scheduled_tokens:
            self.requests[request_id].num_computed_tokens += n
        if not sample_ids:
            return {}
        logits = torch.cat(logits_parts) if len(logits_parts) > 1 else logits_parts[0]
        sampled = self.sampler(logits, [self.requests[rid].sample_row() for rid in sample_ids])
        for rid, tok in zip(sample_ids, sampled, strict=True):
            self.requests[rid].token_ids.append(tok.token_id)
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

    def _completes(self, request_id: str, n: int) -> bool:
        r = self.requests[request_id]
        return r.num_computed_tokens + n == len(r.token_ids)

    # -- batches --------------------------------------------------------------------------------------------

    def _host_batch(self, group: list[tuple[str, int]], width: int):
        """Host lists of one forward: ids, positions, slots, seq_lens, page-table rows, query starts."""
        ids, pos, slots, seq_lens, tables, starts = [], [], [], [], [], [0]
        ps = self.page_size
        for rid, n in group:
            r = self.requests[rid]
            c = r.num_computed_tokens
            ids += r.token_ids[c : c + n]
            positions = range(c, c + n)
            pos += positions
            slots += [r.page_ids[p // ps] * ps + p % ps for p in positions]
            seq_lens.append(c + n)
            tables.append(r.page_ids + [0] * (width - len(r.page_ids)))
            starts.append(starts[-1] + n)
        return ids, pos, slots, seq_lens, tables, starts

    def _to_device(self, values, dtype) -> torch.Tensor:
        t = torch.tensor(values, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _run_eager(self, group: list[tuple[str, int]], wants: list[bool]) -> torch.Tensor:
        width = max(len(self.requests[rid].page_ids) for rid, _ in group)
        ids, pos, slots, seq_lens, tables, starts = self._host_batch(group, width)
        rows = [starts[i + 1] - 1 for i, w in enumerate(wants) if w]
        batch = ForwardBatch(
            input_ids=self._to_device(ids, torch.int64),
            positions=self._to_device(pos, torch.int64),
            query_start=tuple(starts),
            seq_lens=self._to_device(seq_lens, torch.int32),
            page_table=self._to_device(tables, torch.int32),
            slot_mapping=self._to_device(slots, torch.int64),
            logits_rows=self._to_device(rows, torch.int64),
        )
        return self.model(batch, self.kv_caches)

    def _run_decode(self, group: list[tuple[str, int]], wants: list[bool]) -> torch.Tensor:
        bucket = next((b for b in sorted(self.graphs) if b >= len(group)), None)
        if bucket is None:
            return self._run_eager(group, wants)
        # only the live width of the page table moves; entries past a sequence's pages are never read
        width = max(len(self.requests[rid].page_ids) for rid, _ in group)
        ids, pos, slots, seq_lens, tables, _ = self._host_batch(group, width)
        b, s = len(group), self._static
        s["input_ids"][:b].copy_(self._to_device(ids, torch.int64), non_blocking=True)
        s["positions"][:b].copy_(self._to_device(pos, torch.int64), non_blocking=True)
        s["slot_mapping"][:b].copy_(self._to_device(slots, torch.int64), non_blocking=True)
        s["seq_lens"][:b].copy_(self._to_device(seq_lens, torch.int32), non_blocking=True)
        s["page_table"][:b, :width].copy_(self._to_device(tables, torch.int32), non_blocking=True)
        self._reset_padding(b, bucket)
        self.graphs[bucket].graph.replay()
        rows = [i for i, w in enumerate(wants) if w]
        logits = self.graphs[bucket].logits
        return logits[:b] if len(rows) == b else logits[torch.tensor(rows, device=self.device)]

    def _reset_padding(self, start: int, end: int) -> None:
        """Rows past the real batch attend to nothing and write nothing."""
        s = self._static
        s["seq_lens"][start:end].zero_()
        s["slot_mapping"][start:end].fill_(-1)
        s["positions"][start:end].zero_()
        s["input_ids"][start:end].zero_()

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
        biggest = max(sizes)
        dev = self.device
        self._static = {
            "input_ids": torch.zeros(biggest, dtype=torch.int64, device=dev),
            "positions": torch.zeros(biggest, dtype=torch.int64, device=dev),
            "slot_mapping": torch.full((biggest,), -1, dtype=torch.int64, device=dev),
            "seq_lens": torch.zeros(biggest, dtype=torch.int32, device=dev),
            "page_table": torch.zeros(biggest, self.max_pages_per_seq, dtype=torch.int32, device=dev),
        }
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
