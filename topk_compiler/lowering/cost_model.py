"""Predicted run time of each top-k implementation, from shapes, dtype and device facts.

Pure functions. Every formula is written once and evaluates either to a float (concrete sizes) or
to a sympy expression (symbolic sizes, as in a graph compiled with ``dynamic=True``), so a report
can show the cost as a function of the sequence length.

Model of a GPU kernel launch whose ``programs`` each take ``per_program`` seconds on a streaming
multiprocessor (SM):

    time = launch + max(1, programs / processors) * per_program

Fewer programs than SMs run side by side (the time is one program's latency); more share the
SMs. ``per_program`` adds the program's bytes over its SM's share of the bandwidth to a weighted
count of the work it does: per element streamed (load, key, packing), per element and kept slot,
per candidate and key bit of a bisection, per candidate and digit of a radix histogram, per
candidate of the compaction's prefix sum, per element and stage of a sorting network, per
block-wide barrier. Each time is linear in these weights, which are fitted to timings of every
kernel variant on the device (``benchmarks/calibrate_cost_model.py``; the fitted values and the
data they came from are in ``calibration.py`` and ``benchmarks/results/``). torch.topk gets a
fitted formula of the same form.

The CPU profile models the plain-torch implementations, calibrated on a 2-core CI machine: on
CPUs torch.topk is rarely beaten, and the model says so.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import sympy
import torch


def _is_symbolic(*values) -> bool:
    return any(isinstance(v, sympy.Basic) for v in values)


def _log2(x):
    return sympy.log(x, 2) if _is_symbolic(x) else math.log2(max(x, 1))


def _next_pow2(x):
    return sympy.Integer(2) ** sympy.ceiling(sympy.log(x, 2)) if _is_symbolic(x) else 1 << max(0, (x - 1).bit_length())


def _cdiv(a, b):
    return sympy.ceiling(sympy.Integer(1) * a / b) if _is_symbolic(a, b) else -(-a // b)


def _max(a, b):
    return sympy.Max(a, b) if _is_symbolic(a, b) else max(a, b)


@dataclass(frozen=True)
class DeviceProfile:
    """Facts about one device plus the fitted weights (seconds per unit of work).

    args:
        kind: "cuda" or "cpu".
        name: device name, as torch reports it.
        processors: streaming multiprocessors (CUDA) or CPU threads.
        bandwidth: bytes per second the device reads from memory (measured copy bandwidth).
        weights: seconds per unit of each work term, see ``WORK_TERMS``.
    """

    kind: str
    name: str
    processors: int
    bandwidth: float
    weights: Mapping[str, float]

    def weight(self, term: str) -> float:
        return self.weights[term]


# Work terms a kernel's time is made of; every profile gives a weight (seconds per unit) to each.
WORK_TERMS = (
    "launch",         # per kernel launch
    "byte",           # per byte read or written, on top of bandwidth (memory stalls)
    "element",        # per input element streamed: load, key transform, packing
    "slot",           # per element per kept slot (the running top-kb update)
    "bisect",         # per candidate per key bit (one block-wide count per bit)
    "radix",          # per candidate per 8-bit digit (one histogram per digit)
    "scan",           # per candidate (prefix sum and compacting stores)
    "network",        # per element per compare-and-swap stage, in the selecting program
    "sort_network",   # per element per stage, in the separate few-warp sort launch
    "filter",         # per element of the exact kernel's second pass over its row
    "sync",           # per block-wide synchronisation (latency a program cannot hide)
    # torch.topk (a fitted formula of the same shape)
    "torch_launch",
    "torch_element",  # per input element
    "torch_sort",     # per selected element per log2(k)**2 (its sort of the k outputs)
    "torch_row",      # per row (per-slice overheads)
)

# Starting weights before calibration: H100-like throughput (132 SMs, ~1.7 GHz, 128 lanes each).
_LANE_OP = 1.0 / (128 * 1.7e9)
_DEFAULT_CUDA_WEIGHTS = {
    "launch": 4e-6, "byte": 0.0, "element": 8 * _LANE_OP, "slot": 2 * _LANE_OP,
    "bisect": 2 * _LANE_OP, "radix": 110 * _LANE_OP, "scan": 8 * _LANE_OP, "network": 8 * _LANE_OP,
    "sort_network": 3 * _LANE_OP, "filter": 8 * _LANE_OP, "sync": 1.5e-7,
    "torch_launch": 1.5e-5, "torch_element": 3.5e-12, "torch_sort": 1.2e-11, "torch_row": 2e-7,
}
# Plain-torch implementations on a CPU, fitted on the 2-core CI machine (see module docstring).
_DEFAULT_CPU_WEIGHTS = {
    "launch": 2e-5, "byte": 0.0, "element": 1.1e-9, "slot": 6e-10,
    "bisect": 0.0, "radix": 0.0, "scan": 0.0, "network": 0.0, "sort_network": 0.0, "filter": 0.0, "sync": 0.0,
    "torch_launch": 1e-5, "torch_element": 1.0e-9, "torch_sort": 2e-10, "torch_row": 1e-6,
}

# Measured device-to-device copy bandwidth (bytes read + written, so this is the read rate of a
# pure read); for unknown GPUs a conservative 2 TB/s.
_KNOWN_BANDWIDTH = {"H100": 3.0e12, "H200": 4.3e12}


# A device with no weights of its own borrows those of a calibrated one of the same SM design:
# the weights are per unit of SM work, and the H200's SMs and clocks are the H100's (only its
# memory is faster, which the profile's own bandwidth carries).
_SAME_SM = {"H200": "H100"}


def _calibrated_weights(name: str) -> Mapping[str, float] | None:
    from topk_compiler.lowering import calibration

    for key, weights in calibration.CUDA_WEIGHTS.items():
        if key in name:
            return weights
    for key, twin in _SAME_SM.items():
        if key in name and twin in calibration.CUDA_WEIGHTS:
            return calibration.CUDA_WEIGHTS[twin]
    return None


@functools.lru_cache(maxsize=None)
def device_profile(device: str) -> DeviceProfile:
    """Profile of ``device`` ("cpu", "cuda", "cuda:1", ...)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        bandwidth = next((bw for key, bw in _KNOWN_BANDWIDTH.items() if key in props.name), 2.0e12)
        weights = {**_DEFAULT_CUDA_WEIGHTS, **(_calibrated_weights(props.name) or {})}
        return DeviceProfile("cuda", props.name, props.multi_processor_count, bandwidth, weights)
    return DeviceProfile("cpu", "cpu", max(1, torch.get_num_threads()), 2.0e10, dict(_DEFAULT_CPU_WEIGHTS))


