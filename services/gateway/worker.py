"""The gateway's work: validate and tokenize, pick (P, D) from reported load, relay D's token stream as text.

`generate(job)` per request:
1. `prepare()` (in the servicer's call) checked the prompt and sampling: INVALID_ARGUMENT naming the field.
2. Back-pressure: more than `max_inflight` requests in flight -> RESOURCE_EXHAUSTED, never a queue here.
3. `pick()`: D = the decode (or colocated) worker with the fewest requests (this gateway's own in-flight
   count first — load reports lag by a heartbeat — then its reported running + waiting, then most free pages);
   P = the prefill worker with the fewest queued prompt tokens (reported, plus what this gateway sent it
   since). No prefill worker (colocated topology): D prefills.
4. `DecodeWorker.Generate` on D, bounded by the client's deadline; every chunk's tokens are detokenized
   incrementally (UTF-8 safe) and checked for stop strings — text that could still begin a stop string is
   held back; a match ends the request with "stop" and cancels D's call. Leaving early (client cancel)
   cancels D's call, which cancels P's.
5. A decode worker `moemesh up` saw die is dropped from the membership at once (`forget_worker`), so no new
   request is routed to it; one that dies unseen is found by the request that fails on it (below) or by its
   missed heartbeats.
6. Migration: when D's stream fails with UNAVAILABLE (D lost, connection dropped), D leaves the membership
   (a live one registers again with its next heartbeat) and the request goes to another D with the prompt
   plus every token relayed so far (`generated_token_ids`; that D prefills both itself and continues), so the
   client's stream goes on with no gap and no duplicate. At most `GatewayConfig.max_migrations` times, then UNAVAILABLE.
   A client cancel, a deadline or any other status is never migrated.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace

import grpc

from moemesh._proto.v1 import common_pb2, worker_pb2
from moemesh.config.mesh import GatewayConfig
from moemesh.engine.sampling_params import SamplingParams
from moemesh.model.tokenizer import IncrementalDetokenizer, Tokenizer
from moemesh.services.gateway.sessions import DecodeSession
from moemesh.services.sampling import sampling_for_prompt, sampling_to_proto, without_stop_strings
from moemesh.telemetry import spans
from moemesh.telemetry.metrics import GatewayMetrics, new_registry
from moemesh.telemetry.trace_store import TraceStore
from moemesh.telemetry.tracing import Telemetry, mark_failed, trace_id_of
from moemesh.transport.errors import InvalidArgument, ResourceExhausted, Unavailable, status_for
from moemesh.transport.peers import WorkerInfo
from moemesh.transport.registry import Membership

log = logging.getLogger(__name__)
DECODE_ROLES = ("decode", "colocated")


@dataclass(frozen=True)
class GenerateJob:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams  # with the stop strings (the gateway matches them)
    traceparent: str = ""  # the client's trace context; then the request's gateway.generate span, for D


@dataclass(frozen=True)
class Delta:
    """One chunk for the client: its new tokens and the text they completed."""

    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop" | "length" on the last chunk
    logprobs: list = field(default_factory=list)  # common_pb2.TokenLogprob, relayed as D sent them
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0
    decode_usage: common_pb2.Usage | None = None  # on the last chunk: what the decode worker reported


@dataclass(frozen=True)
class Route:
    decode: WorkerInfo
    prefill: WorkerInfo | None


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        membership: Membership,
        tokenizer: Tokenizer | None,
        vocab_size: int,
        max_context_tokens: int,
        channel_factory: Callable[[str], grpc.aio.Channel],
        metrics: GatewayMetrics | None = None,
        *,
        telemetry: Telemetry | None = None,
        traces: TraceStore | None = None,
    ) -> None:
        """metrics: where request latencies and counts go (a private registry's when None); traces: where the
        trace view's recent requests are kept (None: none kept)."""
        self.config = config
        self.membership = membership
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_context_tokens = max_context_tokens
        self.channel_factory = channel_factory
        self.inflight = 0
        self._decode_inflight: Counter[str] = Counter()
        self._decode_picks: Counter[str] = Counter()  # last tie-break: idle workers take turns
        self._prefill_sent: Counter[str] = Counter()  # prompt tokens sent since the last load report
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._sessions: dict[str, DecodeSession] = {}
        self._ids = itertools.count()
        self.metrics = metrics if metrics is not None else GatewayMetrics(new_registry())
        self.telemetry = telemetry or Telemetry.disabled("gateway")
        self.traces = traces or TraceStore(0)

    def new_request_id(self) -> str:
        """An id for a request whose client sent none (gRPC and HTTP draw from the same counter)."""
        return f"gw-{next(self._ids)}"

    # -- validation -----------------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidArgument(f"model {self.config.model_id!r} has no tokenizer: send token_ids")
        return self.tokenizer.encode(text)

    def prepare(
        self,
        text: str | None,
        token_ids: list[int] | None,
        request_id: str,
        sampling: common_pb2.SamplingParams,
    ) -> GenerateJob:
        """Checks and tokenizes a request; raises InvalidArgument naming the field and value. Unset
        max_tokens fills the context; a prompt plus max_tokens beyond it is refused (`check_fits_context`)."""
        if text is not None:
            if not text:
                raise InvalidArgument.field("prompt", text, "non-empty")
            prompt = self.tokenize(text)
            if not prompt:
                raise InvalidArgument(f"prompt={text!r} has no tokens")
        else:
            prompt = list(token_ids or [])
            if not prompt:
                raise InvalidArgument.field("token_ids", prompt, "non-empty")
            for i, token in enumerate(prompt):
                if token >= self.vocab_size:
                    raise InvalidArgument(f"token_ids[{i}]={token} must be < vocab_size={self.vocab_size}")
        if len(prompt) >= self.max_context_tokens:
            raise InvalidArgument(
                f"prompt has {len(prompt)} tokens, must be < max_context_tokens={self.max_context_tokens}"
            )
        params = sampling_for_prompt(sampling, len(prompt), self.max_context_tokens)
        return GenerateJob(request_id or self.new_request_id(), prompt, params)

    # -- routing --------------------------------------------------------------------------------------------

    async def pick(self, lost: Sequence[str] = ()) -> Route:
        """lost: decode workers this request already lost (migration); with none other left, UNAVAILABLE at
        once rather than after `pick_timeout_s`."""
        deadline = time.monotonic() + self.config.pick_timeout_s
        while True:
            self.membership.expire()
            decodes = [m for role in DECODE_ROLES for m in self.membership.members(role)
                       if m.worker_id not in lost]  # fmt: skip
            if decodes:
                break
            if lost:
                raise Unavailable(f"lost decode worker(s) {', '.join(lost)} and no other is registered")
            if time.monotonic() >= deadline:
                raise Unavailable("no decode worker is registered")
            await asyncio.sleep(0.1)
        decode = min(decodes, key=self._decode_score)
        prefills = self.membership.members("prefill")
        prefill = min(prefills, key=self._prefill_score) if prefills else None
        return Route(decode, prefill)

    def _decode_score(self, member: WorkerInfo) -> tuple[int, int, int, int]:
        load = self.membership.load(member.worker_id)
        busy = (load.num_running_requests + load.num_queued_requests) if load else 0
        free = load.num_free_pages if load else 0
        return self._decode_inflight[member.worker_id], busy, -free, self._decode_picks[member.worker_id]

    def _prefill_score(self, member: WorkerInfo) -> tuple[int, int]:
        load = self.membership.load(member.worker_id)
        queued = load.num_queued_tokens if load else 0
        return queued + self._prefill_sent[member.worker_id], self._prefill_sent[member.worker_id]

    async def session(self, decode: WorkerInfo) -> DecodeSession:
        """The multiplexed stream to a decode worker (one per address, reopened after it broke). A channel
        in TRANSIENT_FAILURE (the worker there died, and may have been restarted since) is replaced by a
        fresh one, which connects at once rather than after gRPC's reconnect backoff (up to minutes)."""
        address = decode.grpc_address
        channel = self._channels.get(address)
        if channel is not None and channel.get_state() == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            session = self._sessions.pop(address, None)
            if session is not None:
                await session.close()
            await self._channels.pop(address).close()
        if address not in self._sessions:
            self._sessions[address] = DecodeSession(self.channel(address), decode.worker_id)
        return self._sessions[address]

    def channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = self.channel_factory(address)
        return self._channels[address]

    async def watch_sessions(self, interval_s: float) -> None:
        """Every interval_s: a decode worker that dropped out of the membership (it missed its heartbeats for
        `worker_timeout_s`: stopped, hung or cut off, with its socket still open) and whose session has been
        silent as long, while requests run on it, has its session broken, so its requests migrate now rather
        than when TCP keepalive gives up (30 s). A live worker on an overloaded host may miss heartbeats, but it
        still streams its steps: its session stays."""
        timeout_s = self.config.worker_timeout_s
        while True:
            await asyncio.sleep(interval_s)
            self.membership.expire()
            live = {m.worker_id for m in self.membership.members()}
            now = time.monotonic()
            for session in list(self._sessions.values()):
                silent = now - session.last_heard_s > timeout_s
                if session.num_active and session.name not in live and silent:
                    log.warning("decode worker %s left the membership with %d requests in flight; migrating "
                                "them", session.name, session.num_active)  # fmt: skip
                    session.abort()

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    # -- the stream -----------------------------------------------------------------------------------------

    async def generate(
        self, job: GenerateJob, time_remaining: Callable[[], float | None], traceparent: str = ""
    ) -> AsyncIterator[Delta]:
        """The request's deltas, the last with its finish_reason; observed in `self.metrics` (TTFT, gaps
        between tokens, duration, token counts; failures by status, a consumer that left as CANCELLED) and
        traced (under the client's `traceparent`; "" = a new trace for this request)."""
        timer, finished = self.metrics.request(), False
        try:
            async for delta in self._migrating(replace(job, traceparent=traceparent), time_remaining):
                timer.tokens(len(delta.token_ids))
                if delta.finish_reason is not None:
                    timer.finished(delta.finish_reason, delta.num_prompt_tokens)
                    finished = True
                yield delta
        except (GeneratorExit, asyncio.CancelledError):
            if not finished:
                timer.failed("CANCELLED")
            raise
        except Exception as exc:
            timer.failed(status_for(exc)[0].name)
            raise

    async def _migrating(
        self, job: GenerateJob, time_remaining: Callable[[], float | None]
    ) -> AsyncIterator[Delta]:
        if self.inflight >= self.config.max_inflight:
            raise ResourceExhausted(
                f"{self.inflight} requests in flight, max_inflight={self.config.max_inflight}"
            )
        self.inflight += 1
        start_ns = time.time_ns()
        root = self.telemetry.start(spans.GATEWAY_GENERATE, job.traceparent, {
            spans.REQUEST_ID: job.request_id, spans.MODEL: self.config.model_id,
            spans.PROMPT_TOKENS: len(job.prompt_ids)}, start_ns)  # fmt: skip
        self.telemetry.bind_request(job.request_id, root)
        job = replace(job, traceparent=self.telemetry.traceparent(root))
        trace = self.traces.begin(job.request_id, trace_id_of(root), self.config.model_id,
                                  len(job.prompt_ids), start_ns)  # fmt: skip
        try:
            progress = _Progress(
                _StopText(job.params.stop),
                IncrementalDetokenizer(self.tokenizer, job.prompt_ids) if self.tokenizer else None,
            )
            lost: list[str] = []
            while True:
                with self.telemetry.span(
                    spans.GATEWAY_ROUTE, root, {spans.REQUEST_ID: job.request_id}
                ) as route_span:
                    route = await self.pick(lost)
                    route_span.set_attribute(spans.DECODE_WORKER, route.decode.worker_id)
                    route_span.set_attribute(
                        spans.PREFILL_WORKER, route.prefill.worker_id if route.prefill else ""
                    )
                decode_id = route.decode.worker_id
                self._decode_inflight[decode_id] += 1
                self._decode_picks[decode_id] += 1
                try:
                    async for delta in self._relay(job, route, progress, time_remaining):
                        trace.on_tokens(len(delta.token_ids))
                        if delta.finish_reason is not None:
                            trace.finish(delta.finish_reason)
                        yield delta
                    return
                except Unavailable as err:
                    lost.append(decode_id)
                    self.membership.deregister(decode_id)  # a live one registers again on its next heartbeat
                    if len(lost) > self.config.max_migrations:
                        raise Unavailable(
                            f"{job.request_id}: lost decode workers {', '.join(lost)} after "
                            f"{len(progress.generated)} tokens; gave up after {self.config.max_migrations} migrations "
                            f"(last error: {err})"
                        ) from None
                    log.warning("%s: decode worker %s lost after %d tokens (%s); migrating", job.request_id,
                                decode_id, len(progress.generated), err)  # fmt: skip
                finally:
                    self._decode_inflight[decode_id] -= 1
        except Exception as exc:
            trace.finish(error=str(exc) or type(exc).__name__)
            mark_failed(root, exc, record=False)
            raise
        finally:
            self.inflight -= 1
            if not trace.done:  # left before the last chunk: the client went away
                trace.finish(error="cancelled")
            root.set_attributes({spans.COMPLETION_TOKENS: trace.num_completion_tokens,
                                 spans.FINISH_REASON: trace.finish_reason or trace.error,
                                 spans.TTFT_MS: trace.ttft_ms or 0.0})  # fmt: skip
            root.end()

    async def _relay(
        self,
        job: GenerateJob,
        route: Route,
        progress: _Progress,
        time_remaining: Callable[[], float | None],
    ) -> AsyncIterator[Delta]:
        """One attempt on `route.decode`, resuming after `progress.generated` (empty on the first)."""
        request = worker_pb2.DecodeRequest(
            request_id=job.request_id, prompt_token_ids=job.prompt_ids,
            sampling=sampling_to_proto(without_stop_strings(job.params)),
            generated_token_ids=progress.generated, traceparent=job.traceparent,
        )  # fmt: skip
        if route.prefill is not None and not progress.generated:  # a migrated request is prefilled on D
            request.prefill.CopyFrom(
                worker_pb2.PrefillPeer(
                    worker_id=route.prefill.worker_id, grpc_address=route.prefill.grpc_address
                )
            )
            self._prefill_sent[route.prefill.worker_id] += len(job.prompt_ids)
        remaining_s = time_remaining()
        if remaining_s is not None:
            request.timeout_s = max(remaining_s, 1e-3)
        chunks = (await self.session(route.decode)).run(request)
        text = progress.text
        try:
            async for chunk in chunks:
                tokens = list(chunk.token_ids)
                progress.generated += tokens
                # A "stop" from D is EOS or a stop token id: that last token adds no text (as in the engine).
                texted = tokens[:-1] if chunk.finish_reason == common_pb2.FINISH_REASON_STOP else tokens
                if progress.detok is not None:
                    for token in texted:
                        text.add(progress.detok.add(token))
                reason = _FINISH.get(chunk.finish_reason)
                if text.stopped:
                    reason = "stop"
                new_text = text.take(final=reason is not None)
                usage = chunk.usage if chunk.HasField("usage") else None
                yield Delta(tokens, new_text, reason, list(chunk.logprobs), len(job.prompt_ids),
                            len(progress.generated), usage)  # fmt: skip
                if reason is not None:
                    return
        finally:
            await chunks.aclose()  # before the last chunk: D (and P) stop the request


@dataclass
class _Progress:
    """What one request has relayed so far, kept across migrations: the tokens (what the next D resumes
    after), the stop-string matcher and the detokenizer."""

    text: _StopText
    detok: IncrementalDetokenizer | None
    generated: list[int] = field(default_factory=list)


_FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
}


@dataclass
class _StopText:
    """Generated text with stop strings: `take()` returns the text that can no longer become part of a stop
    string (all of it once final); after a match, the text before it."""

    stop: tuple[str, ...]
    text: str = ""
    sent: int = 0
    stop_at: int | None = None

    @property
    def stopped(self) -> bool:
        return self.stop_at is not None

    def add(self, delta: str) -> None:
        if not delta or self.stopped:
            return
        before = len(self.text)
        self.text += delta
        if self.stop:
            start = max(0, before - max(len(s) for s in self.stop) + 1)
            hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                self.stop_at = min(hits)

    def take(self, final: bool) -> str:
        if self.stop_at is not None:
            end = self.stop_at
        elif final or not self.stop:
            end = len(self.text)
        else:
            end = len(self.text) - max(len(s) for s in self.stop) + 1
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent : end], end
        return out
