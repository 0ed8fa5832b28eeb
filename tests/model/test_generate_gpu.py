"""The engine on a GPU: decode steps replayed from CUDA graphs give the same greedy tokens as transformers."""

from __future__ import annotations

import pytest
import torch

from moemesh import LLM, SamplingParams
from moemesh.config.engine import EngineConfig
from tests.model.test_generate_engine import assert_no_leaks, prompts
from tests.model.tiny import build_hf, hf_greedy, save_hf

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def hf_and_llm(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    hf = build_hf("v3", seed=3, q_lora_rank=24)
    path = save_hf(hf, tmp_path_factory.mktemp("tiny-v3-gpu"))
    config = EngineConfig(
        page_size=8,
        max_num_seqs=16,
        max_num_batched_tokens=40,
        cuda_graph_batch_sizes=(1, 4, 16),
        kv_cache_memory_bytes=64 << 20,  # leave the card to the other engines of this process
    )
    return hf, LLM(path, device="cuda", dtype="float32", engine_config=config)


def test_graphs_captured_and_greedy_matches_transformers(hf_and_llm):
    hf, llm = hf_and_llm
    assert sorted(llm.engine.runner.graphs) == [1, 4, 16]
    batch = prompts(16)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    together = llm.generate(batch, params)
    for prompt, got in zip(batch, together, strict=True):
        assert got.token_ids == hf_greedy(hf, prompt, 12)
        assert llm.generate([prompt], params)[0].token_ids == got.token_ids
    assert_no_leaks(llm)


def test_seeded_sampling_matches_across_batches_on_gpu(hf_and_llm):
    _, llm = hf_and_llm
    p = SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    target = prompts(1, seed=3)[0]
    alone = llm.generate([target], p)[0].token_ids
    assert llm.generate(prompts(6, seed=4) + [target], p)[-1].token_ids == alone
    assert_no_leaks(llm)


def test_grouped_experts_in_bf16_match_the_fp32_loop():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from moemesh.model.moe import LocalExperts

    torch.manual_seed(0)
    cpu = LocalExperts(64, 256, 176)
    torch.nn.init.normal_(cpu.w13, std=0.05)
    torch.nn.init.normal_(cpu.w2, std=0.05)
    gpu = LocalExperts(64, 256, 176).to("cuda", torch.bfloat16)
    gpu.load_state_dict(cpu.state_dict())
    for tokens in (1, 5, 64):
        hidden = torch.randn(tokens, 256)
        ids = torch.stack([torch.randperm(64)[:6] for _ in range(tokens)])
        weights = torch.rand(tokens, 6)
        ref = cpu.forward(hidden, ids, weights)
        got = gpu.forward(hidden.cuda().bfloat16(), ids.cuda(), weights.cuda()).float().cpu()
        assert ((got - ref).norm() / ref.norm()).item() < 1e-2


def test_demo_checkpoint_graphs_match_eager():
    """The bundled demo (FP8 experts and projections on CUDA): decode graphs give the eager greedy tokens."""
    from pathlib import Path

    demo = Path(__file__).resolve().parents[2] / "models" / "demo"
    if not torch.cuda.is_available() or not (demo / "config.json").is_file():
        pytest.skip("needs a CUDA GPU and models/demo")
    texts = ["To Sherlock Holmes she is always", "The old man", "It was", "Watson"]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    got = {}
    for sizes in ((1, 2, 4), ()):
        config = EngineConfig(max_num_seqs=4, cuda_graph_batch_sizes=sizes, kv_cache_memory_bytes=256 << 20)
        llm = LLM(demo, device="cuda", engine_config=config)
        assert bool(llm.engine.runner.graphs) == bool(sizes)
        got[sizes] = [c.token_ids for c in llm.generate(texts, params)]
        assert_no_leaks(llm)
        del llm
        torch.cuda.empty_cache()
    assert got[(1, 2, 4)] == got[()]
