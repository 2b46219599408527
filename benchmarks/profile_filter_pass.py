"""What holds up the exact split kernel's filtering pass (``filtered_topk._filter_block_kernel``)?

    PYTHONPATH=. python3 benchmarks/profile_filter_pass.py --out $OUT

At 1024 x 32768 bf16 k=2048 the pass took 120 us on an H100 (5.4x the HBM floor) with a
program of one warp per 256 elements, 16-byte vector loads and every store masked. Its sm_90
code was 664 instructions a program (``benchmarks/compile_check``), five layout conversions
among them: the vector loads put 8 elements in a thread, the scattered stores one. This script
times variants of the pass, each as a CUDA-graph replay of the split kernel's bound launch
followed by the variant, less the bound alone:

* ``pass:B/w/R/s``: the pass with the op's stores (``_store_passing``), except that a program
  walks R blocks of B elements (w warps) one after another, each block reserving its slots with
  its own atomic add, the loop pipelined over s stages (``tl.range(num_stages=s)``), and loads of
  16-byte vectors. Each is checked: the op's own selection launch after it must return
  torch.topk's values.
* ``...:scalar``: each thread's loads one element each (``_row_keys(ONE_A_THREAD=True)``): the
  layout the scattered stores take. ``pass:256/1/1/1:scalar`` is the kernel as it runs.
* ``no_atomic:...``: the same, each block's slots at a place fixed by its number (no atomic).
* ``no_store:...``: the atomic adds, and no candidate stored.
* ``load_only:...``: the loads and the block's count alone (one word written a program).
* ``read``: a plain read of the input (``x.sum(dim=1)``, for scale), and the HBM floor.

At 8a87819 (benchmarks/results/profile_filter_pass_h100_8a87819.json; then ``pass`` stored
every block's ties and checked the slot bound per element, and ``lean`` was the stores as they
are now), the pass at 1024 x 32768 bf16 / 64 x 131072 bf16 / 1024 x 16384 fp32 took 120 / 29.3 /
58.6 us with vector loads; 91.8 / 25.1 / 51.8 with scalar loads; 105 / 27.6 / 45.8 with the lean
stores; 97.2 / 23.8 / 46.2 with both, which the kernel now runs. Loads and counts alone took
81.2 / 21.7 / 41.6. Programs of several blocks, pipelined or not, were slower everywhere.
"""

from __future__ import annotations

import json

import torch
import triton
import triton.language as tl

from benchmarks.profile_stages import profile_shapes, timed
from topk_compiler.kernels import cdiv, next_pow2
from topk_compiler.kernels.filtered_topk import (SplitFilteredTopk, _passing, _row_bound, _row_counts, _row_keys,
                                                 _store_passing)
from topk_compiler.lowering.plan import filtered_bucketings

SHAPES = [
    (1024, 32768, 2048, torch.bfloat16),
    (64, 131072, 2048, torch.bfloat16),
    (1024, 16384, 2048, torch.float32),
]
PROCESSORS = 132
BANDWIDTH = 3.0e12
FULL, NO_ATOMIC, NO_STORE, LOAD_ONLY = 0, 1, 2, 3
MODES = {"pass": FULL, "no_atomic": NO_ATOMIC, "no_store": NO_STORE, "load_only": LOAD_ONLY}
# (mode, elements a block, warps, blocks a program, pipeline stages, scalar loads)
VARIANTS = [("pass", 256, 1, 1, 1, True), ("pass", 256, 1, 1, 1, False), ("pass", 512, 1, 1, 1, True),
            ("pass", 256, 1, 16, 3, True), ("pass", 1024, 4, 4, 3, False), ("no_atomic", 256, 1, 1, 1, True),
            ("no_store", 256, 1, 1, 1, True), ("load_only", 256, 1, 1, 1, True)]


