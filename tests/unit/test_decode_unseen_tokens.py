"""The decode worker streams an engine output's new tokens by their place in the request's output
(`num_output_tokens`): what it already streamed (migrated tokens, P's first token) is skipped, once."""

from __future__ import annotations

from moemesh.engine.engine import RequestOutput
from moemesh.services.decode.worker import _unseen


def _out(new: tuple[int, ...], num_output_tokens: int) -> RequestOutput:
    return RequestOutput("r", new, num_output_tokens, "", False)


def test_new_tokens_past_what_was_streamed_pass_whole():
    assert _unseen(_out((7,), 3), emitted=2) == (7,)  # token 3 of 3, 2 streamed
    assert _unseen(_out((7, 8), 5), emitted=3) == (7, 8)


def test_tokens_streamed_already_are_skipped():
    # P's first token was streamed from its early result; the engine's finished-at-admission output repeats it
    assert _unseen(_out((5,), 1), emitted=1) == ()
    assert _unseen(_out((5, 6, 7), 4), emitted=2) == (6, 7)  # tokens 2..4, the first two streamed
    assert _unseen(_out((5, 6), 2), emitted=4) == ()
