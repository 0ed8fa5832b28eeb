"""`LLM.generate` on the engine against each request alone and against transformers' greedy (tiny models)."""

from __future__ import annotations

import pytest
import torch

from moemesh import LLM, SamplingParams
from moemesh.config.engine import EngineConfig
from tests.model.tiny import build_hf, hf_greedy, save_hf

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def hf_and_dir(tmp_path_factory):
    hf = build_hf("v3", seed=3, q_lora_rank=24)
    return hf, save_hf(hf, tmp_path_factory.mktemp("tiny-v3"))


def make_llm(path, **knobs) -> LLM:
    config = dict(page_size=8, max_num_seqs=16, max_num_batched_tokens=40)
    config.update(knobs)
    return LLM(path, device="cpu", dtype="float32", engine_config=EngineConfig(**config))


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 96, (int(3 + (7 * i) % 29),), generator=g).tolist() for i in range(n)]


def assert_no_leaks(llm: LLM) -> None:
    s = llm.stats()
    assert s["pages_leased"] == 0, s
    assert s["pages_free"] + s["pages_cached"] == s["pages_total"]
    assert s["num_running"] == s["num_waiting"] == 0


def test_sixteen_concurrent_equal_alone_and_transformers(hf_and_dir):
    hf, path = hf_and_dir
    llm = make_llm(path, enable_prefix_caching=False)
    batch = prompts(16)
    together = llm.generate(batch, GREEDY)
    assert llm.stats()["num_steps"] < sum(len(p) for p in batch)  # they really ran batched
    for prompt, got in zip(batch, together, strict=True):
        alone = llm.generate([prompt], GREEDY)[0]
        assert got.token_ids == alone.token_ids
        assert got.token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens)
        assert got.finish_reason == "length"
    assert_no_leaks(llm)


def test_a_steps_output_carries_its_new_tokens_not_the_output_so_far(hf_and_dir):
    """A step hands out O(its new tokens), not the whole output (that is quadratic over a long answer): each
    unfinished output carries one token, its logprob and the count; only the finished one the whole list, which
    is what was streamed and what `generate` returns."""
    _, path = hf_and_dir
    llm = make_llm(path)
    prompt = prompts(1, seed=5)[0]
    params = SamplingParams(max_tokens=24, ignore_eos=True, logprobs=1)
    reference = llm.generate([prompt], params)[0]
    rid = llm.engine.add_request(prompt, params)
    outs = []
    while not (outs and outs[-1].finished):
        outs += [out for out in llm.engine.step() if out.request_id == rid]
    *running, last = outs
    assert [len(out.new_token_ids) + len(out.output_ids or ()) for out in running] == [1] * 23
    assert [out.num_output_tokens for out in outs] == list(range(1, 25))
    assert [len(out.logprobs) for out in outs] == [1] * 24
    assert [out.logprobs[0].token_id for out in outs] == [out.new_token_ids[0] for out in outs]
    streamed = [t for out in outs for t in out.new_token_ids]
    assert list(last.output_ids) == streamed == reference.token_ids
    assert_no_leaks(llm)


def test_preemption_by_recompute_keeps_greedy_tokens(hf_and_dir):
    _, path = hf_and_dir
    batch = prompts(8, seed=1)
    roomy = make_llm(path).generate(batch, GREEDY)
    tight = make_llm(path, num_kv_pages=12, max_model_len=64, enable_prefix_caching=False)
    got = tight.generate(batch, GREEDY)
    assert tight.stats()["num_preemptions"] > 0
    assert [c.token_ids for c in got] == [c.token_ids for c in roomy]
    assert_no_leaks(tight)


def test_prefix_cache_hit_gives_same_tokens_and_skips_compute(hf_and_dir):
    _, path = hf_and_dir
    llm = make_llm(path)
    shared = prompts(4, seed=2)[3] + [5, 6, 7]  # 24 + 3 tokens: 3 full pages of 8 and change
    first = llm.generate([shared], GREEDY)[0]
    before = llm.stats()
    assert before["pages_cached"] > 0 and before["prefix_hit_tokens"] == 0
    second = llm.generate([shared], GREEDY)[0]
    after = llm.stats()
    assert second.token_ids == first.token_ids
    hit = after["prefix_hit_tokens"]
    assert hit == 24
    assert after["prefill_tokens_computed"] - before["prefill_tokens_computed"] == len(shared) - hit
    cold = make_llm(path, enable_prefix_caching=False).generate([shared], GREEDY)[0]
    assert cold.token_ids == first.token_ids
    assert_no_leaks(llm)


def test_seeded_sampling_is_reproducible_whatever_the_batch(hf_and_dir):
    _, path = hf_and_dir
    llm = make_llm(path)
    p = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, top_k=40, seed=1234, ignore_eos=True)
    target = prompts(1, seed=3)[0]
    alone = llm.generate([target], p)[0].token_ids
    others = prompts(5, seed=4)
    mixed = llm.generate(others[:2] + [target] + others[2:], p)[2].token_ids
    assert mixed == alone
    other_seed = llm.generate([target], SamplingParams(**{**p.__dict__, "seed": 99}))[0].token_ids
    assert other_seed != alone
    assert_no_leaks(llm)


def test_penalties_and_logprobs(hf_and_dir):
    _, path = hf_and_dir
    llm = make_llm(path)
    target = prompts(1, seed=5)[0]
    plain = llm.generate([target], SamplingParams(max_tokens=16, ignore_eos=True, logprobs=3))[0]
    assert len(plain.logprobs) == 16
    for tok, lp in zip(plain.token_ids, plain.logprobs, strict=True):
        assert lp.token_id == tok and lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0][0] == tok  # greedy picks the most likely token
    penalized = llm.generate(
        [target],
        SamplingParams(max_tokens=16, ignore_eos=True, frequency_penalty=2.0, repetition_penalty=2.0),
    )[0]
    assert len(set(penalized.token_ids)) >= len(set(plain.token_ids))
    assert penalized.token_ids != plain.token_ids
    assert_no_leaks(llm)


def test_stop_token_ids_and_eos(hf_and_dir):
    _, path = hf_and_dir
    llm = make_llm(path)
    target = prompts(1, seed=6)[0]
    full = llm.generate([target], GREEDY)[0].token_ids
    stop_at = full[4]
    got = llm.generate([target], SamplingParams(max_tokens=12, ignore_eos=True, stop_token_ids=(stop_at,)))[0]
    assert got.token_ids == full[: full.index(stop_at) + 1]
    assert got.finish_reason == "stop"
    assert_no_leaks(llm)


def test_memory_planner_rejects_a_pool_smaller_than_one_request(hf_and_dir):
    _, path = hf_and_dir
    with pytest.raises(ValueError, match="max_model_len=512"):
        make_llm(path, num_kv_pages=10)
    with pytest.raises(ValueError, match="kv_cache_memory_bytes|give the cache more memory"):
        make_llm(path, kv_cache_memory_bytes=4096)


def test_max_model_len_beyond_the_models_positions_is_refused(hf_and_dir):
    _, path = hf_and_dir
    with pytest.raises(ValueError, match="max_model_len=513 exceeds the model's max_position_embeddings=512"):
        make_llm(path, max_model_len=513)
