"""The prefill attention of a layer does not synchronize the device: sequence lengths come from the host and its
index tensors go up through pinned memory. Before, every layer of a prefill forward waited for the GPU to drain
two or three times (`seq_lens.tolist()`, blocking host-to-device copies), and the engine thread had to win the
GIL back after each wait: a prefill worker whose event loop sends KV meanwhile lost time at every layer."""

from __future__ import annotations

import pytest
import torch

from moemesh import LLM
from moemesh.config.engine import EngineConfig
from moemesh.model.batch import ForwardBatch

pytestmark = pytest.mark.gpu


def test_prefill_attention_with_a_cached_prefix_never_syncs():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    config = EngineConfig(page_size=16, kv_cache_memory_bytes=64 << 20, cuda_graph_batch_sizes=())
    llm = LLM("demo", device="cuda", dtype="bfloat16", fp8=False, engine_config=config)
    attn = llm.model.model.layers[0].self_attn
    mc = llm.config
    # two sequences: 40 new tokens after 32 cached, and 24 new tokens from scratch
    batch = ForwardBatch.build([[1] * 40, [2] * 24], [32, 0], [[0, 1, 2, 3, 4], [5, 6]], 16, "cuda")
    assert batch.seq_lens_host == (72, 24)
    cache = torch.randn(8, 16, mc.kv_cache_dim, device="cuda").bfloat16()
    q = torch.randn(64, mc.num_attention_heads, mc.qk_head_dim, device="cuda").bfloat16()
    expected = attn._prefill(q, batch, cache)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = attn._prefill(q, batch, cache)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got, expected)
