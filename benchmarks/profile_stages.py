"""Where the time goes, on one GPU, in one run: large-k bucketed top-k stage by stage, and the
HiRE FFN kernel by kernel. No counters are needed: stages are timed as variants of the fused
kernel that stop after them, and differences are read off. Top-k variants are timed as CUDA-graph
replays (``timed``; each row's ``timing`` says how), the results files before 2026-12-02 eagerly.

Top-k, per shape and bucketing (one program per row, as the fused kernel runs; ``:u8`` = 8
loads in flight per lane instead of 4, ``:w<n>`` = n warps a program):

* ``stream``: stage 1 alone; its survivors reduced to one integer per row (nothing is selected).
* ``threshold:<select>``: stage 1 and the k-th largest survivor key (bisect, radix).
* ``compact``: + the compaction's positions (reduced to a number); ``compact_store``: + the
  stores of the selected indices and keys, without loading their values from the input.
* ``unsorted:<select>``: the fused kernel with ``sorted=False`` (threshold, compaction, stores).
* ``sorted:<select>:<sort_with>``: the fused kernel as the op runs it (``rank``: then the rank
  sort launch); ``split:s<n>:...``: for fewer rows than SMs, stage 1 over n programs per row,
  then the selection and the rank sort; ``wide:...``: the wide-bucket kernel at the planner's
  bucketings, whole and each of its two launches alone (the selection ``:d<bits>`` deciding its
  threshold 1, 2 (as it runs) or 4 bits per count; ``:bitonic``, and ``wide:bitonic`` whole, keeping
  each bucket's top by a bitonic network); ``shares:...:unsorted``: the wide buckets each keeping
  their share of k (``WideShareTopk``: one launch, unsorted) at every bucket count reaching recall
  0.95, at the planner's warps, 2, 4, 8 and 16, by digits and ``:bracket``, and over contiguous
  buckets (at 8a87819 also sorted by the rank sort after it, and ``:d4`` 4 bits a count).
  At 6b9091a this also timed that kernel with thresholds of 12-20 leading key bits only
  (``_share_prefix_kernel``; profile_stages_h200_shares_variants.json), not adopted: see
  benchmarks/results/measurements.md.
  ``--only wide`` runs these alone.
* ``sort_launch:<warps>``: ``sort_selected`` alone on [rows, k] random entries (gathers and
  stores included); ``register_sort:<warps>``: ``tl.sort`` of those entries, loaded and stored;
  ``rank_sort``: ``rank_sort`` of them (many programs per row); ``torch_sort``: ``torch.sort``.
* Small-k shapes, the certified exact kernel at each bucketing the planner offers: whole
  (``certified``, with the rows it flagged on this input), the approximate fused kernel of the
  same bucketing, and its recompute launch with no row flagged and with every row flagged and
  bisecting (the worst case).

Registers (``--only registers``): the fused kernel of each large-k headline plan, sorted and
unsorted, with a cap on each thread's registers (``max_registers``; ``:r0`` the compiler's
choice): stage 2's registers set how many programs share an SM while stage 1 streams; the
exact filtered kernel at large k with 1024-4096 elements a step of its filtering pass.

HiRE FFN (bf16, d=4096, d_ff=16384, 10% active, batch 1, calibrated as in bench_hire.py): device
time of each kernel the op launches (torch.profiler), the op's CUDA-graph replay, and dense; then
the sparse FFN alone (selection, FFN, reduction) with 132, 264 and 528 programs; the one-row
kernels that predict in the kernel (projection, fused kernel, reduction) with 132 and 264.

Host: the time per eager call of each layer of our op (custom-op dispatch, its Python body, the
launcher, the bare Triton launch, and the same launch through ``kernels.launch.Launch``) on a
small input, against torch.topk; then one large call
(256 x 128256 fp32 k=50) eagerly: its host time, do_bench's eager time and the replay beside a
cProfile of where its host time goes.

    PYTHONPATH=. python3 -m benchmarks.profile_stages --out $OUT    # a GPU, about 4 minutes
    PYTHONPATH=. python3 -m benchmarks.profile_stages --only hire host --out $OUT
    PYTHONPATH=. python3 -m benchmarks.profile_stages --only topk --shapes 16x14336 --out $OUT

benchmarks/results/profile_stages_h200.json was written by this script at commit e05b592, whose
variants timed a ``radix4`` selection in place of ``radix`` (4-bit digits counted in packed
int64 fields; 1.5-2x slower than bisect at every shape, and removed);
profile_stages_h200_hire.json by ``--only hire host`` at d1d45e6 (the op then ran the sparse
FFN's row kernel with 264 programs; b5e0e2a made it 132, from these numbers);
profile_stages_h200_first.json by the script's first version (uncommitted, on c2ae2f6): the
HiRE FFN's kernels before any change of this session, and top-k stages whose radix4 rows failed
to compile. profile_stages_h200_host.json by ``--only hire host`` at 3cb419e (its HiRE part timed
a one-row kernel that predicted and computed its own neurons, 19 us, since replaced);
profile_stages_h200_hire_lists.json by ``--only hire`` at dbd16e8 (the four-launch one-row
low-rank path before its launches chained); profile_stages_h200_hire_lowrank.json by ``--only hire`` at eb527a6 (the four-launch one-row
low-rank path the op runs, with a slot prefetch and a load order since reverted: they measured
no faster). profile_stages_h200_host_direct.json by ``--only host`` at 3d32033 (the public
API's direct call beside the custom op's dispatch); profile_stages_h200_hire_chained.json by
``--only hire`` at 2938ef0 (the four launches chained: under the profiler a chained kernel's
time includes its wait for the one before, so its kernel times do not add up as before).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from topk_compiler.kernels.bucketed_topk import (bucket_survivors_of, fused_bucketed_topk, split_bucketed_topk,
                                                 stage1_meta)
from topk_compiler.kernels.filtered_topk import filtered_topk
from topk_compiler.kernels.select_topk import (compact_positions, kth_key_bisect, kth_key_radix,
                                                rank_sort, select_meta, sort_selected)
from topk_compiler.kernels.sparse_ffn import lowrank_sparse_ffn_row, sparse_ffn
from topk_compiler.lowering import device_timing
from topk_compiler.lowering.recall_model import measured_recall
from topk_compiler.lowering.hire_cost_model import expected_union
from topk_compiler.lowering.hire_predictor import predictor_for, transposed_copy
from topk_compiler.lowering.plan import warps_for

SELECTS = {"bisect": 1, "radix": 2}
# (rows, n, k, dtype, [(num_buckets, per_bucket_k), ...], focus): headline shapes and the bucketings
# the planner picked at recall 0.9 / 0.95 (benchmarks/results/bench_topk.json). "select": large k,
# where stage 2 dominates; "stream": small k, where stage 1 does.
SHAPES = [
    (1024, 32768, 2048, torch.bfloat16, [(1024, 4), (2048, 2)], "select"),
    (64, 131072, 2048, torch.bfloat16, [(1024, 4)], "select"),
    (4096, 4096, 512, torch.bfloat16, [(256, 4), (512, 2)], "select"),
    (16, 14336, 1434, torch.float32, [(2048, 2)], "select"),
    (16384, 8192, 64, torch.float16, [(128, 2), (256, 1)], "stream"),
    (256, 128256, 50, torch.float32, [(1024, 1)], "stream"),
    (1024, 65536, 100, torch.float32, [(1024, 1)], "stream"),
]


@triton.jit
def _stage_probe_kernel(x_ptr, out_ptr, idx_out_ptr, key_out_ptr, n, k, num_buckets, slots, x_row_stride,
                        BLANES: tl.constexpr, KB: tl.constexpr, KBP: tl.constexpr, UNROLL: tl.constexpr,
                        KEY_BITS: tl.constexpr, POS_BITS: tl.constexpr, LAYOUT: tl.constexpr, LARGEST: tl.constexpr,
                        SELECT: tl.constexpr, STAGE: tl.constexpr):
    """STAGE 0: stage 1 alone; 1: + threshold by SELECT; 2: + compaction positions (reduced to a
    number); 3: + stores of the selected indices and keys (no gather of values from x)."""
    row = tl.program_id(0).to(tl.int64)
    keys, idx = bucket_survivors_of(x_ptr + row * x_row_stride, row, 0, n, num_buckets, slots, 0,
                                    BLANES, KB, KBP, LAYOUT, UNROLL, LARGEST, KEY_BITS, POS_BITS)
    if STAGE == 0:
        r = tl.max(keys ^ idx, axis=0)
    else:
        if SELECT == 1:
            r = kth_key_bisect(keys, k, KEY_BITS)
        else:
            r = kth_key_radix(keys, k, KEY_BITS)
        if STAGE >= 2:
            need = k - tl.sum((keys > r).to(tl.int32), axis=0)
            zero = tl.zeros([], dtype=tl.int32)
            chosen, position, _, _ = compact_positions(keys, r, need, zero, zero)
            if STAGE == 2:
                r = tl.sum(tl.where(chosen, position, 0), axis=0)
            else:
                tl.store(idx_out_ptr + row * k + position, idx.to(tl.int64), mask=chosen)
                tl.store(key_out_ptr + row * k + position, keys, mask=chosen)
    tl.store(out_ptr + row, r)


@triton.jit
def _register_sort_kernel(src_ptr, dst_ptr, K_POW2: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, K_POW2)
    tl.store(dst_ptr + row * K_POW2 + o, tl.sort(tl.load(src_ptr + row * K_POW2 + o), descending=True))


def probe(x, k, b, kb, select, stage, unroll=4, warps=None):
    slots, meta = stage1_meta(x, b, kb, b, 0, unroll, True)
    rows = x.shape[0]
    out = torch.empty(rows, dtype=torch.int32, device=x.device)
    idx_out = torch.empty(rows, k, dtype=torch.int64, device=x.device)
    key_out = torch.empty(rows, k, dtype=torch.int32, device=x.device)
    warps = warps or warps_for(b, b * meta["KBP"])
    return lambda: _stage_probe_kernel[(rows,)](x, out, idx_out, key_out, x.shape[1], k, b, slots, x.stride(0),
                                                **meta, SELECT=SELECTS.get(select, 0), STAGE=stage, num_warps=warps)


def save_results(out: Path, name: str, command: str, start: float, **fields) -> None:
    """``out/name``: the run's device, versions, date, command and seconds since ``start``, then
    ``fields``."""
    payload = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                   python=platform.python_version(), date=time.strftime("%Y-%m-%dT%H:%M:%S%z"), command=command,
                   seconds=round(time.time() - start, 1), **fields)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(payload, indent=1) + "\n")


def profile_shapes(argv, doc: str, shapes, rows_of, name: str, module: str, key: str = "rows") -> list[dict]:
    """The main of a script profiling ``rows_of(rows, n, k, dtype)`` over ``shapes`` (``--shapes``
    picks some), saved as ``--out``/``name`` under ``key``; returns the rows."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    parser.add_argument("--shapes", nargs="+", metavar="ROWSxN", help="shapes to profile (default: all)")
    args = parser.parse_args(argv)
    start = time.time()
    results = [r for rows, n, k, dtype in shapes if not args.shapes or f"{rows}x{n}" in args.shapes
               for r in rows_of(rows, n, k, dtype)]
    command = f"PYTHONPATH=. python3 -m {module} " + " ".join(sys.argv[1:] if argv is None else argv)
    save_results(args.out, name, command, start, **{key: results})
    return results


def timed(fn, replayed: bool = True) -> dict:
    """do_bench's median (20th, 80th percentiles) of ``fn``; ``replayed``: of a CUDA graph of it,
    so that the host's work per call cannot stretch a short kernel's time. Eagerly, a call
    whose host part (arguments bound through the JIT, a launcher prepared anew: 30-100 us) outlasts
    do_bench's L2 flush can be timed as the host's: at 16x14336 the same fused kernel measured 45
    and 95 us eagerly in two runs (profile_stages_h200_topk_98d5fb4.jsonl, ..._cc735d4.jsonl). A call that
    cannot be captured is timed eagerly, and its row says so."""
    fn()
    torch.cuda.synchronize()
    how = "eager"
    if replayed:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                fn()
            fn, how = graph.replay, "replayed"
        except RuntimeError:
            torch.cuda.synchronize()
    med, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=60)
    return dict(us=1e3 * med, p20_us=1e3 * p20, p80_us=1e3 * p80, timing=how)


def timed_row(x: torch.Tensor, k: int, b: int, kb: int, variant: str, fn, recall: bool = False, **fields) -> dict:
    """One printed result row: ``fn`` on ``x`` ``timed``, with its read bandwidth, ``fields``, and
    with ``recall`` the recall of the indices it returns; a variant that fails to compile is
    recorded with its error rather than losing the others."""
    try:
        t = timed(fn)
        if recall:
            t["recall"] = measured_recall(x, fn()[1], k)
    except Exception as e:
        t = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
    rows, n = x.shape
    row = dict(rows=rows, n=n, k=k, dtype=str(x.dtype).split(".")[-1], num_buckets=b, per_bucket_k=kb,
               variant=variant, **fields, **t)
    if "us" in t:
        row["read_tb_s"] = x.numel() * x.element_size() / t["us"] / 1e6
    print(json.dumps(row), flush=True)
    return row


