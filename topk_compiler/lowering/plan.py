"""Choice of algorithm, kernel and parameters for one top-k call (the solver).

For a concrete call (rows, n, k, dtype, device, recall target) ``plan_topk`` enumerates the
bucketings (num_buckets, per_bucket_k) whose expected recall meets the target, the kernels that
can run each on the device, and exact top-k (torch.topk, or our Triton selection where it
applies), asks the cost model for each, and keeps the cheapest. With ``rewrite="auto"`` an
approximate plan must beat exact top-k by ``MIN_SPEEDUP``, so a rewrite never makes a model
slower by the model's own prediction.

Plans are cached: the op calls this on every invocation, with concrete sizes, so a graph
compiled with dynamic shapes picks the right plan for each length.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from topk_compiler.lowering import cost_model
from topk_compiler.lowering.recall_model import expected_recall, guaranteed_recall, survivors

# An approximate plan must be predicted at least this much faster than exact top-k.
MIN_SPEEDUP = 1.1
# Bucket counts tried by the solver (powers of two: the kernels' lanes).
BUCKET_CHOICES = tuple(2**i for i in range(4, 14))
# Kept slots per bucket: the kernels hold them in registers (a max/min pair each).
MAX_PER_BUCKET_K = 8
# Survivors one program can hold in registers for stage 2 without spilling (ptxas -v on sm_90a,
# benchmarks/results/registers.md): 16-bit keys pack key and slot into int32, fp32 into int64.
MAX_REGISTER_SURVIVORS = {2: 8192, 4: 4096}
# Programs per row the split kernel may use, and the fewest lanes each keeps (one warp).
MAX_SEGMENTS = 64
MIN_SEGMENT_LANES = 32
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class TopkPlan:
    """How one top-k call runs.

    args:
        algorithm: "exact" or "bucketed".
        kernel: "torch" (torch.topk), "reference" (bucketed in plain torch ops), "fused" (stage 1
            and 2 in one Triton program per row), "split" (stage 1 over several programs per row,
            then stage 2) or "select" (exact Triton selection over whole rows).
        num_buckets, per_bucket_k: the bucketing (bucketed only).
        segments: programs per row of the split kernel's stage 1.
        threshold: stage 2 by bisection + compaction (True) or by a bitonic top-k network.
        num_warps: warps per program of the main kernel.
        expected_recall: the recall model's value for this plan (1.0 for exact).
        predicted_us: the cost model's time for this plan; torch_topk_us: for torch.topk.
        reason: why this plan (for the rewrite report).
    """

    algorithm: str
    kernel: str
    num_buckets: int = 0
    per_bucket_k: int = 0
    segments: int = 1
    threshold: bool = True
    num_warps: int = 8
    expected_recall: float = 1.0
    predicted_us: float = float("nan")
    torch_topk_us: float = float("nan")
    reason: str = field(default="", compare=False)


def recall_of(n: int, k: int, num_buckets: int, per_bucket_k: int, layout: str) -> float:
    """The recall the solver relies on: the any-order bound for "shuffled", random order otherwise."""
    if layout == "shuffled":
        return guaranteed_recall(n, k, num_buckets, per_bucket_k)
    return expected_recall(n, k, num_buckets, per_bucket_k, layout)


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


def _us(seconds) -> float:
    return float(seconds) * 1e6


def kernel_options(rows, n, k, b, kb, elem, sorted_, profile, layout):
    """(time, kernel, segments, threshold, num_warps) for each Triton kernel that can run (b, kb)."""
    kbp = 1 << (kb - 1).bit_length()
    pow2 = b & (b - 1) == 0
    if not pow2 or kb > MAX_PER_BUCKET_K:
        return
    ns = b * kbp
    for threshold in (True, False):
        if ns <= MAX_REGISTER_SURVIVORS[elem]:
            warps = 4 if ns <= 1024 else 8
            t = cost_model.fused_time(rows, n, k, b, kb, elem, sorted_, threshold, profile)
            yield t, "fused", 1, threshold, warps
        if layout == "contiguous" or ns > MAX_REGISTER_SURVIVORS[2]:
            continue
        segments = 2
        while segments <= MAX_SEGMENTS and b // segments >= MIN_SEGMENT_LANES:
            t = cost_model.split_time(rows, n, k, b, kb, segments, elem, sorted_, threshold, profile)
            yield t, "split", segments, threshold, 4
            segments *= 2


def _exact_plans(rows, n, k, elem, sorted_, profile, triton_ok):
    torch_us = _us(cost_model.torch_topk_time(rows, n, k, elem, profile))
    plans = [TopkPlan("exact", "torch", predicted_us=torch_us, torch_topk_us=torch_us, reason="torch.topk")]
    n_pow2 = 1 << (n - 1).bit_length()
    if triton_ok and n_pow2 <= MAX_REGISTER_SURVIVORS[elem]:
        for threshold in (True, False):
            t = _us(cost_model.fused_time(rows, n, k, n_pow2, 1, elem, sorted_, threshold, profile))
            plans.append(TopkPlan("exact", "select", threshold=threshold, num_warps=4 if n_pow2 <= 1024 else 8,
                                  predicted_us=t, torch_topk_us=torch_us, reason="exact Triton selection"))
    return plans


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
    """The plan for top-k of ``rows`` rows of length ``n`` (concrete ints)."""
    profile = cost_model.device_profile(device)
    triton_ok = _triton_ok(device, dtype)
    if not dtype.is_floating_point:
        return TopkPlan("exact", "torch", reason=f"{dtype} is not a floating type: exact top-k")
    if rows == 0 or k == 0 or k >= n:
        return TopkPlan("exact", "torch", reason="nothing to approximate (k = 0, k = n or no rows)")
    elem = torch.empty((), dtype=dtype).element_size()
    exact = _exact_plans(rows, n, k, elem, sorted, profile, triton_ok)
    best_exact = min(exact, key=lambda p: p.predicted_us)
    forced = (num_buckets, per_bucket_k) if num_buckets is not None else None
    if recall_target >= 1.0 and forced is None:
        return best_exact

    best = None
    for b, kb, recall in bucketings(n, k, recall_target, layout, forced):
        options = list(kernel_options(rows, n, k, b, kb, elem, sorted, profile, layout)) if triton_ok else []
        if not options:
            options = [(cost_model.reference_time(rows, n, k, b, kb, elem, profile), "reference", 1, True, 0)]
        for t, kernel, segments, threshold, warps in options:
            plan = TopkPlan("bucketed", kernel, b, kb, segments, threshold, warps, recall, _us(t),
                            best_exact.torch_topk_us)
            if best is None or plan.predicted_us < best.predicted_us:
                best = plan
    if best is None:
        return _with_reason(best_exact, f"no bucketing reaches recall {recall_target:g} more cheaply: exact")
    if forced is not None or rewrite == "always":
        return _with_reason(best, "bucketing fixed by the caller" if forced else "rewrite='always'")
    if best.predicted_us * MIN_SPEEDUP > best_exact.predicted_us:
        return _with_reason(
            best_exact,
            f"exact predicted faster ({best_exact.predicted_us:.1f} us vs bucketed {best.predicted_us:.1f} us)",
        )
    return _with_reason(best, f"predicted {best_exact.predicted_us / best.predicted_us:.1f}x faster than exact")


def _with_reason(plan: TopkPlan, reason: str) -> TopkPlan:
    return TopkPlan(**{**plan.__dict__, "reason": reason})
