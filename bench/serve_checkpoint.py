"""A DeepSeek-V2-Lite-shaped checkpoint with random weights for the GPU serving benchmark (BF16, or DeepSeek FP8
128x128 blocks), written by moemesh's own writer (`save_checkpoint`) from a model built on the GPU; no tokenizer
(the benchmark sends token ids). `--layers N` keeps the first N of the 27 layers (every per-layer shape stays).

    python -m bench.serve_checkpoint --out DIR [--fp8] [--layers N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.bench_engine import V2_LITE


def build(out_dir: Path, fp8: bool, layers: int | None = None) -> Path:
    import transformers

    from moemesh.model.checkpoint import build_empty, save_checkpoint
    from moemesh.model.config import ModelConfig

    shape = {**V2_LITE, **({"num_hidden_layers": layers} if layers else {})}
    with tempfile.TemporaryDirectory() as d:
        transformers.DeepseekV3Config(**shape).save_pretrained(d)
        config = ModelConfig.from_file(Path(d) / "config.json")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_empty(config, device, torch.bfloat16, fp8=False)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif "e_score_correction_bias" in name:
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return save_checkpoint(model, out_dir, fp8=fp8)


def ensure(out_dir: Path, fp8: bool, layers: int | None = None) -> Path:
    """`out_dir` as is when it holds a checkpoint, else built there."""
    if (out_dir / "config.json").is_file():
        return out_dir
    start = time.monotonic()
    build(out_dir, fp8, layers)
    print(
        f"built {'FP8' if fp8 else 'BF16'} V2-Lite-shaped checkpoint in {out_dir} ({time.monotonic() - start:.0f} s)"
    )
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--layers", type=int, default=None, help="the first N layers (default all 27)")
    args = parser.parse_args()
    ensure(args.out, args.fp8, args.layers)


if __name__ == "__main__":
    main()
