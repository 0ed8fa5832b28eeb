"""The rules every entry point shares: an unset temperature is greedy, and a prompt plus max_tokens must fit
the context (the gateway and the decode worker through `sampling_for_prompt`, `LLM` through the same check)."""

from __future__ import annotations

import pytest

from moemesh._proto.v1 import common_pb2
from moemesh.engine.sampling_params import SamplingParams, check_fits_context
from moemesh.services.sampling import sampling_for_prompt
from moemesh.transport.errors import InvalidArgument


def test_unset_sampling_is_greedy_and_fills_the_context():
    params = sampling_for_prompt(common_pb2.SamplingParams(), num_prompt_tokens=10, max_context_tokens=64)
    assert params.temperature == SamplingParams().temperature == 0.0 and params.greedy
    assert params.max_tokens == 54


def test_prompt_plus_max_tokens_must_fit_the_context():
    check_fits_context(10, 54, 64)  # exactly full: fine
    assert sampling_for_prompt(common_pb2.SamplingParams(max_tokens=54), 10, 64).max_tokens == 54
    with pytest.raises(InvalidArgument) as info:
        sampling_for_prompt(common_pb2.SamplingParams(max_tokens=55), 10, 64)
    assert str(info.value) == (
        "max_tokens=55 does not fit: the prompt has 10 tokens and the context is 64 tokens "
        "(max_context_tokens), so max_tokens must be <= 54"
    )
    with pytest.raises(ValueError, match="max_tokens=1000000000 does not fit: the prompt has 250 tokens and "
                       "the context is 256 tokens"):  # fmt: skip
        check_fits_context(250, 10**9, 256)
