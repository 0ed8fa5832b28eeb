"""The synchronous client: `Client(target).generate(...)` streams, `Client(target).complete(...)` waits.

from moemesh.sdk import Client
with Client("localhost:50051") as client:
    for chunk in client.generate(prompt="To Sherlock Holmes she is always", max_tokens=32, temperature=0):
        print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import grpc

from moemesh._proto.v1 import gateway_pb2, gateway_pb2_grpc
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

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


class Stream(Iterator[Chunk]):
    """An in-flight Generate call. Iterate it for chunks; `cancel()` (or dropping it, or leaving a `with`
    block) cancels the request on the server. After cancel() iteration simply ends."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._cancelled = False
        self._finished = False
        self._lock = threading.Lock()
        self.request_id = ""

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Chunk:
        if self._finished:
            raise StopIteration
        try:
            msg = next(self._call)
        except StopIteration:
            self._finished = True
            raise
        except grpc.RpcError as err:
            self._finished = True
            if self._cancelled and err.code() is grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise error_from_rpc(err) from None
        if msg.request_id:
            self.request_id = msg.request_id
        chunk = chunk_from_proto(msg, self.request_id)
        if chunk.finish_reason is not None:
            self._finished = True
        return chunk

    def cancel(self) -> None:
        with self._lock:
            if self._finished or self._cancelled:
                return
            self._cancelled = True
        self._call.cancel()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.cancel()

    def __del__(self) -> None:
        # Leaving an unfinished stream behind cancels it, so the server frees what it holds.
        if not getattr(self, "_finished", True):
            with contextlib.suppress(Exception):  # e.g. at interpreter exit
                self.cancel()


class Client:
    """A connection to a moemesh gateway. Thread-safe; close() (or `with`) releases the channel.

    timeout_s bounds each call (a gRPC deadline that every hop of the mesh honours); api_key is sent as
    `authorization: Bearer <key>`; tls connects with TLS (`TlsOptions.from_dir("certs/client")`).
    """

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
            self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            options = CHANNEL_OPTIONS + tls.channel_options()
            self._channel = grpc.secure_channel(target, tls.credentials(), options=options)
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
    ) -> Stream:
        """Starts a generation and returns its chunk stream.

        sampling: the keywords of `Sampling` — max_tokens, temperature, top_k, top_p, min_p,
        repetition_penalty, frequency_penalty, presence_penalty, seed, stop, stop_token_ids, logprobs,
        ignore_eos. Bad values raise InvalidRequest here, before anything is sent. Unset ones take the server's
        defaults: greedy (temperature 0, as `LLM` and `moemesh generate`), max_tokens up to the context.
        """
        request = build_request(prompt, token_ids, model, request_id, sampling)
        call = self._stub.Generate(request, timeout=self._timeout(timeout_s), metadata=self._metadata)
        return Stream(call)

    def complete(self, prompt: str | None = None, **kwargs: Any) -> Completion:
        """generate() run to the end: the whole token list and text."""
        collector = Collector()
        stream = self.generate(prompt, **kwargs)
        for chunk in stream:
            collector.add(chunk)
        return collector.result(stream.request_id)

    def tokenize(self, text: str, *, model: str = "", add_special_tokens: bool = False) -> list[int]:
        request = gateway_pb2.TokenizeRequest(model=model, text=text, add_special_tokens=add_special_tokens)
        return list(self._unary(self._stub.Tokenize, request).token_ids)

    def health(self, service: str = "") -> bool:
        """The gateway's gRPC health service (grpc.health.v1): True when it reports SERVING for `service`
        ("" = the whole server), False otherwise (NOT_SERVING while it starts or stops, an unknown service).
        Raises Unavailable when the gateway cannot be reached."""
        try:
            status = self._health(service, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as err:
            if err.code() is grpc.StatusCode.NOT_FOUND:  # no such service
                return False
            raise error_from_rpc(err) from None
        return status == HEALTH_SERVING

    def list_models(self) -> list[str]:
        return [m.id for m in self._unary(self._stub.ListModels, gateway_pb2.ListModelsRequest()).models]

    def models(self) -> list[ModelInfo]:
        """list_models with each model's context length and vocabulary size."""
        reply = self._unary(self._stub.ListModels, gateway_pb2.ListModelsRequest())
        return [ModelInfo(m.id, m.max_context_tokens, m.vocab_size) for m in reply.models]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _timeout(self, timeout_s: float | None) -> float | None:
        return self.timeout_s if timeout_s is None else timeout_s

    def _unary(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
