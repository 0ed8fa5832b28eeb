"""The sampler: one `moemesh.kernels.sample` call per step for every row that needs a token.

Each row draws from the counter-based RNG keyed by (its request's seed, tokens it generated so far), so a
seeded request gives the same tokens whatever else shares the batch, after a preemption and after a migration.
Penalty inputs (output token counts, prompt mask) are built only when some row asks for a penalty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from moemesh.engine.sampling_params import SamplingParams
from moemesh.kernels.sample import SamplingTensors, sample, token_counts


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None  # raw log-probability of the token (when the request asked for logprobs)
    top_logprobs: tuple[tuple[int, float], ...] = ()  # the top-n (token, raw logprob), best first


class SampleInput(Protocol):
    """What the sampler needs of one request: its params (seed filled in), `plain_greedy(params)`, and its
    prompt and output tokens (read only for penalties; the runner's requests slice them on demand)."""

    params: SamplingParams
    plain_greedy: bool

    @property
    def prompt_ids(self) -> list[int]: ...

    @property
    def output_ids(self) -> list[int]: ...

    @property
    def num_output_tokens(self) -> int: ...


@dataclass(frozen=True)
class SampleRow:
    """A `SampleInput` from lists (tests, callers without a runner request)."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]

    @property
    def plain_greedy(self) -> bool:
        return plain_greedy(self.params)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1 or p.frequency_penalty != 0 or p.presence_penalty != 0


def plain_greedy(p: SamplingParams) -> bool:
    """Greedy without penalties or logprobs: the argmax alone decides (the sampler's shortcut)."""
    return p.greedy and not _has_penalty(p) and p.logprobs is None


class Sampler:
    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._plain: dict[int, SampledToken] = {}  # token id -> SampledToken(id, None): immutable, reused

    def __call__(self, logits: torch.Tensor, rows: list[SampleInput]) -> list[SampledToken]:
        """logits fp32 [R, V] (one row per entry of `rows`) -> one token per row."""
        if not rows:
            return []
        device = logits.device
        if all(r.plain_greedy for r in rows):
            # The common all-greedy step: the lowest index of each row's max, as `sample` picks it, without
            # building sampling tensors (on CPU the sampler's filtering pass is half of a small model's step).
            # The tokens' records are reused (at most one per vocabulary entry): no object per row and step.
            cache = self._plain
            return [
                cache.get(t) or cache.setdefault(t, SampledToken(t, None)) for t in logits.argmax(-1).tolist()
            ]
        params = [r.params for r in rows]
        floats = torch.tensor(
            [
                [p.temperature for p in params],
                [p.top_p for p in params],
                [p.min_p for p in params],
                [p.repetition_penalty for p in params],
                [p.frequency_penalty for p in params],
                [p.presence_penalty for p in params],
            ],
            dtype=torch.float32,
        )  # [6, R]: one host-to-device copy per dtype
        ints = torch.tensor(
            [[p.seed or 0 for p in params], [r.num_output_tokens for r in rows]], dtype=torch.int64
        )
        top_k = torch.tensor([p.top_k for p in params], dtype=torch.int32)
        floats, ints, top_k = (self._to(t, device) for t in (floats, ints, top_k))
        temperature, top_p, min_p, rep, freq, pres = floats.unbind(0)
        tensors = SamplingTensors(
            temperature, top_k, top_p, min_p, rep, freq, pres, seed=ints[0], step=ints[1]
        )
        counts = prompt_mask = None
        if any(_has_penalty(p) for p in params):
            counts, prompt_mask = self._penalty_inputs(rows, device)
        num_logprobs = max((p.logprobs or 0 for p in params), default=0)
        result = sample(logits, tensors, counts, prompt_mask, num_logprobs)
        token_ids = result.token_ids.tolist()
        want_logprobs = any(p.logprobs is not None for p in params)
        logprobs = result.logprobs.tolist() if want_logprobs else None
        top_ids = result.top_ids.tolist() if num_logprobs else None
        top_lp = result.top_logprobs.tolist() if num_logprobs else None
        out = []
        for i, p in enumerate(params):
            if p.logprobs is None:
                out.append(SampledToken(token_ids[i], None))
                continue
            top = (
                tuple(zip(top_ids[i][: p.logprobs], top_lp[i][: p.logprobs], strict=True)) if top_ids else ()
            )
            out.append(SampledToken(token_ids[i], logprobs[i], top))
        return out

    @staticmethod
    def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
        if device.type == "cuda":
            return t.pin_memory().to(device, non_blocking=True)
        return t

    def _penalty_inputs(self, rows: list[SampleInput], device) -> tuple[torch.Tensor, torch.Tensor]:
        """output_counts int32 [R, V] and prompt_mask bool [R, V] (rows without penalties stay zero)."""
        width = max(1, max(r.num_output_tokens for r in rows))
        outs = torch.full((len(rows), width), -1, dtype=torch.int64)
        prompt_mask = torch.zeros(len(rows), self.vocab_size, dtype=torch.bool)
        for i, r in enumerate(rows):
            if not _has_penalty(r.params):
                continue
            outs[i, : len(r.output_ids)] = torch.tensor(r.output_ids, dtype=torch.int64)
            prompt_mask[i, torch.tensor(r.prompt_ids, dtype=torch.int64)] = True
        return token_counts(outs.to(device), self.vocab_size), prompt_mask.to(device)
