"""The scheduler: which requests run in the next step, with how many tokens each. Pure and deterministic:
no torch, no I/O, no clock; the same calls in the same order give the same plans.

One step (`schedule`):
1. Running requests first, in admission order: a decode takes 1 token of the budget, a request still
   prefilling takes its next chunk (at most what is left of `max_num_batched_tokens`). When a page is
   missing and none is free, the most recently admitted running request is preempted (its pages go back —
   full ones stay in the prefix cache — and it waits at the head of the queue to be recomputed).
2. Then waiting requests, in order, while the budget, `max_num_seqs` and pages allow: leading full pages
   found in the prefix cache are reused (not computed), the rest is prefilled in chunks. No admissions in a
   step that preempted.

A step whose forward raised (the engine's `StepFailed`): when it ran one request, that request is aborted;
when it ran several, they are all preempted and become *suspects* (`isolate`): each next step runs the first
suspect alone, until one step of its own succeeded (it is cleared) or failed (the engine aborts it). So one bad
request fails alone, and a persistent fault costs one failed step per request, never a retry loop.

After the runner ran the step, `update` advances each request, registers its newly full pages in the prefix
cache, appends sampled tokens and finishes requests on max_tokens, EOS and stop token ids. Stop strings need
the detokenizer, so the engine checks them and calls `finish`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from moemesh.config.engine import EngineConfig
from moemesh.engine.kv_pages import PagePool, page_hashes
from moemesh.engine.request import (
    CachedRequestData,
    FinishReason,
    NewRequestData,
    Request,
    RequestStatus,
    SchedulerOutput,
)


@dataclass
class Counters:
    prefill_tokens_computed: int = 0  # tokens run through the model while prefilling (chunks, recomputes)
    prefix_hit_tokens: int = 0  # prompt tokens whose KV came from the prefix cache instead
    num_preemptions: int = 0
    num_steps: int = 0


class Scheduler:
    def __init__(self, config: EngineConfig, pool: PagePool, max_model_len: int, eos_token_ids=()):
        self.config = config
        self.pool = pool
        self.page_size = pool.page_size
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.counters = Counters()
        self._known_to_runner: set[str] = set()
        self._forget: set[str] = set()
        self._next_arrival = 0
        self.suspects: list[str] = []  # request ids, in the order they run alone

    # -- requests in and out --------------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queues a request. One with `num_computed_tokens > 0` arrives with its KV in `page_ids` (a transfer
        filled them) and joins the queue ready to decode."""
        if request.request_id in self.requests:
            raise ValueError(f"request_id={request.request_id!r} is already in the engine")
        if request.num_tokens >= self.max_model_len:
            raise ValueError(
                f"request {request.request_id!r} has {request.num_tokens} tokens, no room for one more under "
                f"max_model_len={self.max_model_len}"
            )
        request.status = RequestStatus.WAITING
        computed = request.num_computed_tokens
        request.prefill_target = computed if computed else request.num_tokens
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def new_arrival(self) -> int:
        self._next_arrival += 1
        return self._next_arrival - 1

    def finish(self, request_id: str, reason: FinishReason, keep_pages: bool = False) -> Request:
        """Ends a request; its pages go back unless `keep_pages` (a prefill handing its KV out)."""
        req = self.requests.pop(request_id)
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status == RequestStatus.WAITING:
            self.waiting.remove(req)
        req.status, req.finish_reason = RequestStatus.FINISHED, reason
        if not keep_pages:
            self.pool.release(req.page_ids)
            req.page_ids = []
        self._drop_from_runner(req)
        return req

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- one step -------------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        alone = self._schedule_suspect()
        if alone is not None:
            return alone
        budget = self.config.max_num_batched_tokens
        page_size = self.page_size
        scheduled: list[tuple[Request, int]] = []
        preempted: list[str] = []
        new_pages: dict[str, list[int]] = {}
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(len(req.token_ids) - req.num_computed_tokens, budget)
            need = -(-(req.num_computed_tokens + n) // page_size) - len(req.page_ids)
            if need > 0:  # a decode needs a page once per page_size steps
                while need > self.pool.num_available and req in self.running:
                    victim = self.running[-1]
                    self._preempt(victim)
                    preempted.append(victim.request_id)
                if req not in self.running:
                    break
                pages = self.pool.allocate(need)
                req.page_ids += pages
                new_pages[req.request_id] = pages
            scheduled.append((req, n))
            budget -= n
            i += 1
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            n = self._admit(req, budget)
            if n == 0:
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append((req, n))
            budget -= n
        return self._message(scheduled, new_pages, preempted)

    def isolate(self, request_ids: list[str]) -> None:
        """The step that ran `request_ids` failed: preempt them; each runs alone next (see the docstring)."""
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            if req.status == RequestStatus.RUNNING:
                self._preempt(req)
            if rid not in self.suspects:
                self.suspects.append(rid)

    def _schedule_suspect(self) -> SchedulerOutput | None:
        """The first suspect alone, if one is waiting and its pages are there (else the normal plan: running
        requests finish and free pages; waiting ones stay behind the suspect, first in line)."""
        self.suspects = [rid for rid in self.suspects if rid in self.requests]
        req = next((self.requests[rid] for rid in self.suspects), None)
        if (
            req is None
            or req.status != RequestStatus.WAITING
            or len(self.running) >= self.config.max_num_seqs
        ):
            return None
        n = self._admit(req, self.config.max_num_batched_tokens)
        if n == 0:
            return None
        self.waiting.remove(req)
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        return self._message([(req, n)], {}, [])

    def update(self, scheduled: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Applies a step's results: `sampled` maps each request that reached the end of its tokens to its new
        token. Returns the requests that finished (their pages released, or kept for a prefill handoff)."""
        self.counters.num_steps += 1
        finished = []
        requests, suspects, page_size = self.requests, self.suspects, self.page_size
        for request_id, n in scheduled.num_scheduled_tokens:
            if suspects and request_id in suspects:  # a step of its own succeeded
                suspects.remove(request_id)
            req = requests.get(request_id)
            if req is None:
                continue
            if req.num_computed_tokens < req.prefill_target:
                self.counters.prefill_tokens_computed += n
            req.num_computed_tokens += n
            if req.num_computed_tokens // page_size > req.num_hashed_pages:
                self._register_full_pages(req)
            token = sampled.get(request_id)
            if token is None:
                continue
            req.append_output(token)
            reason = self.stop_reason(req, token)
            if reason is not None:
                finished.append(self.finish(request_id, reason, keep_pages=reason == FinishReason.PREFILL))
        return finished

    # -- mesh hooks: KV that arrives by transfer ------------------------------------------------------------

    def reserve(self, token_ids: list[int]) -> tuple[list[int], int]:
        """Pages for the KV of `token_ids` (a prompt about to be prefilled elsewhere): prefix-cache hits first,
        then fresh pages. Returns (page ids, tokens already cached here — the sender may skip them). The pages
        are leased until `Engine.add_prefilled` adopts them or `PagePool.release` returns them."""
        max_hit_pages = (len(token_ids) - 1) // self.page_size
        hits = self.pool.match_prefix(token_ids, max_hit_pages)
        need = -(-len(token_ids) // self.page_size) - len(hits)
        if need > self.pool.num_available - self.pool.num_evictable_in(hits):
            raise MemoryError(
                f"no room for {len(token_ids)} tokens: {self.pool.num_available} pages available"
            )
        self.pool.acquire(hits)
        self.counters.prefix_hit_tokens += len(hits) * self.page_size
        return hits + self.pool.allocate(need), len(hits) * self.page_size

    # -- internals ------------------------------------------------------------------------------------------

    def _pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def _admit(self, req: Request, budget: int) -> int:
        """Takes prefix hits and pages for the first chunk of a waiting request; returns the chunk's length
        (0 when pages are short: the request stays first in line)."""
        hits: list[int] = []
        if req.num_computed_tokens == 0:
            hits = self.pool.match_prefix(req.token_ids, (req.num_tokens - 1) // self.page_size)
        computed = max(req.num_computed_tokens, len(hits) * self.page_size)
        if req.num_computed_tokens == 0:
            req.num_cached_prompt_tokens = min(len(hits) * self.page_size, req.num_prompt_tokens)
        n = min(req.num_tokens - computed, budget)
        need = self._pages_for(computed + n) - len(req.page_ids) - len(hits)
        if need > self.pool.num_available - self.pool.num_evictable_in(hits):
            return 0
        if hits:
            self.pool.acquire(hits)
            req.page_ids = list(hits)
            req.num_computed_tokens = computed
            req.num_hashed_pages = len(hits)
            req.last_page_hash = page_hashes(req.token_ids, self.page_size, len(hits))[-1]
            self.counters.prefix_hit_tokens += computed
        req.page_ids += self.pool.allocate(need)
        return n

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.pool.release(req.page_ids)
        req.reset_for_recompute()
        req.prefill_target = req.num_tokens
        self.waiting.appendleft(req)
        self.counters.num_preemptions += 1
        self._drop_from_runner(req)

    def _drop_from_runner(self, req: Request) -> None:
        if req.request_id in self._known_to_runner:
            self._known_to_runner.discard(req.request_id)
            self._forget.add(req.request_id)

    def _register_full_pages(self, req: Request) -> None:
        num_full = req.num_computed_tokens // self.page_size
        if num_full <= req.num_hashed_pages:
            return
        hashes = page_hashes(
            req.token_ids, self.page_size, num_full, start=req.num_hashed_pages, prev=req.last_page_hash
        )
        for j, digest in enumerate(hashes, start=req.num_hashed_pages):
            self.pool.register(req.page_ids[j], digest)
        req.num_hashed_pages, req.last_page_hash = num_full, hashes[-1]

    def stop_reason(self, req: Request, token: int) -> FinishReason | None:
        p = req.params
        if req.prefill_only:
            return FinishReason.PREFILL
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return FinishReason.STOP
        if len(req.output_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _message(self, scheduled, new_pages, preempted) -> SchedulerOutput:
        new, cached = [], []
        known = self._known_to_runner
        for req, _ in scheduled:
            if req.request_id in known:
                added = new_pages.get(req.request_id)
                if added:  # the runner holds the rest: only a request that grew is listed
                    cached.append(CachedRequestData(req.request_id, tuple(added)))
                continue
            self._known_to_runner.add(req.request_id)
            new.append(
                NewRequestData(
                    req.request_id,
                    tuple(req.token_ids),
                    req.num_prompt_tokens,
                    tuple(req.page_ids),
                    req.num_computed_tokens,
                    req.params,
                )
            )
        forget, self._forget = frozenset(self._forget), set()
        return SchedulerOutput(
            new_requests=tuple(new),
            cached_requests=tuple(cached),
            num_scheduled_tokens=tuple((r.request_id, n) for r, n in scheduled),
            finished_request_ids=forget,
            preempted_request_ids=tuple(preempted),
        )
