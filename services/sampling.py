"""Proto `SamplingParams` <-> the engine's `SamplingParams`, shared by the gateway (which validates) and the
workers (which run them). Unset optional fields take the defaults common.proto documents."""

from __future__ import annotations

from dataclasses import replace

from moemesh._proto.v1 import common_pb2
from moemesh.engine.request import FinishReason
from moemesh.engine.sampler import SampledToken
from moemesh.engine.sampling_params import SamplingParams, check_fits_context
from moemesh.transport.errors import InvalidArgument

FINISH_REASONS = {
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
}


def sampling_from_proto(msg: common_pb2.SamplingParams, default_max_tokens: int) -> SamplingParams:
    """Raises InvalidArgument naming the field and value (`max_tokens=0 must be >= 1`)."""
    try:
        return SamplingParams(
            max_tokens=msg.max_tokens if msg.HasField("max_tokens") else default_max_tokens,
            temperature=msg.temperature if msg.HasField("temperature") else 0.0,  # greedy, as LLM and the CLI
            top_k=msg.top_k,
            top_p=msg.top_p if msg.HasField("top_p") else 1.0,
            min_p=msg.min_p,
            repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
            frequency_penalty=msg.frequency_penalty,
            presence_penalty=msg.presence_penalty,
            seed=msg.seed if msg.HasField("seed") else None,
            stop=tuple(msg.stop),
            stop_token_ids=tuple(msg.stop_token_ids),
            ignore_eos=msg.ignore_eos,
            logprobs=msg.logprobs if msg.HasField("logprobs") else None,
        )
    except ValueError as err:
        raise InvalidArgument(str(err)) from None


def sampling_for_prompt(
    msg: common_pb2.SamplingParams, num_prompt_tokens: int, max_context_tokens: int
) -> SamplingParams:
    """A request's sampling as the gateway and the decode worker take it: unset max_tokens fills the context,
    and a prompt plus max_tokens beyond it is INVALID_ARGUMENT (`check_fits_context`, the rule `LLM.generate`
    applies too)."""
    params = sampling_from_proto(msg, default_max_tokens=max(1, max_context_tokens - num_prompt_tokens))
    try:
        check_fits_context(num_prompt_tokens, params.max_tokens, max_context_tokens)
    except ValueError as err:
        raise InvalidArgument(str(err)) from None
    return params


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        max_tokens=params.max_tokens, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
        min_p=params.min_p, repetition_penalty=params.repetition_penalty,
        frequency_penalty=params.frequency_penalty, presence_penalty=params.presence_penalty,
        stop=list(params.stop), stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_eos,
    )  # fmt: skip
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    return msg


def without_stop_strings(params: SamplingParams) -> SamplingParams:
    """The gateway matches stop strings itself (on its detokenized text); workers need not."""
    return replace(params, stop=())


def logprob_to_proto(sampled: SampledToken) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=sampled.token_id, logprob=sampled.logprob or 0.0,
        top=[common_pb2.TopLogprob(token_id=t, logprob=lp) for t, lp in sampled.top_logprobs],
    )  # fmt: skip


def logprob_from_proto(msg: common_pb2.TokenLogprob) -> SampledToken:
    return SampledToken(msg.token_id, msg.logprob, tuple((t.token_id, t.logprob) for t in msg.top))
