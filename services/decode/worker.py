"""The decode worker's loop: admit a request (its KV prefilled by a prefill worker into leased pages, or here),
then continuous-batch decode on the engine and stream its tokens.

`generate(job)` for one request:
* local prefill — the colocated role, no prefill worker named, a migrated request, or a prompt of which at
  most `local_prefill_tokens` tokens are missing from this worker's prefix cache: `add_request` here.
* remote prefill — `reserve_kv` (MemoryError -> RESOURCE_EXHAUSTED), open a lease (`LeaseTable`), call
  `PrefillWorker.Prefill` with the `KvTarget` (the client's deadline bounds it), wait until every byte landed
  (P sends layer by layer as its chunks finish, straight into the leased pages), check the byte count, then
  `add_prefilled` with P's first token.
  If P is lost (UNAVAILABLE) its lease is ended (a late write from it is refused) and the request is
  re-leased under a new lease and sent to another handshaken prefill worker it has not tried; only when none
  is left is it prefilled here. On a cancel or a failure while P may still
  write: `Abort` on P (its acknowledgement means it writes no more), then the lease is closed (the inbox
  refuses later writes), and only then do the pages return to the pool.
* then its outputs stream from the EngineLoop; leaving early aborts it in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import grpc

from moemesh._proto.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from moemesh.config.mesh import WorkerConfig
from moemesh.engine.engine import KvReservation, RequestOutput
from moemesh.engine.sampler import SampledToken
from moemesh.engine.sampling_params import SamplingParams
from moemesh.services.decode.leases import LeaseTable, OpenLease
from moemesh.services.engine_commands import finish
from moemesh.services.engine_loop import EngineLoop
from moemesh.services.sampling import logprob_from_proto, sampling_to_proto
from moemesh.telemetry import spans
from moemesh.telemetry.tracing import Telemetry
from moemesh.transport.errors import MeshError, Unavailable, from_rpc_error
from moemesh.transport.peers import PeerSet, WorkerInfo
from moemesh.transport.registry import LoadReport

log = logging.getLogger(__name__)
ABORT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class DecodeJob:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prefill_worker: WorkerInfo | None  # None: prefill here
    generated_ids: tuple[int, ...] = ()  # migration: tokens produced elsewhere
    traceparent: str = ""  # the span this request's decode.admit hangs under


def _first_output(job: DecodeJob, prefilled: worker_pb2.PrefillResult) -> RequestOutput:
    """The request's first token as P sampled it (its outputs so far: what migrated here, then this one)."""
    first = prefilled.first_token_id
    logprobs = (logprob_from_proto(prefilled.first_logprob),) if prefilled.HasField("first_logprob") else ()
    return RequestOutput(job.request_id, (first,), len(job.generated_ids) + 1, "", False, logprobs=logprobs,
                         num_cached_tokens=prefilled.num_cached_tokens)  # fmt: skip


def _unseen(out: RequestOutput, emitted: int) -> tuple[int, ...]:
    """out's new tokens past the first `emitted` of the request's output (those were streamed already)."""
    start = out.num_output_tokens - len(out.new_token_ids)  # where out's new tokens sit in the output
    return out.new_token_ids[max(0, emitted - start) :]


