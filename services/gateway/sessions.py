"""The gateway's end of `DecodeWorker.Session`: one multiplexed stream per decode worker.

`DecodeSession.run(request)` starts a request on the stream and yields its `DecodeChunk`s as `Generate` would;
a reader task hands each `SessionEvent` to its request's queue. A request's error event raises the matching
MeshError (`from_status`); the stream breaking (a lost decode worker) fails every request on it with
Unavailable, which the gateway's migration loop handles as it did a failed `Generate` call. Leaving `run`
before the last chunk sends `cancel` (D aborts the request, and P's part of it). The stream opens on first
use and again after it broke.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import grpc

from moemesh._proto.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from moemesh.transport.errors import (
    InvalidArgument,
    MeshError,
    Unavailable,
    from_rpc_error,
    from_status,
    status_code_from_number,
)

log = logging.getLogger(__name__)


class DecodeSession:
    def __init__(self, channel: grpc.aio.Channel, name: str) -> None:
        self.stub = worker_pb2_grpc.DecodeWorkerStub(channel)
        self.name = name
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task | None = None
        self._streams: dict[str, tuple[grpc.aio.StreamStreamCall, asyncio.Queue]] = {}
        self._write_lock = asyncio.Lock()
        self.last_heard_s = time.monotonic()  # the last message from D, or the last request started

    async def run(self, request: worker_pb2.DecodeRequest) -> AsyncIterator[worker_pb2.DecodeChunk]:
        rid = request.request_id
        if rid in self._streams:
            raise InvalidArgument(f"request_id={rid!r} is already running on {self.name}")
        queue: asyncio.Queue = asyncio.Queue()
        call, ended = self._open(), False
        self._streams[rid] = (call, queue)
        self.last_heard_s = time.monotonic()
        try:
            await self._write(call, worker_pb2.SessionRequest(start=request))
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    ended = True
                    raise item
                if item.status_code:
                    ended = True
                    raise from_status(status_code_from_number(item.status_code), item.status_message)
                ended = item.chunk.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
                yield item.chunk
                if ended:
                    return
        finally:
            self._streams.pop(rid, None)
            if not ended:
                with contextlib.suppress(MeshError):
                    await asyncio.shield(self._write(call, worker_pb2.SessionRequest(cancel=rid)))

    @property
    def num_active(self) -> int:
        """Requests running on this session's stream now."""
        return len(self._streams)

    def abort(self) -> None:
        """Breaks the stream (its requests fail with Unavailable and migrate); the next run() reopens it."""
        if self._call is not None:
            self._call.cancel()

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    def _open(self) -> grpc.aio.StreamStreamCall:
        if self._call is None or self._call.done():
            self._call = self.stub.Session()
            self._reader = asyncio.ensure_future(self._read(self._call))
        return self._call

    async def _write(self, call: grpc.aio.StreamStreamCall, message: worker_pb2.SessionRequest) -> None:
        try:
            async with self._write_lock:
                await call.write(message)
        except (grpc.RpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as err:
            detail = from_rpc_error(err) if isinstance(err, grpc.RpcError) else err
            raise Unavailable(f"decode session to {self.name} is closed: {detail}") from None

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        error: BaseException = Unavailable(f"decode worker {self.name} ended its session")
        try:
            async for update in call:
                self.last_heard_s = time.monotonic()
                for event in update.events:
                    stream = self._streams.get(event.request_id)
                    if stream is not None and stream[0] is call:
                        stream[1].put_nowait(event)
        except grpc.RpcError as err:
            error = from_rpc_error(err)
            if not isinstance(error, Unavailable) and err.code() != grpc.StatusCode.CANCELLED:
                log.warning("decode session to %s failed: %s", self.name, error)
            error = Unavailable(f"decode worker {self.name} lost: {error}")
        except asyncio.CancelledError:
            error = Unavailable(f"decode session to {self.name} closed")
            raise
        finally:
            if self._call is call:
                self._call = None
            for on_call, queue in self._streams.values():  # every request on this stream: it is gone
                if on_call is call:
                    queue.put_nowait(error)
