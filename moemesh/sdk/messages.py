"""What the SDK returns and what it sends: plain dataclasses, validated on the client side."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moemesh._proto.v1 import common_pb2
from moemesh.sdk.errors import InvalidRequest

_UINT32 = 1 << 32
_UINT64 = 1 << 64
FINISH_REASONS = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length"}


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob) of the top alternatives, best first


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class Chunk:
    """One streamed piece: the new tokens and new text since the previous chunk."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # None until the last chunk, then "stop" or "length"
    logprobs: list[TokenLogprob] | None = None
    usage: Usage | None = None  # on the last chunk


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
