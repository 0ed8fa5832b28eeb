"""Token formats of the expert wire: header, layout, exact BF16, FP8 = act_quant, NVFP4 vs its reference."""

from __future__ import annotations

import importlib

import pytest
import torch

from moemesh.kernels.dispatch import interpreting
from moemesh.kernels.fp8_quant import act_quant_reference
from tests.kernels.checks import assert_close, assert_fp8_equal

tf = importlib.import_module("moemesh.kernels.token_format")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(3, 200), (1, 7), (5, 64), (0, 128)]


def _x(t, h, seed=0, device=DEV):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-2, 1, max(h, 1))[torch.randperm(max(h, 1), generator=gen)][:h]
    return (torch.randn(t, h, generator=gen) * scale).to(torch.bfloat16).to(device)


@pytest.mark.parametrize("t, h", SHAPES)
def test_bf16_roundtrip_exact_and_header(t, h):
    x = _x(t, h)
    buf = tf.encode_tokens(x, tf.TokenFormat.BF16)
    layout = tf.TokenLayout.from_buffer(buf)
    assert layout == tf.TokenLayout(tf.TokenFormat.BF16, t, h) and buf.numel() == layout.nbytes
    assert torch.equal(tf.decode_tokens(buf), x)


@pytest.mark.parametrize("t, h", SHAPES)
def test_fp8_is_act_quant(t, h):
    x = _x(t, h, seed=1)
    buf = tf.encode_tokens(x, tf.TokenFormat.FP8)
    layout = tf.TokenLayout.from_buffer(buf)
    q, s = tf.fp8_views(buf, layout)
    q_ref, s_ref = act_quant_reference(x.cpu())
    assert torch.equal(s.cpu(), s_ref)
    assert_fp8_equal(q, q_ref, interpreted=interpreting())
    if t:
        assert q.data_ptr() == buf.data_ptr() + layout.values_offset  # a view, no copy
        ref = tf.encode_reference(x.cpu(), tf.TokenFormat.FP8)
        assert_close(tf.decode_tokens(ref, layout, torch.float32), x.float().cpu(), dtype=torch.float8_e4m3fn)
        assert torch.equal(tf.decode_tokens(buf, layout).cpu(), tf.decode_reference(buf.cpu(), layout))


@pytest.mark.parametrize("t, h", SHAPES)
def test_nvfp4_matches_reference(t, h):
    x = _x(t, h, seed=2)
    buf = tf.encode_tokens(x, tf.TokenFormat.NVFP4)
    ref = tf.encode_reference(x.cpu(), tf.TokenFormat.NVFP4)
    layout = tf.TokenLayout.from_buffer(ref)
    assert buf.numel() == ref.numel() == layout.nbytes
    got_vals = tf.decode_tokens(buf, layout, torch.float32).cpu()
    ref_vals = tf.decode_reference(ref, layout, torch.float32)
    if interpreting():  # the interpreter's fp32 -> e4m3 cast moves some block scales: compare decoded values
        assert torch.equal(buf[:32].cpu(), ref[:32])
        if t:
            same = (got_vals == ref_vals).float().mean().item()
            assert same > 0.8, same
    else:
        assert torch.equal(buf.cpu(), ref)
    assert torch.equal(tf.decode_tokens(ref.to(DEV), layout, torch.float32).cpu(), ref_vals)  # decode kernel


def test_nvfp4_accuracy_and_codes():
    v = torch.tensor(
        [[0.0, 0.25, 0.26, 0.75, 1.25, 1.3, 1.75, 2.5, 2.6, 3.5, 5.0, 5.1, 7.0, -0.3, -6.0, 6.0]]
    )
    code = tf._e2m1_code(v.abs())
    assert code.tolist() == [[0, 0, 1, 2, 2, 3, 4, 4, 5, 6, 6, 7, 7, 1, 7, 7]]
    assert tf._e2m1_value(torch.arange(16)).tolist() == [
        0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
    ]  # fmt: skip
    x = torch.randn(64, 512).to(torch.bfloat16)
    buf = tf.encode_reference(x, tf.TokenFormat.NVFP4)
    back = tf.decode_reference(buf, tf.TokenLayout.from_buffer(buf), torch.float32)
    rel = (back - x.float()).norm() / x.float().norm()
    assert rel < 0.12, rel  # e2m1 with e4m3 block scales: ~9 % rms on Gaussian data


def test_bad_buffers():
    with pytest.raises(ValueError, match="token buffer"):
        tf.TokenLayout.from_buffer(torch.zeros(64, dtype=torch.uint8))
    buf = tf.encode_reference(torch.zeros(2, 16, dtype=torch.bfloat16), tf.TokenFormat.FP8)
    with pytest.raises(ValueError, match="FP8"):
        tf.fp8_views(buf, tf.TokenLayout(tf.TokenFormat.NVFP4, 2, 16))
    with pytest.raises(ValueError, match="shorter"):
        tf.decode_tokens(buf[:40], tf.TokenLayout.from_buffer(buf))
    with pytest.raises(ValueError, match="bf16"):
        tf.encode_tokens(torch.zeros(2, 16), tf.TokenFormat.BF16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_v3_hidden_exact():
    x = torch.randn(4096, 7168, device="cuda", dtype=torch.bfloat16)
    for fmt in tf.TokenFormat:
        buf = tf.encode_tokens(x, fmt)
        assert torch.equal(buf.cpu(), tf.encode_reference(x.cpu(), fmt)), fmt.name
        layout = tf.TokenLayout(fmt, 4096, 7168)
        assert torch.equal(tf.decode_tokens(buf, layout).cpu(), tf.decode_reference(buf.cpu(), layout))
