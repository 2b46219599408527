"""Exact top-k at large k on one GPU: torch.topk against our exact kernels, launch by launch.

    PYTHONPATH=. python3 benchmarks/profile_large_k.py --out $OUT

Per shape (random normal rows), each timed as a CUDA-graph replay (``profile_stages.timed``):

* ``torch:<sorted|unsorted>``: torch.topk.
* ``filtered:sorted``: the one-program exact filtered kernel at the same bucketing.
* ``split:<sorted|unsorted>:...``: ``SplitFilteredTopk`` whole (checked against torch.topk's values
  first), at the planner's filtered bucketing of fewest slots a bucket, its bound over ``s``
  programs a row, its filtering pass over blocks of ``block`` elements of ``w`` warps, its bound
  of ``bits`` leading key bits decided ``d`` bits a block-wide count (``:bound<bits>/<d>``);
  ``split:bound`` its first launch alone, ``split:bound+filter`` its first two (the bound launch
  zeroes the counts the filtering pass reserves slots from, so the pair repeats faithfully);
  the selection is the whole less these.
* ``select:<sorted|unsorted>:<select>:<sort_with>:w<warps>``: ``exact_topk``, the whole row held in
  registers by one program of ``w`` warps (up to 32: 32 keys a thread at 32768 16-bit elements),
  against the same reference (``--only select`` runs this family alone, ``--only split`` all but it).

``--warm`` runs every variant once, untimed (compiles them: run it in parallel processes first).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.profile_stages import save_results, timed
from topk_compiler.kernels import cdiv, next_pow2
from topk_compiler.kernels.filtered_topk import SplitFilteredTopk, filtered_topk
from topk_compiler.kernels.select_topk import exact_topk
from topk_compiler.lowering.plan import filtered_bucketings

SHAPES = [
    (1024, 32768, 2048, torch.bfloat16),
    (64, 131072, 2048, torch.bfloat16),
    (4096, 4096, 512, torch.bfloat16),
    (16, 14336, 1434, torch.float32),
    (1024, 16384, 2048, torch.float32),
]
PROCESSORS = 132
# (elements a block of the filtering pass, its warps)
FILTER_BLOCKS = ((256, 1), (1024, 4))
# (leading key bits of the split kernel's bound, bits a block-wide count); the second is its default.
BOUNDS = ((32, 1), (14, 1), (14, 2), (12, 2))
# Most elements a row held in registers by one program of 32 warps (32 keys a thread).
REGISTER_ROW = {2: 32768, 4: 16384}
WARM_ONLY = False


def row(x, k, variant, fn, **extra) -> dict:
    try:
        if WARM_ONLY:
            fn()
            torch.cuda.synchronize()
            t = {}
        else:
            t = timed(fn)
    except Exception as e:  # a variant that fails is recorded, the others still run
        t = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    rows, n = x.shape
    out = dict(rows=rows, n=n, k=k, dtype=str(x.dtype).split(".")[-1], variant=variant, **t, **extra)
    print(json.dumps(out), flush=True)
    return out


def exact_values_match(values, x, k) -> bool:
    expected = torch.topk(x, k, dim=1, sorted=True).values
    return torch.equal(values.float().sort(dim=1, descending=True).values, expected.float())


def register_row_rows(x, k) -> list[dict]:
    out = []
    if next_pow2(x.shape[1]) > REGISTER_ROW[x.element_size()]:
        return out
    for warps in (8, 16, 32):
        if next_pow2(x.shape[1]) > 1024 * warps:
            continue  # over 32 keys a thread: spills
        for sorted_, select, sort_with in ((True, "radix", "program"), (True, "bisect", "program"),
                                           (True, "radix", "launch"), (False, "radix", "program"),
                                           (False, "bisect", "program")):
            def fn(sorted_=sorted_, select=select, sort_with=sort_with, warps=warps):
                return exact_topk(x, k, largest=True, sorted=sorted_, select=select, sort_with=sort_with,
                                  sort_warps=min(8, max(1, next_pow2(k) // 1024)), num_warps=warps)
            try:
                ok = exact_values_match(fn()[0], x, k)
            except Exception as e:
                ok = f"{type(e).__name__}: {str(e)[:300]}"
            name = f"select:{'sorted' if sorted_ else 'unsorted'}:{select}:{sort_with}:w{warps}"
            out.append(row(x, k, name, fn, exact=ok))
    return out


def shape_rows(rows, n, k, dtype, only=None) -> list[dict]:
    x = torch.randn(rows, n, device="cuda", dtype=dtype)
    out = [row(x, k, f"torch:{'sorted' if s else 'unsorted'}", lambda s=s: torch.topk(x, k, dim=1, sorted=s))
           for s in (True, False)]
    if only in (None, "select"):
        out += register_row_rows(x, k)
    if only == "select":
        return out
    b, kb = list(filtered_bucketings(n, k, x.element_size()))[-1]  # the fewest slots a bucket
    segments = min(next_pow2(cdiv(PROCESSORS, rows)) if rows < PROCESSORS else 1, b // 32)
    out.append(row(x, k, f"filtered:sorted:b{b}:kb{kb}",
                   lambda: filtered_topk(x, k, num_buckets=b, per_bucket_k=kb, largest=True, sorted=True)))
    select_warps = 16 if 2 * next_pow2(k) > 4096 else 8
    key_bits = 8 * x.element_size()
    variants = [(block, warps, bits, digits, sorted_) for block, warps in FILTER_BLOCKS
                for bits, digits in (BOUNDS if block == FILTER_BLOCKS[0][0] else BOUNDS[1:2])
                for sorted_ in ((True, False) if (block, bits, digits) == (FILTER_BLOCKS[0][0], *BOUNDS[1])
                                else (False,))]
    for block, warps, bits, digits, sorted_ in variants:
        op = SplitFilteredTopk(x, k, num_buckets=b, per_bucket_k=kb, segments=segments, largest=True,
                               sorted=sorted_, block=block, filter_warps=warps, bound_bits=bits,
                               bound_digit_bits=digits, num_warps=select_warps)
        bound = f"bound{min(bits, key_bits)}/{digits}"
        name = (f"split:{'sorted' if sorted_ else 'unsorted'}:b{b}:kb{kb}:s{segments}:block{block}:w{warps}:"
                f"{bound}")
        try:
            ok = exact_values_match(op(x)[0], x, k)
        except Exception as e:
            ok = f"{type(e).__name__}: {str(e)[:300]}"
        out.append(row(x, k, name, lambda op=op: op(x), exact=ok))
        if not sorted_:
            scratch, indices = op.new_scratch(), op.new_outputs()[1]
            out.append(row(x, k, f"split:bound:b{b}:kb{kb}:s{segments}:{bound}",
                           lambda op=op: op.bound(x, scratch)))
            out.append(row(x, k, f"split:bound+filter:block{block}:w{warps}:{bound}",
                           lambda op=op: (op.bound(x, scratch), op.filter_blocks(x, scratch, indices))))
            counts = scratch[:, op.counts_at].float()
            out[-1]["candidates_mean"] = round(counts.mean().item(), 1)
            out[-1]["candidates_max"] = int(counts.max().item())
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    parser.add_argument("--warm", action="store_true", help="run every variant once, untimed (compiles them)")
    parser.add_argument("--shapes", nargs="+", metavar="ROWSxN", help="shapes to profile (default: all)")
    parser.add_argument("--only", choices=("select", "split"), help="one family of variants (default: all)")
    args = parser.parse_args(argv)
    global WARM_ONLY
    WARM_ONLY = args.warm
    start = time.time()
    results = [r for rows, n, k, dtype in SHAPES if not args.shapes or f"{rows}x{n}" in args.shapes
               for r in shape_rows(rows, n, k, dtype, args.only)]
    if args.warm:
        return
    command = "PYTHONPATH=. python3 benchmarks/profile_large_k.py " + " ".join(argv or [])
    save_results(args.out, "profile_large_k.json", command, start, rows=results)
    for r in results:
        print(f"{r['rows']}x{r['n']} k={r['k']} {r['dtype']:9s} {r['variant']:55s} "
              f"{r.get('us', float('nan')):8.1f} us {'' if r.get('exact', True) is True else r['exact']}")


if __name__ == "__main__":
    main()
