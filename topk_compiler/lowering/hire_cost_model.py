"""HiRE cost model: bytes moved and predicted time of the dense and predict-then-compute forms of a
logits top-k and of an FFN. Pure functions of shapes, dtype and device facts.

At decode sizes both forms are memory-bound: the dense form reads the whole weight, HiRE reads
the predictor, then only the candidates' rows. Each form's time is

    time = launches * LAUNCH_SECONDS + max(bytes / bandwidth, flops / PEAK_FLOPS) [+ selections]

where a top-k selection's time comes from the top-k planner (``plan.py``: the cost model of the
top-k kernels), so the costs of selecting are written once. Device bandwidth and SM count come
from ``cost_model.device_profile``.

Batches: the rows of a batch share one gather of the union of their candidate sets, whose
expected size is taken for independent random sets (``expected_union``): real rows share more
candidates than that, so the estimate errs towards the dense form.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from topk_compiler.lowering import cost_model
from topk_compiler.lowering.plan import plan_topk

# HiRE must be predicted at least this much faster than dense to rewrite (the model's error bar:
# a rewrite must never make a model slower).
MIN_SPEEDUP = 1.2
# Recall target of the selection of the k' candidates from the predicted scores (bucketed top-k
# where the planner finds it faster). A bucketed selection drops an element only behind others
# of its bucket, so the candidates lost are low-ranked ones, rarely in the true top-k.
CANDIDATE_RECALL = 0.99
# Seconds per kernel launched back to back (GPU time of a small kernel's ramp-up and drain, as
# under CUDA graphs), and per plain-torch op on a CPU (dispatch overhead).
LAUNCH_SECONDS = {"cuda": 3e-6, "cpu": 1e-5}
# Achievable dense matmul rate, by device name and element size: about 60% of the datasheet (H100
# SXM: 989 TFLOPS bf16, 67 TFLOPS fp32 without TF32); a 2-core CPU for the plain-torch path.
_PEAK_FLOPS = {"H100": {2: 6e14, 4: 4e13}, "H200": {2: 6e14, 4: 4e13}}
_DEFAULT_CUDA_FLOPS = {2: 2e14, 4: 2e13}
_CPU_FLOPS = 5e10
# The FFN kernel's neuron groups per SM (each group writes one fp32 partial sum of the output,
# written once and read once by the reduction; the kernel's N_SPLIT adds programs within a group
# where more loads in flight pay) and the most bytes of partial sums it may write (one program's
# partial sum, rows x d_out fp32, where that alone is more).
FFN_PROGRAMS_PER_SM = 1
FFN_PARTIAL_BYTES = 16 * 2**20
# For one row of x (kernels/sparse_ffn.py's row kernel, 4 neurons a block, each block's loads
# all in flight at once): one program per SM. On an H200 (1862 of 16384 neurons, d = 4096,
# benchmarks/results/profile_stages_h200_hire.json) selection + FFN + reduction took 29.9 us
# replayed with 132 programs, 32.5 with 264 and 39.3 with 528: the reduction of the partial
# sums grows with the programs (5.0, 8.6, 14.2 us) while the FFN kernel stays at 7-8 us.
FFN_ROW_PROGRAMS_PER_SM = 1
# Widest d and d_out the one-row kernels hold in registers (kernels/sparse_ffn.py ROW_MAX_WIDTH).
FFN_ROW_MAX_WIDTH = 8192
# Rows of x per program of the FFN kernel (kernels/sparse_ffn.py MAX_BLOCK_M): more rows re-read
# the weights once per block of rows.
FFN_ROWS_PER_BLOCK = 16
# The plain-torch path copies the gathered rows (index_select) before multiplying them.
_CPU_GATHER_PASSES = 3
# The FFN's neuron selection: programs of SELECT_BLOCK neurons, each counting the blocks before
# it SELECT_EARLIER at a time (kernels/sparse_ffn.py): one dependent round trip to memory (about
# a microsecond) per SELECT_EARLIER blocks before the last.
SELECT_ROUND_SECONDS = 1e-6
SELECT_BLOCK = 1024
SELECT_EARLIER = 16


@dataclass(frozen=True)
class FormCost:
    """Predicted cost of one form (dense or HiRE) of a site at one batch size.

    args:
        bytes: bytes read and written.
        flops: multiply-adds times two.
        launches: kernels (CUDA) or torch ops (CPU) it runs.
        seconds: predicted time.
    """

    bytes: float
    flops: float
    launches: int
    seconds: float

    @property
    def us(self) -> float:
        return self.seconds * 1e6


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def peak_flops(profile: cost_model.DeviceProfile, elem_bytes: int) -> float:
    if profile.kind != "cuda":
        return _CPU_FLOPS
    table = next((t for key, t in _PEAK_FLOPS.items() if key in profile.name), _DEFAULT_CUDA_FLOPS)
    return table[2 if elem_bytes <= 2 else 4]


def _cost(bytes_, flops, launches, profile, elem_bytes, extra_seconds=0.0) -> FormCost:
    transfer = max(bytes_ / profile.bandwidth, flops / peak_flops(profile, elem_bytes))
    seconds = launches * LAUNCH_SECONDS[profile.kind] + transfer + extra_seconds
    return FormCost(float(bytes_), float(flops), int(launches), float(seconds))


def predictor_bytes(kind: str, n: int, d: int, rank: int, elem_bytes: int) -> int:
    """Bytes of a predictor of an [n, d] weight (what it reads per call)."""
    if kind == "lowrank":
        return rank * (d + n) * elem_bytes
    if kind == "int8":
        return n * d + 4 * n
    if kind == "int4":
        return n * ((d + 1) // 2) + 4 * n
    raise ValueError(f"predictor must be one of ('lowrank', 'int8', 'int4'), got {kind!r}")


def expected_union(rows: int, candidates: int, n: int) -> float:
    """Expected size of the union of ``rows`` independent uniformly random ``candidates``-subsets
    of ``n`` items (1 row: exactly ``candidates``)."""
    if rows <= 1 or candidates >= n:
        return float(min(candidates, n))
    return n * (1.0 - (1.0 - candidates / n) ** rows)


def ffn_programs(slots: int, rows: int, d_out: int, processors: int) -> int:
    """Programs of the sparse FFN kernel (per block of rows): about FFN_PROGRAMS_PER_SM per SM,
    fewer when their fp32 partial sums would pass FFN_PARTIAL_BYTES. Each program writes a partial
    sum of every row (``kernels/sparse_ffn.py`` allocates [programs, rows, d_out]), so the bound
    counts all rows: 4096 rows of d_out = 4096 at 132 programs would hold 8.9 GB."""
    by_bytes = FFN_PARTIAL_BYTES // max(1, rows * d_out * 4)
    per_sm = FFN_ROW_PROGRAMS_PER_SM if rows == 1 else FFN_PROGRAMS_PER_SM
    return max(1, min(per_sm * processors, by_bytes, slots))


def fuses_prediction(rows: int, d: int, d_out: int, kind: str) -> bool:
    """Whether the GPU FFN predicts and selects in one kernel (kernels/sparse_ffn.py's
    ``lowrank_sparse_ffn_row``): one row, a low-rank predictor, widths the row kernel holds."""
    return rows == 1 and kind == "lowrank" and max(d, d_out) <= FFN_ROW_MAX_WIDTH


def fused_ffn_programs(d_ff: int, d_out: int, processors: int) -> int:
    """Programs of the prediction that lists the chosen neurons (each reads its share of the
    predictor, so FFN_ROW_PROGRAMS_PER_SM per SM whatever the density) and at most of the row
    kernel after it; fewer when the partial sums would pass FFN_PARTIAL_BYTES."""
    return max(1, min(FFN_ROW_PROGRAMS_PER_SM * processors, FFN_PARTIAL_BYTES // (d_out * 4), d_ff))


def _predictor_cost(rows, n, d, kind, rank, elem):
    """(bytes, flops, launches, predicted-score element size) of the predicted scores."""
    score_elem = elem if kind == "lowrank" else 4
    bytes_ = predictor_bytes(kind, n, d, rank, elem) + rows * d * elem + rows * n * score_elem
    flops = 2 * rows * rank * (d + n) if kind == "lowrank" else 2 * rows * n * d
    return bytes_, flops, (2 if kind == "lowrank" else 1), score_elem


def _computed_slots(slots, union, profile):
    """Slots multiplied per row: the GPU kernels run over every slot, duplicates (padding)
    included; the plain-torch path over the deduplicated union."""
    return slots if profile.kind == "cuda" else union


def _selection_seconds(rows, n, kc, score_elem, device):
    dtype = {2: torch.bfloat16, 4: torch.float32}[score_elem]
    if kc >= n:
        return 0.0
    return plan_topk(rows, n, kc, dtype, device, CANDIDATE_RECALL).predicted_us * 1e-6


def dense_logits_cost(rows: int, d: int, n: int, k: int, dtype: torch.dtype, device: str,
                      normalize: str = "none") -> FormCost:
    """F.linear (reads all of W), then softmax if any, then torch.topk over the n logits."""
    profile = cost_model.device_profile(device)
    e = element_size(dtype)
    bytes_ = n * d * e + rows * d * e + rows * n * e
    launches = 1
    if normalize != "none":
        bytes_ += 2 * rows * n * e
        launches += 1
    topk = cost_model.torch_topk_time(rows, n, k, e, profile)
    return _cost(bytes_, 2 * rows * d * n, launches, profile, e, topk)


def hire_logits_cost(rows: int, d: int, n: int, k: int, candidates: int, kind: str, rank: int,
                     dtype: torch.dtype, device: str, normalize: str = "none") -> FormCost:
    """Predicted scores, top-k' selection, exact logits of the candidates (gather-matmul over the
    batch's union of candidates), top-k over them; with softmax, the normaliser's mixed scores."""
    profile = cost_model.device_profile(device)
    e = element_size(dtype)
    kc = min(max(candidates, k), n)
    bytes_, flops, launches, score_elem = _predictor_cost(rows, n, d, kind, rank, e)
    slots = rows * kc
    union = expected_union(rows, kc, n)
    gather_passes = 1 if profile.kind == "cuda" else _CPU_GATHER_PASSES
    bytes_ += gather_passes * union * d * e + rows * slots * 4
    flops += 2 * rows * _computed_slots(slots, union, profile) * d
    launches += 1 + 3  # gather-matmul; top-k over the candidates, index map, cast
    if rows > 1:
        bytes_ += 3 * slots * 8 + 2 * rows * slots * 4
        launches += 5  # sort, duplicates, membership (gather, compare, and)
    if normalize != "none":
        bytes_ += 3 * rows * n * 4
        launches += 5  # mixed scores (copy, scatter), logsumexp, final values
    extra = _selection_seconds(rows, n, kc, score_elem, device)
    extra += cost_model.torch_topk_time(rows, slots, k, 4, profile)
    return _cost(bytes_, flops, launches, profile, e, extra)


def dense_ffn_cost(rows: int, d: int, d_ff: int, d_out: int, dtype: torch.dtype, device: str) -> FormCost:
    """linear, activation, linear: both weights read in full."""
    profile = cost_model.device_profile(device)
    e = element_size(dtype)
    bytes_ = (d_ff * d + d_out * d_ff) * e + rows * (d + 3 * d_ff + d_out) * e
    return _cost(bytes_, 2 * rows * d_ff * (d + d_out), 3, profile, e)


def hire_ffn_cost(rows: int, d: int, d_ff: int, d_out: int, expected_neurons: int, kind: str, rank: int,
                  dtype: torch.dtype, device: str) -> FormCost:
    """Predicted pre-activations, the neurons above the threshold (``expected_neurons`` per row),
    the sparse FFN over the batch's union of neurons (one row of W1 and of W2^T each), the
    reduction of its partial sums."""
    profile = cost_model.device_profile(device)
    e = element_size(dtype)
    neurons = min(max(expected_neurons, 1), d_ff)
    bytes_, flops, launches, score_elem = _predictor_cost(rows, d_ff, d, kind, rank, e)
    if profile.kind == "cuda" and fuses_prediction(rows, d, d_out, kind):
        # x A; prediction and selection in one kernel, its lists of chosen neurons written and
        # read (the scores never reach memory); the row kernel; the reduction.
        programs = min(fused_ffn_programs(d_ff, d_out, profile.processors), math.ceil(neurons / 4))
        bytes_ += neurons * (d + d_out) * e + (d + d_out) * e - rows * d_ff * score_elem
        bytes_ += 2 * programs * d_out * 4 + 2 * neurons * 4
        flops += 2 * neurons * (d + d_out)
        return _cost(bytes_, flops, 4, profile, e)
    union = expected_union(rows, neurons, d_ff)
    row_blocks = 1 if rows == 1 else math.ceil(rows / FFN_ROWS_PER_BLOCK)
    gather_passes = 1 if profile.kind == "cuda" else _CPU_GATHER_PASSES
    bytes_ += gather_passes * row_blocks * union * (d + d_out) * e + rows * (d + d_out) * e
    bytes_ += rows * d_ff * score_elem + d_ff * 8  # the selection reads the scores, writes the slots
    extra = 0.0
    if profile.kind == "cuda":
        programs = ffn_programs(int(union), rows, d_out, profile.processors)
        bytes_ += 2 * programs * rows * d_out * 4
        extra = (1 + math.ceil(d_ff / SELECT_BLOCK / SELECT_EARLIER)) * SELECT_ROUND_SECONDS
    flops += 2 * rows * union * (d + d_out)
    launches += 3 if rows == 1 else 4
    return _cost(bytes_, flops, launches, profile, e, extra)


def as_called(hire: FormCost, dense: FormCost, device: str, replays_cuda_graphs: bool
              ) -> tuple[FormCost, FormCost, str]:
    """(hire, dense, the report's verdict) priced as a site's calls will run. Outside CUDA graphs
    each call pays the host's dispatch: HiRE one call of our op with its launches, dense its torch
    ops, each at the longer of its host and device times (``cost_model.outside_graphs``)."""
    if replays_cuda_graphs:
        return hire, dense, verdict(hire, dense)
    p = cost_model.device_profile(device)
    hire_host = cost_model.our_op_host_seconds(hire.launches, p)
    dense_host = cost_model.torch_ops_host_seconds(dense.launches, p)
    hire = dataclasses.replace(hire, seconds=float(cost_model.outside_graphs(hire.seconds, hire_host)))
    dense = dataclasses.replace(dense, seconds=float(cost_model.outside_graphs(dense.seconds, dense_host)))
    return hire, dense, f"outside CUDA graphs (the host's dispatch priced in): {verdict(hire, dense)}"


def worth_rewriting(hire: FormCost, dense: FormCost) -> bool:
    return hire.seconds * MIN_SPEEDUP <= dense.seconds


def verdict(hire: FormCost, dense: FormCost) -> str:
    """One line for the rewrite report."""
    ratio = dense.seconds / hire.seconds if hire.seconds else float("inf")
    if worth_rewriting(hire, dense):
        return f"HiRE predicted {ratio:.1f}x faster than dense ({hire.us:.1f} us vs {dense.us:.1f} us)"
    return (f"dense predicted cheaper: HiRE {hire.us:.1f} us vs dense {dense.us:.1f} us "
            f"(needs {MIN_SPEEDUP:g}x)")
