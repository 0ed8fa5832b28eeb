"""DecodeWorker RPCs: proto <-> `DecodeJob` / `RequestOutput`; exceptions -> status codes (`map_errors`).

`Generate` serves one request per call. `Session` serves many over one bidirectional stream (what the gateway
uses): each started request runs as a task of the session's TaskGroup, exactly as `Generate` would run it,
and a writer sends whatever chunks are ready as one `SessionUpdate` — after a decode step, one message for the
whole batch instead of one per request. A request's failure is an error event on the stream, not the stream's
end. The events waiting for the writer are bounded (`Outbox`): a client that stops reading holds its requests
back, and a request held `session_stall_s` fails with RESOURCE_EXHAUSTED (leaving the engine, pages returned).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from moemesh._proto.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from moemesh.services.decode.outbox import MAX_EVENTS, STALL_S, Outbox
from moemesh.services.decode.worker import DecodeJob, DecodeWorker
from moemesh.services.expert_spans import ExpertDispatchSpans
from moemesh.services.sampling import FINISH_REASONS, logprob_to_proto, sampling_for_prompt
from moemesh.telemetry import spans
from moemesh.telemetry.metrics import DecodeMetrics
from moemesh.telemetry.tracing import Telemetry, mark_failed, traceparent_from_metadata
from moemesh.transport.errors import InvalidArgument, map_errors, status_code_number, status_for
from moemesh.transport.peers import WorkerInfo

log = logging.getLogger(__name__)


class DecodeServicer(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(
        self,
        worker: DecodeWorker,
        max_model_len: int,
        metrics: DecodeMetrics | None = None,
        max_session_events: int = MAX_EVENTS,
        session_stall_s: float = STALL_S,
        *,
        telemetry: Telemetry | None = None,
        expert_spans: ExpertDispatchSpans | None = None,
    ) -> None:
        """max_session_events / session_stall_s: a session's outgoing bound (`services/decode/outbox.py`);
        expert_spans: each request's `expert.dispatch` (remote experts, tracing on)."""
        self.worker = worker
        self.max_model_len = max_model_len
        self.metrics = metrics
        self.max_session_events = max_session_events
        self.session_stall_s = session_stall_s
        self.telemetry = telemetry or Telemetry.disabled()
        self.expert_spans = expert_spans

    @map_errors
    async def Generate(self, request, context):
        traceparent = request.traceparent or traceparent_from_metadata(context.invocation_metadata())
        async for chunk in self._chunks(request, context.time_remaining, traceparent):
            yield chunk

    async def Session(self, request_iterator, context):
        outbox = Outbox(self.max_session_events, self.session_stall_s)
        session = asyncio.ensure_future(self._run_session(request_iterator, outbox))
        try:
            while (events := await outbox.take()) is not None:
                yield worker_pb2.SessionUpdate(events=events)
        finally:
            session.cancel()
            await asyncio.gather(session, return_exceptions=True)

    @map_errors
    async def GetLoad(self, request, context):
        return self.worker.load().to_proto()

    # -- one request ----------------------------------------------------------------------------------------

    async def _chunks(
        self,
        request: worker_pb2.DecodeRequest,
        time_remaining: Callable[[], float | None],
        traceparent: str = "",
    ) -> AsyncIterator[worker_pb2.DecodeChunk]:
        """traceparent: the gateway's span; this request's spans on D hang under it (`_RequestSpans`)."""
        prompt = list(request.prompt_token_ids)
        if not prompt:
            raise InvalidArgument("prompt_token_ids=[] must be non-empty")
        params = sampling_for_prompt(request.sampling, len(prompt), self.max_model_len)
        if params.stop:  # workers stream token ids only
            raise InvalidArgument(
                f"sampling.stop={list(params.stop)!r}: stop strings are matched by the gateway"
            )
        peer = None
        if request.HasField("prefill") and request.prefill.worker_id:
            peer = WorkerInfo(request.prefill.worker_id, "prefill", request.prefill.grpc_address)
        traced = _RequestSpans(self.telemetry, request.request_id, traceparent or request.traceparent,
                               self.expert_spans)  # fmt: skip
        job = DecodeJob(request.request_id, prompt, params, peer, tuple(request.generated_token_ids),
                        traceparent=traced.traceparent)  # fmt: skip
        num_tokens = 0
        timing = common_pb2.TtftBreakdown()
        async for out in traced.wrap(self.worker.generate(job, time_remaining, timing)):
            if num_tokens == 0 and self.metrics is not None:  # the first output: the request was queued
                self.metrics.queue_time.observe(timing.queue_ms / 1000)
            num_tokens += len(out.new_token_ids)
            chunk = worker_pb2.DecodeChunk(token_ids=out.new_token_ids)
            chunk.logprobs.extend(logprob_to_proto(sampled) for sampled in out.logprobs)
            if out.finished:
                chunk.finish_reason = FINISH_REASONS.get(out.finish_reason, common_pb2.FINISH_REASON_STOP)
                chunk.usage.CopyFrom(
                    common_pb2.Usage(prompt_tokens=len(prompt), completion_tokens=num_tokens,
                                     cached_prompt_tokens=out.num_cached_tokens,
                                     ttft=timing)
                )  # fmt: skip
            yield chunk

    # -- the session ----------------------------------------------------------------------------------------

    async def _run_session(self, request_iterator, outbox: Outbox) -> None:
        """Starts and cancels requests as the client asks, each a task of one TaskGroup; once the client closed
        its side and every request is done, ends the outbox (the writer ends the stream)."""
        tasks: dict[str, asyncio.Task] = {}
        try:
            async with asyncio.TaskGroup() as group:
                async for message in request_iterator:
                    kind = message.WhichOneof("kind")
                    if kind == "start":
                        rid = message.start.request_id
                        if rid in tasks:
                            error = InvalidArgument(f"request_id={rid!r} is already running")
                            outbox.put_last(_error_event(rid, error))
                            continue
                        tasks[rid] = group.create_task(self._serve(message.start, outbox))
                        tasks[rid].add_done_callback(lambda _, rid=rid: tasks.pop(rid, None))
                    elif kind == "cancel" and message.cancel in tasks:
                        tasks[message.cancel].cancel()
        finally:
            outbox.end()

    async def _serve(self, request: worker_pb2.DecodeRequest, outbox: Outbox) -> None:
        """One request of a session; never raises but CancelledError (its failure is its last event)."""
        rid = request.request_id
        deadline = time.monotonic() + request.timeout_s if request.timeout_s > 0 else None

        def time_remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        try:
            timeout = asyncio.timeout(request.timeout_s) if deadline is not None else contextlib.nullcontext()
            async with timeout:
                async for chunk in self._chunks(request, time_remaining):
                    await outbox.put(worker_pb2.SessionEvent(request_id=rid, chunk=chunk), rid)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            error = TimeoutError(f"request {rid} ran past its {request.timeout_s:.3g} s")
            outbox.put_last(_error_event(rid, error))
        except Exception as exc:
            outbox.put_last(_error_event(rid, exc))


