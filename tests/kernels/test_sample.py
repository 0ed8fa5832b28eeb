"""`sample`: kernel vs reference token for token, seeds independent of the batch, each filter's semantics."""

from __future__ import annotations

import math

import pytest
import torch

from moemesh.kernels.sample import (
    SamplingTensors,
    _penalize,
    reference,
    row_keys,
    sample,
    token_counts,
    uniforms,
)
from tests.kernels.checks import assert_close

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Statistical tests draw thousands of rows: too slow for the interpreter, so on a CPU they check the reference
# (which the kernel matches token for token in the tests above them).
draw_many = sample if DEV == "cuda" else reference


def _mixed_params(b: int, v: int, device, gen: torch.Generator) -> SamplingTensors:
    """A batch where every row uses a different mix of filters and penalties."""

    def pick(choices, dtype):
        idx = torch.randint(0, len(choices), (b,), generator=gen)
        return torch.tensor(choices, dtype=dtype)[idx].to(device)

    return SamplingTensors(
        temperature=pick([0.0, 0.5, 1.0, 1.3], torch.float32),
        top_k=pick([0, 1, 5, 40, v], torch.int32),
        top_p=pick([1.0, 0.9, 0.5, 0.05], torch.float32),
        min_p=pick([0.0, 0.05, 0.2], torch.float32),
        repetition_penalty=pick([1.0, 1.2, 0.8], torch.float32),
        frequency_penalty=pick([0.0, 0.5, -0.3], torch.float32),
        presence_penalty=pick([0.0, 0.7], torch.float32),
        seed=torch.randint(0, 2**62, (b,), generator=gen).to(device),
        step=torch.randint(0, 1000, (b,), generator=gen).to(device),
    )


def _inputs(b, v, seed=0, device=DEV):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, v, generator=gen) * 3).to(device)
    history = torch.randint(-1, v, (b, 12), generator=gen).to(device)
    prompt = torch.rand(b, v, generator=gen).lt(0.05).to(device)
    return logits, _mixed_params(b, v, device, gen), token_counts(history, v), prompt