# Host time of one call made outside a CUDA graph (a replay runs the device's work alone), as
# measured on the H200 machine's host (benchmarks/results/profile_stages_h200_host_direct.json,
# 1 x 4096 fp32 k=16): torch.topk 26.8 us a call, one aten op; our op 67.7 us with torch.topk as
# its plan, so 41 us of custom-op dispatch and Python body; a Triton plan then adds 23 us of
# launcher Python and output allocations, and 33 us per launch. CPU profiles price their ops'
# dispatch in their weights already.
HOST_SECONDS = {"cuda": {"torch_op": 27e-6, "our_op": 64e-6, "triton_launch": 33e-6}}


def torch_ops_host_seconds(ops: int, p: DeviceProfile) -> float:
    """Host time of ``ops`` plain torch ops called outside a CUDA graph."""
    return ops * HOST_SECONDS.get(p.kind, {}).get("torch_op", 0.0)


def our_op_host_seconds(launches: int, p: DeviceProfile) -> float:
    """Host time of one call of our custom op outside a CUDA graph that makes ``launches``
    kernel launches."""
    host = HOST_SECONDS.get(p.kind)
    return host["our_op"] + launches * host["triton_launch"] if host else 0.0


def outside_graphs(device_seconds, host_seconds):
    """Time per call outside a CUDA graph, calls back to back: the host dispatches the next call
    while the device runs this one, so the longer of the two sets the pace."""
    return _max(device_seconds, host_seconds)


def with_weights(profile: DeviceProfile, weights: Mapping[str, float]) -> DeviceProfile:
    return dataclasses.replace(profile, weights={**profile.weights, **weights})


def _waves(programs, p: DeviceProfile):
    return _max(1, programs / p.processors)


def _network_stages(size):
    """Compare-and-swap stages of a bitonic sort of ``size`` (a power of two) elements."""
    return _log2(size) * (_log2(size) + 1) / 2


