"""The engine's knobs: one frozen dataclass, validated on construction. Nothing here reads the environment;
services build it from their own deploy config (CLI / env / YAML) and hand it to the engine."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    """How one worker's engine batches requests and sizes its paged latent KV cache.

    * page_size: tokens per KV page (each page holds, per layer, page_size rows of kv_lora_rank +
      qk_rope_head_dim values).
    * max_num_seqs: most requests in one step (running at once).
    * max_num_batched_tokens: per-step token budget; longer prompts are prefilled in chunks.
    * max_model_len: prompt + output tokens of one request; None = the model's max_position_embeddings.
    * kv_cache_memory_bytes: the KV pool's size. On CPU None means 1 GiB; on CUDA None means "what is left of
      gpu_memory_utilization x device memory after weights and activations" (measured).
    * num_kv_pages: an exact page count, overriding both (tests use small pools to force preemption).
    * gpu_memory_utilization: share of device memory the worker may take on CUDA.
    * enable_prefix_caching: reuse full pages of earlier requests by chained page hashes.
    * cuda_graph_batch_sizes: decode batch buckets captured as CUDA graphs (CUDA only; () = eager).
    * pingpong: an eager decode batch of >= 2 requests runs as two micro-batches interleaved at the MoE layers
      whose experts are remote (one half's attention while the other half's tokens are at the expert pool);
      output-identical, useful only with remote experts.
    """

    page_size: int = 64
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    kv_cache_memory_bytes: int | None = None
    num_kv_pages: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    cuda_graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64)
    pingpong: bool = False

    def __post_init__(self):
        object.__setattr__(self, "cuda_graph_batch_sizes", tuple(sorted(set(self.cuda_graph_batch_sizes))))
        checks = [
            ("page_size", self.page_size >= 1, "must be >= 1"),
            ("max_num_seqs", self.max_num_seqs >= 1, "must be >= 1"),
            ("max_num_batched_tokens", self.max_num_batched_tokens >= 1, "must be >= 1"),
            ("max_model_len", self.max_model_len is None or self.max_model_len >= 2, "must be >= 2"),
            (
                "kv_cache_memory_bytes",
                self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0,
                "must be > 0",
            ),
            ("num_kv_pages", self.num_kv_pages is None or self.num_kv_pages >= 1, "must be >= 1"),
            ("gpu_memory_utilization", 0 < self.gpu_memory_utilization <= 1, "must be in (0, 1]"),
            (
                "cuda_graph_batch_sizes",
                all(b >= 1 for b in self.cuda_graph_batch_sizes),
                "must hold sizes >= 1",
            ),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} {rule}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= max_num_seqs={self.max_num_seqs}"
                " (every running request needs a token per step)"
            )