def test_rng_is_a_pure_function_of_seed_step_index():
    keys = row_keys(torch.tensor([7, 7, 2**40 + 7, 7]), torch.tensor([0, 1, 0, 0]))
    assert keys[0] != keys[1] and keys[0] != keys[2] and keys[0] == keys[3]
    u = uniforms(keys, 50_000)
    assert (u > 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.01
    # a hash, not a counter: neighbouring indices are uncorrelated
    c = torch.corrcoef(torch.stack([u[0, :-1], u[0, 1:]]))[0, 1].item()
    assert abs(c) < 0.02


def test_kernel_matches_reference_token_for_token():
    b, v = 12, 777  # V not a multiple of the segment size
    logits, params, counts, prompt = _inputs(b, v)
    got = sample(logits, params, counts, prompt, num_logprobs=3)
    ref = reference(logits.cpu(), _to(params, "cpu"), counts.cpu(), prompt.cpu(), num_logprobs=3)
    assert torch.equal(got.token_ids.cpu(), ref.token_ids), (got.token_ids, ref.token_ids)
    assert_close(got.logprobs, ref.logprobs, name="logprobs")
    assert torch.equal(got.top_ids.cpu(), ref.top_ids)
    assert_close(got.top_logprobs, ref.top_logprobs, name="top_logprobs")


def test_kernel_without_penalty_inputs():
    b, v = 6, 300
    logits, params, _, _ = _inputs(b, v, seed=3)
    got = sample(logits, params)
    ref = reference(logits.cpu(), _to(params, "cpu"))
    assert torch.equal(got.token_ids.cpu(), ref.token_ids)
    assert_close(got.logprobs, ref.logprobs, name="logprobs")  # computed inside the kernel here
    assert got.top_ids.shape == (b, 0) and got.top_logprobs.shape == (b, 0)


def test_tied_candidates_fall_back_to_the_full_row():
    """Ties overflow a segment's candidate buffer: the finisher must take the full-row path, same tokens."""
    v = 700
    logits = torch.zeros(3, v, device=DEV)
    logits[1, 5] = 1.0
    logits[2] = torch.arange(v, device=DEV).remainder(7).float()  # 100 ties at each value
    params = _replace(
        SamplingTensors.filled(3, DEV, top_k=3, top_p=0.8), seed=torch.tensor([1, 2, 3], device=DEV)
    )
    got = sample(logits, params)
    ref = reference(logits.cpu(), _to(params, "cpu"))
    assert torch.equal(got.token_ids.cpu(), ref.token_ids)
    assert logits[2, got.token_ids[2]] == 6.0


def test_top_p_and_min_p_without_top_k():
    """Peaked rows are served by the segments' candidates, flat rows fall back to the whole row: same tokens."""
    v, b = 2000, 8
    gen = torch.Generator().manual_seed(21)
    spread = torch.tensor([8.0, 8.0, 0.1, 0.1, 4.0, 4.0, 0.5, 2.0])[:, None]
    logits = (torch.randn(b, v, generator=gen) * spread).to(DEV)
    params = SamplingTensors(
        temperature=torch.full((b,), 0.9, device=DEV),
        top_k=torch.tensor([0, v, 0, 0, 0, 0, 0, 3000], dtype=torch.int32, device=DEV),
        top_p=torch.tensor([0.9, 0.99, 0.9, 1.0, 1.0, 0.7, 0.95, 0.5], device=DEV),
        min_p=torch.tensor([0.0, 0.0, 0.0, 0.5, 0.1, 0.05, 0.0, 0.0], device=DEV),
        repetition_penalty=torch.ones(b, device=DEV),
        frequency_penalty=torch.zeros(b, device=DEV),
        presence_penalty=torch.zeros(b, device=DEV),
        seed=torch.arange(b, device=DEV) * 31,
        step=torch.full((b,), 5, device=DEV),
    )
    got = sample(logits, params)
    ref = reference(logits.cpu(), _to(params, "cpu"))
    assert torch.equal(got.token_ids.cpu(), ref.token_ids)


def test_same_seed_same_tokens_whatever_the_batch():
    v = 500
    logits, params, counts, prompt = _inputs(9, v, seed=5)
    alone = sample(logits[4:5], _rows(params, slice(4, 5)), counts[4:5], prompt[4:5])
    shuffled = torch.tensor([8, 4, 0, 3], device=logits.device)
    mixed = sample(logits[shuffled], _rows(params, shuffled), counts[shuffled], prompt[shuffled])
    assert mixed.token_ids[1] == alone.token_ids[0]


def test_greedy_is_first_argmax_of_penalized_logits():
    v = 64
    logits = torch.zeros(2, v, device=DEV)
    logits[:, 10] = 5.0
    logits[:, 20] = 5.0  # tie: lowest index wins
    logits[1, 30] = 6.0
    params = SamplingTensors.filled(2, DEV, temperature=0.0, repetition_penalty=2.0)
    prompt = torch.zeros(2, v, dtype=torch.bool, device=DEV)
    prompt[1, 30] = True  # 6 / 2 = 3 < 5
    out = sample(logits, params, prompt_mask=prompt)
    assert out.token_ids.tolist() == [10, 10]


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits, _, _, _ = _inputs(5, 400, seed=9)
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=0.999)):
        params = SamplingTensors.filled(5, DEV, seed=123, temperature=2.0, **kw)
        assert torch.equal(sample(logits, params).token_ids, logits.argmax(-1)), kw


def test_filters_keep_exactly_their_set():
    """Over many seeds the drawn tokens stay inside the set each filter defines, and cover it."""
    probs = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.08, 0.07, 0.04, 0.03, 0.01, 0.01, 0.005, 0.005])
    logits = probs.log()[None].repeat(400, 1).to(DEV)
    cases = {
        "top_k": (dict(top_k=3), {0, 1, 2}),
        "top_p": (dict(top_p=0.6), {0, 1, 2}),  # 0.3 + 0.2 = 0.5 < 0.6 <= 0.65
        "min_p": (dict(min_p=0.3), {0, 1, 2, 3}),  # p >= 0.09
        "k_then_p": (dict(top_k=2, top_p=0.55), {0}),  # 0.3 / 0.5 = 0.6 >= 0.55
    }
    for name, (kw, allowed) in cases.items():
        params = SamplingTensors.filled(400, DEV, **kw)
        params = _replace(params, seed=torch.arange(400, device=DEV))
        drawn = set(draw_many(logits, params).token_ids.tolist())
        assert drawn == allowed, (name, drawn)


