"""The requests of a run and when they are sent.

* synthetic (vLLM's "random" dataset): prompt and output lengths drawn uniformly from
  [len * (1 - range_ratio), len * (1 + range_ratio)], prompts sent as token ids (exact lengths, no tokenizer
  round trip): request i's token j is (offset_i + i + j) % vocab_size with a random offset_i.
* a JSONL file: one object per line with `prompt` (text) or `prompt_token_ids` (a list of ids), and optionally
  `output_len` (else the run's --output-len).
* arrivals: a Poisson process at `request_rate` requests/s (exponential gaps, seeded), or all at once (inf).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: exactly one of prompt_text / prompt_token_ids; output_len new tokens (ignore_eos)."""

    output_len: int
    prompt_token_ids: tuple[int, ...] | None = None
    prompt_text: str | None = None

    def __post_init__(self) -> None:
        if (self.prompt_text is None) == (self.prompt_token_ids is None):
            raise ValueError("a request needs exactly one of prompt_text and prompt_token_ids")
        if self.output_len < 1:
            raise ValueError(f"output_len={self.output_len} must be >= 1")

    @property
    def prompt_len(self) -> int:
        """Prompt tokens when known here (token ids); 0 for text until the server reports its count."""
        return len(self.prompt_token_ids) if self.prompt_token_ids is not None else 0


@dataclass(frozen=True)
class SyntheticConfig:
    num_prompts: int
    input_len: int
    output_len: int
    range_ratio: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_prompts", "input_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.range_ratio < 1:
            raise ValueError(f"range_ratio={self.range_ratio} must be in [0, 1)")


def _lengths(rng: random.Random, mean: int, ratio: float, count: int) -> list[int]:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(count)]


def synthetic(config: SyntheticConfig, vocab_size: int) -> list[RequestSpec]:
    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size} must be >= 1")
    rng = random.Random(config.seed)
    n = config.num_prompts
    inputs = _lengths(rng, config.input_len, config.range_ratio, n)
    outputs = _lengths(rng, config.output_len, config.range_ratio, n)
    offsets = [rng.randrange(vocab_size) for _ in range(n)]
    return [
        RequestSpec(
            outputs[i], prompt_token_ids=tuple((offsets[i] + i + j) % vocab_size for j in range(inputs[i]))
        )
        for i in range(n)
    ]


def load_jsonl(path: str | Path, num_prompts: int, default_output_len: int) -> list[RequestSpec]:
    """The first `num_prompts` requests of a JSONL file (cycled when it has fewer lines)."""
    specs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not JSON ({err})") from None
            if not isinstance(item, dict):
                raise ValueError(f"{path}:{lineno}: expected an object, got {type(item).__name__}")
            specs.append(_spec(item, default_output_len, f"{path}:{lineno}"))
    if not specs:
        raise ValueError(f"{path}: no requests in the file")
    return [specs[i % len(specs)] for i in range(num_prompts)]


def _spec(item: dict, default_output_len: int, where: str) -> RequestSpec:
    output_len = item.get("output_len", default_output_len)
    if not isinstance(output_len, int) or isinstance(output_len, bool) or output_len < 1:
        raise ValueError(f"{where}: output_len={output_len!r} must be an integer >= 1")
    if "prompt_token_ids" in item:
        ids = item["prompt_token_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
            raise ValueError(f"{where}: prompt_token_ids must be a non-empty list of ids >= 0")
        return RequestSpec(output_len, prompt_token_ids=tuple(ids))
    prompt = item.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"{where}: needs a non-empty 'prompt' string or 'prompt_token_ids'")
    return RequestSpec(output_len, prompt_text=prompt)


def arrival_times_s(num_requests: int, request_rate: float, seed: int = 0) -> list[float]:
    """When each request is sent, from the run's start: a Poisson process at `request_rate` per second (the
    first request at 0), or all at 0 for inf."""
    if not request_rate > 0:
        raise ValueError(f"request_rate={request_rate!r} must be > 0 (inf: all at once)")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    times, now = [], 0.0
    for _ in range(num_requests):
        times.append(now)
        now += rng.expovariate(request_rate)
    return times
