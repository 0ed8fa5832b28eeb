"""What the SDK returns and what it sends: plain dataclasses, validated on the client side."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from moemesh._proto.v1 import common_pb2, gateway_pb2
from moemesh.sdk.errors import InvalidRequest, ServerError

_UINT32 = 1 << 32
_UINT64 = 1 << 64
FINISH_REASONS = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length"}


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob) of the top alternatives, best first


@dataclass(frozen=True)
class TtftBreakdown:
    """Where the time to first token went, in milliseconds; each span measured by one server process."""

    remote_prefill: bool  # a prefill worker computed the prompt (else the decode worker did)
    queue_ms: float  # decode worker: arrival -> KV pages reserved
    prefill_ms: float  # the prompt's forward (its wait for a batch included)
    kv_transfer_ms: float  # prefill worker: forward's end -> last KV chunk acknowledged (not overlapped)
    handoff_ms: float  # decode worker: the rest of its wait for the KV (RPC hops, checks)
    first_decode_step_ms: float  # decode worker: KV in its pages -> its first decoded token


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0
    ttft: TtftBreakdown | None = None


@dataclass(frozen=True)
class Chunk:
    """One streamed piece: the new tokens and new text since the previous chunk."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # None until the last chunk, then "stop" or "length"
    logprobs: list[TokenLogprob] | None = None
    usage: Usage | None = None  # on the last chunk
    request_id: str = ""  # the gateway's id of the request (the client's own when it chose one)


@dataclass(frozen=True)
class ModelInfo:
    """A model the gateway serves (ListModels)."""

    id: str
    max_context_tokens: int  # prompt + output tokens of one request
    vocab_size: int


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    usage: Usage | None = None
    request_id: str = ""


def _bad(name: str, value: object, requirement: str) -> InvalidRequest:
    return InvalidRequest(f"{name}={value!r} must be {requirement}")


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(name, value, "a finite number")
    return float(value)


def _integer(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, value, "an integer")
    if not low <= value < high:
        raise _bad(name, value, f">= {low}" if high in (_UINT32, _UINT64) else f"in [{low}, {high})")
    return value


