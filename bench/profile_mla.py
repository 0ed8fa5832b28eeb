"""A few launches of each attention kernel at V3 shapes, for Nsight Compute to read (what bounds them):

    ncu --clock-control none --kernel-name regex:mla_ --launch-skip 2 --launch-count 1 --section SpeedOfLight \\
        python -m bench.profile_mla
"""

from __future__ import annotations

import torch

from bench.bench_mla import RANK, SCALE, decode_inputs
from bench.bench_prefill import SCALE as PREFILL_SCALE
from bench.bench_prefill import inputs as prefill_inputs
from moemesh.kernels import mla_decode, mla_prefill


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    for fp8 in (False, True):
        args = decode_inputs(64, 4096, fp8, gen)
        for _ in range(3):
            mla_decode(*args, SCALE, RANK)
    q, k, v, cu, _ = prefill_inputs(4, 4096, 0, gen)
    for _ in range(3):
        mla_prefill(q, k, v, cu, PREFILL_SCALE, 4096)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
