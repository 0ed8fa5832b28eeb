"""The engine's mesh hooks on tiny models (CPU): KV handed from a prefill-only engine to a decode engine through
pack/unpack, migration by export/import, and stop strings on detokenized text."""

from __future__ import annotations

import pytest
import torch

from moemesh import LLM, SamplingParams
from moemesh.config.engine import EngineConfig
from moemesh.engine.engine import KvProgress
from moemesh.engine.request import FinishReason
from moemesh.kernels import pack_kv, unpack_kv
from tests.model.test_generate_engine import assert_no_leaks, prompts
from tests.model.tiny import build_hf, save_hf

GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_hf(build_hf("v3", seed=11), tmp_path_factory.mktemp("tiny-mesh"))


def make_llm(path) -> LLM:
    config = EngineConfig(page_size=8, max_num_seqs=8, max_num_batched_tokens=24)
    return LLM(path, device="cpu", dtype="float32", engine_config=config)


def run(engine, until_done: set[str]) -> dict:
    done = {}
    while until_done - set(done):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def test_prefill_elsewhere_then_decode_from_transferred_pages(tiny_dir):
    prefill, decode = make_llm(tiny_dir), make_llm(tiny_dir)
    prompt = prompts(4, seed=7)[3] + [3, 4, 5]  # 27 tokens
    expected = decode.generate([prompt], GREEDY)[0].token_ids  # also leaves 3 full pages in decode's cache
    shorter = prompt[:20]  # 2 full pages shared with the cached prompt
    want = decode.generate([shorter], GREEDY)[0].token_ids
    for p, reference, cached in ((prompt, expected, 24), (shorter, want, 16)):
        p_engine, d_engine = prefill.engine, decode.engine
        rid = p_engine.add_request(p, GREEDY, prefill_only=True)
        assert p_engine.kv_progress(rid) == (KvProgress((), 0))  # queued, nothing computed yet
        (out,) = run(p_engine, {rid}).values()
        assert p_engine.kv_progress(rid) is None and p_engine.num_running == 0
        assert out.finish_reason == FinishReason.PREFILL and out.kv.num_tokens == len(p)
        reservation = d_engine.reserve_kv("moved", p)
        assert reservation.num_cached_tokens == cached  # full pages the decode side already holds
        skip = reservation.num_cached_tokens // d_engine.config.page_size
        src = torch.tensor(out.kv.page_ids[skip:])
        unpack_kv(
            pack_kv(p_engine.kv_caches, src), d_engine.kv_caches, torch.tensor(reservation.page_ids[skip:])
        )
        p_engine.release_handoff(rid)
        d_engine.add_prefilled(reservation, p, out.kv.first_token_id, GREEDY)
        before = decode.stats()["prefill_tokens_computed"]
        (moved,) = run(d_engine, {"moved"}).values()
        assert list(moved.output_ids) == reference
        assert decode.stats()["prefill_tokens_computed"] == before  # nothing prefilled on the decode side
        assert_no_leaks(prefill)
        assert_no_leaks(decode)


def test_cancelled_reservation_returns_its_pages(tiny_dir):
    llm = make_llm(tiny_dir)
    reservation = llm.engine.reserve_kv("r", list(range(2, 40)))
    assert llm.stats()["pages_leased"] == len(reservation.page_ids) == 5
    llm.engine.cancel_reservation(reservation)
    assert_no_leaks(llm)


@pytest.mark.parametrize(
    "params", [GREEDY, SamplingParams(max_tokens=10, temperature=1.0, seed=5, ignore_eos=True)]
)
def test_export_then_import_elsewhere_continues_identically(tiny_dir, params):
    a, b = make_llm(tiny_dir), make_llm(tiny_dir)
    batch = prompts(3, seed=8)
    reference = [c.token_ids for c in a.generate(batch, params)]
    ids = [a.engine.add_request(p, params) for p in batch]
    for _ in range(4):
        assert not [o for o in a.engine.step() if o.finished]
    exported = a.engine.export_request(ids[1])
    assert 0 < len(exported.output_ids) < params.max_tokens
    assert_no_leaks_but(a, running=2)
    b.engine.import_request(exported)
    moved = run(b.engine, {ids[1]})[ids[1]]
    stayed = run(a.engine, {ids[0], ids[2]})
    assert list(moved.output_ids) == reference[1]
    assert [list(stayed[i].output_ids) for i in (ids[0], ids[2])] == [reference[0], reference[2]]
    assert_no_leaks(a)
    assert_no_leaks(b)


def assert_no_leaks_but(llm: LLM, running: int) -> None:
    assert llm.stats()["num_running"] + llm.stats()["num_waiting"] == running


# -- stop strings need a tokenizer: a byte-level BPE over a 300-token vocabulary ------------------------------


@pytest.fixture(scope="module")
def text_llm(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = save_hf(build_hf("v3", seed=12, vocab_size=300), tmp_path_factory.mktemp("tiny-text"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the old man and the sea", "héllo wörld ünïcode ✓ ok"] * 20, trainer)
    tok.save(str(path / "tokenizer.json"))
    return LLM(path, device="cpu", dtype="float32", engine_config=EngineConfig(page_size=8))


def test_stop_strings_cut_text_and_stop_early(text_llm):
    prompt = "the old man"
    full = text_llm.generate([prompt], SamplingParams(max_tokens=24, ignore_eos=True))[0]
    decoded = text_llm.tokenizer.decode(full.token_ids)
    # incremental text is the full decode, minus bytes of a character still incomplete at the end
    assert decoded.startswith(full.text) and set(decoded[len(full.text) :]) <= {"\ufffd"}
    middle = len(full.text) // 2
    stop = next(
        full.text[i : i + 2]
        for i in range(middle, len(full.text) - 1)
        if "\ufffd" not in full.text[i : i + 2]
    )
    got = text_llm.generate(
        [prompt], SamplingParams(max_tokens=24, ignore_eos=True, stop=(stop, "\x00never"))
    )[0]
    assert got.finish_reason == "stop"
    assert got.text == full.text[: full.text.find(stop)]
    assert got.token_ids == full.token_ids[: len(got.token_ids)] and len(got.token_ids) < 24
    assert_no_leaks(text_llm)