def _error_event(request_id: str, exc: BaseException) -> worker_pb2.SessionEvent:
    code, message = status_for(exc)
    if code.name == "INTERNAL":
        log.error("request %s failed", request_id, exc_info=exc)
    return worker_pb2.SessionEvent(
        request_id=request_id, status_code=status_code_number(code), status_message=message
    )


class _RequestSpans:
    """D's spans of one request, under the gateway's: `decode.first_token` (arrival here -> the first token
    out; `decode.admit` and the prefill worker's spans hang under it) and `decode.stream` (the first token ->
    the last, with the token count), and under the last of them the request's `expert.dispatch` when its
    experts are remote. Started and ended explicitly: they live across `yield`s."""

    def __init__(
        self, telemetry: Telemetry, request_id: str, traceparent: str,
        expert_spans: ExpertDispatchSpans | None = None,
    ) -> None:  # fmt: skip
        self.telemetry = telemetry
        self.request_id = request_id
        self.expert_spans = expert_spans
        self.attributes = {spans.REQUEST_ID: request_id, spans.WORKER: telemetry.worker}
        self.first = telemetry.start(spans.DECODE_FIRST_TOKEN, traceparent, self.attributes)
        self.traceparent = telemetry.traceparent(self.first)
        self.parent = traceparent
        self.stream = None
        self.num_tokens = 0
        telemetry.bind_request(request_id, self.first)

    async def wrap(self, outputs: AsyncIterator) -> AsyncIterator:
        """Passes `outputs` (RequestOutput) through, timing them; ends the spans however it ends."""
        failed: BaseException | None = None
        try:
            async with contextlib.aclosing(outputs):
                async for out in outputs:
                    if out.new_token_ids and self.stream is None:
                        self.first.end()
                        self.stream = self.telemetry.start(spans.DECODE_STREAM, self.parent, self.attributes)
                    self.num_tokens += len(out.new_token_ids)
                    yield out
        except BaseException as exc:
            failed = exc
            raise
        finally:
            span = self.stream if self.stream is not None else self.first
            if failed is not None:
                mark_failed(span, failed)
            if self.stream is not None:
                self.stream.set_attribute(spans.TOKENS, self.num_tokens)
            if self.expert_spans is not None:
                self.expert_spans.finish(self.request_id, span)
            span.end()
