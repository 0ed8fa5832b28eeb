"""How one request samples and when it stops."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy. top_k 0 and top_p 1 switch those filters off; min_p 0 too.

    Penalties follow vLLM/OpenAI: repetition_penalty (1 = off) divides positive logits of tokens seen in the
    prompt or output and multiplies negative ones; frequency_penalty subtracts count x value and
    presence_penalty subtracts value once, for tokens generated so far. `seed` makes sampling reproducible
    whatever else is in the batch. `logprobs` = N returns the chosen token's logprob and the top N."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 disables it)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} {rule}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed={self.seed!r} must be in [0, 2**63)")
        if any(not s for s in self.stop):
            raise ValueError(f"stop={self.stop!r} must not contain an empty string")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r} must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def check_fits_context(num_prompt_tokens: int, max_tokens: int, max_context_tokens: int) -> None:
    """The one rule every entry point (`LLM.generate`, the gateway, the decode worker) applies before a
    request starts: its prompt plus `max_tokens` must fit the model's context. Otherwise the engine would cut
    it short with finish reason "length"; refusing says so up front. Raises ValueError naming all four."""
    if num_prompt_tokens + max_tokens > max_context_tokens:
        room = max(0, max_context_tokens - num_prompt_tokens)
        raise ValueError(
            f"max_tokens={max_tokens} does not fit: the prompt has {num_prompt_tokens} tokens and the context "
            f"is {max_context_tokens} tokens (max_context_tokens), so max_tokens must be <= {room}"
        )
