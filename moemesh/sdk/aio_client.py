"""The asyncio client: the same API as `Client`, awaited.

async with AsyncClient("localhost:50051") as client:
    async for chunk in client.generate(prompt="To Sherlock Holmes she is always", max_tokens=32):
        print(chunk.text, end="")
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from moemesh._proto.v1 import gateway_pb2, gateway_pb2_grpc
from moemesh.sdk.client import CHANNEL_OPTIONS
from moemesh.sdk.errors import error_from_rpc
from moemesh.sdk.messages import (
    HEALTH_CHECK_METHOD,
    HEALTH_SERVING,
    Chunk,
    Collector,
    Completion,
    ModelInfo,
    build_request,
    chunk_from_proto,
    decode_health_status,
    encode_health_request,
)
from moemesh.sdk.tls import TlsOptions


class AsyncStream(AsyncIterator[Chunk]):
    """An in-flight Generate call; `async for` it. cancel() (or leaving `async with`) cancels the request,
    after which iteration simply ends."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._iter = call.__aiter__()
        self._cancelled = False
        self._finished = False
        self.request_id = ""

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> Chunk:
        if self._finished:
            raise StopAsyncIteration
        try:
            msg = await self._iter.__anext__()
        except StopAsyncIteration:
            self._finished = True
            raise
        except grpc.RpcError as err:
            self._finished = True
            if self._cancelled and err.code() is grpc.StatusCode.CANCELLED:
                raise StopAsyncIteration from None
            raise error_from_rpc(err) from None
        except BaseException:
            if self._cancelled:  # grpc.aio raises CancelledError on a call we cancelled ourselves
                self._finished = True
                raise StopAsyncIteration from None
            raise
        if msg.request_id:
            self.request_id = msg.request_id
        chunk = chunk_from_proto(msg, self.request_id)
        if chunk.finish_reason is not None:
            self._finished = True
        return chunk

    def cancel(self) -> None:
        if not self._finished and not self._cancelled:
            self._cancelled = True
            self._call.cancel()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.cancel()


class AsyncClient:
    """A grpc.aio connection to a gateway; create and use it inside one event loop, `aclose()` at the end."""

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float | None = None,
        api_key: str | None = None,
        tls: TlsOptions | None = None,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        if tls is None:
            self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            options = CHANNEL_OPTIONS + tls.channel_options()
            self._channel = grpc.aio.secure_channel(target, tls.credentials(), options=options)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._health = self._channel.unary_unary(
            HEALTH_CHECK_METHOD,
            request_serializer=encode_health_request,
            response_deserializer=decode_health_status,
        )

    def generate(
        self,
        prompt: str | None = None,
        *,
        token_ids: list[int] | None = None,
        model: str = "",
        request_id: str = "",
        timeout_s: float | None = None,
        **sampling: Any,
    ) -> AsyncStream:
        """Like Client.generate; validation errors raise here, before anything is sent."""
        request = build_request(prompt, token_ids, model, request_id, sampling)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        return AsyncStream(self._stub.Generate(request, timeout=timeout, metadata=self._metadata))

    async def complete(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        collector = Collector()
        stream = self.generate(prompt, **kwargs)
        async for chunk in stream:
            collector.add(chunk)
        return collector.result(stream.request_id)

    async def tokenize(self, text: str, *, model: str = "", add_special_tokens: bool = False) -> list[int]:
        request = gateway_pb2.TokenizeRequest(model=model, text=text, add_special_tokens=add_special_tokens)
        return list((await self._unary(self._stub.Tokenize, request)).token_ids)

    async def health(self, service: str = "") -> bool:
        """The gateway's gRPC health service (grpc.health.v1): True when it reports SERVING for `service`
        ("" = the whole server), False otherwise (NOT_SERVING while it starts or stops, an unknown service).
        Raises Unavailable when the gateway cannot be reached."""
        try:
            status = await self._health(service, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as err:
            if err.code() is grpc.StatusCode.NOT_FOUND:  # no such service
                return False
            raise error_from_rpc(err) from None
        return status == HEALTH_SERVING

    async def list_models(self) -> list[str]:
        reply = await self._unary(self._stub.ListModels, gateway_pb2.ListModelsRequest())
        return [m.id for m in reply.models]

    async def models(self) -> list[ModelInfo]:
        """list_models with each model's context length and vocabulary size."""
        reply = await self._unary(self._stub.ListModels, gateway_pb2.ListModelsRequest())
        return [ModelInfo(m.id, m.max_context_tokens, m.vocab_size) for m in reply.models]

    async def aclose(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _unary(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
