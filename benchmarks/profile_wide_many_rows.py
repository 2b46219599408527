"""Wide buckets where rows fill the GPU: does a program per (row, bucket) beat the fused kernel's
program per row at large k? One GPU, one run, CUDA-graph replays (``profile_stages.timed``).

The planner offers the wide kernels (``kernels/wide_bucket_topk.py``) only while rows x buckets
stay within two programs an SM, for few long rows. At 1024 x 32768 bf16 k=2048 the fused kernel
(a program a row, stage 2 and the sort in it) takes about 8x the HBM floor sorted and 3x unsorted
(benchmarks/results/bench_topk_h200_quick_6b9091a.md, measurements.md). Buckets of a few thousand
slots each keeping their share of k need no stage 2: each program's threshold is a few block-wide
counts over 16-bit keys, if thousands of small programs can hide each other's waits. Compiled for
sm_90 they hold 102-196 registers a thread (``benchmarks/compile_check.py``'s ``compile_launch``),
so a few share an SM: tens of waves of them at 1024 x 32768 against the fused kernel's 2-4.

Per shape, side by side: torch.topk sorted and unsorted; the op at recall 0.95 as planned, sorted
and unsorted; then per bucket count whose expected recall of shares is 0.93 or more:

* ``shares:L<layout>:w<warps>``: ``WideShareTopk`` (unsorted, one launch); layout 0
  interleaved, 2 contiguous (its loads coalesced whatever the order programs run in); warps as
  the planner gives them (``plan.share_warps``) and one other.
* ``wide:L<layout>:w<warps>[:bitonic]``: ``WideBucketTopk`` with every bucket keeping its share
  (survivors exactly k): each bucket's top sorted in its program, then the merge by rank, sorted.

Each row has its measured recall and read bandwidth. Measured on an H100 at 1feb989
(benchmarks/results/profile_wide_many_rows_h100_1feb989.json): at 1024 x 32768 the share kernel
took 429-729 us (contiguous buckets 429-446, interleaved 556-729) and the wide kernel 625-1897
(bisecting; 1472-2327 with bitonic networks), against the op's 68 unsorted and 129 sorted; at
4096 x 4096 193-289 and 340-804 against 49 and 70. So the planner keeps the wide kernels to few
rows (``plan.WIDE_PROGRAMS_PER_SM``).

Usage (one device call):
``PYTHONPATH=. python3 -m benchmarks.profile_wide_many_rows --out $OUT``
"""

import torch

from benchmarks.profile_stages import profile_shapes, timed_row
from topk_compiler import approx_topk
from topk_compiler.kernels import cdiv, next_pow2, smallest_bucket
from topk_compiler.kernels.wide_bucket_topk import MAX_NETWORK_KB, MAX_SLOTS, WideBucketTopk, WideShareTopk
from topk_compiler.lowering.plan import share_warps, warps_for
from topk_compiler.lowering.recall_model import expected_recall_of_shares

# (rows, n, k, dtype): the large-k headline shapes whose rows fill the GPU.
SHAPES = [(1024, 32768, 2048, torch.bfloat16), (4096, 4096, 512, torch.bfloat16)]
BUCKET_COUNTS = (4, 8, 16, 32)
MIN_RECALL = 0.93


def profile_shape(rows, n, k, dtype) -> list[dict]:
    x = torch.randn(rows, n, device="cuda", dtype=dtype)
    out = [timed_row(x, k, None, None, f"torch.topk:{'sorted' if s else 'unsorted'}",
                     lambda s=s: torch.topk(x, k, sorted=s), recall=True) for s in (True, False)]
    out += [timed_row(x, k, None, None, f"op@0.95:{'sorted' if s else 'unsorted'}",
                      lambda s=s: approx_topk(x, k, recall_target=0.95, sorted=s), recall=True)
            for s in (True, False)]
    for b in BUCKET_COUNTS:
        slots = cdiv(n, b)
        share = cdiv(k, b)
        if slots > MAX_SLOTS or share > smallest_bucket(n, b, 0):
            continue
        expected = round(expected_recall_of_shares(n, k, b), 4)
        if expected < MIN_RECALL:
            continue
        planned = share_warps(next_pow2(slots))
        for layout, warps in ((0, planned), (0, 4 if planned != 4 else 8), (2, planned)):
            run = WideShareTopk(x, k, num_buckets=b, largest=True, layout_id=layout, num_warps=warps)
            out.append(timed_row(x, k, b, share, f"shares:L{layout}:w{warps}", lambda r=run: r(x), recall=True,
                                 expected_recall=expected))
        warps = warps_for(next_pow2(slots))
        for layout, select in ((0, "bisect"), (2, "bisect"), (0, "bitonic")):
            if select == "bitonic" and next_pow2(share) > MAX_NETWORK_KB:
                continue
            run = WideBucketTopk(x, k, num_buckets=b, per_bucket_k=share, largest=True, layout_id=layout,
                                 num_warps=warps, select=select)
            suffix = ":bitonic" if select == "bitonic" else ""
            out.append(timed_row(x, k, b, share, f"wide:L{layout}:w{warps}{suffix}", lambda r=run: r(x), recall=True,
                                 expected_recall=expected))
    return out


def main(argv=None):
    profile_shapes(argv, __doc__, SHAPES, profile_shape, "profile_wide_many_rows.json",
                   "benchmarks.profile_wide_many_rows", key="results")


if __name__ == "__main__":
    main()
