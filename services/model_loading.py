"""A worker's checkpoint and engine, built as `LLM` builds them (so greedy outputs are the same everywhere)."""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import torch

from moemesh.config.mesh import WorkerConfig
from moemesh.engine.engine import Engine
from moemesh.model.checkpoint import default_fp8, load_model
from moemesh.model.config import ModelConfig
from moemesh.model.tokenizer import Tokenizer
from moemesh.services.remote_experts import detach_routed_experts
from moemesh.transport.kv import Fingerprint, KvLayout

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_KV_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class LoadedModel:
    engine: Engine
    model_config: ModelConfig
    tokenizer: Tokenizer | None
    model_id: str  # directory name + a hash of config.json: what P and D compare at handshake

    @property
    def kv_layout(self) -> KvLayout:
        e = self.engine
        cache = e.kv_caches[0]  # [num_pages, page_size, kv_lora_rank + qk_rope_head_dim]
        return KvLayout(_KV_DTYPES[cache.dtype], e.config.page_size, cache.shape[2] * cache.element_size(),
                        len(e.kv_caches))  # fmt: skip

    @property
    def fingerprint(self) -> Fingerprint:
        return Fingerprint(self.model_id, self.kv_layout)


def load_engine(config: WorkerConfig) -> LoadedModel:
    """The checkpoint and an Engine over it, as `LLM` builds them (so greedy outputs are the same)."""
    model_dir = config.model_dir
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if config.device == "auto" else config.device))  # fmt: skip
    if config.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = _DTYPES[config.dtype]
    model_config = ModelConfig.from_file(model_dir / "config.json")
    fp8 = default_fp8(device, model_dir)  # as LLM decides: an FP8 checkpoint computes in FP8 on CUDA
    model = load_model(model_dir, device, dtype, progress=False, fp8=fp8)
    tokenizer = Tokenizer(model_dir, model_config) if (model_dir / "tokenizer.json").is_file() else None
    eos = tokenizer.eos_token_ids if tokenizer else model_config.eos_token_id
    # No tokenizer in the engine: workers stream token ids; the gateway detokenizes and matches stop strings.
    engine_config = config.engine
    if config.remote_experts:  # a CUDA graph cannot span the expert pool's round trip
        engine_config = dataclasses.replace(engine_config, cuda_graph_batch_sizes=())
        detach_routed_experts(model)  # before the KV plan: the pool holds them (services/remote_experts.py)
    engine = Engine(model, engine_config, None, tuple(eos))
    digest = hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()[:12]
    return LoadedModel(engine, model_config, tokenizer, f"{model_dir.name}@{digest}")
