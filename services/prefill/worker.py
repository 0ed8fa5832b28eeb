"""The prefill worker's loop: batched, chunked prefill on the engine, KV pushed into D's leased pages.

One `prefill()` per request (the Prefill RPC):
1. `add_request(prompt, params, prefill_only=True)`; the EngineLoop batches it with the other prompts and
   chunks it (max_num_batched_tokens).
2. After every engine step, `_after_step` (under the engine lock) packs the pages the step completed — full
   pages of computed tokens, and every page once the prompt is done — into a copy, and queues it. Once the
   request finished, its own pages go back to the pool at once (`release_handoff`): the copy is what is sent.
3. `prefill()` sends each queued chunk, one `sender.send` per layer, all layers in flight together, while
   the engine computes the next chunk. Then it returns the first token.
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
from moemesh.kernels import pack_kv
from moemesh.services.engine_loop import EngineLoop

from moemesh.engine.engine import RequestOutput
from moemesh.engine.sampling_params import SamplingParams
from moemesh.transport.errors import LeaseRefused
from moemesh.transport.kv import KvSender, KvTarget, LeaseKey
from moemesh.transport.registry import LoadReport

log = logging.getLogger(__name__)


@dataclass
class _Chunk:
    first_page: int  # index into the target's page ids
    layers: torch.Tensor  # [num_layers, n, page_size, kv_dim], a copy


@dataclass
class _Job:
    target: KvTarget
    num_prompt_tokens: int
    next_page: int  # first page not yet packed (index into the prompt's pages)
    chunks: asyncio.Queue[_Chunk | None] = field(default_factory=asyncio.Queue)  # None: all packed
    first_token_id: int | None = None
    aborted: bool = False
    stopped: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class PrefillOutcome:
    first_token_id: int
    num_prompt_tokens: int
    kv_bytes_sent: int


class PrefillWorker:
    def __init__(self, worker_id: str, loop: EngineLoop, sender: KvSender) -> None:
        self.worker_id = worker_id
        self.loop = loop
        self.engine = loop.engine
        self.sender = sender
        self.page_size = self.engine.config.page_size
        self.jobs: dict[str, _Job] = {}
        loop.on_step.append(self._after_step)

    async def prefill(self, prompt: list[int], params: SamplingParams, target: KvTarget) -> PrefillOutcome:
        """Runs the prompt, pushes its KV into target's lease, returns the first token. Raises LeaseRefused
        when D refused a write or aborted the request."""
        rid = target.request_id
        if rid in self.jobs:
            raise ValueError(f"request_id={rid!r} is already being prefilled here")
        num_pages = -(-len(prompt) // self.page_size)
        if len(target.page_ids) != num_pages:
            raise ValueError(f"kv_target has {len(target.page_ids)} pages, the prompt needs {num_pages}")
        job = _Job(target, len(prompt), next_page=target.first_page)
        self.jobs[rid] = job
        sent = 0
        try:
            await self.loop.call(self.engine.add_request, prompt, params, rid, prefill_only=True)
            while (chunk := await job.chunks.get()) is not None:
                sent += await self._send(job, chunk)
            if job.aborted:
                raise LeaseRefused(f"request {rid} was aborted by the decode worker")
            assert job.first_token_id is not None
            return PrefillOutcome(job.first_token_id, len(prompt), sent)
        finally:
            del self.jobs[rid]
            job.aborted = True
            with contextlib.suppress(Exception):
                await asyncio.shield(self.loop.call(self.engine.abort, rid))  # no-op once it finished
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
        sends = [
            self.sender.send(job.target, layer, chunk.first_page, chunk.layers[layer])
            for layer in range(chunk.layers.shape[0])
        ]
        results = await asyncio.gather(*sends, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
        return sum(results)

    def _after_step(self, outputs: list[RequestOutput]) -> None:
        """Under the engine lock, right after a step: pack what the step completed."""
        finished = {out.request_id: out for out in outputs if out.kv is not None}
        for rid, out in finished.items():
            job = self.jobs.get(rid)
            if job is not None and not job.aborted:
                self._pack(job, list(out.kv.page_ids), len(out.kv.page_ids))
                job.first_token_id = out.kv.first_token_id
                job.chunks.put_nowait(None)
            self.engine.release_handoff(rid)  # the packed copies are what is sent
        for rid, job in self.jobs.items():
            if rid in finished or job.aborted:
                continue
            progress = self.engine.kv_progress(rid)
            if progress is None or not progress.page_ids:
                continue
            full = min(progress.num_computed_tokens // self.page_size, len(progress.page_ids))
            self._pack(job, list(progress.page_ids), full)

    def _pack(self, job: _Job, page_ids: list[int], end: int) -> None:
        if end <= job.next_page:
            return
        index = torch.tensor(page_ids[job.next_page : end], dtype=torch.long, device=self.engine.device)
        layers = pack_kv(self.engine.kv_caches, index)  # [num_layers, n, page_size, kv_dim]
        job.chunks.put_nowait(_Chunk(job.next_page, layers))
        job.next_page = end