def test_distribution_follows_temperature():
    n, v = 4000, 4
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]], device=DEV).repeat(n, 1)
    params = _replace(
        SamplingTensors.filled(n, DEV, temperature=2.0), seed=torch.arange(n, device=DEV) * 7919
    )
    freq = torch.bincount(draw_many(logits, params).token_ids.cpu(), minlength=v).float() / n
    want = torch.softmax(torch.tensor([0.0, 1.0, 2.0, 3.0]) / 2.0, -1)
    assert (freq - want).abs().max() < 0.03, (freq, want)


def test_penalties():
    logits = torch.tensor([[2.0, 1.0, -1.0, 0.5, 0.0, 0.0, 0.0, 0.0]], device=DEV)
    counts = torch.tensor([[1, 0, 2, 0, 0, 0, 0, 0]], dtype=torch.int32, device=DEV)
    params = SamplingTensors.filled(
        1, DEV, repetition_penalty=2.0, frequency_penalty=0.25, presence_penalty=0.5
    )
    x = _penalize(logits, params, counts, None)
    assert_close(x, torch.tensor([[2 / 2 - 0.25 - 0.5, 1.0, -2 - 0.5 - 0.5, 0.5, 0, 0, 0, 0]], device=DEV))


def test_token_counts_ignores_padding():
    ids = torch.tensor([[3, 3, -1, 0], [1, -1, -1, -1]])
    counts = token_counts(ids, 5)
    assert counts.tolist() == [[1, 0, 0, 2, 0], [0, 1, 0, 0, 0]]


def test_logprobs_are_raw():
    logits, params, counts, prompt = _inputs(4, 50, seed=11)
    out = sample(logits, params, counts, prompt, num_logprobs=50)
    lsm = torch.log_softmax(logits.float(), -1)
    assert_close(out.logprobs, lsm.gather(1, out.token_ids[:, None])[:, 0])
    assert_close(out.top_logprobs, lsm.sort(-1, descending=True).values)
    assert math.isclose(out.top_logprobs.exp().sum(-1)[0].item(), 1.0, rel_tol=1e-4)


def test_bad_inputs_name_the_argument():
    logits = torch.zeros(3, 10)
    with pytest.raises(ValueError, match="top_k"):
        sample(logits, _replace(SamplingTensors.filled(3), top_k=torch.zeros(3)))
    with pytest.raises(ValueError, match="output_counts"):
        sample(logits, SamplingTensors.filled(3), output_counts=torch.zeros(3, 9, dtype=torch.int32))
    with pytest.raises(ValueError, match="logits"):
        sample(torch.zeros(10), SamplingTensors.filled(3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_full_vocab_matches_reference():
    b, v = 64, 129_280  # DeepSeek-V3 vocabulary
    logits, params, counts, prompt = _inputs(b, v, seed=1, device="cuda")
    got = sample(logits, params, counts, prompt, num_logprobs=5)
    ref = reference(logits.cpu(), _to(params, "cpu"), counts.cpu(), prompt.cpu(), num_logprobs=5)
    same = (got.token_ids.cpu() == ref.token_ids).float().mean().item()
    assert same == 1.0, f"{same:.3f} of tokens agree"
    assert_close(got.top_logprobs, ref.top_logprobs)


# -- helpers


def _to(params: SamplingTensors, device) -> SamplingTensors:
    return SamplingTensors(**{k: getattr(params, k).to(device) for k in params.__dataclass_fields__})


def _rows(params: SamplingTensors, rows) -> SamplingTensors:
    return SamplingTensors(**{k: getattr(params, k)[rows] for k in params.__dataclass_fields__})


def _replace(params: SamplingTensors, **fields) -> SamplingTensors:
    return SamplingTensors(**{k: fields.get(k, getattr(params, k)) for k in params.__dataclass_fields__})
