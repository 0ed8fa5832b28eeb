"""moemesh's network against transformers' DeepseekV3/V2ForCausalLM (the oracle) on tiny random configs."""

from __future__ import annotations

import pytest
import torch

from moemesh import LLM, SamplingParams
from tests.model.tiny import build_hf, hf_greedy, save_hf

CASES = {
    "v3-no-qlora": ("v3", {}),
    "v3-qlora": ("v3", {"q_lora_rank": 24}),
    "v3-groups-bias": ("v3", {"n_group": 4, "topk_group": 2, "num_experts_per_tok": 3}),
    "v3-first-dense-0": ("v3", {"first_k_dense_replace": 0}),
    "v3-first-dense-2": ("v3", {"first_k_dense_replace": 2, "num_hidden_layers": 4}),
    "v3-yarn": (
        "v3",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 0.707,
                "mscale_all_dim": 0.707,
            },
            "max_position_embeddings": 256,
        },
    ),
    "v3-no-norm-topk": ("v3", {"norm_topk_prob": False}),
    "v2-softmax-greedy": ("v2", {"topk_method": "greedy", "routed_scaling_factor": 1.5}),
    "v2-group-limited": ("v2", {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    kind, overrides = CASES[request.param]
    hf = build_hf(kind, seed=len(request.param), **overrides)
    path = save_hf(hf, tmp_path_factory.mktemp(request.param))
    return hf, LLM(path, device="cpu", dtype="float32")


def test_logits_match_transformers(pair):
    hf, llm = pair
    torch.manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (37,)).tolist()
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].float()
    got = llm.score(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4


def test_greedy_continuation_matches_transformers(pair):
    hf, llm = pair
    torch.manual_seed(2)
    prompt = torch.randint(0, hf.config.vocab_size, (11,)).tolist()
    expected = hf_greedy(hf, prompt, 32)
    got = llm.generate([prompt], SamplingParams(max_tokens=32, ignore_eos=True))[0]
    assert got.token_ids == expected
    assert got.finish_reason == "length"
