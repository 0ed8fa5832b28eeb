"""The bundled demo model (models/demo, written by tools/train_demo.py): it loads, it is the architecture DESIGN
§5 asks for, it has learned its corpus (held-out perplexity below an add-k bigram fitted on the same training
tokens), FP8 costs at most 2 % perplexity against the BF16 weights it was quantized from, and greedy text is
made of real words."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moemesh import LLM, SamplingParams

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "demo"
CORPUS = DEMO / "corpus"
PROMPT = "To Sherlock Holmes she is always"  # the first sentence of "A Scandal in Bohemia" (adventures.txt)


def _train_demo():
    spec = importlib.util.spec_from_file_location(
        "moemesh_tools_train_demo", ROOT / "tools" / "train_demo.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: this tiny model gains nothing from two, and on a 2-core machine that other processes
    share, two threads wait on each other at every op (10x slower measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def td():
    return _train_demo()


@pytest.fixture(scope="module")
def fp8():
    return LLM(DEMO, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def chunks(td, fp8):
    chunks = td.heldout_chunks(fp8.tokenizer, CORPUS, fp8.config.max_position_embeddings)
    assert len(chunks) >= 10, f"only {len(chunks)} held-out chunks"
    return chunks


@pytest.fixture(scope="module")
def fp8_ppl(td, fp8, chunks):
    return td.perplexity(fp8, chunks)


def _words(text: str) -> list[str]:
    return [w for w in (t.strip("\"'.,;:!?()[]_-").lower() for t in text.split()) if w]


def test_demo_is_a_small_deepseek_v3_moe_in_fp8_blocks():
    config = json.loads((DEMO / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["scoring_func"] == "sigmoid"
    assert config["n_routed_experts"] >= 8 and config["n_shared_experts"] >= 1
    assert config["n_group"] > 1 and config["topk_group"] < config["n_group"]
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    total_bytes = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert total_bytes <= 20 * 2**20, f"models/demo holds {total_bytes} bytes"
    with safe_open(DEMO / "model.safetensors", "pt") as f:
        names = set(f.keys())
        quantized = [n for n in names if n + "_scale_inv" in names]
        assert len(quantized) >= 50
        for name in quantized:
            w, scale = f.get_tensor(name), f.get_tensor(name + "_scale_inv")
            assert w.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
            assert tuple(scale.shape) == (-(-w.shape[0] // 128), -(-w.shape[1] // 128)), name
        assert f.get_tensor("model.layers.1.self_attn.kv_a_proj_with_mqa.weight").shape[0] % 128, (
            "the partial-edge-block case is meant to be covered"
        )
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16


def test_heldout_text_is_not_in_the_training_files(td):
    training = "".join(f.read_text() for f in td.training_files(CORPUS))
    paragraphs = [p for p in (CORPUS / td.HELDOUT).read_text().split("\n\n") if len(p) > 200]
    assert len(paragraphs) >= 20
    assert not [p for p in paragraphs if p[:200] in training]


def test_tokenizer_eos_and_chat_template(fp8):
    tok = fp8.tokenizer
    assert 2048 <= tok.vocab_size <= 8192
    assert tok.eos_token_ids == (0,) and tok.decode([0], skip_special_tokens=False) == "<|endoftext|>"
    assert tok.decode(tok.encode("Mr. Sherlock Holmes")) == "Mr. Sherlock Holmes"
    chat = tok.apply_chat_template([{"role": "user", "content": "Who is Watson?"}])
    assert chat == "User: Who is Watson?\n\nAssistant:"


def test_heldout_perplexity_beats_a_bigram_on_the_same_tokens(td, fp8, chunks, fp8_ppl):
    train_ids = torch.tensor(
        [t for f in td.training_files(CORPUS) for t in (*fp8.tokenizer.encode(f.read_text()), 0)]
    )
    bigram_ppl, k = td.bigram_perplexity(train_ids, chunks, fp8.config.vocab_size)
    assert fp8_ppl < 0.8 * bigram_ppl, f"demo {fp8_ppl:.2f} vs bigram {bigram_ppl:.2f} (k={k})"


def test_fp8_perplexity_within_2_percent_of_bf16(td, chunks, fp8_ppl, tmp_path):
    bf16 = LLM(td.assemble_bf16(DEMO, tmp_path / "bf16"), device="cpu", dtype="float32")
    bf16_ppl = td.perplexity(bf16, chunks)
    assert abs(fp8_ppl / bf16_ppl - 1) < 0.02, f"FP8 {fp8_ppl:.3f} vs BF16 {bf16_ppl:.3f}"
    assert fp8_ppl != bf16_ppl, "the two versions should differ by their quantization"


def test_greedy_continuation_is_real_words(td, fp8):
    training = "\n".join(f.read_text() for f in td.training_files(CORPUS))
    assert PROMPT in training
    vocabulary = set(_words(training))
    out = fp8.generate([PROMPT], SamplingParams(max_tokens=48))[0]
    words = _words(out.text)
    if out.finish_reason == "length":
        words = words[:-1]  # the last word may be cut off
    assert len(words) >= 15, f"too few words: {out.text!r}"
    known = [w for w in words if w in vocabulary]
    assert len(known) >= 0.8 * len(words), f"{out.text!r}: unknown {set(words) - vocabulary}"
    assert len(set(words)) >= 8, f"degenerate repetition: {out.text!r}"
    assert not re.search(r"\b(\w+)( \1\b){4}", out.text), f"a word repeated 5 times: {out.text!r}"
