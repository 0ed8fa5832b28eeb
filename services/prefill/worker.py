"""The prefill worker's loop: batched, chunked prefill on the engine, KV pushed into D's leased pages while the
forward that computes it runs.

One `prefill()` per request (the Prefill RPC):
1. On the engine thread: the request is tracked by the runner's KV exporter (`engine/kv_export.py`, from D's
   first uncached page) and added (`add_request(prompt, params, prefill_only=True)`); the EngineLoop batches
   it with the other prompts and chunks it (max_num_batched_tokens).
2. In each forward that completes pages of it (full pages, and every page once the prompt ends), the exporter
   packs each layer group's pages as soon as that group's attention wrote them — on CUDA on a side stream
   behind an event, nothing waited for on the host — and posts the chunks (a copy + a `ready` event) to the
   event loop (`_on_chunks`), which queues them. The groups are few and the last layer is a group of its
   own, so by the forward's end only that small chunk is left to send. Nothing the event loop owns is
   touched on the engine thread: the exporter, its stream and events are the runner's; the loop only reads.
3. `prefill()` sends each chunk as soon as its copy is done on the device (waited for off the event loop),
   many in flight (a TaskGroup). After the step that ends the prompt (`_after_step`, an `on_step` hook) the
   first token is taken, the job's queue closed and the request's own pages go back to the pool
   (`release_handoff`; the next forward waits for the packs that read them, in stream order). It hands the
   first token on (`on_forward_done`: the Prefill stream's early result, which D streams to the client) and
   returns the whole outcome once every chunk was acknowledged. A chunk of several layers goes as one message
   per layer and run of D's consecutive pages (`plan_segments`): a few large messages, one round trip.
On `Abort`, a gRPC cancel, a `LeaseRefused` or any failure the request leaves the engine and the exporter
(its pages return) and nothing more is sent; `abort()` returns only once `prefill()` stopped sending. A
failed batch is re-run a request at a time (the engine's isolation): the exporter packs the layer groups the
failed forward did not reach then, so every (layer, page) is still sent once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch

from moemesh.engine.engine import RequestOutput
from moemesh.engine.kv_export import DEFAULT_MAX_GROUPS, KvExportChunk, KvExporter
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
class _Job:
    target: KvTarget
    num_prompt_tokens: int
    next_page: int  # first page not yet packed (index into the prompt's pages), for every layer
    chunks: asyncio.Queue[KvExportChunk | None] = field(default_factory=asyncio.Queue)  # None: all packed
    first_token_id: int | None = None
    forward_done_s: float = 0.0  # monotonic time the prompt's forward ended (its first token was sampled)
    num_cached_tokens: int = 0  # prompt tokens this worker's prefix cache supplied (not recomputed)
    first_logprob: SampledToken | None = None  # when the request asked for logprobs
    num_chunks: int = 0
    aborted: bool = False
    failed: Exception | None = None  # the engine step running it raised (the engine aborted it)
    first_send_unix_ns: int = 0  # when the first KV chunk went out (the kv.send span's start)
    forward_done_unix_ns: int = 0  # time.time_ns() when the prompt's forward ended
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
    forward_done_unix_ns: int = 0  # time.time_ns() of the forward's end (chunks may go out before it)


class PrefillWorker:
    def __init__(
        self,
        worker_id: str,
        loop: EngineLoop,
        sender: KvSender,
        max_chunk_bytes: int = MAX_CHUNK_BYTES,
        max_layer_groups: int = DEFAULT_MAX_GROUPS,
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
        self.exporter = KvExporter(
            self.caches, self.page_size, self._publish, max_chunk_bytes, max_layer_groups
        )
        self.engine.runner.kv_export = self.exporter  # the engine thread's; one prefill worker per engine
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
            await self.loop.call(self._start, prompt, params, rid, target.first_page)
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
                kv_first_send_unix_ns=job.first_send_unix_ns, forward_done_unix_ns=job.forward_done_unix_ns,
            )  # fmt: skip
            log.info("%s: prefilled %d tokens, %d bytes of KV sent in %d chunks of up to %d layers", rid,
                     len(prompt), outcome.kv_bytes_sent, job.num_chunks, max(map(len, self.exporter.groups)))  # fmt: skip
            return outcome
        finally:
            del self.jobs[rid]
            finished = job.first_token_id is not None and not job.aborted  # the engine is done with it
            job.aborted = True
            if not finished:
                with contextlib.suppress(Exception):
                    await self.loop.must_run(self._stop, rid)
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

    async def _send(self, job: _Job, chunk: KvExportChunk) -> int:
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

    # -- the engine thread's side (runs there; only posts to the event loop) ----------------------------------

    def _start(self, prompt: list[int], params: SamplingParams, rid: str, first_page: int) -> None:
        self.exporter.track(rid, first_page)
        try:
            self.engine.add_request(prompt, params, rid, prefill_only=True)
        except BaseException:
            self.exporter.forget(rid)
            raise

    def _stop(self, rid: str) -> None:
        self.exporter.forget(rid)
        self.engine.abort(rid)

    def _publish(self, chunks: list[KvExportChunk]) -> None:
        self.loop.commands.post(functools.partial(self._on_chunks, chunks))

    # -- the event loop's side ----------------------------------------------------------------------------------

    def _on_chunks(self, chunks: list[KvExportChunk]) -> None:
        """A layer group's packs, queued on the device (or done, on CPU): each to its job's send queue."""
        for chunk in chunks:
            job = self.jobs.get(chunk.request_id)
            if job is None or job.aborted or job.failed is not None:
                continue
            job.chunks.put_nowait(chunk)
            job.num_chunks += 1
            if chunk.layer + chunk.num_layers == self.num_layers:
                job.next_page = max(job.next_page, chunk.end_page)

    def _after_step(self, outputs: list[RequestOutput]) -> None:
        """Right after a step, before anything else touches the engine: finish the jobs whose prompt is done
        (their chunks were all posted before this hook) and free their own pages."""
        step_done_s, step_done_ns = time.monotonic(), time.time_ns()  # the forward's end
        for out in outputs:
            if out.kv is None:
                continue
            rid = out.request_id
            job = self.jobs.get(rid)
            if job is not None and not job.aborted and job.failed is None:
                job.first_token_id = out.kv.first_token_id
                job.forward_done_s, job.forward_done_unix_ns = step_done_s, step_done_ns
                job.num_cached_tokens = out.num_cached_tokens
                job.first_logprob = out.logprobs[0] if out.logprobs else None
                job.chunks.put_nowait(None)
            self.engine.release_handoff(rid)  # the next forward waits for the packs reading them
