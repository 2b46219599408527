"""Launches of the kernels whose time issue 4's note cannot yet explain, for Nsight Compute to read.

    ncu --clock-control none --section SpeedOfLight --section WarpStateStats --section SourceCounters \
        python3 benchmarks/ncu_kernels.py wide shares split

``wide``: the FFN shape's plan (16 x 14336 fp32, k=1434, 8 buckets of 180: ``WideBucketTopk``,
its selection then its merge); ``shares``: the same buckets each keeping their share of k
(``WideShareTopk``, unsorted: one launch; at 8a87819 sorted, the rank sort after it);
``shares16``: 16 buckets each keeping its share, at the planner's warps (``plan.share_warps``: 4),
the fastest share plan measured (profile_stages_h200_shares_early_exit.json). ``split``: the exact
plan at 1024 x 32768 bf16, k=2048 (``SplitFilteredTopk``: bound, filtering pass, selection).
Each runs twice, the first call compiling, so that ``ncu --launch-skip`` can pass over it;
outputs are checked against torch.topk so that a profile of a wrong kernel is not read. Timings
come from the profiler, not from here.
"""

from __future__ import annotations

import argparse

import torch

from topk_compiler.kernels import cdiv, next_pow2
from topk_compiler.kernels.filtered_topk import SplitFilteredTopk
from topk_compiler.kernels.wide_bucket_topk import WideBucketTopk, WideShareTopk
from topk_compiler.lowering.plan import filtered_bucketings, share_warps

PROCESSORS = 132


def wide():
    x = torch.randn(16, 14336, device="cuda", dtype=torch.float32)
    op = WideBucketTopk(x, 1434, num_buckets=8, per_bucket_k=180, largest=True)
    return x, 1434, op, False


def shares(num_buckets=8, num_warps=8):
    x = torch.randn(16, 14336, device="cuda", dtype=torch.float32)
    op = WideShareTopk(x, 1434, num_buckets=num_buckets, largest=True, num_warps=num_warps)
    return x, 1434, op, False


def shares16():
    return shares(16, share_warps(next_pow2(cdiv(14336, 16))))


def split():
    rows, n, k = 1024, 32768, 2048
    x = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    b, kb = list(filtered_bucketings(n, k, x.element_size()))[-1]
    segments = min(next_pow2(cdiv(PROCESSORS, rows)) if rows < PROCESSORS else 1, b // 32)
    op = SplitFilteredTopk(x, k, num_buckets=b, per_bucket_k=kb, segments=segments, largest=True, sorted=True)
    return x, k, op, True


PLANS = {"wide": wide, "shares": shares, "shares16": shares16, "split": split}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("plans", nargs="+", choices=sorted(PLANS))
    args = parser.parse_args(argv)
    for name in args.plans:
        x, k, op, exact = PLANS[name]()
        for _ in range(2):
            values = op(x)[0]
        torch.cuda.synchronize()
        values = values.sort(dim=1, descending=True).values
        expected = torch.topk(x, k, dim=1).values
        if exact:
            assert torch.equal(values, expected), f"{name}: not torch.topk's values"
        else:
            found = torch.isin(values, expected).float().mean().item()
            assert found >= 0.95, f"{name}: recall {found:.3f}"
        print(f"{name}: checked", flush=True)


if __name__ == "__main__":
    main()
