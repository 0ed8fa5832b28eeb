"""The memory planner: how many KV pages the worker can hold. Pure arithmetic; the engine measures the
inputs (device memory after weights and a profiling forward on CUDA, the configured budget on CPU)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryPlan:
    num_pages: int
    page_size: int
    bytes_per_page: (
        int  # all layers: num_layers x page_size x (kv_lora_rank + qk_rope_head_dim) x dtype bytes
    )
    kv_cache_bytes: int
    source: str  # where the number came from, for logs: "num_kv_pages", "budget" or "device"

    @property
    def num_tokens(self) -> int:
        return self.num_pages * self.page_size


def bytes_per_page(num_layers: int, page_size: int, kv_cache_dim: int, dtype_bytes: int) -> int:
    return num_layers * page_size * kv_cache_dim * dtype_bytes


def plan_pages(
    *,
    page_bytes: int,
    page_size: int,
    max_model_len: int,
    num_kv_pages: int | None = None,
    budget_bytes: int | None = None,
    device_free_bytes: int | None = None,
) -> MemoryPlan:
    """Page count from, in order of precedence: an exact `num_kv_pages`, a `budget_bytes`, or the device
    memory left for the cache (`device_free_bytes`: usable memory after weights, activations and graphs).
    Raises ValueError when one request of `max_model_len` tokens would not fit."""
    if num_kv_pages is not None:
        num_pages, source = num_kv_pages, "num_kv_pages"
    elif budget_bytes is not None:
        num_pages, source = budget_bytes // page_bytes, "budget"
    elif device_free_bytes is not None:
        num_pages, source = max(0, device_free_bytes) // page_bytes, "device"
    else:
        raise ValueError("the KV cache needs num_kv_pages, kv_cache_memory_bytes or a device to measure")
    need = -(-max_model_len // page_size)
    if num_pages < need:
        raise ValueError(
            f"the KV cache holds {num_pages} pages of {page_size} tokens ({num_pages * page_bytes / 2**20:.1f} MiB, "
            f"from {source}) but one request of max_model_len={max_model_len} tokens needs {need} pages "
            f"({need * page_bytes / 2**20:.1f} MiB): give the cache more memory or lower max_model_len"
        )
    return MemoryPlan(num_pages, page_size, page_bytes, num_pages * page_bytes, source)
