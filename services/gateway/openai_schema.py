"""OpenAI's request and response JSON <-> the gateway's request (`OpenAIRequest`) and its `Delta`s.

Requests: the fields of `/v1/completions` and `/v1/chat/completions` that moemesh serves are checked here
(type and range, `BadField` naming the field); values the mesh checks itself (max_tokens against the
context, ...) are checked by `Gateway.prepare`. Fields that would change the answer in a way moemesh does not
implement (n > 1, best_of, echo, suffix, logit_bias, tools, a JSON response_format) are refused by name,
never silently ignored; fields that change nothing here (user, service_tier, ...) are ignored.
Responses: plain dicts in OpenAI's shapes, one function per object type.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moemesh._proto.v1 import common_pb2
from moemesh.services.gateway.worker import Delta
from moemesh.transport.errors import InvalidArgument

MAX_LOGPROBS = 20
CHAT_ROLES = ("system", "user", "assistant", "developer", "tool")


class BadField(InvalidArgument):
    """A request field with a bad value; `param` is its name as the client spelled it."""

    def __init__(self, param: str, value: Any, requirement: str) -> None:
        super().__init__(f"{param}={value!r} must be {requirement}")
        self.param = param


@dataclass(frozen=True)
class OpenAIRequest:
    """One completion or chat request, ready for `Gateway.prepare`."""

    chat: bool
    model: str
    prompt_text: str | None  # exactly one of prompt_text, prompt_ids
    prompt_ids: list[int] | None
    sampling: common_pb2.SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    num_top_logprobs: int | None  # None: no logprobs; N: the sampled token's plus the top N
    timeout_s: float | None  # moemesh extension: the request's deadline (504 past it)


# --- requests ---------------------------------------------------------------------------------------------


def parse_completion(body: dict[str, Any]) -> OpenAIRequest:
    _refuse_unsupported(body)
    prompt = body.get("prompt")
    text, ids = None, None
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
        ids = list(prompt)
    else:
        raise BadField(
            "prompt", _short(prompt), "a non-empty string or token id list (one prompt per request)"
        )
    logprobs = body.get("logprobs")
    if logprobs is not None:
        _integer(body, "logprobs", 0, MAX_LOGPROBS)
    return _request(body, False, text, ids, logprobs)


def parse_chat(body: dict[str, Any], render_chat: Callable[[list[dict[str, str]]], str]) -> OpenAIRequest:
    """render_chat: the messages -> the prompt text (the checkpoint's chat template, or `plain_chat`)."""
    _refuse_unsupported(body)
    for name in ("tools", "functions"):
        if body.get(name):
            raise BadField(name, "...", "unset: moemesh does not call tools")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise BadField("response_format", fmt, '{"type": "text"} or unset')
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadField("messages", _short(messages), "a non-empty list of {role, content}")
    plain = [_message(i, m) for i, m in enumerate(messages)]
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise BadField("logprobs", logprobs, "true or false")
    top = body.get("top_logprobs")
    if top is not None:
        _integer(body, "top_logprobs", 0, MAX_LOGPROBS)
        if not logprobs:
            raise BadField("top_logprobs", top, "unset unless logprobs is true")
    if "max_completion_tokens" in body and body.get("max_tokens") is None:
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    return _request(body, True, render_chat(plain), None, (top or 0) if logprobs else None)


def plain_chat(messages: list[dict[str, str]]) -> str:
    """The prompt of a checkpoint whose tokenizer_config.json has no chat_template: each message as
    "Role: content" and a blank line, then "Assistant:" (the bundled demo checkpoint's template is the same)."""
    turns = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages)
    return turns + "Assistant:"


def _message(i: int, message: Any) -> dict[str, str]:
    if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
        role = message.get("role") if isinstance(message, dict) else message
        raise BadField(f"messages[{i}].role", _short(role), f"one of {', '.join(CHAT_ROLES)}")
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        texts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise BadField(
                    f"messages[{i}].content[{j}]", _short(part), 'a {"type": "text", "text": ...} part'
                )
            texts.append(part["text"])
        content = "".join(texts)
    if content is None and message["role"] == "assistant":
        content = ""
    if not isinstance(content, str):
        raise BadField(f"messages[{i}].content", _short(content), "a string or a list of text parts")
    return {"role": message["role"], "content": content}


def _refuse_unsupported(body: dict[str, Any]) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise BadField("n", n, "1: moemesh returns one choice per request")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise BadField("best_of", best_of, "1 or unset")
    if body.get("echo"):
        raise BadField("echo", body["echo"], "false or unset")
    if body.get("suffix"):
        raise BadField("suffix", _short(body["suffix"]), "unset: moemesh does not fill in the middle")
    if body.get("logit_bias"):
        raise BadField("logit_bias", "...", "unset or empty")


