"""Where a benchmark sends its requests. A backend turns one RequestSpec into a stream of `StreamEvent`s
(how many tokens arrived, and the server's counts when it reports them); the runner timestamps them.

* GrpcBackend: a moemesh gateway through the SDK's AsyncClient (prompts as token ids or text).
* OpenAIBackend: an OpenAI-compatible HTTP server's streaming completions (`POST /v1/completions`,
  `stream: true`, server-sent events), through aiohttp (`pip install moemesh[bench]`).
Every request asks for exactly `output_len` tokens: greedy, `ignore_eos`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from moemesh.benchmark.workload import RequestSpec


@dataclass(frozen=True)
class StreamEvent:
    num_tokens: int  # new tokens in this chunk
    prompt_tokens: int | None = None  # the server's counts, when it reports them (the last chunk)
    completion_tokens: int | None = None


class Backend(Protocol):
    name: str

    def stream(self, spec: RequestSpec) -> AsyncIterator[StreamEvent]: ...

    async def vocab_size(self) -> int | None: ...

    async def aclose(self) -> None: ...


class GrpcBackend:
    """A gateway at HOST:PORT (created and used inside one event loop)."""

    name = "grpc"

    def __init__(
        self, target: str, *, model: str = "", timeout_s: float = 600.0, api_key: str | None = None
    ) -> None:
        from moemesh.sdk import AsyncClient

        self.model = model  # "" = the gateway's default
        self._client = AsyncClient(target, timeout_s=timeout_s, api_key=api_key)

    async def vocab_size(self) -> int | None:
        models = await self._client.models()
        return models[0].vocab_size if models else None

    async def stream(self, spec: RequestSpec) -> AsyncIterator[StreamEvent]:
        prompt = {"prompt": spec.prompt_text} if spec.prompt_text is not None else {}
        token_ids = list(spec.prompt_token_ids) if spec.prompt_token_ids is not None else None
        async with self._client.generate(
            **prompt,
            token_ids=token_ids,
            model=self.model,
            max_tokens=spec.output_len,
            temperature=0,
            ignore_eos=True,
        ) as stream:
            async for chunk in stream:
                usage = chunk.usage
                yield StreamEvent(
                    len(chunk.token_ids),
                    usage.prompt_tokens if usage else None,
                    usage.completion_tokens if usage else None,
                )

    async def aclose(self) -> None:
        await self._client.aclose()


class OpenAIBackend:
    """An OpenAI-compatible server: `base_url` is http://HOST:PORT or http://HOST:PORT/v1.

    Prompts go as token-id arrays (the completions API accepts them) or text. Each streamed chunk with a
    choice counts as as many tokens as its `logprobs.tokens` lists when present, else one (as vLLM's
    benchmark counts: a chunk whose token's text is held back still marks the token's arrival); the final
    `usage` chunk (stream_options.include_usage) gives the exact count, which TPOT uses."""

    name = "openai"

    def __init__(
        self, base_url: str, *, model: str = "", timeout_s: float = 600.0, api_key: str | None = None
    ):
        try:
            import aiohttp
        except ImportError:
            raise RuntimeError("--openai-url needs aiohttp: pip install 'moemesh[bench]'") from None
        base = base_url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session = aiohttp.ClientSession(
            timeout=timeout, headers=headers, connector=aiohttp.TCPConnector(limit=0)
        )

    async def vocab_size(self) -> int | None:
        """From GET /v1/models when the server lists a `vocab_size` (not part of OpenAI's schema)."""
        models = await self._models()
        return models[0].get("vocab_size") if models else None

    async def _models(self) -> list[dict[str, Any]]:
        async with self._session.get(f"{self.base}/models") as resp:
            if resp.status != 200:
                raise RuntimeError(f"GET {self.base}/models: HTTP {resp.status}: {(await resp.text())[:200]}")
            return (await resp.json()).get("data") or []

    async def _model(self) -> str:
        if not self.model:
            models = await self._models()
            if not models:
                raise RuntimeError(f"GET {self.base}/models lists no model; pass --model")
            self.model = models[0]["id"]
        return self.model

    async def stream(self, spec: RequestSpec) -> AsyncIterator[StreamEvent]:
        body = {
            "model": await self._model(),
            "prompt": list(spec.prompt_token_ids) if spec.prompt_token_ids is not None else spec.prompt_text,
            "max_tokens": spec.output_len,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with self._session.post(f"{self.base}/completions", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
            async for raw in resp.content:
                event = sse_event(raw)
                if event is None:
                    continue
                if event == "[DONE]":
                    return
                yield event

    async def aclose(self) -> None:
        await self._session.close()


def sse_event(raw: bytes) -> StreamEvent | str | None:
    """One line of a completions event stream: a StreamEvent, "[DONE]", or None (blank, comment, other field).
    An `error` object in the stream raises RuntimeError."""
    line = raw.strip()
    if not line.startswith(b"data:"):
        return None
    data = line[5:].strip()
    if data == b"[DONE]":
        return "[DONE]"
    msg = json.loads(data)
    if "error" in msg:
        raise RuntimeError(f"server error in the stream: {msg['error']}")
    num_tokens = 0
    for choice in msg.get("choices") or []:
        tokens = (choice.get("logprobs") or {}).get("tokens")
        # vLLM's rule: a chunk with a choice is (at least) a token
        num_tokens += len(tokens) if tokens is not None else 1
    usage = msg.get("usage") or {}
    return StreamEvent(num_tokens, usage.get("prompt_tokens"), usage.get("completion_tokens"))