class DecodeWorker:
    def __init__(
        self,
        config: WorkerConfig,
        loop: EngineLoop,
        leases: LeaseTable,
        peers: PeerSet,
        *,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.config = config
        self.telemetry = telemetry or Telemetry.disabled(config.worker_id)
        self.loop = loop
        self.engine = loop.engine
        self.leases = leases
        self.peers = peers
        self.members: list[WorkerInfo] = []
        self.num_remote_prefills = 0
        self.num_local_prefills = 0
        self.num_prefill_fallbacks = (
            0  # meant for a prefill worker, prefilled here (load report; logged once)
        )
        self._sync_lock = asyncio.Lock()

    async def on_members(self, members: list[WorkerInfo]) -> None:
        """The registry's membership: handshake new prefill workers now (UCX endpoints before any request)."""
        self.members = members
        async with self._sync_lock:
            await self.peers.sync(members)

    async def generate(
        self,
        job: DecodeJob,
        time_remaining: Callable[[], float | None],
        timing: common_pb2.TtftBreakdown | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs until the finished one. Closing the iterator aborts the request.
        `timing` gets the TTFT breakdown, complete once the first output of the engine was yielded.

        With a remote prefill, P's first token is yielded as soon as P's forward ended (its early result),
        while its KV is still moving; the engine's outputs follow once the KV landed."""
        rid = job.request_id
        queue = self.loop.subscribe(rid)
        finished = False
        timing = timing if timing is not None else common_pb2.TtftBreakdown()
        early: asyncio.Future[worker_pb2.PrefillResult] = asyncio.get_running_loop().create_future()
        admission = asyncio.ensure_future(self._admit_traced(job, time_remaining, timing, early))
        try:
            await asyncio.wait({admission, early}, return_when=asyncio.FIRST_COMPLETED)
            emitted = len(job.generated_ids)  # the output's first `emitted` were streamed (or elsewhere)
            if early.done():  # P's first token, before its KV landed
                emitted += 1
                yield _first_output(job, early.result())
            prefilled, admitted_s = await admission
            if prefilled is not None and not early.done():  # P sampled the first token; the engine's follow
                emitted += 1
                yield _first_output(job, prefilled)
            while not finished:
                out = await queue.get()
                if admitted_s:  # the engine's first output: a decode step after P's KV, or the local prefill
                    elapsed_ms = 1000 * (time.monotonic() - admitted_s)
                    if timing.remote_prefill:
                        timing.first_decode_step_ms = elapsed_ms
                    else:
                        timing.prefill_ms = elapsed_ms
                    admitted_s = 0.0
                new: list[int] = []
                logprobs: list[SampledToken] = []
                while not isinstance(out, BaseException):
                    new += _unseen(out, emitted)
                    emitted = max(emitted, out.num_output_tokens)
                    logprobs += out.logprobs
                    if out.finished or queue.empty():
                        break
                    out = queue.get_nowait()  # behind the engine: one chunk for every output already here
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                if new or finished:  # the prompt's cached tokens: where it was computed (P's cache, or ours)
                    cached = out.num_cached_tokens if prefilled is None else prefilled.num_cached_tokens
                    logprobs = logprobs[-len(new) :] if new else []
                    yield replace(
                        out, new_token_ids=tuple(new), logprobs=tuple(logprobs), num_cached_tokens=cached
                    )
        finally:
            early.cancel()
            if not admission.done():
                admission.cancel()
            await asyncio.gather(admission, return_exceptions=True)  # its leases end, its pages return
            self.loop.unsubscribe(rid)
            if not finished:
                with contextlib.suppress(Exception):
                    await self.loop.must_run(self.engine.abort, rid)

    def load(self) -> LoadReport:
        stats = self.engine.stats()
        return LoadReport(
            self.config.worker_id, self.config.role, num_running_requests=stats["num_running"],
            num_queued_requests=stats["num_waiting"], num_queued_tokens=0,
            num_free_pages=stats["pages_free"] + stats["pages_cached"], num_total_pages=stats["pages_total"],
            unix_ms=int(time.time() * 1000), num_remote_prefills=self.num_remote_prefills,
            num_prefill_fallbacks=self.num_prefill_fallbacks,
        )  # fmt: skip

    # -- admission ------------------------------------------------------------------------------------------

    async def _admit_traced(
        self,
        job: DecodeJob,
        time_remaining: Callable[[], float | None],
        timing: common_pb2.TtftBreakdown,
        early: asyncio.Future[worker_pb2.PrefillResult],
    ) -> tuple[worker_pb2.PrefillResult | None, float]:
        """`_admit` under its `decode.admit` span (current in this task: the Prefill call carries it)."""
        with self.telemetry.span(spans.DECODE_ADMIT, job.traceparent, {spans.REQUEST_ID: job.request_id,
                                 spans.PROMPT_TOKENS: len(job.prompt_ids)}) as span:  # fmt: skip
            prefilled, admitted_s = await self._admit(job, time_remaining, timing, early)
            span.set_attribute(spans.CACHED_TOKENS, prefilled.num_cached_tokens if prefilled else 0)
            return prefilled, admitted_s

    async def _admit(
        self,
        job: DecodeJob,
        time_remaining: Callable[[], float | None],
        timing: common_pb2.TtftBreakdown,
        early: asyncio.Future[worker_pb2.PrefillResult],
    ) -> tuple[worker_pb2.PrefillResult | None, float]:
        """Queues the request in the engine. Returns the prefill worker's result (its first token) if one ran
        it, and when the engine took the request (time.monotonic(), on the engine thread). P's early result
        (its first token, before the KV landed) is set on `early` as soon as it comes."""
        arrived_s = time.monotonic()
        peer = None if self.config.force_local_prefill or job.generated_ids else job.prefill_worker
        tried: list[str] = []
        while peer is not None:
            # A caller cancelled while reserve_kv runs never sees the reservation: undo returns its pages.
            reservation, reserved_s = await self.loop.call_at(
                self.engine.reserve_kv, job.request_id, job.prompt_ids, undo=self.engine.cancel_reservation
            )
            # From here the reservation is ours until _prefill_remote takes it (it frees it on any failure).
            timing.queue_ms = 1000 * (reserved_s - arrived_s)
            missing = len(job.prompt_ids) - reservation.num_cached_tokens
            if missing <= self.config.local_prefill_tokens:
                await self.loop.must_run(self.engine.cancel_reservation, reservation)
                break
            try:
                result, adopted_s = await self._prefill_remote(
                    job, peer, reservation, time_remaining, timing, early
                )
                self.num_remote_prefills += 1
                timing.remote_prefill = True
                return result, adopted_s
            except Unavailable as err:  # P is lost; its lease is closed (and the pages freed) already
                tried.append(peer.worker_id)
                if early.done():  # its first token is out: the rest is computed here, after that token
                    job = replace(job, generated_ids=(*job.generated_ids, early.result().first_token_id))
                    self.num_prefill_fallbacks += 1
                    log.warning("prefill worker %s lost %s after its first token (%s); prefilling it here",
                                tried[-1], job.request_id, err)  # fmt: skip
                    break
                peer = self._other_prefill(tried)
                then = f"retrying on {peer.worker_id}" if peer else "prefilling it here"
                if peer is None:
                    self.num_prefill_fallbacks += 1
                first = peer is None and self.num_prefill_fallbacks == 1  # the cause, loud, once
                log.log(logging.WARNING if peer or first else logging.DEBUG,
                        "prefill worker %s unavailable for %s (%s); %s%s", tried[-1], job.request_id, err, then,
                        " (the first local-prefill fallback; later ones are counted in the load report's "
                        "num_prefill_fallbacks)" if first else "")  # fmt: skip
        self.num_local_prefills += 1
        _, queued_s = await self.loop.call_at(
            self.engine.add_request, job.prompt_ids, job.params, job.request_id, output_ids=job.generated_ids
        )
        timing.queue_ms = 1000 * (queued_s - arrived_s)
        return None, queued_s

    def _other_prefill(self, tried: list[str]) -> WorkerInfo | None:
        """A handshaken prefill worker not in `tried` (the registry's members first, in their order)."""
        live = {m.worker_id for m in self.members if m.role == "prefill"}
        ready = [m for wid, m in self.peers.ready.items() if wid not in tried]
        ready.sort(key=lambda m: m.worker_id not in live)
        return ready[0] if ready else None

    async def _prefill_remote(
        self,
        job: DecodeJob,
        peer: WorkerInfo,
        reservation: KvReservation,
        time_remaining: Callable[[], float | None],
        timing: common_pb2.TtftBreakdown,
        early: asyncio.Future[worker_pb2.PrefillResult],
    ) -> tuple[worker_pb2.PrefillResult, float]:
        """P's final result and when the engine adopted the KV (engine thread's time.monotonic()); P's early
        result goes to `early` as it comes. Owns `reservation`: whatever happens, its pages end adopted by the
        engine or returned to the pool."""
        try:
            channel = await self._channel(peer)
            remaining_s = (
                time_remaining()
            )  # bounds the call; the lease lives lease_ttl_s, renewed by progress
            lease = self.leases.open(reservation)
            opened_ns, traceparent = time.time_ns(), self.telemetry.traceparent()  # decode.admit's span
        except BaseException:
            await self.loop.must_run(self.engine.cancel_reservation, reservation)
            raise
        stub = worker_pb2_grpc.PrefillWorkerStub(channel)
        request = worker_pb2.PrefillRequest(
            request_id=job.request_id, token_ids=job.prompt_ids, sampling=sampling_to_proto(job.params),
            kv_target=replace(lease.target, traceparent=traceparent).to_proto(),
        )  # fmt: skip
        p_done = False
        called_s = time.monotonic()
        call = stub.Prefill(request, timeout=remaining_s, metadata=self.telemetry.metadata())
        try:
            try:
                result = await self._read_while_leased(call, lease, peer)
                if not result.kv_complete:  # the early result: P's first token, its KV still moving
                    timing.prefill_ms = result.prefill_ms
                    timing.handoff_ms = max(0.0, 1000 * (time.monotonic() - called_s) - result.prefill_ms)
                    if not early.done():
                        early.set_result(result)
                    result = await self._read_while_leased(call, lease, peer)
                    if not result.kv_complete:
                        raise MeshError(
                            f"{job.request_id}: prefill worker {peer.worker_id} sent two early results"
                        )
                else:  # a P that answers once, with its KV acknowledged
                    timing.prefill_ms = result.prefill_ms
                    timing.handoff_ms = max(0.0, 1000 * (time.monotonic() - called_s) - result.prefill_ms
                                            - result.kv_transfer_ms)  # fmt: skip
                timing.kv_transfer_ms = result.kv_transfer_ms
            except grpc.RpcError as err:
                raise from_rpc_error(err) from None
            p_done = True
            progress = await self.leases.receiver.inbox.wait_complete(lease.key, timeout_s=time_remaining())
            log.info("%s: prefilled on %s, %d of %d prompt tokens' KV received in lease %s (%d bytes, P sent %d)",
                     job.request_id, peer.worker_id, len(job.prompt_ids) - reservation.num_cached_tokens,
                     len(job.prompt_ids), lease.key, progress.bytes_received, result.kv_bytes_sent)  # fmt: skip
            self.telemetry.record(spans.KV_RECEIVE, opened_ns, time.time_ns(), None, {
                spans.REQUEST_ID: job.request_id, spans.LEASE: str(lease.key), spans.PREFILL_WORKER: peer.worker_id,
                spans.KV_BYTES: progress.bytes_received, spans.KV_DURATION_MS: (time.time_ns() - opened_ns) / 1e6,
                spans.KV_LAYERS: lease.target.layout.num_layers,
                spans.KV_PAGES: len(lease.target.page_ids) - lease.target.first_page})  # fmt: skip
            if progress.bytes_received != result.kv_bytes_sent:
                raise MeshError(
                    f"{job.request_id}: received {progress.bytes_received} KV bytes, P sent {result.kv_bytes_sent}"
                )
            adopted_s = await lease.adopt(
                lambda: self.engine.add_prefilled(
                    reservation, job.prompt_ids, result.first_token_id, job.params
                )
            )
            return result, adopted_s
        except BaseException:
            call.cancel()
            await finish(self._give_up(lease, stub, p_done))
            raise

    async def _read_while_leased(self, call, lease: OpenLease, peer: WorkerInfo) -> worker_pb2.PrefillResult:
        """The Prefill stream's next result (`_call_while_leased`); a stream that ends without one is a lost P."""
        result = await self._call_while_leased(call.read(), lease)
        if result is grpc.aio.EOF:
            raise Unavailable(f"prefill worker {peer.worker_id} ended the Prefill stream without its result")
        return result

    async def _call_while_leased(self, call, lease: OpenLease):
        """Awaits P's answer, but no longer than the lease lives: a P that stops sending lets the lease expire
        (Unavailable: the call is cancelled, another P or a local prefill takes the request), so a hung P holds
        the pages for at most lease_ttl_s."""
        answer = asyncio.ensure_future(call)
        ended = asyncio.ensure_future(self.leases.receiver.inbox.wait_complete(lease.key))
        try:
            await asyncio.wait({answer, ended}, return_when=asyncio.FIRST_COMPLETED)
            if not answer.done() and ended.exception() is not None:  # expired: P is stuck, try another
                raise Unavailable(f"lease {lease.key} expired before the prefill worker finished: "
                                  f"{ended.exception()}") from ended.exception()  # fmt: skip
            return await answer
        finally:
            for task in (answer, ended):
                task.cancel()
            await asyncio.gather(answer, ended, return_exceptions=True)

    async def _give_up(self, lease: OpenLease, stub: worker_pb2_grpc.PrefillWorkerStub, p_done: bool) -> None:
        """P may still write: have it acknowledge the abort, then end the lease and free the pages."""
        if not p_done:
            abort = worker_pb2.AbortRequest(
                request_id=lease.reservation.request_id, lease_id=lease.key.lease_id,
                lease_generation=lease.key.generation,
            )  # fmt: skip
            try:
                await stub.Abort(abort, timeout=ABORT_TIMEOUT_S)
            except grpc.RpcError as err:  # lost P: the ended lease refuses whatever it still sends
                log.warning("abort of %s not acknowledged: %s", lease.key, err.code().name)
        await lease.close()

    async def _channel(self, peer: WorkerInfo) -> grpc.aio.Channel:
        """The handshaken channel to `peer`; handshakes now when the registry has not told us of it yet."""
        if peer.worker_id not in self.peers.ready:
            async with self._sync_lock:
                known = {m.worker_id: m for m in [*self.peers.ready.values(), *self.members]}
                known[peer.worker_id] = peer
                await self.peers.sync(list(known.values()))
        if peer.worker_id not in self.peers.ready:
            refused = self.peers.refused.get(peer.worker_id)
            if refused is not None:
                raise refused
            raise Unavailable(f"prefill worker {peer.worker_id} at {peer.grpc_address} did not answer")
        return self.peers.channel(peer.worker_id)