def _stream(n, elem_bytes, per_bucket_k, p: DeviceProfile):
    """One program reading ``n`` elements and pushing each through ``per_bucket_k`` slots."""
    return (n * elem_bytes * (p.processors / p.bandwidth + p.weight("byte")) + n * p.weight("element")
            + n * per_bucket_k * p.weight("slot"))


def _select(ns, k, key_bits, select, p: DeviceProfile):
    """Selecting k of ``ns`` register-held candidates (``select_topk.select_and_store``), sorting
    excluded except for ``bitonic``, whose network sorts as it selects."""
    if select == "bitonic":
        kp = _next_pow2(k)
        stages = _network_stages(kp) + _log2(ns / kp) * (_log2(kp) + 1)
        return ns * stages * p.weight("network") + stages * p.weight("sync")
    if select == "bisect":
        search = ns * key_bits * p.weight("bisect") + key_bits * p.weight("sync")
    else:
        search = ns * (key_bits // 8) * p.weight("radix") + (key_bits // 8) * p.weight("sync")
    return search + ns * p.weight("scan") + 2 * p.weight("sync")


def _sort_here(k, p: DeviceProfile):
    kp = _next_pow2(k)
    return kp * _network_stages(kp) * p.weight("network") + (_network_stages(kp) + 2) * p.weight("sync")


def sort_time(rows, k, p: DeviceProfile):
    """``select_topk.sort_selected``: one few-warp program per row sorting its k selected."""
    kp = _next_pow2(k)
    return p.weight("launch") + _waves(rows, p) * (kp * _network_stages(kp) * p.weight("sort_network")
                                                    + 2 * p.weight("sync"))


# Entries each program of ``select_topk.rank_sort`` ranks (kernels/select_topk.py RANK_BLOCK_I).
RANK_BLOCK_I = 64


def rank_sort_time(rows, k, p: DeviceProfile):
    """``select_topk.rank_sort``: RANK_BLOCK_I entries a program, each compared with the row's k.
    A compare-and-count per pair is priced as bisect's per candidate, the nearest fitted term
    (not yet calibrated on this kernel)."""
    programs = rows * _cdiv(k, RANK_BLOCK_I)
    return p.weight("launch") + _waves(programs, p) * (RANK_BLOCK_I * k * p.weight("bisect") + 2 * p.weight("sync"))


# kernels/wide_bucket_topk.DIGIT_BITS (tied by a test).
WIDE_DIGIT_BITS = 2


def wide_time(rows, n, k, num_buckets, per_bucket_k, elem_bytes, select, p: DeviceProfile):
    """``wide_bucket_topk``: a program per (row, bucket) loading its bucket and keeping its top
    per_bucket_k sorted (``select="bisect"``: the threshold WIDE_DIGIT_BITS bits per block-wide
    count, 2**WIDE_DIGIT_BITS compares per slot each, then a sort of those kept; "bitonic": a
    top-k network over the bucket); then a program per (row, bucket) ranking its entries by a
    binary search in every bucket's list. Priced with the fused kernel's terms (streaming,
    bisection, sorting networks), not yet calibrated on this kernel."""
    slots = _next_pow2(_cdiv(n, num_buckets))
    if select == "bitonic":
        top = _select(slots, per_bucket_k, _key_bits(elem_bytes), "bitonic", p)
    else:
        top = _wide_threshold(slots, elem_bytes, p) + _sort_here(per_bucket_k, p)
    merge = num_buckets * _next_pow2(per_bucket_k) * _log2(per_bucket_k + 1) * p.weight("bisect")
    programs = rows * num_buckets
    return 2 * p.weight("launch") + _waves(programs, p) * (_stream(slots, elem_bytes, 0, p) + top + merge)


def _wide_threshold(slots, elem_bytes, p: DeviceProfile):
    """A wide bucket's threshold: WIDE_DIGIT_BITS bits a block-wide count, 2**WIDE_DIGIT_BITS
    compares a slot each."""
    rounds = _key_bits(elem_bytes) // WIDE_DIGIT_BITS
    return slots * rounds * 2**WIDE_DIGIT_BITS * p.weight("bisect") + rounds * p.weight("sync")


def shares_time(rows, n, k, num_buckets, elem_bytes, p: DeviceProfile):
    """``WideShareTopk``: ``wide_time``'s selection without its sort, each bucket's share written
    straight to the output, no merge. Priced with the same borrowed terms, not calibrated on this
    kernel (16 x 14336 fp32 k=1434, 8 buckets: 20.4 us predicted, 12.8 measured on an H100)."""
    slots = _next_pow2(_cdiv(n, num_buckets))
    programs = rows * num_buckets
    return p.weight("launch") + _waves(programs, p) * (_stream(slots, elem_bytes, 0, p)
                                                       + _wide_threshold(slots, elem_bytes, p))


def _finish(rows, k, sorted_, select, sort_with, p: DeviceProfile):
    """(time inside the selecting program, time of the sort after it)."""
    if not sorted_ or select == "bitonic":
        return 0, 0
    if sort_with == "program":
        return _sort_here(k, p), 0
    if sort_with == "rank":
        return 0, rank_sort_time(rows, k, p)
    return 0, sort_time(rows, k, p)


def _key_bits(elem_bytes):
    return 16 if elem_bytes == 2 else 32


def fused_time(rows, n, k, num_buckets, per_bucket_k, elem_bytes, sorted_, select, sort_with, p: DeviceProfile):
    """``fused_bucketed_topk``: one program per row, stage 1 then stage 2 on registers."""
    ns = num_buckets * _next_pow2(per_bucket_k)
    inner, outer = _finish(rows, k, sorted_, select, sort_with, p)
    per_row = _stream(n, elem_bytes, per_bucket_k, p) + _select(ns, k, _key_bits(elem_bytes), select, p) + inner
    return p.weight("launch") + _waves(rows, p) * per_row + outer


def split_time(rows, n, k, num_buckets, per_bucket_k, segments, elem_bytes, sorted_, select, sort_with,
               p: DeviceProfile):
    """``split_bucketed_topk``: stage 1 over ``segments`` programs per row, survivors (8 bytes
    each) to memory, then one program per row selects."""
    ns = num_buckets * _next_pow2(per_bucket_k)
    inner, outer = _finish(rows, k, sorted_, select, sort_with, p)
    to_memory = 8 * p.processors / p.bandwidth
    stage1 = _stream(n / segments, elem_bytes, per_bucket_k, p) + (ns / segments) * to_memory
    stage2 = ns * to_memory + _select(ns, k, _key_bits(elem_bytes), select, p) + inner
    return 2 * p.weight("launch") + _waves(rows * segments, p) * stage1 + _waves(rows, p) * stage2 + outer


def select_time(rows, n, k, elem_bytes, sorted_, select, sort_with, p: DeviceProfile):
    """``exact_topk``: the whole row in one program's registers, then the selection."""
    inner, outer = _finish(rows, k, sorted_, select, sort_with, p)
    per_row = _stream(n, elem_bytes, 0, p) + _select(_next_pow2(n), k, _key_bits(elem_bytes), select, p) + inner
    return p.weight("launch") + _waves(rows, p) * per_row + outer


def _candidate_slots(k):
    """``filtered_topk.candidate_slots``: the slots for the elements above a row's bound."""
    return 2 * _next_pow2(k)


# kernels/filtered_topk.BOUND_BITS: the filtered kernels' bound decides this many leading key
# bits, one block-wide count each.
BOUND_BITS = 14


def _bound_counts(survivors, key_bits, p: DeviceProfile):
    """The filtered kernels' bound among ``survivors`` keys: one block-wide count a leading bit."""
    bits = min(key_bits, BOUND_BITS)
    return survivors * bits * p.weight("bisect") + bits * p.weight("sync")


def filtered_time(rows, n, k, num_buckets, per_bucket_k, elem_bytes, sorted_, select, sort_with, p: DeviceProfile):
    """``filtered_topk``: stage 1 for a bound, a second pass over the row keeping what exceeds it,
    an exact selection among the candidate slots (``_candidate_slots``)."""
    ns = num_buckets * _next_pow2(per_bucket_k)
    key_bits = _key_bits(elem_bytes)
    inner, outer = _finish(rows, k, sorted_, select, sort_with, p)
    per_row = (_stream(n, elem_bytes, per_bucket_k, p) + _bound_counts(ns, key_bits, p) + n * p.weight("filter")
               + _select(_candidate_slots(k), k, key_bits, select, p) + inner)
    return p.weight("launch") + _waves(rows, p) * per_row + outer


# kernels/filtered_topk.SPLIT_FILTER_BLOCK: elements a program of the split kernel's filtering pass.
SPLIT_FILTER_BLOCK = 256
# The split kernel's filtering pass per element, as a share of the one-program kernel's ``filter``
# weight: its light programs overlap their waits, where one program a row cannot. On an H100 the
# pass took 0.12 us a wave of programs (256 elements each) at all four shapes of many rows, bf16
# and fp32 alike, 2.6-2.9x below the full weight, with vector loads and every store masked
# (benchmarks/results/profile_large_k_h100_packed.json: 119 us at 1024 x 32768 bf16, 59 at
# 1024 x 16384 fp32, 61 at 4096 x 4096, 30 at 64 x 131072): a share of 0.33. With a thread's
# element a load and lean stores (profile_filter_pass_h100_8a87819.json: 97.2, 46.2 and 23.8 us
# at the first, second and fourth) the share beyond the bytes' time is 0.25 for bf16, 0.22 fp32.
SPLIT_FILTER_SHARE = 0.25


def split_filtered_time(rows, n, k, num_buckets, per_bucket_k, segments, elem_bytes, sorted_, select, sort_with,
                        p: DeviceProfile):
    """``split_filtered_topk``: stage 1 and the k / segments-th survivor key over ``segments``
    programs a row (the bound), the filtering pass over a program per SPLIT_FILTER_BLOCK of the
    row, then a selection among the candidate slots, one program a row. Priced with the
    one-program kernel's terms, the filtering pass's scaled by ``SPLIT_FILTER_SHARE`` (measured
    on this kernel; the rest not yet calibrated on it)."""
    ns = num_buckets * _next_pow2(per_bucket_k) / segments
    key_bits = _key_bits(elem_bytes)
    inner, outer = _finish(rows, k, sorted_, select, sort_with, p)
    bound = _stream(n / segments, elem_bytes, per_bucket_k, p) + _bound_counts(ns, key_bits, p)
    blocks = _cdiv(n, SPLIT_FILTER_BLOCK)
    filtering = (SPLIT_FILTER_BLOCK * elem_bytes * p.processors / p.bandwidth
                 + SPLIT_FILTER_BLOCK * SPLIT_FILTER_SHARE * p.weight("filter"))
    selection = _select(_candidate_slots(k), k, key_bits, select, p) + inner
    return (3 * p.weight("launch") + _waves(rows * segments, p) * bound + _waves(rows * blocks, p) * filtering
            + _waves(rows, p) * selection + outer)


def certified_time(rows, n, k, num_buckets, per_bucket_k, elem_bytes, sorted_, select, sort_with, flagged,
                   p: DeviceProfile):
    """``certified_topk``: the fused kernel with its certificate, then a launch recomputing the
    rows it flags (``flagged``: the probability that any is), each by a filtering pass over the
    row and a selection among the candidate slots."""
    recompute = (_stream(n, elem_bytes, 0, p) + n * p.weight("filter")
                 + _select(_candidate_slots(k), k, _key_bits(elem_bytes), select, p))
    return (fused_time(rows, n, k, num_buckets, per_bucket_k, elem_bytes, sorted_, select, sort_with, p)
            + p.weight("launch") + flagged * recompute)


def torch_topk_time(rows, n, k, elem_bytes, p: DeviceProfile):
    """torch.topk (fitted): a pass-proportional term per element, a sort of the k outputs per row."""
    return (
        p.weight("torch_launch")
        + rows * n * (elem_bytes / p.bandwidth + p.weight("torch_element"))
        + rows * k * _log2(k + 1) ** 2 * p.weight("torch_sort")
        + rows * p.weight("torch_row")
    )


def reference_time(rows, n, k, num_buckets, per_bucket_k, elem_bytes, p: DeviceProfile):
    """The plain-torch bucketed implementation (lowering/bucketed_reference.py): keys, per-bucket
    torch.topk, then torch.topk over the survivors."""
    stage1 = rows * n * (8 / p.bandwidth + p.weight("element") + per_bucket_k * p.weight("slot"))
    return p.weight("launch") + stage1 + torch_topk_time(rows, num_buckets * per_bucket_k, k, 8, p)
