"""The prefill worker's loop: batched, chunked prefill on the engine, KV pushed into D's leased pages as each
engine step completes pages.

One `prefill()` per request (the Prefill RPC):
1. `add_request(prompt, params, prefill_only=True)`; the EngineLoop batches it with the other prompts and
   chunks it (max_num_batched_tokens).
2. After each step (`_after_step`, an `on_step` hook: in the event loop, while the engine thread waits, so
   nothing else touches the engine), every request's pages that step completed — full pages, and the last page
   once the prompt is done — are packed for all layers at once (`pack_kv`, one launch per group of layers,
   page ids uploaded from pinned memory without blocking) into chunks of up to MAX_CHUNK_BYTES, and queued.
   A finished request's first token is taken and its own pages go back to the pool (`release_handoff`): the
   packed copies are what is sent. The forward itself has no hook and no sync.
3. `prefill()` sends each chunk as soon as its copy is done on the device (waited for off the event loop),
   many in flight (a TaskGroup); hands the first token on (`on_forward_done`: the Prefill stream's early
   result, which D streams to the client) as soon as the prompt's forward ended, while the chunks are still
   moving; and returns the whole outcome once every chunk was acknowledged. A chunk of several layers goes as one message
   per layer and run of D's consecutive pages (`plan_segments`): a few large messages, one round trip.
On `Abort`, a gRPC cancel, a `LeaseRefused` or any failure the request leaves the engine (its pages return)
and nothing more is sent; `abort()` returns only once `prefill()` stopped sending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from moemesh.engine.engine import RequestOutput
from moemesh.engine.sampler import SampledToken
from moemesh.engine.sampling_params import SamplingParams
from moemesh.kernels import pack_kv
from moemesh.services.engine_loop import EngineLoop
from moemesh.transport.errors import LeaseRefused
from moemesh.transport.kv import KvSender, KvTarget, LeaseKey
from moemesh.transport.kv_wire import MAX_CHUNK_BYTES
from moemesh.transport.registry import LoadReport

log = logging.getLogger(__name__)


@dataclass
class _Chunk:
    layer: int  # the first layer
    num_layers: int
    first_page: int  # index into the target's page ids
    pages: torch.Tensor  # [num_layers, n, page_size, kv_dim], a copy
    ready: torch.cuda.Event | None = None  # CUDA: recorded after the copy


@dataclass
class _Job:
    target: KvTarget
    num_prompt_tokens: int
    next_page: int  # first page not yet packed (index into the prompt's pages), for every layer
    chunks: asyncio.Queue[_Chunk | None] = field(default_factory=asyncio.Queue)  # None: all packed
    first_token_id: int | None = None
    forward_done_s: float = 0.0  # monotonic time the prompt's forward ended (its first token was sampled)
    num_cached_tokens: int = 0  # prompt tokens this worker's prefix cache supplied (not recomputed)
    first_logprob: SampledToken | None = None  # when the request asked for logprobs
    num_chunks: int = 0
    aborted: bool = False
    failed: Exception | None = None  # the engine step running it raised (the engine aborted it)
    first_send_unix_ns: int = 0  # when the first KV chunk went out (the kv.send span's start)
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
    num_kv_chunks: int = 0
    kv_first_send_unix_ns: int = 0  # time.time_ns() of the first chunk sent (0: none sent)


class PrefillWorker:
    def __init__(
        self, worker_id: str, loop: EngineLoop, sender: KvSender, max_chunk_bytes: int = MAX_CHUNK_BYTES
    ) -> None:
        self.worker_id = worker_id
        self.loop = loop
        self.engine = loop.engine
        self.sender = sender
        self.max_chunk_bytes = max_chunk_bytes
        self.page_size = self.engine.config.page_size
        self.caches = self.engine.kv_caches
        self.num_layers = len(self.caches)
        self.jobs: dict[str, _Job] = {}
        loop.on_step.append(self._after_step)
        loop.on_failed.append(self._step_failed)

    async def prefill(
        self,
        prompt: list[int],
        params: SamplingParams,
        target: KvTarget,
        on_forward_done: Callable[[PrefillOutcome], Awaitable[None]] | None = None,
    ) -> PrefillOutcome:
        """Runs the prompt, pushes its KV into target's lease, returns the first token. `on_forward_done` gets
        the first token as soon as the forward ended (an outcome without the KV fields), while the KV chunks
        are sent. Raises LeaseRefused when D refused a write or aborted the request."""
        rid = target.request_id
        if rid in self.jobs:
            raise ValueError(f"request_id={rid!r} is already being prefilled here")
        num_pages = -(-len(prompt) // self.page_size)
        if len(target.page_ids) != num_pages:
            raise ValueError(f"kv_target has {len(target.page_ids)} pages, the prompt needs {num_pages}")
        job = _Job(target, len(prompt), next_page=target.first_page)
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
                    if on_forward_done is not None and job.first_token_id is not None and not job.aborted:
                        await on_forward_done(PrefillOutcome(
                            job.first_token_id, len(prompt), 0, job.num_cached_tokens, job.first_logprob,
                            prefill_ms=1000 * (job.forward_done_s - arrived_s)))  # fmt: skip
            except ExceptionGroup as failed:  # the first failed send (LeaseRefused, Unavailable, ...)
                raise failed.exceptions[0] from None
            if job.failed is not None:
                raise job.failed
            if job.aborted:
                raise LeaseRefused(f"request {rid} was aborted by the decode worker")
            assert job.first_token_id is not None
            acked_s = time.monotonic()
            outcome = PrefillOutcome(
                job.first_token_id, len(prompt), sum(t.result() for t in sends), job.num_cached_tokens,
                job.first_logprob, prefill_ms=1000 * (job.forward_done_s - arrived_s),
                kv_transfer_ms=1000 * max(0.0, acked_s - job.forward_done_s), num_kv_chunks=job.num_chunks,
                kv_first_send_unix_ns=job.first_send_unix_ns,
            )  # fmt: skip
            log.info("%s: prefilled %d tokens, %d bytes of KV sent in %d chunks of up to %d layers", rid,
                     len(prompt), outcome.kv_bytes_sent, job.num_chunks, self._layers_per_chunk(1))  # fmt: skip
            return outcome
        finally:
            del self.jobs[rid]
            finished = job.first_token_id is not None and not job.aborted  # the engine is done with it
            job.aborted = True
            if not finished:
                with contextlib.suppress(Exception):
                    await self.loop.must_run(self.engine.abort, rid)
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

    def _step_failed(self, request_id: str, err: Exception) -> None:
        """The step running the request raised: it left the engine; prefill() raises `err`."""
        job = self.jobs.get(request_id)
        if job is not None and job.failed is None:
            job.failed = err
            job.chunks.put_nowait(None)

    def warm_up(self) -> torch.Tensor:
        """Packs page 0 of every layer once, as a request's pages are packed, before the worker serves: the pack
        kernel is compiled and the first pinned host block made here, not inside a user's first prefill.
        Returns the packed copy [num_layers, 1, page_size, kv_dim]."""
        cache = self.caches[0]
        ids = torch.zeros(1, dtype=torch.long)
        index = ids.pin_memory().to(cache.device, non_blocking=True) if cache.is_cuda else ids
        out = torch.empty(self.num_layers, 1, *cache.shape[1:], dtype=cache.dtype, device=cache.device)
        pack_kv(self.caches, index, out=out)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        return out

    def load(self) -> LoadReport:
        stats = self.engine.stats()
        queued = sum(j.num_prompt_tokens - j.next_page * self.page_size for j in self.jobs.values())
        return LoadReport(
            self.worker_id, "prefill", num_running_requests=stats["num_running"],
            num_queued_requests=len(self.jobs), num_queued_tokens=max(0, queued),
            num_free_pages=stats["pages_free"] + stats["pages_cached"], num_total_pages=stats["pages_total"],
            unix_ms=int(time.time() * 1000),
        )  # fmt: skip

    async def _send(self, job: _Job, chunk: _Chunk) -> int:
        if job.aborted:
            return 0
        if chunk.ready is not None and not chunk.ready.query():
            await asyncio.to_thread(chunk.ready.synchronize)  # the copy on the device; never on the loop
        if job.aborted:
            return 0
        job.first_send_unix_ns = job.first_send_unix_ns or time.time_ns()
        return await self.sender.send(
            job.target, chunk.layer, chunk.first_page, chunk.pages, chunk.num_layers
        )

    # -- packing: after each step (event loop, the engine thread waiting) ---------------------------------------

    def _after_step(self, outputs: list[RequestOutput]) -> None:
        """Right after a step, before anything else touches the engine: pack every job's newly completed pages
        (all layers), finish the jobs whose prompt is done and free their own pages."""
        step_done_s = time.monotonic()  # the forward's end: packing and sending are the KV transfer's part
        finished = {out.request_id: out for out in outputs if out.kv is not None}
        for rid, out in finished.items():
            job = self.jobs.get(rid)
            if job is not None and not job.aborted:
                for chunk in self._pack(job, out.kv.page_ids, len(out.kv.page_ids)):
                    job.chunks.put_nowait(chunk)
                job.first_token_id = out.kv.first_token_id
                job.forward_done_s = step_done_s
                job.num_cached_tokens = out.num_cached_tokens
                job.first_logprob = out.logprobs[0] if out.logprobs else None
                job.chunks.put_nowait(None)
            self.engine.release_handoff(rid)  # the packed copies are what is sent (stream order)
        for rid, job in self.jobs.items():
            if rid in finished or job.aborted:
                continue
            progress = self.engine.kv_progress(rid)
            if progress is None or not progress.page_ids:
                continue
            full = min(progress.num_computed_tokens // self.page_size, len(progress.page_ids))
            for chunk in self._pack(job, progress.page_ids, full):
                job.chunks.put_nowait(chunk)

    def _layers_per_chunk(self, num_pages: int) -> int:
        page_bytes = self.caches[0][0].numel() * self.caches[0].element_size()
        return max(1, min(self.num_layers, self.max_chunk_bytes // max(1, num_pages * page_bytes)))

    def _pack(self, job: _Job, page_ids: tuple[int, ...], end: int) -> list[_Chunk]:
        """Pages [job.next_page, end) of every layer, copied into chunks of whole layers (and, when one layer
        of them is over max_chunk_bytes, of fewer pages)."""
        start = job.next_page
        if end <= start:
            return []
        job.next_page = end
        cache = self.caches[0]
        page_bytes = cache[0].numel() * cache.element_size()
        max_pages = max(1, self.max_chunk_bytes // page_bytes)
        chunks = []
        for first in range(start, end, max_pages):
            last = min(end, first + max_pages)
            ids = torch.tensor(page_ids[first:last], dtype=torch.long)
            index = ids.pin_memory().to(cache.device, non_blocking=True) if cache.is_cuda else ids
            step = self._layers_per_chunk(last - first)
            for layer in range(0, self.num_layers, step):
                layers = self.caches[layer : layer + step]
                out = torch.empty(len(layers), last - first, *cache.shape[1:], dtype=cache.dtype,
                                  device=cache.device)  # fmt: skip
                pack_kv(layers, index, out=out)  # [num_layers, n, page_size, kv_dim]
                ready = None
                if out.is_cuda:
                    ready = torch.cuda.Event()
                    ready.record()
                chunks.append(_Chunk(layer, len(layers), first, out, ready))
        job.num_chunks += len(chunks)
        return chunks