@triton.jit
def _filter_variant_kernel(x_ptr, scratch_ptr, tie_idx_ptr,
                           n, k,
                           x_row_stride, scratch_row_stride, tie_row_stride,
                           LARGEST: tl.constexpr, KEY_BITS: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr,
                           SEGMENTS: tl.constexpr, PACK32: tl.constexpr, BLOCKS: tl.constexpr,
                           STAGES: tl.constexpr, MODE: tl.constexpr, SCALAR_LOADS: tl.constexpr):
    """The pass at one of MODES (its values: 0 the pass, 1 no atomic, 2 no store, 3 loads only)."""
    row = tl.program_id(0).to(tl.int64)
    scratch_row = scratch_ptr + row * scratch_row_stride
    bound = _row_bound(scratch_row, CAP, SEGMENTS, PACK32)
    counts = _row_counts(scratch_row, CAP, SEGMENTS, PACK32)
    seen = tl.zeros([], dtype=tl.int32)
    for i in tl.range(0, BLOCKS, num_stages=STAGES):
        block = tl.program_id(1) * BLOCKS + i
        keys, offs = _row_keys(x_ptr + row * x_row_stride, block * BLOCK, n, BLOCK, LARGEST, KEY_BITS, SCALAR_LOADS)
        total = tl.sum(_passing(keys, bound), axis=0)
        if MODE == 3:
            seen += total
        else:
            n_tied = total >> 16
            if MODE == 1:
                above_base = (block * 16) % CAP
                tied_base = tl.zeros([], dtype=tl.int32)
            else:
                above_base = tl.atomic_add(counts, total & 0xFFFF, sem="relaxed")
                tied_base = tl.atomic_add(counts + 1, n_tied, mask=n_tied > 0, sem="relaxed")
            if MODE != 2:
                _store_passing(keys, offs, bound, total, above_base, tied_base, k, scratch_row,
                               tie_idx_ptr + row * tie_row_stride, CAP, PACK32)
    if MODE == 3:
        tl.store(tie_idx_ptr + row * tie_row_stride + tl.program_id(1) % k, seen.to(tl.int64))


def variant_launch(op: SplitFilteredTopk, x, k, block, warps, blocks, stages, mode, scalar_loads=False):
    rows, n = x.shape
    base = op.filter_blocks.arguments
    grid = (rows, cdiv(cdiv(n, block), blocks))

    def launch(scratch, tie_idx):
        _filter_variant_kernel[grid](x, scratch, tie_idx, n, k, x.stride(0), scratch.stride(0), k,
                                     LARGEST=True, KEY_BITS=base["KEY_BITS"], CAP=base["CAP"], BLOCK=block,
                                     SEGMENTS=base["SEGMENTS"], PACK32=base["PACK32"], BLOCKS=blocks,
                                     STAGES=stages, MODE=mode, SCALAR_LOADS=scalar_loads, num_warps=warps)
    return launch


def shape_rows(rows, n, k, dtype) -> list[dict]:
    x = torch.randn(rows, n, device="cuda", dtype=dtype)
    b, kb = list(filtered_bucketings(n, k, x.element_size()))[-1]
    segments = min(next_pow2(cdiv(PROCESSORS, rows)) if rows < PROCESSORS else 1, b // 32)
    op = SplitFilteredTopk(x, k, num_buckets=b, per_bucket_k=kb, segments=segments, largest=True, sorted=False)
    expected = torch.topk(x, k, dim=1).values.float()
    floor_us = x.numel() * x.element_size() / BANDWIDTH * 1e6
    head = dict(rows=rows, n=n, k=k, dtype=str(dtype).split(".")[-1], floor_us=round(floor_us, 2))
    out = []

    def record(variant, fn, **extra):
        try:
            t = timed(fn)
        except Exception as e:  # a variant that fails is recorded, the others still run
            t = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
        r = dict(head, variant=variant, **t, **extra)
        print(json.dumps(r), flush=True)
        out.append(r)
        return r

    record("read", lambda: x.sum(dim=1))
    scratch, indices = op.new_scratch(), op.new_outputs()[1]
    bound_us = record("bound", lambda: op.bound(x, scratch)).get("us", float("nan"))
    for name, block, warps, blocks, stages, scalar in VARIANTS:
        mode = MODES[name]
        launch = variant_launch(op, x, k, block, warps, blocks, stages, mode, scalar)
        extra = {}
        if mode == FULL:
            try:
                values, indices_, order = op.new_outputs()
                check = op.new_scratch()
                op.bound(x, check)
                launch(check, indices_)
                op.select(x, check, values, indices_, order)
                values = op.finish(values, indices_, order)[0]
                extra["exact"] = torch.equal(values.float().sort(dim=1, descending=True).values, expected)
            except Exception as e:
                extra["exact"] = f"{type(e).__name__}: {str(e)[:300]}"
        r = record(f"{name}:{block}/{warps}/{blocks}/{stages}{':scalar' if scalar else ''}",
                   lambda launch=launch: (op.bound(x, scratch), launch(scratch, indices)), **extra)
        if "us" in r:
            r["pass_us"] = round(r["us"] - bound_us, 2)
            r["pass_x_floor"] = round(r["pass_us"] / floor_us, 2)
    return out


def main(argv=None):
    results = profile_shapes(argv, __doc__, SHAPES, shape_rows, "profile_filter_pass.json",
                             "benchmarks.profile_filter_pass")
    for r in results:
        print(f"{r['rows']}x{r['n']} {r['dtype']:9s} {r['variant']:28s} {r.get('us', float('nan')):8.1f} us "
              f"pass {r.get('pass_us', float('nan')):7.1f} us {r.get('pass_x_floor', '')} {r.get('exact', '')}")


if __name__ == "__main__":
    main()
