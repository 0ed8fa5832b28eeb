"""The prefill worker's loop: batched, chunked prefill on the engine, KV pushed into D's leased pages layer by
layer while the forward goes on.

One `prefill()` per request (the Prefill RPC):
1. `add_request(prompt, params, prefill_only=True)`; the EngineLoop batches it with the other prompts and
   chunks it (max_num_batched_tokens).
2. Layer by layer, inside the engine's forward: a torch forward hook on every decoder layer (`_layer_done`,
   in the step's thread) finds each request of this forward (its next token's KV slot is in the batch's
   slot mapping), packs that layer's pages the forward completes — full pages, and the last page once the
   prompt is done — into a copy (`pack_kv`) and hands it to the event loop, which sends it at once while
   the next layers compute.
3. After the step (`_after_step`, under the engine lock): whatever a hook did not see is packed the same way
   (a fallback: a forward hooks do not reach), the first token is taken and the request's own pages go back to
   the pool (`release_handoff`): the copies are what is sent.
4. `prefill()` has every layer chunk sent as soon as it is queued (a TaskGroup, many in flight), then returns
   the first token.
On `Abort`, a gRPC cancel, a `LeaseRefused` or any failure the request leaves the engine (its pages return)
and nothing more is sent; `abort()` returns only once `prefill()` stopped sending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch

from moemesh.engine.engine import RequestOutput
from moemesh.engine.sampler import SampledToken
from moemesh.engine.sampling_params import SamplingParams
from moemesh.kernels import pack_kv
from moemesh.model.batch import ForwardBatch
from moemesh.services.engine_loop import EngineLoop
from moemesh.transport.errors import LeaseRefused
from moemesh.transport.kv import KvSender, KvTarget, LeaseKey
from moemesh.transport.registry import LoadReport

log = logging.getLogger(__name__)


@dataclass
class _Chunk:
    layer: int
    first_page: int  # index into the target's page ids
    pages: torch.Tensor  # [n, page_size, kv_dim], a copy
    ready: torch.cuda.Event | None = None  # CUDA: recorded after the copy


@dataclass
class _Job:
    target: KvTarget
    num_prompt_tokens: int
    next_page: list[int]  # per layer: first page not yet packed (index into the prompt's pages)
    chunks: asyncio.Queue[_Chunk | None] = field(default_factory=asyncio.Queue)  # None: all packed
    first_token_id: int | None = None
    forward_done_s: float = 0.0  # monotonic time the prompt's forward ended (its first token was sampled)
    num_cached_tokens: int = 0  # prompt tokens this worker's prefix cache supplied (not recomputed)
    first_logprob: SampledToken | None = None  # when the request asked for logprobs
    num_chunks: int = 0
    num_chunks_in_forward: int = 0  # packed by a layer hook while the forward went on
    aborted: bool = False
    stopped: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class PrefillOutcome:
    first_token_id: int
    num_prompt_tokens: int
    kv_bytes_sent: int
    num_cached_tokens: int = 0  # prompt tokens from this worker's prefix cache
    first_logprob: SampledToken | None = None
    prefill_ms: float = 0.0  # arrival -> the forward's end
    kv_transfer_ms: float = 0.0  # the forward's end -> the last chunk acknowledged


class PrefillWorker:
    def __init__(self, worker_id: str, loop: EngineLoop, sender: KvSender) -> None:
        """Construct inside the running event loop (the layer hooks hand chunks to it)."""
        self.worker_id = worker_id
        self.loop = loop
        self.engine = loop.engine
        self.sender = sender
        self.page_size = self.engine.config.page_size
        self.num_layers = len(self.engine.kv_caches)
        self.jobs: dict[str, _Job] = {}
        self._event_loop = asyncio.get_running_loop()
        self._forward_rows: tuple[ForwardBatch, dict[str, tuple[int, int]]] | None = None
        loop.on_step.append(self._after_step)
        for i, layer in enumerate(self.engine.model.model.layers):
            layer.register_forward_hook(lambda module, args, output, i=i: self._layer_done(i, args))

    async def prefill(self, prompt: list[int], params: SamplingParams, target: KvTarget) -> PrefillOutcome:
        """Runs the prompt, pushes its KV into target's lease, returns the first token. Raises LeaseRefused
        when D refused a write or aborted the request."""
        rid = target.request_id
        if rid in self.jobs:
            raise ValueError(f"request_id={rid!r} is already being prefilled here")
        num_pages = -(-len(prompt) // self.page_size)
        if len(target.page_ids) != num_pages:
            raise ValueError(f"kv_target has {len(target.page_ids)} pages, the prompt needs {num_pages}")
        job = _Job(target, len(prompt), next_page=[target.first_page] * self.num_layers)
        self.jobs[rid] = job
        arrived_s = time.monotonic()
        sends: list[asyncio.Task[int]] = []
        try:
            await self.loop.call(self.engine.add_request, prompt, params, rid, prefill_only=True)
            try:
                async with asyncio.TaskGroup() as group:
                    while (chunk := await job.chunks.get()) is not None:
                        if job.aborted:
                            break
                        sends.append(group.create_task(self._send(job, chunk)))
            except ExceptionGroup as failed:  # the first failed send (LeaseRefused, Unavailable, ...)
                raise failed.exceptions[0] from None
            if job.aborted:
                raise LeaseRefused(f"request {rid} was aborted by the decode worker")
            assert job.first_token_id is not None
            acked_s = time.monotonic()
            outcome = PrefillOutcome(
                job.first_token_id, len(prompt), sum(t.result() for t in sends), job.num_cached_tokens,
                job.first_logprob, prefill_ms=1000 * (job.forward_done_s - arrived_s),
                kv_transfer_ms=1000 * max(0.0, acked_s - job.forward_done_s),
            )  # fmt: skip
            log.info("%s: prefilled %d tokens, %d bytes of KV sent in %d layer chunks (%d packed inside the "
                     "forward)", rid, len(prompt), outcome.kv_bytes_sent, job.num_chunks,
                     job.num_chunks_in_forward)  # fmt: skip
            return outcome
        finally:
            del self.jobs[rid]
            finished = job.first_token_id is not None and not job.aborted  # the engine is done with it
            job.aborted = True
            if not finished:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.loop.call(self.engine.abort, rid))
            job.stopped.set()

    async def abort(self, request_id: str, lease: LeaseKey, timeout_s: float = 10.0) -> bool:
        """Stops the request; returns once nothing more will be written into `lease` (False: unknown)."""
        job = self.jobs.get(request_id)
        if job is None or job.target.lease != lease:
            return False
        job.aborted = True
        job.chunks.put_nowait(None)
        await asyncio.wait_for(job.stopped.wait(), timeout_s)
        return True

    def load(self) -> LoadReport:
        stats = self.engine.stats()
        queued = sum(j.num_prompt_tokens - min(j.next_page) * self.page_size for j in self.jobs.values())
        return LoadReport(
            self.worker_id, "prefill", num_running_requests=stats["num_running"],
            num_queued_requests=len(self.jobs), num_queued_tokens=max(0, queued),
            num_free_pages=stats["pages_free"] + stats["pages_cached"], num_total_pages=stats["pages_total"],
            unix_ms=int(time.time() * 1000),
        )  # fmt: skip

    async def _send(self, job: _Job, chunk: _Chunk) -> int:
        if job.aborted:
            return 0
        if chunk.ready is not None:
            chunk.ready.synchronize()
        return await self.sender.send(job.target, chunk.layer, chunk.first_page, chunk.pages)

    # -- packing: inside the forward (the step's thread), and after the step (event loop, engine lock) -------

    def _layer_done(self, layer: int, args: tuple) -> None:
        """Forward hook of decoder layer `layer`, in the step's thread (the engine lock is held)."""
        batch = next((a for a in args if isinstance(a, ForwardBatch)), None)
        jobs = dict(self.jobs)  # a snapshot: the event loop adds and removes jobs meanwhile
        if batch is None or not jobs:
            return
        try:
            for rid, (start, num_tokens) in self._rows_of(batch, jobs).items():
                job, progress = jobs[rid], self.engine.kv_progress(rid)
                if job.aborted or progress is None:
                    continue
                computed = start + num_tokens  # after this forward
                last = computed >= job.num_prompt_tokens
                end = -(-computed // self.page_size) if last else computed // self.page_size
                chunk = self._pack(job, layer, list(progress.page_ids), min(end, len(progress.page_ids)))
                if chunk is not None:
                    job.num_chunks_in_forward += 1
                    self._event_loop.call_soon_threadsafe(job.chunks.put_nowait, chunk)
        except Exception:  # never fail the step: the after-step fallback packs what is left
            log.exception("packing layer %d inside the forward failed", layer)

    def _rows_of(self, batch: ForwardBatch, jobs: dict[str, _Job]) -> dict[str, tuple[int, int]]:
        """request id -> (tokens computed before this forward, tokens it computes), for the prefill jobs in
        `batch`: a job is in it when the KV slot of its next token is in the batch's slot mapping. Worked
        out at the first layer, kept for the others (the batch object is held, so it is this forward's)."""
        if self._forward_rows is not None and self._forward_rows[0] is batch:
            return self._forward_rows[1]
        slots = batch.slot_mapping.tolist()
        first_slot_row = {slots[batch.query_start[b]]: b for b in range(batch.num_seqs)}
        rows = {}
        for rid in jobs:
            progress = self.engine.kv_progress(rid)
            if progress is None or not progress.page_ids:
                continue
            done = progress.num_computed_tokens
            if done // self.page_size >= len(progress.page_ids):
                continue
            slot = progress.page_ids[done // self.page_size] * self.page_size + done % self.page_size
            b = first_slot_row.get(slot)
            if b is not None:
                rows[rid] = (done, batch.query_len(b))
        self._forward_rows = (batch, rows)
        return rows

    def _after_step(self, outputs: list[RequestOutput]) -> None:
        """Under the engine lock, right after a step: pack what no hook did, finish, free own pages."""
        self._forward_rows = None
        finished = {out.request_id: out for out in outputs if out.kv is not None}
        for rid, out in finished.items():
            job = self.jobs.get(rid)
            if job is not None and not job.aborted:
                for layer in range(self.num_layers):
                    chunk = self._pack(job, layer, list(out.kv.page_ids), len(out.kv.page_ids))
                    if chunk is not None:
                        job.chunks.put_nowait(chunk)
                job.first_token_id = out.kv.first_token_id
                job.forward_done_s = time.monotonic()
                job.num_cached_tokens = out.num_cached_tokens
                job.first_logprob = out.logprobs[0] if out.logprobs else None
                job.chunks.put_nowait(None)
            self.engine.release_handoff(rid)  # the packed copies are what is sent
        for rid, job in self.jobs.items():
            progress = self.engine.kv_progress(rid)
            if rid in finished or job.aborted or progress is None or not progress.page_ids:
                continue
            full = min(progress.num_computed_tokens // self.page_size, len(progress.page_ids))
            for layer in range(self.num_layers):
                chunk = self._pack(job, layer, list(progress.page_ids), full)
                if chunk is not None:
                    job.chunks.put_nowait(chunk)

    def _pack(self, job: _Job, layer: int, page_ids: list[int], end: int) -> _Chunk | None:
        start = job.next_page[layer]
        if end <= start:
            return None
        cache = self.engine.kv_caches[layer]
        index = torch.tensor(page_ids[start:end], dtype=torch.long, device=cache.device)
        pages = pack_kv(cache, index)  # [n, page_size, kv_dim]
        ready = None
        if pages.is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        job.next_page[layer] = end
        job.num_chunks += 1
        return _Chunk(layer, start, pages, ready)
