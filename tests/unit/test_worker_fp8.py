"""Mesh workers compute in FP8 where `LLM` does: both decide with `default_fp8` (an FP8 checkpoint on CUDA), so an
FP8 checkpoint is no longer dequantized to BF16 in the workers while the in-process engine runs FP8 GEMMs."""

from __future__ import annotations

import json

import pytest
import torch

import moemesh.llm
import moemesh.services.model_loading as worker_loading
from moemesh import LLM, SamplingParams
from moemesh.config.engine import EngineConfig
from moemesh.config.mesh import WorkerConfig
from moemesh.make_checkpoint import shape_config, write_random_checkpoint
from moemesh.model.checkpoint import default_fp8
from moemesh.model.fp8 import Fp8Experts, Fp8Linear

PROMPT = [5, 17, 99, 3, 250, 41, 7]
SMALL = EngineConfig(
    num_kv_pages=4, page_size=16, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=64
)  # a 1 GiB CPU pool per engine would dominate the test


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    raw = shape_config("tiny", num_layers=2)
    root = tmp_path_factory.mktemp("worker-fp8")
    fp8 = write_random_checkpoint(raw, root / "fp8", fp8=True, seed=5, log=lambda *_: None)
    bf16 = root / "bf16"  # default_fp8 reads config.json only
    bf16.mkdir()
    (bf16 / "config.json").write_text(json.dumps(raw))
    return bf16, fp8


def _fp8_modules(model: torch.nn.Module) -> int:
    return sum(isinstance(m, Fp8Linear | Fp8Experts) for m in model.modules())


def _worker_tokens(engine, prompt: list[int], max_tokens: int) -> list[int]:
    engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), "r0")
    while True:
        for out in engine.step():
            if out.finished:
                return list(out.output_ids)


def test_default_fp8_is_an_fp8_checkpoint_on_cuda(dirs):
    bf16, fp8 = dirs
    assert default_fp8(torch.device("cuda"), fp8) is True
    assert default_fp8(torch.device("cuda:1"), fp8) is True
    assert default_fp8(torch.device("cpu"), fp8) is False
    assert default_fp8(torch.device("cuda"), bf16) is False


def test_worker_keeps_fp8_weights_where_llm_does_and_generates_the_same_tokens(dirs, monkeypatch):
    _, fp8_dir = dirs
    config = WorkerConfig(role="prefill", worker_id="p0", model=str(fp8_dir), device="cpu", engine=SMALL)
    # On CPU both dequantize, as LLM always did.
    plain = worker_loading.load_engine(config).engine.model
    assert _fp8_modules(plain) == 0
    assert _fp8_modules(LLM(fp8_dir, device="cpu", engine_config=SMALL).model) == 0
    # The CUDA decision (default_fp8 says yes), taken on CPU: the worker builds the FP8 path as LLM does.
    for module in (moemesh.llm, worker_loading):
        monkeypatch.setattr(module, "default_fp8", lambda device, model_dir: True)
    llm = LLM(fp8_dir, device="cpu", engine_config=SMALL)
    engine = worker_loading.load_engine(config).engine
    layer = engine.model.model.layers[1]
    assert isinstance(layer.self_attn.o_proj, Fp8Linear)
    assert layer.self_attn.o_proj.weight.dtype == torch.float8_e4m3fn
    assert _fp8_modules(engine.model) == _fp8_modules(llm.model) > 0
    expected = llm.generate([PROMPT], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids
    assert _worker_tokens(engine, PROMPT, 6) == expected
