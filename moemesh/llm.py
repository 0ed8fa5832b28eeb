"""`LLM`: load a checkpoint and generate in this process.

from moemesh import LLM, SamplingParams
llm = LLM("models/demo")
print(llm.generate(["To Sherlock Holmes she is always"], SamplingParams(max_tokens=32))[0].text)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from moemesh.config.engine import EngineConfig
from moemesh.config.mesh import resolve_model_dir
from moemesh.engine.engine import Engine, RequestOutput
from moemesh.engine.sampling_params import SamplingParams, check_fits_context
from moemesh.model.batch import ForwardBatch
from moemesh.model.checkpoint import default_fp8, load_model
from moemesh.model.config import ModelConfig
from moemesh.model.tokenizer import Tokenizer

log = logging.getLogger("moemesh")

DEMO_DIR = Path(__file__).resolve().parent.parent / "models" / "demo"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]  # generated tokens; include the EOS token when generation ended on it
    text: str  # the generated text, without EOS or a matched stop string
    finish_reason: str  # "stop" or "length"
    logprobs: tuple[Logprob, ...] | None = None  # one per token, when SamplingParams.logprobs is set


@dataclass(frozen=True)
class Logprob:
    token_id: int
    logprob: float  # raw log-probability under the model (before penalties and temperature)
    top: tuple[tuple[int, float], ...]  # the top-n (token id, logprob), best first


def resolve_device_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device={device!r} must be 'auto', 'cpu' or 'cuda'")
    if dtype not in ("auto", *_DTYPES):
        raise ValueError(f"dtype={dtype!r} must be 'auto', 'float32' or 'bfloat16'")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device")
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    return dev, _DTYPES[dtype]


class LLM:
    """A checkpoint and an `Engine` in this process: `generate` runs prompts to completion through continuous
    batching; `stats()` is the engine's page and compute accounting."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "auto",
        dtype: str = "auto",
        progress: bool = False,
        engine_config: EngineConfig | None = None,
        fp8: bool | None = None,
    ):
        """`fp8`: keep DeepSeek FP8 weights as FP8 and run FP8 GEMMs (default: on CUDA for FP8 checkpoints);
        False dequantizes them exactly into `dtype`."""
        self.model_dir = resolve_model_dir(model_dir)
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        self.config = ModelConfig.from_file(self.model_dir / "config.json")
        if fp8 is None:
            fp8 = default_fp8(self.device, self.model_dir)
        self.model = load_model(self.model_dir, self.device, self.dtype, progress=progress, fp8=fp8)
        self.tokenizer = (
            Tokenizer(self.model_dir, self.config) if (self.model_dir / "tokenizer.json").is_file() else None
        )
        eos = self.tokenizer.eos_token_ids if self.tokenizer else self.config.eos_token_id
        self.engine = Engine(self.model, engine_config, self.tokenizer, tuple(eos))
        self.page_size = self.engine.config.page_size

    def score(self, token_ids: list[int]) -> torch.Tensor:
        """fp32 logits [len(token_ids), vocab_size] of one full prefill (in a scratch cache of its own).
        ValueError for more tokens than the model has positions (max_position_embeddings)."""
        self._check_ids(token_ids, "token_ids")
        if len(token_ids) > self.config.max_position_embeddings:
            raise ValueError(
                f"token_ids has {len(token_ids)} tokens, more than the model's "
                f"max_position_embeddings={self.config.max_position_embeddings}"
            )
        pages = list(range(-(-len(token_ids) // self.page_size)))
        batch = ForwardBatch.build([token_ids], [0], [pages], self.page_size, self.device, logits="all")
        shape = (len(pages), self.page_size, self.config.kv_cache_dim)  # kv_lora_rank + qk_rope_head_dim
        cache = [
            torch.zeros(shape, dtype=self.dtype, device=self.device)
            for _ in range(self.config.num_hidden_layers)
        ]
        return self.model(batch, cache).cpu()

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[Completion]:
        """Runs every prompt to completion in one continuously batched loop; results in prompt order.
        params: one SamplingParams for every prompt, or one per prompt. ValueError, before any prompt starts,
        for a prompt whose length plus max_tokens exceeds the context (`check_fits_context`, the rule the
        gateway and the decode workers apply)."""
        if params is None or isinstance(params, SamplingParams):
            per_prompt = [params or SamplingParams()] * len(prompts)
        else:
            per_prompt = list(params)
            if len(per_prompt) != len(prompts):
                raise ValueError(f"params has {len(per_prompt)} entries for {len(prompts)} prompts")
        encoded = [self._encode(p, i) for i, p in enumerate(prompts)]
        for i, (prompt_ids, one) in enumerate(zip(encoded, per_prompt, strict=True)):
            try:
                check_fits_context(len(prompt_ids), one.max_tokens, self.engine.max_model_len)
            except ValueError as err:
                raise ValueError(f"prompts[{i}]: {err}") from None
        ids = [self.engine.add_request(ids_, one) for ids_, one in zip(encoded, per_prompt, strict=True)]
        done: dict[str, RequestOutput] = {}
        logprobs: dict[str, list[Logprob]] = {i: [] for i in ids}
        while len(done) < len(ids):
            outputs = self.engine.step()
            if not outputs and not self.engine.scheduler.running:
                raise RuntimeError(f"the engine cannot admit any waiting request: {self.engine.stats()}")
            for out in outputs:
                logprobs[out.request_id] += [
                    Logprob(s.token_id, s.logprob, s.top_logprobs) for s in out.logprobs
                ]
                if out.finished:
                    done[out.request_id] = out
        return [
            self._completion(done[i], logprobs[i] if one.logprobs is not None else None)
            for i, one in zip(ids, per_prompt, strict=True)
        ]

    def stats(self) -> dict[str, int]:
        """pages_total, pages_free, pages_cached, pages_leased, prefill_tokens_computed, prefix_hit_tokens, ..."""
        return self.engine.stats()

    @staticmethod
    def _completion(out: RequestOutput, logprobs: list[Logprob] | None) -> Completion:
        lp = tuple(logprobs) if logprobs is not None else None
        return Completion(list(out.output_ids), out.text, out.finish_reason.value, lp)

    def _encode(self, prompt: str | list[int], index: int) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompts[{index}] is text but {self.model_dir} has no tokenizer.json")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        self._check_ids(ids, f"prompts[{index}]")
        return ids

    def _check_ids(self, ids: list[int], name: str) -> None:
        if not ids:
            raise ValueError(f"{name} is empty")
        bad = [t for t in ids if not 0 <= int(t) < self.config.vocab_size]
        if bad:
            raise ValueError(f"{name} has token id {bad[0]} outside [0, {self.config.vocab_size})")