def _request(
    body: dict[str, Any], chat: bool, text: str | None, ids: list[int] | None, top_logprobs: int | None
) -> OpenAIRequest:
    model = body.get("model", "")
    if not isinstance(model, str):
        raise BadField("model", model, "a string")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise BadField("stream", stream, "true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise BadField("stream_options", options, '{"include_usage": true|false}')
    if options and not stream:
        raise BadField("stream_options", options, "unset unless stream is true")
    timeout_s = body.get("timeout_s")
    if timeout_s is not None and (_number(body, "timeout_s") <= 0):
        raise BadField("timeout_s", timeout_s, "> 0 seconds")
    return OpenAIRequest(
        chat, model, text, ids, _sampling(body, top_logprobs), stream,
        bool(options.get("include_usage", False)), top_logprobs, timeout_s,
    )  # fmt: skip


def _sampling(body: dict[str, Any], top_logprobs: int | None) -> common_pb2.SamplingParams:
    """The sampling fields (OpenAI's, and the extensions top_k, min_p, repetition_penalty, stop_token_ids,
    ignore_eos) as the proto `Gateway.prepare` takes; ranges are checked there (InvalidArgument)."""
    msg = common_pb2.SamplingParams()
    if body.get("max_tokens") is not None:
        msg.max_tokens = _integer(body, "max_tokens", 1, 1 << 32)
    for name in ("temperature", "top_p", "repetition_penalty"):
        if body.get(name) is not None:
            setattr(msg, name, _number(body, name))
    for name in ("min_p", "frequency_penalty", "presence_penalty"):
        if body.get(name) is not None:
            setattr(msg, name, _number(body, name))
    if body.get("top_k") is not None:
        top_k = body["top_k"]
        msg.top_k = 0 if top_k == -1 else _integer(body, "top_k", 0, 1 << 32)  # -1: vLLM's "off"
    if body.get("seed") is not None:
        msg.seed = _integer(body, "seed", 0, 1 << 64)
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise BadField("stop", _short(stop), "a non-empty string or a list of them")
        msg.stop.extend(stops)
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(_is_int(t) and 0 <= t < 1 << 32 for t in ids):
            raise BadField("stop_token_ids", _short(ids), "a list of token ids")
        msg.stop_token_ids.extend(ids)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise BadField("ignore_eos", ignore_eos, "true or false")
    msg.ignore_eos = ignore_eos
    if top_logprobs is not None:
        msg.logprobs = top_logprobs
    return msg


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int:
    value = body[name]
    if not _is_int(value) or not low <= value < high:
        raise BadField(
            name, value, f"an integer >= {low}" if high >= 1 << 32 else f"an integer in [{low}, {high}]"
        )
    return value


def _number(body: dict[str, Any], name: str) -> float:
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadField(name, value, "a finite number")
    return float(value)


def _short(value: Any) -> Any:
    text = repr(value)
    return value if len(text) <= 80 else text[:77] + "..."


# --- responses --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResponseHead:
    """What every object of one response repeats."""

    request_id: str
    model: str
    created: int  # unix seconds

    @classmethod
    def now(cls, request_id: str, model: str) -> ResponseHead:
        return cls(request_id, model, int(time.time()))

    def fields(self, chat: bool, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
        prefix = "chatcmpl-" if chat else "cmpl-"
        return {"id": prefix + self.request_id, "object": kind, "created": self.created, "model": self.model}


def usage_json(delta: Delta) -> dict[str, Any]:
    cached = delta.decode_usage.cached_prompt_tokens if delta.decode_usage is not None else 0
    return {
        "prompt_tokens": delta.num_prompt_tokens,
        "completion_tokens": delta.num_completion_tokens,
        "total_tokens": delta.num_prompt_tokens + delta.num_completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


class LogprobFormatter:
    """`common_pb2.TokenLogprob`s -> OpenAI's logprobs objects; token strings from `token_text(id)`."""

    def __init__(self, token_text: Callable[[int], str]) -> None:
        self.token_text = token_text
        self.offset = 0  # completions' text_offset: characters of the completion before the token

    def chat(self, items: list[common_pb2.TokenLogprob]) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {
            "content": [
                {
                    **entry(p.token_id, p.logprob),
                    "top_logprobs": [entry(t.token_id, t.logprob) for t in p.top],
                }
                for p in items
            ]
        }

    def completion(self, items: list[common_pb2.TokenLogprob]) -> dict[str, Any]:
        tokens = [self.token_text(p.token_id) for p in items]
        offsets = []
        for text in tokens:
            offsets.append(self.offset)
            self.offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [p.logprob for p in items],
            "top_logprobs": [{self.token_text(t.token_id): t.logprob for t in p.top} for p in items],
            "text_offset": offsets,
        }


def choice_json(
    chat: bool, chunk: bool, text: str, finish_reason: str | None, logprobs: dict | None, first: bool = False
) -> dict[str, Any]:
    """One choice (index 0). Chat chunks carry a `delta` (with the role on the first), chat responses a
    `message`, completions `text`."""
    choice: dict[str, Any] = {"index": 0}
    if not chat:
        choice["text"] = text
    elif chunk:
        choice["delta"] = (
            {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        )
    else:
        choice["message"] = {"role": "assistant", "content": text}
    choice["logprobs"] = logprobs
    choice["finish_reason"] = finish_reason
    return choice


def error_json(message: str, kind: str, param: str | None, code: str | None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
