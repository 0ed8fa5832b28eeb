"""One request's state as the scheduler sees it (pure Python), and the step messages the scheduler sends
the runner.

A request's tokens are `token_ids = prompt + output`; `num_computed_tokens` of them have their KV in the
request's pages. While `num_computed_tokens < len(token_ids)` the request is prefilling (a first prompt, a
resumed migration or a recompute after preemption: all the same to the scheduler); a step that brings it to
`len(token_ids)` yields logits and one sampled token.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from moemesh.engine.kv_pages import ROOT_DIGEST
from moemesh.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or max_model_len
    PREFILL = "prefill"  # a prefill-only request: its pages are handed out, see Engine.take_handoff
    ABORT = "abort"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int  # admission order; ties broken by it, so scheduling is deterministic
    output_ids: list[int] = field(default_factory=list)
    prefill_only: bool = False
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    page_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_hashed_pages: int = 0  # leading pages registered in the prefix cache
    last_page_hash: bytes = ROOT_DIGEST  # chained digest of page num_hashed_pages - 1
    prefill_target: int = 0  # len(token_ids) when the current prefill began (for the counters)
    num_cached_prompt_tokens: int = 0  # prompt tokens the prefix cache supplied at its (last) admission

    def __post_init__(self):
        self.token_ids: list[int] = list(self.prompt_ids) + list(self.output_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def append_output(self, token_id: int) -> None:
        self.output_ids.append(token_id)
        self.token_ids.append(token_id)

    def reset_for_recompute(self) -> None:
        """Preempted or resumed: drop KV bookkeeping; the prefix cache may still hold its full pages."""
        self.page_ids = []
        self.num_computed_tokens = 0
        self.num_hashed_pages = 0
        self.last_page_hash = ROOT_DIGEST
        self.status = RequestStatus.WAITING


# -------------------------------------------------------------------------------------------- step messages


@dataclass(frozen=True)
class NewRequestData:
    """A request the runner has not seen, or must forget and see anew (after preemption): everything it needs.

    token_ids: prompt + output so far · page_ids: its pages in order · num_computed_tokens: tokens whose KV
    already sits in those pages (prefix-cache hits, or a KV transfer)."""

    request_id: str
    token_ids: tuple[int, ...]
    num_prompt_tokens: int
    page_ids: tuple[int, ...]
    num_computed_tokens: int
    params: SamplingParams


@dataclass(frozen=True)
class CachedRequestData:
    """A request the runner holds from an earlier step: only what changed, and only when its pages did (a
    decode step of a request that needs no new page sends nothing). The runner appended the token it sampled
    last step itself, so no token ids travel."""

    request_id: str
    new_page_ids: tuple[int, ...]


@dataclass(frozen=True)
class SchedulerOutput:
    """One step's plan. `num_scheduled_tokens` lists every request in the step, in batch order, with how
    many of its tokens to compute (1 for a decode, a chunk for a prefill). `finished_request_ids` are
    requests the runner should forget (finished, aborted, exported or preempted since the last step)."""

    new_requests: tuple[NewRequestData, ...]
    cached_requests: tuple[CachedRequestData, ...]
    num_scheduled_tokens: tuple[tuple[str, int], ...]
    finished_request_ids: frozenset[str]
    preempted_request_ids: tuple[str, ...] = ()

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(n for _, n in self.num_scheduled_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens
