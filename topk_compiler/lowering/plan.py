"""Choice of algorithm, kernel and parameters for one top-k call (the solver).

For a concrete call (rows, n, k, dtype, device, recall target) ``plan_topk`` enumerates the
bucketings (num_buckets, per_bucket_k) whose expected recall meets the target, the kernels that
can run each on the device (with their ways of selecting and of sorting the k selected), and the
exact implementations (torch.topk, and our Triton ones where they apply), asks the cost model for
each, and keeps the cheapest. With ``rewrite="auto"`` an approximate plan must beat exact top-k
by ``MIN_SPEEDUP``, so a rewrite never makes a model slower by the model's own prediction.

Plans are cached: the op calls this on every invocation, with concrete sizes, so a graph
compiled with dynamic shapes picks the right plan for each length.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from topk_compiler.kernels import MAX_GRID_YZ, cdiv, next_pow2, smallest_bucket
from topk_compiler.lowering import cost_model
from topk_compiler.lowering.layouts import LAYOUT_IDS
from topk_compiler.lowering.recall_model import (expected_recall, expected_recall_of_shares, guaranteed_recall,
                                                 guaranteed_recall_of_shares, survivors, uncertified_probability)

# An approximate plan must be predicted (and, on the GPU, measured) at least this much faster
# than exact top-k.
MIN_SPEEDUP = 1.1
# Plans of each kind (approximate, exact) timed at a shape's first call on the GPU, each of a
# different kernel, bucketing or split.
SHORTLIST = 4
# A plan of torch.topk is raced at the first call against our kernels predicted within this
# factor of it (``races_torch``).
TIME_WITHIN = 1.5
# Bucket counts tried by the solver (powers of two: the kernels' lanes).
BUCKET_CHOICES = tuple(2**i for i in range(4, 14))
# Kept slots per bucket: the kernels hold them in registers (a max/min pair each).
MAX_PER_BUCKET_K = 8
# Survivors one program holds in registers for stage 2 without spilling (ptxas -v on sm_90a):
# 16-bit keys pack key and slot into an int32 in stage 1, fp32 keys into an int64.
MAX_REGISTER_SURVIVORS = {2: 8192, 4: 4096}
# Programs per row the split kernel may use, and the fewest lanes each keeps (one warp).
MAX_SEGMENTS = 64
MIN_SEGMENT_LANES = 32
# Warps per SM the fused kernel's grid should keep resident (``fused_warps``). On an H200
# (benchmarks/results/profile_stages_h200.json), 16384 x 8192 fp16 k=64 with 256 buckets ran in
# 115 us with 1 warp a program and 222 us with 8; 256 x 128256 fp32 k=50 with 1024 buckets in
# 54 us with 8 and 85 us with 4; 1024 x 65536 fp32 k=100 in 103 us with 4 and 108 us with 8.
RESIDENT_WARPS_PER_SM = 16
# The fused kernel's threshold, compaction and stores hold 96-128 registers a thread where its
# stage 1 needs about 40 (sm_90, benchmarks/compile_check.py), and the most any part needs sets
# how many programs share an SM while stage 1 streams. With at least this many survivors a
# thread, over at least a program per SM, the kernel caps a thread's registers (16-bit keys at
# REGISTER_CAP, fp32 keys at WIDE_KEY_REGISTER_CAP): stage 2 spills a little and stage 1 has
# more programs. On an H200 (benchmarks/results/profile_stages_h200_registers_1587b6a.json and
# ..._6df8453.json) 1024 x 32768 bf16 k=2048 (b=1024, kb=4, 8 warps) took 127 us sorted and 67
# unsorted against 141 and 76 uncapped; 4096 x 4096 k=512 (b=256, kb=4, 2 warps) 69.3 and 48.3
# against 70.9 and 49.0; 1024 x 16384 fp32 k=2048 263 and 90.8 against 279 and 96.5 (at 64: 257
# and 93.5, at 48: 276 and 104). With 8 a thread (b=128, kb=6, 4 warps) caps measured
# within 2% either way. Programs of 16 warps (over 4096 survivors) would spill about 850 bytes a
# thread at 64: they keep the compiler's choice.
CAPPED_SURVIVORS_PER_THREAD = 16
REGISTER_CAP = 64
WIDE_KEY_REGISTER_CAP = 80
# Elements a step of the exact filtered kernel's filtering pass where its rows fill the GPU and
# its candidates (``filtered_topk.candidate_slots``) number at least FILTER_STEP_MIN_SLOTS:
# the kernel's default step (4096) holds 207-234 registers a thread, one program an SM. At
# 1024 x 32768 bf16 k=2048 (b=4096, kb=1) the kernel took 336 us with 2048 a step, 374 with
# 1024 and 418 with 4096 (benchmarks/results/profile_stages_h200_registers_6df8453.json).
FILTER_STEP = 2048
FILTER_STEP_MIN_SLOTS = 4096
# A bitonic selection network only pays for small k (its cost grows with log(k)**2 per survivor).
MAX_BITONIC_K = 256
# The exact filtered kernel's stage 1 keeps this expected recall, so that about k / recall
# candidates pass its filter, well inside the candidate slots (at least twice k).
FILTER_RECALL = 0.8
# The split filtered kernel is offered at this many of the filtered bucketings (those of fewest
# slots a bucket). It is priced with the one-program kernel's terms, never fitted to its own
# timings, so every shortlist of exact plans where it runs races its cheapest plan
# (``_with_borrowed_prices``). On an H100 (benchmarks/results/profile_large_k_h100.json) it took
# 102 us sorted and 65 unsorted at 64 x 131072 bf16 k=2048 against torch.topk's 135 and 118,
# 74 us sorted at 16 x 14336 fp32 k=1434 against 97, 263 unsorted at 1024 x 32768 bf16 against
# 326; sorted at large row counts it lost (405 against 361 us at 1024 x 32768).
SPLIT_FILTERED_BUCKETINGS = 2
# The certified exact kernel's bucketings: the fewest slots per bucket count with which a call's
# rows in random order all pass the certificate at least this often (a failing row costs a
# recompute; one slot never certifies the bucket holding the maximum).
CERTIFIED_CALLS = 0.5
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The kernels index within a row in int32 (with a few steps of slack past its end); longer rows
# go to torch.topk or the reference.
MAX_TRITON_ROW = 2**30
SELECTS = ("bisect", "radix", "bitonic")
SORT_WITH = ("program", "launch", "rank")
# The rank sort compares every pair of a row's k selected: worth trying for large k (sorts that
# take one program per row long) of few rows (rows * k**2 pairs at most), whose one program per
# row leaves most SMs idle: 16 x 14336 fp32 k=1434 took 28 us in the separate sort launch
# (benchmarks/results/profile_stages_h200.json).
RANK_SORT_MIN_K = 512
RANK_SORT_MAX_PAIRS = 2**26
# The wide-bucket kernel (kernels/wide_bucket_topk.py): 4-32 buckets of up to MAX_WIDE_SLOTS
# slots held in registers, a program per (row, bucket), for large k of rows too few to fill the
# GPU with one program each (rows x buckets within WIDE_PROGRAMS_PER_SM a processor). Where rows
# fill the GPU its programs (90-200 registers a thread, a few an SM) come in tens of waves:
# at 1024 x 32768 bf16 k=2048 on an H100 the share kernel took 429-729 us and the wide kernel
# 625-1897 (bisecting), against 68 and 129 for the fused kernel, unsorted and sorted
# (benchmarks/results/profile_wide_many_rows_h100_1feb989.json).
WIDE_BUCKET_CHOICES = (4, 8, 16, 32)
MAX_WIDE_SLOTS = 4096
WIDE_MIN_K = 256
WIDE_PROGRAMS_PER_SM = 2


@dataclass(frozen=True)
class TopkPlan:
    """How one top-k call runs.

    args:
        algorithm: "exact" or "bucketed".
        kernel: "torch" (torch.topk), "reference" (bucketed in plain torch ops), "fused" (stage 1
            and 2 in one Triton program per row), "split" (stage 1 over several programs per row,
            then stage 2), "select" (exact Triton selection of rows held in registers) or
            "filtered" (exact: a bucketed bound, a filtering pass, a selection), "certified"
            (exact: the fused kernel, whose rows are certified exact or recomputed), "wide"
            (a few wide buckets, a program each, then a merge by rank: few rows of large k),
            "shares" (as "wide", each bucket keeping its share of k: survivors exactly k, written
            unsorted in one launch; ``per_bucket_k`` is the largest share) or
            "split_filtered" (exact: the filtered kernel's bound, filtering pass and selection
            as three launches of many programs).
        num_buckets, per_bucket_k: the bucketing (bucketed and filtered only).
        segments: programs per row of the split kernel's stage 1 (of the split filtered
            kernel's bound).
        select: how the k-th largest key is found: "bisect" (one count per key bit; by digits in
            the wide kernels), "radix" (one histogram per 8-bit digit), "bitonic" (a top-k network
            that also sorts) or, for the share kernel, "bracket" (``SHARE_SELECTS``).
        sort_with: with sorted output, where the k selected are sorted: "program" (in the
            selecting program), "launch" (a separate launch of ``sort_warps`` warps per row) or
            "rank" (a separate launch placing each entry at its rank, many programs per row).
        num_warps: warps per program of the main kernel.
        sort_warps: warps per program of the separate sort launch.
        expected_recall: the recall model's value for this plan (1.0 for exact).
        predicted_us: the cost model's time for this plan; torch_topk_us: for torch.topk.
        reason: why this plan (for the rewrite report).
        max_registers: registers a thread of the main kernel is capped at (0: the compiler's
            choice; ``register_cap``).
    """

    algorithm: str
    kernel: str
    num_buckets: int = 0
    per_bucket_k: int = 0
    segments: int = 1
    select: str = "bisect"
    sort_with: str = "program"
    num_warps: int = 8
    sort_warps: int = 1
    expected_recall: float = 1.0
    predicted_us: float = float("nan")
    torch_topk_us: float = float("nan")
    reason: str = field(default="", compare=False)
    max_registers: int = 0


def register_cap(rows: int, survivors: int, num_warps: int, elem: int, processors: int) -> int:
    """Registers a thread of the fused kernel is capped at (0: the compiler's choice) for
    ``survivors`` per row over ``num_warps`` warps of ``elem``-byte keys (``REGISTER_CAP``)."""
    if num_warps > 8 or rows < processors or survivors < CAPPED_SURVIVORS_PER_THREAD * 32 * num_warps:
        return 0
    return REGISTER_CAP if elem == 2 else WIDE_KEY_REGISTER_CAP


def raced_caps(rows: int, survivors: int, num_warps: int, elem: int, processors: int) -> tuple[int, ...]:
    """No cap and, where ``register_cap`` caps the fused kernel, that cap: the caps a kernel
    whose capped speed is not known is raced with at the first call."""
    return tuple(dict.fromkeys((0, register_cap(rows, survivors, num_warps, elem, processors))))


def filter_step(rows: int, k: int, processors: int) -> int | None:
    """Elements a step of the filtered kernel's filtering pass (None: the kernel's default)."""
    return FILTER_STEP if rows >= processors and 2 * next_pow2(k) >= FILTER_STEP_MIN_SLOTS else None


def recall_of(n: int, k: int, num_buckets: int, per_bucket_k: int, layout: str) -> float:
    """The recall the solver relies on: the any-order bound for "shuffled", random order otherwise."""
    if layout == "shuffled":
        return guaranteed_recall(n, k, num_buckets, per_bucket_k)
    return expected_recall(n, k, num_buckets, per_bucket_k, layout)


def recall_of_shares(n: int, k: int, num_buckets: int, layout: str) -> float:
    """``recall_of`` where each bucket keeps its share of k."""
    if layout == "shuffled":
        return guaranteed_recall_of_shares(n, k, num_buckets)
    return expected_recall_of_shares(n, k, num_buckets, layout)


def _triton_ok(device: str, dtype: torch.dtype) -> bool:
    if torch.device(device).type != "cuda" or dtype not in TRITON_DTYPES:
        return False
    from topk_compiler import kernels

    return kernels.has_triton()


def bucketings(n: int, k: int, recall_target: float, layout: str, forced: tuple[int, int] | None = None):
    """(num_buckets, per_bucket_k, recall) meeting the target: the smallest per_bucket_k per bucket count."""
    if forced is not None:
        b, kb = forced
        yield b, kb, recall_of(n, k, b, kb, layout)
        return
    for b in BUCKET_CHOICES:
        if b > n // 2:
            break
        for kb in range(1, MAX_PER_BUCKET_K + 1):
            if kb * b >= n:
                break  # keeps every element: no cheaper than exact
            if survivors(n, b, kb, layout) < k:
                continue
            recall = recall_of(n, k, b, kb, layout)
            if recall >= recall_target:
                yield b, kb, recall
                break


def warps_for(lanes: int, candidates: int = 0) -> int:
    """Warps of a program streaming ``lanes`` elements a step (buckets, or the row held in
    registers), none without a lane of its own: 8, or 16 where it holds over 4096 candidates
    (8 warps spill there: ptxas -v on sm_90a, ``python -m benchmarks.compile_check``)."""
    return min(16 if candidates > 4096 else 8, max(1, lanes // 32))


def share_warps(slots: int) -> int:
    """Warps of the share kernel's program over a bucket of ``slots`` (a power of two): one per 256
    slots (8 keys a thread), 1 to 8. Its program waits on block-wide counts, not on streaming: at
    16 x 14336 fp32 k=1434 on an H200, 4 warps took 10.8-11.0 us over buckets of 1024 slots where
    8 took 11.3-11.4, 8 warps 12.3 over 2048 where 4 took 12.8-12.9, and over 4096 8 and 16
    warps were within 0.2 us (profile_stages_h200_shares_early_exit.json)."""
    return min(8, max(1, slots // 256))


def fused_warps(rows: int, lanes: int, candidates: int, processors: int) -> int:
    """Warps of a fused program chosen for stage 1's streaming: as few as keep
    ``RESIDENT_WARPS_PER_SM`` warps per SM busy over the rows (fewer warps give each thread more
    lanes, so wider loads and more bytes in flight), at least one per 512 candidates (16 keys and
    indices a thread; more spill), at most ``warps_for``."""
    most = warps_for(lanes, candidates)
    least = next_pow2(cdiv(candidates, 512))
    want = next_pow2(cdiv(RESIDENT_WARPS_PER_SM * processors, max(rows, 1)))
    return max(1, least, min(most, want))


def sort_warps_for(k: int, elem: int) -> int:
    """Warps of the separate sort launch: at most 32 order entries a thread (16 when they are
    int64), which keeps it within registers (ptxas -v on sm_90a)."""
    per_warp = 1024 if elem == 2 else 512
    return min(8, max(1, next_pow2(k) // per_warp))


def _us(seconds) -> float:
    return float(seconds) * 1e6


def _finishes(rows: int, k: int, sorted_: bool):
    """(select, sort_with) pairs to consider for k selected of each of ``rows`` rows."""
    selects = [s for s in SELECTS if s != "bitonic" or next_pow2(k) <= MAX_BITONIC_K]
    for select in selects:
        if not sorted_ or select == "bitonic":
            yield select, "program"
        else:
            yield from ((select, where) for where in SORT_WITH
                        if where != "rank" or RANK_SORT_MIN_K <= k and rows * k * k <= RANK_SORT_MAX_PAIRS)


def kernel_options(rows, n, k, b, kb, elem, sorted_, profile, layout):
    """(time, kernel, segments, select, sort_with, num_warps) of each Triton kernel that runs (b, kb).

    The fused kernel comes with ``fused_warps`` and, where that differs, with ``warps_for``: the
    cost model does not see warps, so both are shortlisted and the first call's timing decides.
    """
    if b & (b - 1) or kb > MAX_PER_BUCKET_K:
        return
    ns = b * next_pow2(kb)
    fused_choices = dict.fromkeys((fused_warps(rows, b, ns, profile.processors), warps_for(b, ns)))
    for select, sort_with in _finishes(rows, k, sorted_):
        if ns <= MAX_REGISTER_SURVIVORS[elem] and (select != "bitonic" or n <= 2**16):
            t = cost_model.fused_time(rows, n, k, b, kb, elem, sorted_, select, sort_with, profile)
            for warps in fused_choices:
                yield t, "fused", 1, select, sort_with, warps
        if layout == "contiguous" or ns > MAX_REGISTER_SURVIVORS[2] or select == "bitonic":
            continue
        segments = 2
        while segments <= MAX_SEGMENTS and b // segments >= MIN_SEGMENT_LANES:
            t = cost_model.split_time(rows, n, k, b, kb, segments, elem, sorted_, select, sort_with, profile)
            yield t, "split", segments, select, sort_with, warps_for(b // segments)
            segments *= 2


def split_filtered_options(rows: int, n: int, k: int, elem: int, processors: int):
    """(num_buckets, per_bucket_k, segments) for the split filtered kernel: the two filtered
    bucketings of fewest slots a bucket (its bound streams the row once per slot), the bound
    spread over enough programs a row to give every SM one, each with a warp of lanes at least
    and survivors for its share of k. None where the filtering pass's blocks of a row would pass
    the grid's second dimension (rows of more than about 16.7M elements)."""
    if cdiv(n, cost_model.SPLIT_FILTER_BLOCK) > MAX_GRID_YZ:
        return
    for b, kb in list(filtered_bucketings(n, k, elem))[-SPLIT_FILTERED_BUCKETINGS:]:
        segments = next_pow2(cdiv(processors, rows)) if rows < processors else 1
        while segments > 1 and (b // segments < MIN_SEGMENT_LANES
                                or b // segments * next_pow2(kb) < cdiv(k, segments)):
            segments //= 2
        yield b, kb, segments


def filtered_bucketings(n: int, k: int, elem: int):
    """(num_buckets, per_bucket_k) for the exact filtered kernel: per bucket count, the fewest
    slots giving stage-1 recall FILTER_RECALL, with candidate slots for at least twice k; at least
    a lane per thread of its 8 warps."""
    for b in BUCKET_CHOICES[BUCKET_CHOICES.index(256):]:
        for kb in range(1, MAX_PER_BUCKET_K + 1):
            ns = b * next_pow2(kb)
            if ns > MAX_REGISTER_SURVIVORS[elem] or b * kb >= n // 2:
                break
            if ns >= 2 * next_pow2(k) and expected_recall(n, k, b, kb) >= FILTER_RECALL:
                yield b, kb
                break


def _wide_bucket_counts(rows: int, n: int, k: int, processors: int):
    """Bucket counts of the wide kernels, for k of WIDE_MIN_K or more: buckets of at most
    MAX_WIDE_SLOTS, rows x buckets within WIDE_PROGRAMS_PER_SM a processor."""
    if k < WIDE_MIN_K:
        return
    for b in WIDE_BUCKET_CHOICES:
        if cdiv(n, b) <= MAX_WIDE_SLOTS and rows * b <= WIDE_PROGRAMS_PER_SM * processors:
            yield b


def wide_bucketings(rows: int, n: int, k: int, recall_target: float, layout: str, processors: int):
    """(num_buckets, per_bucket_k, recall) for the wide-bucket kernel: per bucket count, the
    fewest slots per bucket meeting the target (recall grows with them: found by bisection),
    where every bucket holds that many and the survivors hold k."""
    for b in _wide_bucket_counts(rows, n, k, processors):
        lo, hi = cdiv(k, b), smallest_bucket(n, b, LAYOUT_IDS[layout])
        if lo > hi or recall_of(n, k, b, hi, layout) < recall_target:
            continue
        while lo < hi:
            mid = (lo + hi) // 2
            if recall_of(n, k, b, mid, layout) >= recall_target:
                hi = mid
            else:
                lo = mid + 1
        yield b, lo, recall_of(n, k, b, lo, layout)


# How the share kernel finds a bucket's threshold: by digits ("bisect"), or between two of its
# keys ("bracket", ``select_topk.kth_key_bracketed``): 2.5 fewer block-wide counts at a call's
# slowest bucket on random normal rows of 16 x 14336 fp32 k=1434, replayed in numpy
# (benchmarks/results/simulate_threshold_rounds.json), not yet timed on a GPU. The model prices
# both alike and lists digits first; the first call on the device races them.
SHARE_SELECTS = ("bisect", "bracket")


def share_bucketings(rows: int, n: int, k: int, recall_target: float, layout: str, processors: int,
                     sorted_: bool = False):
    """(num_buckets, largest share, recall) for the wide buckets that each keep their share of k
    (``kernels/wide_bucket_topk.WideShareTopk``): every bucket count of the wide kernel whose
    recall reaches the target, each bucket holding its share. Unsorted output only: sorted by
    rank after it, it took twice the wide kernel's time at 16 x 14336 fp32 k=1434 (42-48 us
    against 21, benchmarks/results/profile_stages_h100_wide_shares_8a87819.json)."""
    if sorted_:
        return
    for b in _wide_bucket_counts(rows, n, k, processors):
        if cdiv(k, b) > smallest_bucket(n, b, LAYOUT_IDS[layout]):
            continue
        recall = recall_of_shares(n, k, b, layout)
        if recall >= recall_target:
            yield b, cdiv(k, b), recall


def certified_bucketings(rows: int, n: int, k: int, elem: int):
    """(num_buckets, per_bucket_k, probability that a call recomputes a row) for the certified
    exact kernel: per bucket count, the fewest slots (two or more) certifying a call's rows with
    probability CERTIFIED_CALLS, survivors held in registers and numerous enough for k."""
    for b in BUCKET_CHOICES:
        for kb in range(2, MAX_PER_BUCKET_K + 1):
            ns = b * next_pow2(kb)
            if ns > MAX_REGISTER_SURVIVORS[elem] or b * kb >= n // 2:
                break
            if ns < next_pow2(k):
                continue
            flagged = 1.0 - (1.0 - uncertified_probability(n, k, b, kb)) ** rows
            if flagged <= 1.0 - CERTIFIED_CALLS:
                yield b, kb, flagged
                break


def _exact_plans(rows, n, k, elem, sorted_, profile, triton_ok):
    torch_us = _us(cost_model.torch_topk_time(rows, n, k, elem, profile))
    plans = [TopkPlan("exact", "torch", predicted_us=torch_us, torch_topk_us=torch_us, reason="torch.topk")]
    if not triton_ok:
        return plans
    n_pow2 = next_pow2(n)
    for select, sort_with in _finishes(rows, k, sorted_):
        if n_pow2 <= MAX_REGISTER_SURVIVORS[elem] and (select != "bitonic" or n <= 2**16):
            t = _us(cost_model.select_time(rows, n, k, elem, sorted_, select, sort_with, profile))
            warps = warps_for(n_pow2 // 8, n_pow2)
            # The selection holds the row where the fused kernel holds survivors: where the fused
            # kernel would be capped the first call also times a capped selection (84-90
            # registers a thread uncapped at 4096 x 4096 bf16 k=512, sorted in the program or
            # unsorted: two programs an SM; 24-48 bytes spilt at 64). There the capped one won
            # the race: 148 us, against 182 uncapped in the run before (bench_topk.md of
            # 2026-12-02, bench_topk_h200_10137ab.md). fp32 rows are unmeasured.
            capped = select != "bitonic" and sort_with == "program"
            for cap in raced_caps(rows, n_pow2, warps, elem, profile.processors) if capped else (0,):
                plans.append(TopkPlan("exact", "select", select=select, sort_with=sort_with, num_warps=warps,
                                      sort_warps=sort_warps_for(k, elem), predicted_us=t, torch_topk_us=torch_us,
                                      reason="exact Triton selection", max_registers=cap))
    for b, kb in filtered_bucketings(n, k, elem):
        for select, sort_with in _finishes(rows, k, sorted_):
            if select == "bitonic":
                continue
            t = _us(cost_model.filtered_time(rows, n, k, b, kb, elem, sorted_, select, sort_with, profile))
            plans.append(TopkPlan("exact", "filtered", b, kb, select=select, sort_with=sort_with,
                                  num_warps=warps_for(b, b * next_pow2(kb)),
                                  sort_warps=sort_warps_for(k, elem), predicted_us=t, torch_topk_us=torch_us, reason="exact Triton filtered selection"))
    for b, kb, segments in split_filtered_options(rows, n, k, elem, profile.processors):
        for select, sort_with in _finishes(rows, k, sorted_):
            if select == "bitonic":
                continue
            t = _us(cost_model.split_filtered_time(rows, n, k, b, kb, segments, elem, sorted_, select, sort_with,
                                                   profile))
            cap = cost_model._candidate_slots(k)  # the selection holds them
            plans.append(TopkPlan("exact", "split_filtered", b, kb, segments, select=select, sort_with=sort_with,
                                  num_warps=warps_for(cap, cap), sort_warps=sort_warps_for(k, elem),
                                  predicted_us=t, torch_topk_us=torch_us,
                                  reason="exact Triton filtered selection in three launches"))
    for b, kb, flagged in certified_bucketings(rows, n, k, elem):
        for select, sort_with in _finishes(rows, k, sorted_):
            if select == "bitonic":
                continue
            t = _us(cost_model.certified_time(rows, n, k, b, kb, elem, sorted_, select, sort_with, flagged, profile))
            warps = fused_warps(rows, b, b * next_pow2(kb), profile.processors)
            # Its certifying launch is the fused kernel, whose cap (``register_cap``) spills more
            # here (192-264 bytes a thread for fp32 at 256 x 128256 k=50 and 1024 x 65536
            # k=100, 152 for 16384 x 8192 fp16 k=64; compile_check): raced capped and not, not
            # yet timed.
            for cap in raced_caps(rows, b * next_pow2(kb), warps, elem, profile.processors):
                plans.append(TopkPlan("exact", "certified", b, kb, select=select, sort_with=sort_with,
                                      num_warps=warps, sort_warps=sort_warps_for(k, elem), predicted_us=t,
                                      torch_topk_us=torch_us, max_registers=cap,
                                      reason=f"exact: certified bucketed (a row recomputed in {flagged:.0%} of calls)"))
    return plans


def _ranked(rows, n, k, dtype, device, recall_target, layout, sorted_, forced):
    """(approximate plans, exact plans), each cheapest first by the cost model."""
    profile = cost_model.device_profile(device)
    triton_ok = _triton_ok(device, dtype) and n <= MAX_TRITON_ROW
    elem = torch.empty((), dtype=dtype).element_size()
    exact = sorted(_exact_plans(rows, n, k, elem, sorted_, profile, triton_ok), key=lambda p: p.predicted_us)
    torch_us = exact[0].torch_topk_us
    approx = []
    if recall_target < 1.0 or forced is not None:
        for b, kb, recall in bucketings(n, k, recall_target, layout, forced):
            options = list(kernel_options(rows, n, k, b, kb, elem, sorted_, profile, layout)) if triton_ok else []
            if not options:
                t = cost_model.reference_time(rows, n, k, b, kb, elem, profile)
                options = [(t, "reference", 1, "bisect", "program", 0)]
            for t, kernel, segments, select, sort_with, warps in options:
                cap = register_cap(rows, b * next_pow2(kb), warps, elem, profile.processors) if kernel == "fused" else 0
                approx.append(TopkPlan("bucketed", kernel, b, kb, segments, select, sort_with, warps,
                                       sort_warps_for(k, elem), recall, _us(t), torch_us, max_registers=cap))
        if triton_ok and forced is None:
            for b, kb, recall in wide_bucketings(rows, n, k, recall_target, layout, profile.processors):
                for select in ("bisect", "bitonic") if next_pow2(kb) <= MAX_BITONIC_K else ("bisect",):
                    t = cost_model.wide_time(rows, n, k, b, kb, elem, select, profile)
                    approx.append(TopkPlan("bucketed", "wide", b, kb, 1, select, "program",
                                           warps_for(next_pow2(cdiv(n, b))), 1, recall, _us(t), torch_us))
            for b, share, recall in share_bucketings(rows, n, k, recall_target, layout, profile.processors,
                                                     sorted_):
                t = cost_model.shares_time(rows, n, k, b, elem, profile)
                for select in SHARE_SELECTS:
                    approx.append(TopkPlan("bucketed", "shares", b, share, 1, select, "program",
                                           share_warps(next_pow2(cdiv(n, b))), 1, recall, _us(t), torch_us))
    return sorted(approx, key=lambda p: p.predicted_us), exact


def _trivial(rows, n, k, dtype) -> TopkPlan | None:
    if not dtype.is_floating_point:
        return TopkPlan("exact", "torch", reason=f"{dtype} is not a floating type: exact top-k")
    if rows == 0 or k == 0 or k >= n:
        return TopkPlan("exact", "torch", reason="nothing to approximate (k = 0, k = n or no rows)")
    return None


@functools.lru_cache(maxsize=8192)
def plan_topk(
    rows: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    device: str,
    recall_target: float,
    layout: str = "interleaved",
    sorted: bool = True,
    num_buckets: int | None = None,
    per_bucket_k: int | None = None,
    rewrite: str = "auto",
) -> TopkPlan:
    """The cost model's plan for top-k of ``rows`` rows of length ``n`` (concrete ints)."""
    trivial = _trivial(rows, n, k, dtype)
    if trivial is not None:
        return trivial
    forced = (num_buckets, per_bucket_k) if num_buckets is not None else None
    approx, exact = _ranked(rows, n, k, dtype, device, recall_target, layout, sorted, forced)
    best_exact = exact[0]
    if recall_target >= 1.0 and forced is None:
        return best_exact
    if not approx:
        return _with_reason(best_exact, f"no bucketing reaches recall {recall_target:g} more cheaply: exact")
    best = approx[0]
    if forced is not None or rewrite == "always":
        return _with_reason(best, "bucketing fixed by the caller" if forced else "rewrite='always'")
    if best.predicted_us * MIN_SPEEDUP > best_exact.predicted_us:
        return _with_reason(
            best_exact,
            f"exact predicted faster ({best_exact.predicted_us:.1f} us vs bucketed {best.predicted_us:.1f} us)",
        )
    return _with_reason(best, f"predicted {best_exact.predicted_us / best.predicted_us:.1f}x faster than exact")


@functools.lru_cache(maxsize=8192)
def shortlist(
    rows: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    device: str,
    recall_target: float,
    layout: str = "interleaved",
    sorted: bool = True,
    num_buckets: int | None = None,
    per_bucket_k: int | None = None,
) -> tuple[tuple[TopkPlan, ...], tuple[TopkPlan, ...]]:
    """The plans worth timing at a shape's first call on the device (``bucketed_topk.tuned_plan``):
    the cost model's cheapest ``SHORTLIST`` approximate and exact ones, torch.topk always among the
    exact. The model is fitted within ~17% (median) but can be far off where it extrapolates."""
    trivial = _trivial(rows, n, k, dtype)
    if trivial is not None:
        return (), (trivial,)
    forced = (num_buckets, per_bucket_k) if num_buckets is not None else None
    approx, exact = _ranked(rows, n, k, dtype, device, recall_target, layout, sorted, forced)
    few_rows = 2 * rows <= cost_model.device_profile(device).processors
    chosen_exact = _with_borrowed_prices(_distinct(exact), exact, few_rows)
    if not any(p.kernel == "torch" for p in chosen_exact):
        chosen_exact.append(next(p for p in exact if p.kernel == "torch"))
    chosen_approx = _with_other_finish(_with_borrowed_prices(_distinct(approx), approx, few_rows), approx)
    return tuple(chosen_approx), tuple(chosen_exact)


@functools.lru_cache(maxsize=8192)
def races_torch(rows: int, n: int, k: int, dtype: torch.dtype, device: str, recall_target: float,
                layout: str = "interleaved", sorted: bool = True, num_buckets: int | None = None,
                per_bucket_k: int | None = None) -> bool:
    """Whether a shape whose plan is torch.topk still times our kernels at its first call: some
    shortlisted Triton plan is predicted within TIME_WITHIN of torch.topk (e.g. the split
    filtered kernel at 1.2x torch.topk at 1024 x 16384 fp32 k=2048, measured at 1.18x sorted);
    the model is fitted within ~17% (median) and extrapolates at such shapes."""
    if not device.startswith("cuda"):
        return False
    approx, exact = shortlist(rows, n, k, dtype, device, recall_target, layout, sorted, num_buckets, per_bucket_k)
    torch_us = next((p.predicted_us for p in exact if p.kernel == "torch"), None)
    if torch_us is None:
        return False
    return any(p.kernel not in ("torch", "reference") and p.predicted_us <= TIME_WITHIN * torch_us
               for p in (*approx, *exact))


def _with_other_finish(chosen: list[TopkPlan], plans: list[TopkPlan]) -> list[TopkPlan]:
    """``chosen`` and, where its cheapest plan is a fused one, the cheapest of ``plans`` of the
    same bucketing and warps that finishes the other way (a bitonic network against a threshold
    and a sort of the k selected). The model prices the two within 1% at 16384 x 8192 fp16 k=64
    (b=128, kb=2, one warp); there the network measured 129 us, and 30 of them come after stage
    1 (benchmarks/results/profile_stages_h200_topk_98d5fb4.jsonl), so the first call times both."""
    if not chosen or chosen[0].kernel != "fused":
        return chosen
    lead = chosen[0]

    def same_bucketing(p):
        return (p.kernel, p.num_buckets, p.per_bucket_k, p.segments, p.num_warps) == \
            (lead.kernel, lead.num_buckets, lead.per_bucket_k, lead.segments, lead.num_warps)

    networks = {p.select == "bitonic" for p in chosen if same_bucketing(p)}
    other = [p for p in plans if same_bucketing(p) and (p.select == "bitonic") not in networks]
    return chosen + other[:1]


def _with_borrowed_prices(chosen: list[TopkPlan], plans: list[TopkPlan], few_rows: bool) -> list[TopkPlan]:
    """``chosen`` and, if none of them sorts by rank, the cheapest of ``plans`` that does, and
    likewise the cheapest split filtered plan: their prices are borrowed from other kernels'
    terms, so the first call's timing, not the model, decides whether they win. With
    ``few_rows`` (fewer than half the SMs), also the cheapest split kernel sorting by rank and
    the cheapest wide-bucket plan of each finish, and the share plan of every bucket count: they
    spread a row over many programs, where the fused kernel streams and sorts each row in one (16 x
    14336 fp32 k=1434 sorted 2048 entries a row in one program for 29 of its 45 us,
    benchmarks/results/profile_stages_h200.json). The model prices the share kernel's programs
    in waves of one an SM, so it prefers 8 buckets there (128 programs) to 16 (256); on an H100
    16 buckets of 4 warps took 10.5 us and 8 of 8 warps 11.9
    (benchmarks/results/profile_stages_h100_shares_skip_count_1feb989.json)."""
    extra = []
    kinds = [lambda p: p.sort_with == "rank", lambda p: p.kernel == "split_filtered"]
    if few_rows:
        kinds += [lambda p: p.sort_with == "rank" and p.kernel == "split",
                  lambda p: p.kernel == "wide" and p.select == "bisect",
                  lambda p: p.kernel == "wide" and p.select == "bitonic"]
    for kind in kinds:
        if not any(kind(p) for p in chosen + extra):
            extra += [p for p in plans if kind(p)][:1]
    if few_rows:
        taken = chosen + extra
        extra += [p for p in plans if p.kernel == "shares" and p not in taken]
    return chosen + extra


def _distinct(plans: list[TopkPlan]) -> list[TopkPlan]:
    """The cheapest SHORTLIST plans of different (kernel, bucketing, split, warps, register cap):
    the model ranks the ways to finish one bucketing reliably; it is the bucketings, kernels,
    warps and registers (which it does not see) it may misjudge."""
    chosen, seen = [], set()
    for p in plans:
        key = (p.kernel, p.num_buckets, p.per_bucket_k, p.segments, p.num_warps, p.max_registers)
        if key not in seen:
            seen.add(key)
            chosen.append(p)
        if len(chosen) == SHORTLIST:
            break
    return chosen


def _with_reason(plan: TopkPlan, reason: str) -> TopkPlan:
    return TopkPlan(**{**plan.__dict__, "reason": reason})
