"""The gateway's HTTP port: OpenAI-compatible `/v1` routes, `/metrics`, and whatever routes other modules add.

    app = build_http_app(gateway, registry, extra_routes=[web.get("/traces", handler)], authenticate=check)
    async with serve_http(app, host, port): ...

Requests run through `Gateway.prepare` / `Gateway.generate` in this event loop, exactly as gRPC `Generate`
does (same validation, routing, back-pressure, request ids and metrics; no gRPC hop). Every response carries
`X-Request-Id`: the client's own (the header, when it sends one) or the gateway's id for the request, the
one its logs and traces use. Errors are OpenAI's `{"error": {message, type, param, code}}` with the status
of the mesh's error (`HTTP_STATUS`); a stream that fails after its first event ends with an error event and
`data: [DONE]`. A client that disconnects cancels its request on every worker.

`authenticate(request)` runs before every route; raising `Unauthenticated` (or PermissionError) answers 401.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from aiohttp import web
from prometheus_client import CollectorRegistry

from moemesh.services.gateway.openai_schema import (
    LogprobFormatter,
    OpenAIRequest,
    ResponseHead,
    choice_json,
    error_json,
    parse_chat,
    parse_completion,
    plain_chat,
    usage_json,
)
from moemesh.services.gateway.worker import Delta, Gateway
from moemesh.services.metrics_http import metrics_route
from moemesh.transport.errors import DeadlineExceeded, InvalidArgument, NotFound, Unauthenticated, status_for
from moemesh.transport.security import ApiKeys

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
Authenticate = Callable[[web.Request], Awaitable[None]]

# mesh status -> (HTTP status, OpenAI error type)
HTTP_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
# The mesh's field names in its messages -> the request field a client sent.
_PARAM_NAMES = {"token_ids": "prompt", "prompt": "prompt", "sampling.stop": "stop"}
_PARAM = re.compile(r"^([a-z_][a-z_.]*)(?:\[\d+\])?(?:=| has )")
# Where the middleware keeps the request id (aiohttp >= 3.12 wants typed keys; older ones take a string).
_ID_KEY: Any = web.RequestKey("request_id", str) if hasattr(web, "RequestKey") else "request_id"
_CHAT_KEY: Any = web.RequestKey("chat", bool) if hasattr(web, "RequestKey") else "chat"


def build_http_app(
    gateway: Gateway,
    registry: CollectorRegistry,
    *,
    extra_routes: Iterable[web.AbstractRouteDef] = (),
    authenticate: Authenticate | None = None,
) -> web.Application:
    """The gateway's aiohttp app: `/v1/models`, `/v1/completions`, `/v1/chat/completions`, `/metrics`
    (`registry`), plus `extra_routes` (e.g. `web.get("/traces", handler)`)."""
    api = OpenAIRoutes(gateway)
    app = web.Application(middlewares=[_front_door(gateway, authenticate)], client_max_size=16 << 20)
    app.add_routes([
        web.get("/v1/models", api.models),
        web.post("/v1/completions", api.completions),
        web.post("/v1/chat/completions", api.chat_completions),
        metrics_route(registry),
        *extra_routes,
    ])  # fmt: skip
    return app


def request_id_of(request: web.Request) -> str:
    """The request id the middleware gave this HTTP request (also for routes added by other modules)."""
    return request[_ID_KEY]


def _front_door(gateway: Gateway, authenticate: Authenticate | None) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
        given = request.headers.get(REQUEST_ID_HEADER)
        request[_ID_KEY] = given if given and _REQUEST_ID.fullmatch(given) else gateway.new_request_id()
        try:
            if given and not _REQUEST_ID.fullmatch(given):
                raise _BadHeader(given)
            if authenticate is not None:
                await authenticate(request)
            response = await handler(request)
        except web.HTTPException as exc:  # routing: 404, 405, 413 ...
            if exc.status < 400:
                raise
            kind = {404: "not_found_error", 405: "invalid_request_error"}.get(
                exc.status, "invalid_request_error"
            )
            message = f"{request.method} {request.path}: {exc.reason}"
            response = _json(
                exc.status, error_json(message, kind, None, exc.reason.lower().replace(" ", "_"))
            )
        except Exception as exc:
            response = error_response(exc, request.get(_CHAT_KEY, False))
        if not response.prepared:
            response.headers[REQUEST_ID_HEADER] = request[_ID_KEY]
        return response

    return middleware


def api_key_check(api_keys: ApiKeys) -> Authenticate | None:
    """The gateway's API keys on the HTTP front: every route but `/metrics` needs `Authorization: Bearer
    KEY` (the same header as gRPC's metadata); None when no key is configured."""
    if not api_keys:
        return None

    async def authenticate(request: web.Request) -> None:
        if request.path != "/metrics" and not api_keys.check(request.headers.get("Authorization")):
            raise Unauthenticated("missing or invalid API key: send the header 'Authorization: Bearer <key>'")

    return authenticate


class _BadHeader(InvalidArgument):
    def __init__(self, value: str) -> None:
        super().__init__(f"{REQUEST_ID_HEADER}={value[:40]!r} must be 1 to 128 of A-Z a-z 0-9 . _ : -")
        self.param = REQUEST_ID_HEADER


def error_response(exc: BaseException, chat: bool = False) -> web.Response:
    status, body = error_body(exc, chat)
    return _json(status, body)


def error_body(exc: BaseException, chat: bool = False) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI error object) for an exception of the mesh (or a built-in, as `status_for`)."""
    code, message = status_for(exc)
    status, kind = HTTP_STATUS.get(code, (500, "server_error"))
    param = getattr(exc, "param", None)
    if param is None and status == 400 and (match := _PARAM.match(message)):
        param = _PARAM_NAMES.get(match.group(1), match.group(1))
        if chat and param == "prompt":
            param = "messages"
    if status == 500:
        log.error("HTTP request failed", exc_info=exc)
    error_code = getattr(exc, "error_code", None) or code.name.lower()
    return status, error_json(message, kind, param, error_code)


class _ModelNotFound(NotFound):
    param = "model"
    error_code = "model_not_found"


class OpenAIRoutes:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def models(self, request: web.Request) -> web.Response:
        g = self.gateway
        created = int(time.time())
        model = {"id": g.config.model_id, "object": "model", "created": created, "owned_by": "moemesh",
                 "max_model_len": g.max_context_tokens}  # fmt: skip
        return _json(200, {"object": "list", "data": [model]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, parse_completion(await _body(request)))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        request[_CHAT_KEY] = True
        return await self._serve(request, parse_chat(await _body(request), self._render_chat))

    def _render_chat(self, messages: list[dict[str, str]]) -> str:
        tokenizer = self.gateway.tokenizer
        if tokenizer is None:
            raise InvalidArgument(f"model {self.gateway.config.model_id!r} has no tokenizer: chat needs one")
        if not tokenizer.chat_template:
            return plain_chat(messages)
        try:
            return tokenizer.apply_chat_template(messages)
        except Exception as err:  # jinja2: a template the messages do not fit
            raise InvalidArgument(f"messages do not fit the model's chat template: {err}") from None

    # -- one request ----------------------------------------------------------------------------------------

    async def _serve(self, request: web.Request, parsed: OpenAIRequest) -> web.StreamResponse:
        model_id = self.gateway.config.model_id
        if parsed.model and parsed.model != model_id:
            raise _ModelNotFound(f"model={parsed.model!r} is not served here (serving {model_id!r})")
        job = self.gateway.prepare(
            parsed.prompt_text, parsed.prompt_ids, request_id_of(request), parsed.sampling
        )
        deadline = None if parsed.timeout_s is None else time.monotonic() + parsed.timeout_s

        def time_remaining() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        reply = _Reply(parsed, ResponseHead.now(job.request_id, model_id), self._token_text)
        deltas = aiter(self.gateway.generate(job, time_remaining))
        try:
            if parsed.stream:
                return await self._stream(request, reply, deltas, deadline)
            async with _until(deadline, parsed):
                return _json(200, reply.whole([delta async for delta in deltas]))
        finally:
            await deltas.aclose()  # before the last delta (an error, a client gone): the workers stop it

    async def _stream(
        self, request: web.Request, reply: _Reply, deltas: AsyncIterator[Delta], deadline: float | None
    ) -> web.StreamResponse:
        async with _until(deadline, reply.request):  # errors before the first token get their own status
            first = await anext(deltas)
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            REQUEST_ID_HEADER: request_id_of(request),
        })  # fmt: skip
        await response.prepare(request)
        try:
            async with _until(deadline, reply.request):
                delta: Delta | None = first
                while delta is not None:
                    for event in reply.chunks(delta):
                        await response.write(_sse(event))
                    delta = await anext(deltas, None)
        except (ConnectionResetError, asyncio.CancelledError):
            raise  # the client left: the caller's aclose() cancels the request on the workers
        except Exception as exc:
            await response.write(_sse(error_body(exc, reply.request.chat)[1]))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _token_text(self, token_id: int) -> str:
        tokenizer = self.gateway.tokenizer
        return tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer else f"<{token_id}>"


class _Reply:
    """Builds one request's response objects from its deltas."""

    def __init__(self, request: OpenAIRequest, head: ResponseHead, token_text: Callable[[int], str]) -> None:
        self.request = request
        self.head = head
        self.logprobs = LogprobFormatter(token_text)
        self.sent_first = False

    def _logprobs(self, items: list) -> dict | None:
        if self.request.num_top_logprobs is None:
            return None
        return self.logprobs.chat(items) if self.request.chat else self.logprobs.completion(items)

    def whole(self, deltas: list[Delta]) -> dict[str, Any]:
        last = deltas[-1]
        items = [p for d in deltas for p in d.logprobs]
        choice = choice_json(self.request.chat, False, "".join(d.text for d in deltas), last.finish_reason,
                             self._logprobs(items))  # fmt: skip
        return {**self.head.fields(self.request.chat, False), "choices": [choice], "usage": usage_json(last)}

    def chunks(self, delta: Delta) -> list[dict[str, Any]]:
        """The SSE events for one delta: none when it adds nothing a client sees."""
        events = []
        logprobs = self._logprobs(delta.logprobs) if delta.logprobs else None
        if delta.text or delta.finish_reason or logprobs or not self.sent_first:
            choice = choice_json(self.request.chat, True, delta.text, delta.finish_reason, logprobs,
                                 first=not self.sent_first)  # fmt: skip
            self.sent_first = True
            events.append(self._chunk([choice], None))
        if delta.finish_reason and self.request.include_usage:
            events.append(self._chunk([], usage_json(delta)))
        return events

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        chunk = {**self.head.fields(self.request.chat, True), "choices": choices}
        if self.request.include_usage:
            chunk["usage"] = usage
        return chunk


@contextlib.asynccontextmanager
async def _until(deadline: float | None, request: OpenAIRequest) -> AsyncIterator[None]:
    """Raises DeadlineExceeded when `deadline` (time.monotonic()) passes inside the block. Entered in the
    handler's own frame (never inside the delta generator), so whatever it awaits is what is cancelled."""
    if deadline is None:
        yield
        return
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(loop.time() + deadline - time.monotonic()):
            yield
    except TimeoutError as err:
        if isinstance(err, DeadlineExceeded):
            raise
        raise DeadlineExceeded(f"the request ran past its timeout_s={request.timeout_s}") from None


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=json.loads)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidArgument(f"the request body is not JSON: {err}") from None
    if not isinstance(body, dict):
        raise InvalidArgument(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.json_response(body, status=status)


def _sse(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
