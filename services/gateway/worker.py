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
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from moemesh._proto.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from moemesh.config.mesh import GatewayConfig
from moemesh.engine.sampling_params import SamplingParams
from moemesh.model.tokenizer import IncrementalDetokenizer, Tokenizer
from moemesh.services.sampling import sampling_from_proto, sampling_to_proto, without_stop_strings
from moemesh.transport.errors import InvalidArgument, ResourceExhausted, Unavailable, from_rpc_error
from moemesh.transport.peers import WorkerInfo
from moemesh.transport.registry import Membership

log = logging.getLogger(__name__)
DECODE_ROLES = ("decode", "colocated")


@dataclass(frozen=True)
class GenerateJob:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams  # with the stop strings (the gateway matches them)


@dataclass(frozen=True)
class Delta:
    """One chunk for the client: its new tokens and the text they completed."""

    token_ids: list[int]
    text: str
    finish_reason: str | None  # "stop" | "length" on the last chunk
    logprobs: list = field(default_factory=list)  # common_pb2.TokenLogprob, relayed as D sent them
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0


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
    ) -> None:
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
        self._ids = itertools.count()

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
        max_tokens fills the context."""
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
        params = sampling_from_proto(sampling, default_max_tokens=self.max_context_tokens - len(prompt))
        return GenerateJob(request_id or f"gw-{next(self._ids)}", prompt, params)

    # -- routing --------------------------------------------------------------------------------------------

    async def pick(self) -> Route:
        deadline = time.monotonic() + self.config.pick_timeout_s
        while True:
            self.membership.expire()
            decodes = [m for role in DECODE_ROLES for m in self.membership.members(role)]
            if decodes:
                break
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

    def channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = self.channel_factory(address)
        return self._channels[address]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    # -- the stream -----------------------------------------------------------------------------------------

    async def generate(
        self, job: GenerateJob, time_remaining: Callable[[], float | None]
    ) -> AsyncIterator[Delta]:
        if self.inflight >= self.config.max_inflight:
            raise ResourceExhausted(
                f"{self.inflight} requests in flight, max_inflight={self.config.max_inflight}"
            )
        self.inflight += 1
        try:
            route = await self.pick()
            self._decode_inflight[route.decode.worker_id] += 1
            self._decode_picks[route.decode.worker_id] += 1
            try:
                async for delta in self._relay(job, route, time_remaining):
                    yield delta
            finally:
                self._decode_inflight[route.decode.worker_id] -= 1
        finally:
            self.inflight -= 1

    async def _relay(
        self, job: GenerateJob, route: Route, time_remaining: Callable[[], float | None]
    ) -> AsyncIterator[Delta]:
        request = worker_pb2.DecodeRequest(
            request_id=job.request_id, prompt_token_ids=job.prompt_ids,
            sampling=sampling_to_proto(without_stop_strings(job.params)),
        )  # fmt: skip
        if route.prefill is not None:
            request.prefill.CopyFrom(
                worker_pb2.PrefillPeer(
                    worker_id=route.prefill.worker_id, grpc_address=route.prefill.grpc_address
                )
            )
            self._prefill_sent[route.prefill.worker_id] += len(job.prompt_ids)
        stub = worker_pb2_grpc.DecodeWorkerStub(self.channel(route.decode.grpc_address))
        call = stub.Generate(request, timeout=time_remaining())
        text = _StopText(job.params.stop)
        detok = IncrementalDetokenizer(self.tokenizer, job.prompt_ids) if self.tokenizer else None
        num_tokens = 0
        try:
            async for chunk in call:
                tokens = list(chunk.token_ids)
                num_tokens += len(tokens)
                # A "stop" from D is EOS or a stop token id: that last token adds no text (as in the engine).
                texted = tokens[:-1] if chunk.finish_reason == common_pb2.FINISH_REASON_STOP else tokens
                if detok is not None:
                    for token in texted:
                        text.add(detok.add(token))
                reason = _FINISH.get(chunk.finish_reason)
                if text.stopped:
                    reason = "stop"
                new_text = text.take(final=reason is not None)
                yield Delta(tokens, new_text, reason, list(chunk.logprobs), len(job.prompt_ids), num_tokens)
                if reason is not None:
                    return
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()  # no-op once the stream ended; otherwise D (and P) stop the request


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
