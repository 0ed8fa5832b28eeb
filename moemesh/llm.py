"""`LLM`: load a checkpoint and generate in this process.

from moemesh import LLM, SamplingParams
llm = LLM("models/demo")
print(llm.generate(["The old man"], SamplingParams(max_tokens=32))[0].text)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from moemesh.engine.sampling_params import SamplingParams
from moemesh.model.batch import ForwardBatch
from moemesh.model.checkpoint import load_model
from moemesh.model.config import ModelConfig
from moemesh.model.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("moemesh")

DEMO_DIR = Path(__file__).resolve().parent.parent / "models" / "demo"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]  # generated tokens; include the EOS token when generation ended on it
    text: str  # the generated text, without EOS or a matched stop string
    finish_reason: str  # "stop" or "length"


def resolve_model_dir(model: str | Path) -> Path:
    path = DEMO_DIR if str(model) == "demo" else Path(model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json")
    return path


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
    def __init__(
        self, model_dir: str | Path, device: str = "auto", dtype: str = "auto", progress: bool = False
    ):
        self.model_dir = resolve_model_dir(model_dir)
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        self.config = ModelConfig.from_file(self.model_dir / "config.json")
        self.model = load_model(self.model_dir, self.device, self.dtype, progress=progress)
        self.tokenizer = (
            Tokenizer(self.model_dir, self.config) if (self.model_dir / "tokenizer.json").is_file() else None
        )
        self.page_size = 64

    # -- the simple generation loop (the engine replaces it) ------------------------------------------------

    def _new_cache(self, num_pages: int) -> list[torch.Tensor]:
        shape = (num_pages, self.page_size, self.config.kv_cache_dim)  # kv_lora_rank + qk_rope_head_dim
        return [
            torch.zeros(shape, dtype=self.dtype, device=self.device)
            for _ in range(self.config.num_hidden_layers)
        ]

    def score(self, token_ids: list[int]) -> torch.Tensor:
        """fp32 logits [len(token_ids), vocab_size] of one full prefill."""
        self._check_ids(token_ids, "token_ids")
        pages = list(range(-(-len(token_ids) // self.page_size)))
        batch = ForwardBatch.build([token_ids], [0], [pages], self.page_size, self.device, logits="all")
        return self.model(batch, self._new_cache(len(pages))).cpu()

    def generate(
        self, prompts: list[str] | list[list[int]], params: SamplingParams | None = None
    ) -> list[Completion]:
        params = params or SamplingParams()
        prompt_ids = [self._encode(p, i) for i, p in enumerate(prompts)]
        if not prompt_ids:
            return []
        pages, next_page = [], 0
        for ids in prompt_ids:
            n = -(-(len(ids) + params.max_tokens) // self.page_size)
            pages.append(list(range(next_page, next_page + n)))
            next_page += n
        cache = self._new_cache(next_page)
        generators = [self._generator(params, i) for i in range(len(prompt_ids))]
        outputs: list[list[int]] = [[] for _ in prompt_ids]
        detoks = [
            IncrementalDetokenizer(self.tokenizer, ids) if self.tokenizer else None for ids in prompt_ids
        ]
        finish: list[str | None] = [None] * len(prompt_ids)
        texts = [""] * len(prompt_ids)
        step_tokens, cached = prompt_ids, [0] * len(prompt_ids)
        active = list(range(len(prompt_ids)))
        while active:
            batch = ForwardBatch.build(
                [step_tokens[i] for i in active],
                [cached[i] for i in active],
                [pages[i] for i in active],
                self.page_size,
                self.device,
            )
            logits = self.model(batch, cache)
            for row, i in enumerate(active):
                token = self._sample(logits[row], params, generators[i])
                cached[i] += len(step_tokens[i])
                outputs[i].append(token)
                finish[i], texts[i] = self._check_stop(token, outputs[i], params, detoks[i], texts[i])
            step_tokens = [out[-1:] for out in outputs]
            active = [i for i in active if finish[i] is None]
        return [
            Completion(token_ids=out, text=text, finish_reason=f)
            for out, text, f in zip(outputs, texts, finish, strict=True)
        ]

    def _check_stop(self, token, output, params, detok, text) -> tuple[str | None, str]:
        eos = self.tokenizer.eos_token_ids if self.tokenizer else self.config.eos_token_id
        if (token in eos and not params.ignore_eos) or token in params.stop_token_ids:
            return "stop", text
        if detok is not None:
            text += detok.add(token)
            for s in params.stop:
                cut = text.find(s)
                if cut >= 0:
                    return "stop", text[:cut]
        if len(output) >= params.max_tokens:
            return "length", text
        return None, text

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        if params.greedy:
            return None
        g = torch.Generator(device="cpu")
        g.manual_seed(params.seed if params.seed is not None else torch.seed() + index)
        return g

    @staticmethod
    def _sample(logits: torch.Tensor, params: SamplingParams, generator) -> int:
        if params.greedy:
            return int(logits.argmax())
        logits = logits.float().cpu() / params.temperature
        if params.top_k:
            kth = logits.topk(min(params.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        if params.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            drop = sorted_probs.cumsum(0) - sorted_probs > params.top_p
            probs[order[drop]] = 0
            probs /= probs.sum()
        return int(torch.multinomial(probs, 1, generator=generator))

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