def topk_stages(rows, n, k, dtype, bucketings, focus, wide_only=False) -> list[dict]:
    x = torch.randn(rows, n, device="cuda", dtype=dtype)
    out = []

    def record(variant, b, kb, fn):
        out.append(timed_row(x, k, b, kb, variant, fn))

    def fused(b, kb, select, sorted_, sort_with="program", unroll=4, warps=None):
        warps = warps or warps_for(b, b * triton.next_power_of_2(kb))
        return lambda: fused_bucketed_topk(x, k, num_buckets=b, per_bucket_k=kb, largest=True, sorted=sorted_,
                                           select=select, sort_with=sort_with, sort_warps=2, unroll=unroll,
                                           num_warps=warps)

    if wide_only:
        if focus == "select" and rows < 132:
            wide(x, k, record)
            shares(x, k, record)
        return out
    for b, kb in bucketings:
        default_warps = warps_for(b, b * triton.next_power_of_2(kb))
        if focus == "select":
            record("stream", b, kb, probe(x, k, b, kb, "stream", 0))
            record("stream:u8", b, kb, probe(x, k, b, kb, "stream", 0, unroll=8))
            for select in ("bisect", "radix"):
                record(f"threshold:{select}", b, kb, probe(x, k, b, kb, select, 1))
            record("compact:bisect", b, kb, probe(x, k, b, kb, "bisect", 2))
            record("compact_store:bisect", b, kb, probe(x, k, b, kb, "bisect", 3))
            for select in ("bisect", "radix"):
                record(f"unsorted:{select}", b, kb, fused(b, kb, select, False))
            record("sorted:bisect:program", b, kb, fused(b, kb, "bisect", True))
            record("sorted:bisect:program:u8", b, kb, fused(b, kb, "bisect", True, unroll=8))
            record("sorted:bisect:launch", b, kb, fused(b, kb, "bisect", True, sort_with="launch"))
            record("sorted:bisect:rank", b, kb, fused(b, kb, "bisect", True, sort_with="rank"))
            if rows < 132:  # few rows: stage 1 over several programs per row, then the selection
                for segments in (4, 8):
                    record(f"split:s{segments}:sorted:bisect:rank", b, kb, lambda s=segments: split_bucketed_topk(
                        x, k, num_buckets=b, per_bucket_k=kb, segments=s, largest=True, sorted=True,
                        select="bisect", sort_with="rank"))
        else:
            for warps in dict.fromkeys((default_warps, 4, 2, 1)):  # each count once
                if warps > default_warps or (warps < default_warps and warps == 1 and b > 256):
                    continue
                for unroll in (4, 8):
                    record(f"stream:w{warps}:u{unroll}", b, kb, probe(x, k, b, kb, "stream", 0, unroll, warps))
                    for select in ("bitonic", "bisect"):
                        record(f"sorted:{select}:w{warps}:u{unroll}", b, kb, fused(b, kb, select, True,
                                                                                 unroll=unroll, warps=warps))
    if focus == "select":
        sorts(rows, n, k, dtype, record)
        if rows < 132:
            wide(x, k, record)
            shares(x, k, record)
    else:
        certified(x, k, record)
    return out


