"""`DecodeWorker.Session` over real gRPC: many requests on one stream, a decode step's chunks for all of them in
one message; a cancel, a deadline or a bad request ends that request alone; the gateway's `DecodeSession`
reads it back as per-request chunk streams."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest

from moemesh._proto.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from moemesh.engine.engine import RequestOutput
from moemesh.engine.request import FinishReason
from moemesh.services.decode.servicer import DecodeServicer
from moemesh.services.gateway.sessions import DecodeSession
from moemesh.transport.errors import DeadlineExceeded, InvalidArgument, Unavailable


class SteppingWorker:
    """A decode worker whose engine steps every 20 ms: each running request gets one token per step."""

    def __init__(self) -> None:
        self.step = asyncio.Event()
        self.aborted: list[str] = []

    async def tick(self) -> None:
        while True:
            await asyncio.sleep(0.02)
            self.step.set()
            self.step.clear()

    async def generate(self, job, time_remaining, timing=None):
        tokens: list[int] = []
        try:
            while len(tokens) < job.params.max_tokens:
                await self.step.wait()
                tokens.append(len(tokens) + 7)
                done = len(tokens) == job.params.max_tokens
                yield RequestOutput(job.request_id, (tokens[-1],), len(tokens), "", done,
                                    FinishReason.LENGTH if done else None,
                                    output_ids=tuple(tokens) if done else None)  # fmt: skip
        finally:
            if len(tokens) < job.params.max_tokens:
                self.aborted.append(job.request_id)


def _start(rid: str, max_tokens: int, prompt=(1, 2, 3), timeout_s: float = 0.0) -> worker_pb2.SessionRequest:
    request = worker_pb2.DecodeRequest(request_id=rid, prompt_token_ids=list(prompt), timeout_s=timeout_s,
                                       sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0))  # fmt: skip
    return worker_pb2.SessionRequest(start=request)


@contextlib.asynccontextmanager
async def _decode_server() -> AsyncIterator[tuple[SteppingWorker, grpc.aio.Server, grpc.aio.Channel]]:
    """A stepping worker behind a real DecodeServicer on a real port, and a channel to it."""
    worker = SteppingWorker()
    ticker = asyncio.ensure_future(worker.tick())
    server = grpc.aio.server()
    worker_pb2_grpc.add_DecodeWorkerServicer_to_server(DecodeServicer(worker, max_model_len=1024), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield worker, server, channel
    finally:
        ticker.cancel()
        await channel.close()
        await server.stop(None)


def test_one_message_per_step_carries_every_request_and_errors_stay_per_request():
    async def body():
        async with _decode_server() as (worker, _, channel):
            call = worker_pb2_grpc.DecodeWorkerStub(channel).Session()
            for i in range(8):
                await call.write(_start(f"r{i}", 4))
            await call.write(_start("bad", 4, prompt=()))  # INVALID_ARGUMENT for it alone
            await call.write(_start("slow", 50, timeout_s=0.15))  # DEADLINE_EXCEEDED for it alone
            await call.write(_start("gone", 50))
            tokens: dict[str, list[int]] = {}
            errors: dict[str, tuple[int, str]] = {}
            updates, cancelled = 0, False
            async for update in call:
                updates += 1
                for event in update.events:
                    if event.status_code:
                        errors[event.request_id] = (event.status_code, event.status_message)
                    else:
                        tokens.setdefault(event.request_id, []).extend(event.chunk.token_ids)
                if not cancelled and len(tokens.get("gone", [])) >= 2:
                    await call.write(worker_pb2.SessionRequest(cancel="gone"))
                    cancelled = True
                if len(errors) == 2 and all(len(tokens.get(f"r{i}", [])) == 4 for i in range(8)):
                    break
            for _ in range(100):  # the cancel reached D: its generator was closed
                if "gone" in worker.aborted:
                    break
                await asyncio.sleep(0.02)
            call.cancel()
        assert all(tokens[f"r{i}"] == [7, 8, 9, 10] for i in range(8))
        chunks = sum(len(t) for t in tokens.values())
        assert updates * 3 < chunks, (updates, chunks)  # several requests' chunks per message
        assert errors["bad"] == (
            grpc.StatusCode.INVALID_ARGUMENT.value[0],
            "prompt_token_ids=[] must be non-empty",
        )
        assert (
            errors["slow"][0] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] and "0.15 s" in errors["slow"][1]
        )
        assert "gone" not in errors and sorted(worker.aborted) == ["gone", "slow"]

    asyncio.run(asyncio.wait_for(body(), 20))


def test_first_tokens_of_one_step_go_in_one_message():
    """Each request hands its first chunk to the session's writer before it goes on (TTFT): the requests woken
    by the same step still put theirs first, so they leave in one SessionUpdate."""
    worker = SteppingWorker()
    waiting: list[str] = []
    generate = worker.generate

    async def counted(job, time_remaining, timing=None):
        waiting.append(job.request_id)
        async for out in generate(job, time_remaining, timing):
            yield out

    worker.generate = counted

    async def body():
        servicer = DecodeServicer(worker, max_model_len=1024)

        async def starts():
            for i in range(8):
                yield _start(f"r{i}", 1)
            while len(waiting) < 8:  # every request waits for the engine's next step
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.01)
            worker.step.set()

        return [
            sorted(e.request_id for e in update.events) async for update in servicer.Session(starts(), None)
        ]

    updates = asyncio.run(asyncio.wait_for(body(), 20))
    assert updates == [[f"r{i}" for i in range(8)]]


def test_the_gateway_side_reads_chunks_back_per_request_and_a_lost_worker_fails_them_all():
    async def body():
        async with _decode_server() as (worker, server, channel):
            session = DecodeSession(channel, "decode-0")

            async def collect(request: worker_pb2.SessionRequest) -> list[int]:
                return [t async for chunk in session.run(request.start) for t in chunk.token_ids]

            assert await asyncio.gather(*(collect(_start(f"r{i}", 3)) for i in range(4))) == [[7, 8, 9]] * 4
            with pytest.raises(InvalidArgument, match=r"prompt_token_ids=\[\] must be non-empty"):
                await collect(_start("bad", 3, prompt=()))
            with pytest.raises(DeadlineExceeded):
                await collect(_start("slow", 50, timeout_s=0.1))
            stream = session.run(_start("early-exit", 50).start)  # leaving early cancels it on D
            assert (await anext(stream)).token_ids == [7]
            await stream.aclose()
            for _ in range(50):
                if "early-exit" in worker.aborted:
                    break
                await asyncio.sleep(0.02)
            assert "early-exit" in worker.aborted
            long = [asyncio.ensure_future(collect(_start(f"l{i}", 500))) for i in range(3)]
            await asyncio.sleep(0.1)
            await server.stop(None)  # the decode worker goes away mid-stream
            results = await asyncio.gather(*long, return_exceptions=True)
            assert all(isinstance(r, Unavailable) for r in results), results
            await session.close()

    asyncio.run(asyncio.wait_for(body(), 20))


def test_a_client_that_stops_reading_holds_its_requests_back_then_they_fail_resource_exhausted():
    """The session's writer stalls (as it does when the client reads nothing and gRPC's flow control is full):
    at most `max_session_events` events wait, the requests stop producing, and after `session_stall_s` each
    fails with RESOURCE_EXHAUSTED and leaves the worker. Before, the outgoing queue grew with every token and
    the requests ran to their end."""

    async def body():
        worker = SteppingWorker()
        ticker = asyncio.ensure_future(worker.tick())
        servicer = DecodeServicer(worker, max_model_len=64, max_session_events=4, session_stall_s=0.3)
        client_done = asyncio.Event()

        async def requests():
            for i in range(3):
                yield _start(f"r{i}", 60)
            await client_done.wait()

        stream = servicer.Session(requests(), None)
        try:
            first = await anext(stream)  # then the client reads nothing for a while
            for _ in range(100):
                if len(worker.aborted) == 3:
                    break
                await asyncio.sleep(0.02)
            assert sorted(worker.aborted) == ["r0", "r1", "r2"]  # every request left the engine
            client_done.set()
            updates = [first] + [update async for update in stream]
        finally:
            ticker.cancel()
        held = updates[1].events  # everything that waited while the client read nothing
        assert len(held) <= 4 + 3  # the bound, plus one error per request
        chunks = [e for u in updates for e in u.events if not e.status_code]
        errors = {e.request_id: e for u in updates for e in u.events if e.status_code}
        assert len(chunks) <= len(first.events) + 4  # nothing was produced past the bound (60 tokens each)
        assert sorted(errors) == ["r0", "r1", "r2"]
        for event in errors.values():
            assert event.status_code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert "the client read nothing for 0.3 s" in event.status_message
            assert "(at most 4)" in event.status_message

    asyncio.run(asyncio.wait_for(body(), 20))