@dataclass(frozen=True)
class Sampling:
    """Sampling options of one request; None = the server's default (see proto SamplingParams)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    logprobs: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens is not None:
            _integer("max_tokens", self.max_tokens, 1, _UINT32)
        if self.temperature is not None and _number("temperature", self.temperature) < 0:
            raise _bad("temperature", self.temperature, ">= 0")
        if self.top_k is not None:
            _integer("top_k", self.top_k, 0, _UINT32)
        if self.top_p is not None and not 0 < _number("top_p", self.top_p) <= 1:
            raise _bad("top_p", self.top_p, "in (0, 1]")
        if self.min_p is not None and not 0 <= _number("min_p", self.min_p) <= 1:
            raise _bad("min_p", self.min_p, "in [0, 1]")
        if (
            self.repetition_penalty is not None
            and _number("repetition_penalty", self.repetition_penalty) <= 0
        ):
            raise _bad("repetition_penalty", self.repetition_penalty, "> 0")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if value is not None and not -2 <= _number(name, value) <= 2:
                raise _bad(name, value, "in [-2, 2]")
        if self.seed is not None:
            _integer("seed", self.seed, 0, _UINT64)
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise _bad("stop", self.stop, "a non-empty string or a list of them")
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for token in self.stop_token_ids:
            _integer("stop_token_ids", token, 0, _UINT32)
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, 0, 21)

    def to_proto(self) -> common_pb2.SamplingParams:
        msg = common_pb2.SamplingParams(stop=list(self.stop), stop_token_ids=list(self.stop_token_ids))
        for name in (
            "max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
            "frequency_penalty", "presence_penalty", "seed", "logprobs",
        ):  # fmt: skip
            value = getattr(self, name)
            if value is not None:
                setattr(msg, name, value)
        msg.ignore_eos = self.ignore_eos
        return msg


def check_prompt(prompt: str | None, token_ids: list[int] | None) -> None:
    if (prompt is None) == (token_ids is None):
        raise InvalidRequest("give exactly one of prompt= and token_ids=")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise _bad("prompt", prompt, "a non-empty string")
    if token_ids is not None:
        if isinstance(token_ids, str | bytes) or len(token_ids) == 0:
            raise _bad("token_ids", token_ids, "a non-empty list of token ids")
        for token in token_ids:
            _integer("token_ids", token, 0, _UINT32)


def logprobs_from_proto(items) -> list[TokenLogprob] | None:
    if not items:
        return None
    return [TokenLogprob(p.token_id, p.logprob, tuple((t.token_id, t.logprob) for t in p.top)) for p in items]


def build_request(
    prompt: str | None, token_ids: list[int] | None, model: str, request_id: str, sampling: dict[str, Any]
) -> gateway_pb2.GenerateRequest:
    """Validates everything (InvalidRequest, or TypeError for an unknown sampling keyword) and builds it."""
    check_prompt(prompt, token_ids)
    try:
        params = Sampling(**sampling)
    except TypeError as err:
        raise TypeError(f"generate() got an unexpected sampling option: {err}") from None
    request = gateway_pb2.GenerateRequest(model=model, request_id=request_id, sampling=params.to_proto())
    if prompt is not None:
        request.text = prompt
    else:
        request.token_ids.ids.extend(token_ids)
    return request


def chunk_from_proto(msg: gateway_pb2.GenerateChunk, request_id: str = "") -> Chunk:
    """request_id: the stream's (the server sends it on the first chunk only)."""
    usage = None
    if msg.HasField("usage"):
        u = msg.usage
        ttft = None
        if u.HasField("ttft"):
            t = u.ttft
            ttft = TtftBreakdown(t.remote_prefill, t.queue_ms, t.prefill_ms, t.kv_transfer_ms, t.handoff_ms,
                                 t.first_decode_step_ms)  # fmt: skip
        usage = Usage(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens, ttft)
    finish = FINISH_REASONS.get(msg.finish_reason)
    return Chunk(list(msg.token_ids), msg.text, finish, logprobs_from_proto(msg.logprobs), usage,
                 msg.request_id or request_id)  # fmt: skip


class Collector:
    """Joins a stream's chunks into one Completion."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.texts: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self.usage: Usage | None = None

    def add(self, chunk: Chunk) -> None:
        self.token_ids += chunk.token_ids
        self.texts.append(chunk.text)
        self.logprobs += chunk.logprobs or []
        self.finish_reason = chunk.finish_reason or self.finish_reason
        self.usage = chunk.usage or self.usage

    def result(self, request_id: str = "") -> Completion:
        if self.finish_reason is None:  # the server closed the stream without saying why: its bug, not ours
            raise ServerError("the stream ended without a finish_reason", "INTERNAL")
        text = "".join(self.texts)
        return Completion(
            self.token_ids, text, self.finish_reason, self.logprobs or None, self.usage, request_id
        )


# grpc.health.v1 (the standard health service every moemesh server offers), encoded by hand so the SDK needs
# no grpcio-health-checking: HealthCheckRequest {string service = 1}, HealthCheckResponse {enum status = 1}.
HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
HEALTH_SERVING = 1


def encode_health_request(service: str) -> bytes:
    data = service.encode()
    if not data:
        return b""
    return b"\x0a" + _varint(len(data)) + data


def decode_health_status(data: bytes) -> int:
    """The `status` field of a HealthCheckResponse (0 = UNKNOWN when absent)."""
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        if key & 7 != 0:  # only the varint field 1 is defined; a server never sends another
            raise ServerError(f"unexpected field {key >> 3} in a health response", "INTERNAL")
        value, i = _read_varint(data, i)
        if key >> 3 == 1:
            return value
    return 0


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= len(data):
            raise ServerError("truncated health response", "INTERNAL")
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not byte & 0x80:
            return value, i