def wide(x, k, record):
    """The wide-bucket kernel at every bucketing the planner offers for recall 0.95: whole, and
    each of its two launches alone (each bucket's top; the merge by rank)."""
    from topk_compiler.kernels.wide_bucket_topk import MAX_NETWORK_KB, WideBucketTopk
    from topk_compiler.lowering.plan import warps_for, wide_bucketings

    rows, n = x.shape
    processors = torch.cuda.get_device_properties(x.device).multi_processor_count
    for b, kb, recall in wide_bucketings(rows, n, k, 0.95, "interleaved", processors):
        warps = warps_for(triton.next_power_of_2(-(-n // b)))
        run = WideBucketTopk(x, k, num_buckets=b, per_bucket_k=kb, largest=True, num_warps=warps)
        record(f"wide:w{warps}:recall={recall:.3f}", b, kb, lambda r=run: r(x))
        entries = run.new_entries()
        values, indices = run(x)
        record("wide:merge", b, kb, lambda r=run, e=entries, v=values, i=indices: r.merge(e, x, v, i))
        for digit_bits in (1, 2, 4):
            other = WideBucketTopk(x, k, num_buckets=b, per_bucket_k=kb, largest=True, num_warps=warps,
                                   digit_bits=digit_bits)
            record(f"wide:select:w{warps}:d{digit_bits}", b, kb, lambda r=other, e=entries: r.select(x, e))
        bracketed = WideBucketTopk(x, k, num_buckets=b, per_bucket_k=kb, largest=True, num_warps=warps,
                                   search="bracket")
        record(f"wide:w{warps}:bracket", b, kb, lambda r=bracketed: r(x))
        record(f"wide:select:w{warps}:bracket", b, kb, lambda r=bracketed, e=entries: r.select(x, e))
        if triton.next_power_of_2(kb) <= MAX_NETWORK_KB:
            network = WideBucketTopk(x, k, num_buckets=b, per_bucket_k=kb, largest=True, num_warps=warps,
                                     select="bitonic")
            record(f"wide:bitonic:w{warps}", b, kb, lambda r=network: r(x))
            record(f"wide:select:w{warps}:bitonic", b, kb, lambda r=network, e=entries: r.select(x, e))


def shares(x, k, record):
    """The wide buckets that each keep their share of k (``WideShareTopk``, unsorted: one launch)
    at every bucket count whose recall reaches 0.95, at the planner's warps searching each
    bucket's threshold by digits (as it runs) and between two of its keys (``:bracket``,
    ``kth_key_bracketed``), also at 2, 4, 8 and 16 warps (one warp spills at 8 and
    16 buckets of 16 x 14336 fp32 on sm_90) and over contiguous buckets (``:contiguous``:
    coalesced loads, where interleaved buckets read every b-th element). 4-bit digits were slower
    at every bucket and warp count on an H100 (profile_stages_h100_shares_skip_count_1feb989.json)."""
    from topk_compiler.kernels.wide_bucket_topk import WideShareTopk
    from topk_compiler.lowering.layouts import LAYOUT_IDS
    from topk_compiler.lowering.plan import share_bucketings, share_warps

    rows, n = x.shape
    processors = torch.cuda.get_device_properties(x.device).multi_processor_count
    for b, kb, recall in share_bucketings(rows, n, k, 0.95, "interleaved", processors):
        planned = share_warps(triton.next_power_of_2(-(-n // b)))
        for warps in [planned] + [w for w in (2, 4, 8, 16) if w != planned]:
            for search in ("digits", "bracket"):
                run = WideShareTopk(x, k, num_buckets=b, largest=True, num_warps=warps, search=search)
                name = f"shares:w{warps}:unsorted:recall={recall:.3f}" if search == "digits" else \
                    f"shares:w{warps}:bracket"
                record(name, b, kb, lambda r=run: r(x))
        for search in ("digits", "bracket"):
            run = WideShareTopk(x, k, num_buckets=b, largest=True, num_warps=planned,
                                layout_id=LAYOUT_IDS["contiguous"], search=search)
            record(f"shares:w{planned}:contiguous" + (":bracket" if search == "bracket" else ""), b, kb,
                   lambda r=run: r(x))


def share_rows(rows, n, k, dtype) -> list[dict]:
    """``shares`` with its sweep of warps and layouts, on a fresh input, with recall."""
    x = torch.randn(rows, n, device="cuda", dtype=dtype)
    out = []
    shares(x, k, lambda variant, b, kb, fn: out.append(timed_row(x, k, b, kb, variant, fn, recall=True)))
    return out


def certified(x, k, record):
    """The certified exact kernel at the planner's bucketings: whole, its certifying pass alone
    (the fused kernel with CERTIFY), and its recompute launch with no row flagged and with every
    row flagged (the worst case), beside the approximate fused kernel of the same bucketing."""
    from topk_compiler.kernels import certified_topk as module
    from topk_compiler.lowering.plan import certified_bucketings, fused_warps

    rows, n = x.shape
    processors = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    for b, kb, flagged in certified_bucketings(rows, n, k, x.element_size()):
        warps = fused_warps(rows, b, b * triton.next_power_of_2(kb), processors)
        _, _, flags = module.certified_topk(x, k, num_buckets=b, per_bucket_k=kb, largest=True, sorted=True,
                                            num_warps=warps)
        label = f"certified:w{warps}:predicted_flagged={flagged:.2f}:flagged_rows={int((flags != 0).sum())}"
        record(label, b, kb, lambda: module.certified_topk(x, k, num_buckets=b, per_bucket_k=kb, largest=True,
                                                             sorted=True, num_warps=warps))
        record(f"fused_approximate:w{warps}", b, kb, lambda: fused_bucketed_topk(
            x, k, num_buckets=b, per_bucket_k=kb, largest=True, sorted=True, num_warps=warps))
        slots, meta = stage1_meta(x, b, kb, b, 0, 4, True)
        cap = b * meta["KBP"]
        finish = select_meta(k, meta["KEY_BITS"], n, sorted=True, select="bisect", sort_with="program")
        values, indices = torch.empty(rows, k, dtype=x.dtype, device=x.device), torch.empty(rows, k, dtype=torch.int64,
                                                                                             device=x.device)
        order = torch.empty(rows, k, dtype=torch.int32 if finish["ORDER32"] else torch.int64, device=x.device)
        scratch = torch.empty(rows, 2 * cap, dtype=torch.int32, device=x.device)
        # Every row flagged with the bound at key 0 (about half of a normal row above it): more
        # pass than the slots hold, so every program bisects its row, the slowest path.
        for name, flag in (("none_flagged", 0), ("all_flagged_bisecting", 1)):
            certificate = torch.zeros(2, rows, dtype=torch.int32, device=x.device)
            certificate[0] = flag
            record(f"recompute:{name}", b, kb, lambda c=certificate: module._recompute_flagged_kernel[(rows,)](
                x, c, values, indices, order, scratch, n, k, x.stride(0), k, 2 * cap, LARGEST=True,
                KEY_BITS=meta["KEY_BITS"], CAP=cap, BLOCK=module.FILTER_BLOCK, num_warps=8, **finish))


def sorts(rows, n, k, dtype, record):
    """The sort of k selected per row alone: the separate launch, tl.sort in registers, torch.sort."""
    k_pow2 = triton.next_power_of_2(k)
    entries = torch.randint(-2**30, 2**30, (rows, k_pow2), device="cuda", dtype=torch.int32)
    values = torch.randn(rows, k, device="cuda", dtype=dtype)
    indices = torch.randint(0, n, (rows, k), device="cuda")
    order = (entries[:, :k] & ~0xFFFF) | (0xFFFF - torch.arange(k, device="cuda", dtype=torch.int32))
    dst = torch.empty_like(entries)
    for warps in (1, 2, 4, 8):
        record(f"sort_launch:{warps}", 0, 0, lambda w=warps: sort_selected(values, indices, order, num_warps=w))
        record(f"register_sort:{warps}", 0, 0,
               lambda w=warps: _register_sort_kernel[(rows,)](entries, dst, K_POW2=k_pow2, num_warps=w))
    record("rank_sort", 0, 0, lambda: rank_sort(values, indices, order))
    record("torch_sort", 0, 0, lambda: torch.sort(order, dim=1, descending=True))


def hire_ffn_kernels() -> dict:
    from benchmarks import bench_hire

    cfg = dict(bench_hire.FULL)
    gen = torch.Generator().manual_seed(0)
    dtype, d, d_ff = torch.bfloat16, cfg["d"], cfg["d_ff"]
    w1 = bench_hire.structured_weight(d_ff, d, gen, "cuda", dtype)
    w2 = (torch.randn(d, d_ff, generator=gen) / d_ff ** 0.5).to("cuda", dtype)
    b2 = (0.1 * torch.randn(d, generator=gen)).to("cuda", dtype)
    cut = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.9)).item()
    b1 = (-w1.float().norm(dim=1) * cut).to(dtype)
    entry = bench_hire.calibrated(bench_hire.Ffn(w1, b1, w2, b2), d, 1, cfg, "cuda", dtype, 0.96, seed=4)
    x = bench_hire.inputs(1, d, 6, "cuda", dtype)

    def hire():
        return torch.ops.topk_compiler.hire_ffn(x, w1, b1, w2, b2, "relu", "lowrank", entry["rank"],
                                                entry["threshold"], entry["candidates"], "always")

    _, graphed = bench_hire.timer("cuda")
    result = dict(rank=entry["rank"], threshold=entry["threshold"], neurons=entry["candidates"],
                  hire_graph_us=graphed(hire)[0],
                  dense_graph_us=graphed(lambda: bench_hire.dense_ffn(x, w1, b1, w2, b2, "relu"))[0],
                  kernels=kernel_times(hire))
    pred = predictor_for(w1, "lowrank", entry["rank"]).scores(x, b1).contiguous()
    w2t = transposed_copy(w2)
    union = math.ceil(expected_union(1, entry["candidates"], d_ff))
    result["sparse_ffn"] = []
    for programs in (132, 264, 528):
        def run(p=programs):
            return sparse_ffn(x, w1, b1, w2t, b2, pred, entry["threshold"], activation="relu", programs=p,
                              expected=union)
        result["sparse_ffn"].append(dict(programs=programs, graph_us=graphed(run)[0], kernels=kernel_times(run)))
    model = predictor_for(w1, "lowrank", entry["rank"])
    result["predicted_in_kernel"] = []
    for programs in (132, 264):
        def fused(p=programs):
            return lowrank_sparse_ffn_row(x, model.a, model.b, w1, b1, w2t, b2, entry["threshold"], programs=p,
                                          expected=union)
        result["predicted_in_kernel"].append(dict(programs=programs, graph_us=graphed(fused)[0],
                                                  kernels=kernel_times(fused)))
    print(json.dumps(result, indent=1), flush=True)
    return result


def kernel_times(fn, reps=20) -> list[dict]:
    """Device time of each kernel ``fn`` launches, per call (torch.profiler)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    kernels = []
    for e in prof.key_averages():
        total = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if total > 0:
            kernels.append(dict(name=e.key[:120], calls_per_op=e.count / reps, us_per_op=total / reps))
    return sorted(kernels, key=lambda r: -r["us_per_op"])


def host_overheads(calls: int = 2000) -> dict:
    """Host time per eager call of each layer of our op, on 1 x 4096 fp32 k=16 (kernels of a few
    microseconds, queued back to back: the host is the bottleneck), against torch.topk."""
    from topk_compiler.kernels import bucketed_topk as kernels
    from topk_compiler.kernels.launch import Launch
    from topk_compiler.kernels.select_topk import new_outputs, select_meta
    from topk_compiler.lowering import bucketed_topk as op_module

    x = torch.randn(1, 4096, device="cuda")
    k = 16
    args = (x, k, -1, True, True, 0.95, 0, 0, "interleaved", 0, "auto", 0)
    op = torch.ops.topk_compiler.bucketed_topk
    op(*args)  # the first call times the shortlist and keeps a plan
    # The plan replays chose (the one a CUDA graph runs): the layers below time its dispatch.
    plan = op_module.lookup_tuned(1, 4096, k, x.dtype, str(x.device), True, True, 0.95, captured=True)
    layers = {
        "torch.topk": lambda: torch.topk(x, k),
        "approx_topk (public API, eager plan)": lambda: op_module.approx_topk(x, k, recall_target=0.95),
        "torch.ops.topk_compiler.bucketed_topk (eager plan)": lambda: op(*args),
        "the op's Python body (no custom-op layer, eager plan)": lambda: op_module._bucketed_topk(*args),
        "lowering._run (graph plan)": lambda: op_module._run(x, k, True, True, plan, "interleaved", 0),
    }
    if plan.kernel == "fused":
        slots, meta = kernels.stage1_meta(x, plan.num_buckets, plan.per_bucket_k, plan.num_buckets, 0,
                                          op_module.UNROLL, True)
        values, indices, order = new_outputs(x, k, meta["KEY_BITS"], True)
        finish = select_meta(k, meta["KEY_BITS"], x.shape[1], sorted=True, select=plan.select,
                             sort_with=plan.sort_with)
        launch = Launch(kernels._fused_bucketed_topk_kernel, (1,), n=x.shape[1], k=k, num_buckets=plan.num_buckets,
                        slots=slots, seed=0, x_row_stride=x.stride(0), out_row_stride=k, **meta, **finish,
                        CERTIFY=False, num_warps=plan.num_warps)
        layers["the Triton launch alone (outputs preallocated)"] = lambda: launch.kernel[launch.grid](
            x, values, indices, order, indices, **launch.arguments)
        layers["the same launch through kernels.launch.Launch (the compiled kernel called directly)"] = (
            lambda: launch(x, values, indices, order, indices))
        layers["torch.empty x3 (the outputs)"] = lambda: new_outputs(x, k, meta["KEY_BITS"], True)
    eager_plan = op_module.lookup_tuned(1, 4096, k, x.dtype, str(x.device), True, True, 0.95)
    result = {"graph_plan": dataclasses.asdict(plan), "eager_plan": dataclasses.asdict(eager_plan), "us_per_call": {}}
    for name, fn in layers.items():
        result["us_per_call"][name] = device_timing.eager_time_us(fn, replays=calls)
    print(json.dumps(result, indent=1), flush=True)
    return result


def large_eager_call(calls: int = 300, top: int = 25) -> dict:
    """256 x 128256 fp32 k=50 at recall 0.95 called from Python: host time per call (back to
    back, and each after the device finished), do_bench's eager time (L2 flushed between calls),
    the graph replay, and a cProfile of the calls by time spent in each function: where an eager
    call whose kernel takes 55 us spends the rest."""
    import cProfile
    import io
    import pstats

    from topk_compiler import approx_topk

    x = torch.randn(256, 128256, device="cuda")

    def fn():
        return approx_topk(x, 50, recall_target=0.95)

    back_to_back = device_timing.eager_time_us(fn, replays=calls)
    waited = []
    for _ in range(calls // 10):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        waited.append((time.perf_counter() - t) * 1e6)  # the host's part alone: nothing waits on the device
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        fn()
    profile.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(top)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    result = dict(back_to_back_us=back_to_back, host_part_us=sorted(waited)[len(waited) // 2],
                  do_bench_eager_us=timed(fn, replayed=False)["us"],
                  graph_replay_us=timed(graph.replay, replayed=False)["us"],
                  cprofile_by_tottime=text.getvalue().splitlines())
    print(json.dumps({k: v for k, v in result.items() if k != "cprofile_by_tottime"}), flush=True)
    return result


# (rows, n, k, dtype, num_buckets, per_bucket_k, num_warps): the fused plans of the large-k
# headline shapes (bench_topk.json of 2026-12-02), whose stage 2 holds 96-102 registers a thread
# where stage 1 alone needs 40 (benchmarks/compile_check.py; ``maxnreg`` below that spills), and
# one of fp32 keys (114-128 registers).
REGISTER_PLANS = [(1024, 32768, 2048, torch.bfloat16, 1024, 4, 8), (4096, 4096, 512, torch.bfloat16, 256, 4, 2),
                  (4096, 4096, 512, torch.bfloat16, 128, 6, 4), (1024, 16384, 2048, torch.float32, 1024, 4, 8)]
REGISTER_CAPS = (0, 80, 64, 48)
# (rows, n, k, dtype, num_buckets, per_bucket_k): exact filtered plans the first call raced (and
# lost) at large k. Their filtering pass holds FILTER_BLOCK elements a step: 207-234 registers a
# thread at 4096 (one program an SM), 109-128 at 1024 (compile_check).
FILTERED_PLANS = [(1024, 32768, 2048, torch.bfloat16, 4096, 1), (4096, 4096, 512, torch.bfloat16, 1024, 1)]
FILTER_BLOCKS = (1024, 2048, 4096)


def register_caps(shapes=None) -> list[dict]:
    """The fused kernel at each plan of REGISTER_PLANS, sorted and unsorted, with each cap of
    REGISTER_CAPS on a thread's registers (0: the compiler's choice): ``sorted:r80`` etc.; the
    exact filtered kernel at each plan of FILTERED_PLANS with each of FILTER_BLOCKS; ``shapes``:
    only those ("ROWSxN")."""
    out = []
    for rows, n, k, dtype, b, kb, warps in REGISTER_PLANS:
        if shapes and f"{rows}x{n}" not in shapes:
            continue
        x = torch.randn(rows, n, device="cuda", dtype=dtype)
        for sorted_ in (True, False):
            for cap in REGISTER_CAPS:
                out.append(timed_row(x, k, b, kb, f"{'sorted' if sorted_ else 'unsorted'}:w{warps}:r{cap}",
                                     lambda: fused_bucketed_topk(x, k, num_buckets=b, per_bucket_k=kb, largest=True,
                                                                 sorted=sorted_, num_warps=warps,
                                                                 max_registers=cap)))
    for rows, n, k, dtype, b, kb in FILTERED_PLANS:
        if shapes and f"{rows}x{n}" not in shapes:
            continue
        x = torch.randn(rows, n, device="cuda", dtype=dtype)
        for block in FILTER_BLOCKS:
            out.append(timed_row(x, k, b, kb, f"filtered:sorted:block{block}",
                                 lambda: filtered_topk(x, k, num_buckets=b, per_bucket_k=kb, largest=True,
                                                       sorted=True, block=block)))
    return out


# (rows, n, k, dtype, num_buckets, per_bucket_k, warps, register cap): the fused plans the H100
# quick run of 1feb989 ran at recall 0.95 (bench_topk_h100_quick_1feb989.md), large k first.
SELECT_PLANS = [(1024, 32768, 2048, torch.bfloat16, 1024, 4, 8, 64), (64, 131072, 2048, torch.bfloat16, 4096, 2, 16, 0),
                (4096, 4096, 512, torch.bfloat16, 256, 4, 2, 64), (1024, 65536, 100, torch.float32, 1024, 1, 4, 0)]


def selects(shapes=None, methods=("bisect", "digits", "bracket")) -> list[dict]:
    """The fused kernel at each plan of SELECT_PLANS, sorted and unsorted, finding the k-th
    survivor key by bisection (one block-wide count a bit, as it runs), by digits (two bits a
    count, stopping where exactly k lie at or above) and between two survivor keys
    (``kth_key_bracketed``); ``shapes``: only those ("ROWSxN"); ``methods``: only those."""
    out = []
    for rows, n, k, dtype, b, kb, warps, cap in SELECT_PLANS:
        if shapes and f"{rows}x{n}" not in shapes:
            continue
        x = torch.randn(rows, n, device="cuda", dtype=dtype)
        for sorted_ in (False, True):
            for select in methods:
                out.append(timed_row(x, k, b, kb, f"{'sorted' if sorted_ else 'unsorted'}:{select}:w{warps}:r{cap}",
                                     lambda s=select, o=sorted_: fused_bucketed_topk(
                                         x, k, num_buckets=b, per_bucket_k=kb, largest=True, sorted=o, select=s,
                                         num_warps=warps, max_registers=cap), recall=True))
    return out


PARTS = ("topk", "wide", "shares", "registers", "selects", "hire", "host")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--shapes", nargs="+", metavar="ROWSxN", help="top-k shapes to profile (default: all)")
    parser.add_argument("--selects", nargs="+", choices=("bisect", "digits", "bracket"),
                        default=["bisect", "digits", "bracket"], help="selections the selects part times")
    args = parser.parse_args(argv)
    start = time.time()
    parts = {}
    if "topk" in args.only:
        parts["topk"] = [row for rows, n, k, dtype, bucketings, focus in SHAPES
                         if not args.shapes or f"{rows}x{n}" in args.shapes
                         for row in topk_stages(rows, n, k, dtype, bucketings, focus)]
    if "wide" in args.only:
        parts["wide"] = [row for rows, n, k, dtype, bucketings, focus in SHAPES
                         if not args.shapes or f"{rows}x{n}" in args.shapes
                         for row in topk_stages(rows, n, k, dtype, bucketings, focus, wide_only=True)]
    if "shares" in args.only:
        parts["shares"] = [row for rows, n, k, dtype, bucketings, focus in SHAPES
                           if rows < 132 and focus == "select" and (not args.shapes or f"{rows}x{n}" in args.shapes)
                           for row in share_rows(rows, n, k, dtype)]
    if "registers" in args.only:
        parts["registers"] = register_caps(args.shapes)
    if "selects" in args.only:
        parts["selects"] = selects(args.shapes, args.selects)
    if "hire" in args.only:
        parts["hire_ffn"] = hire_ffn_kernels()
    if "host" in args.only:
        parts["host"] = host_overheads()
        parts["host_large"] = large_eager_call()
    save_results(args.out, "profile_stages.json",
                 "PYTHONPATH=. python3 -m benchmarks.profile_stages " + " ".join(argv or sys.argv[1:]), start, **parts)


if __name__ == "__main__":
    main()
