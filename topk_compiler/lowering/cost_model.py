"""Predicted run time of each top-k implementation, from shapes, dtype and device facts.

Pure functions. Every formula is written once and evaluates either to a float (concrete sizes) or
to a sympy expression (symbolic sizes, as in a graph compiled with ``dynamic=True``), so a report
can show the cost as a function of the sequence length.

Model of a GPU kernel launch with one program per work item (a row, or a row segment): the
``programs`` are spread over ``processors`` streaming multiprocessors, each of which works through
its share one after the other at its share of the device's bandwidth and instruction rate:

    time = launch + ceil(programs / processors) * per_program_time

``per_program_time`` adds bytes moved over the per-SM bandwidth to a weighted count of the work
the kernel does per element (key transform, slot updates, one block-wide count per key bit,
prefix sums, compare-and-swap stages of sorting networks). The weights are fitted to timings
measured on the device by ``benchmarks/calibrate_cost_model.py``; the fitted values and the data
they came from are in ``benchmarks/results/``. torch.topk gets a fitted formula of the same form.

The CPU profile models the plain-torch implementations the same way, calibrated on a 2-core CI
machine: on CPUs torch.topk is rarely beaten, and the model says so.
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


def _ceil_div(a, b):
    return sympy.ceiling(a / b) if _is_symbolic(a, b) else -(-a // b)


def _log2(x):
    return sympy.log(x, 2) if _is_symbolic(x) else math.log2(max(x, 1))


def _next_pow2(x):
    return sympy.Integer(2) ** sympy.ceiling(sympy.log(x, 2)) if _is_symbolic(x) else 1 << max(0, (x - 1).bit_length())


def _min(a, b):
    return sympy.Min(a, b) if _is_symbolic(a, b) else min(a, b)


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
    "element",        # per input element: load, key transform, packing
    "slot",           # per element per kept slot (the running top-kb update)
    "bisect",         # per candidate per key bit (one block-wide count per bit)
    "scan",           # per candidate (prefix sums and compaction)
    "network",        # per element per compare-and-swap stage of a sorting network
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
    "launch": 4e-6, "byte": 0.0, "element": 6 * _LANE_OP, "slot": 2 * _LANE_OP,
    "bisect": 2 * _LANE_OP, "scan": 8 * _LANE_OP, "network": 6 * _LANE_OP, "sync": 1.5e-7,
    "torch_launch": 1.5e-5, "torch_element": 3.5e-12, "torch_sort": 1.2e-11, "torch_row": 2e-7,
}
# Plain-torch implementations on a CPU, fitted on the 2-core CI machine (see module docstring).
_DEFAULT_CPU_WEIGHTS = {
    "launch": 2e-5, "byte": 0.0, "element": 1.1e-9, "slot": 6e-10,
    "bisect": 0.0, "scan": 0.0, "network": 0.0, "sync": 0.0,
    "torch_launch": 1e-5, "torch_element": 1.0e-9, "torch_sort": 2e-10, "torch_row": 1e-6,
}

# Measured device-to-device copy bandwidth (bytes read + written, so this is the read rate of a
# pure read); for unknown GPUs a conservative 2 TB/s.
_KNOWN_BANDWIDTH = {"H100": 3.0e12, "H200": 4.3e12}


def _calibrated_weights(name: str) -> Mapping[str, float] | None:
    from topk_compiler.lowering import calibration

    for key, weights in calibration.CUDA_WEIGHTS.items():
        if key in name:
            return weights
    return None


@functools.lru_cache(maxsize=None)
def device_profile(device: str) -> DeviceProfile:
    """Profile of ``device`` ("cpu", "cuda", "cuda:1", ...)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        bandwidth = next((bw for key, bw in _KNOWN_BANDWIDTH.items() if key in props.name), 2.0e12)
        weights = _calibrated_weights(props.name) or _DEFAULT_CUDA_WEIGHTS
        return DeviceProfile("cuda", props.name, props.multi_processor_count, bandwidth, dict(weights))
    return DeviceProfile("cpu", "cpu", max(1, torch.get_num_threads()), 2.0e10, dict(_DEFAULT_CPU_WEIGHTS))


def with_weights(profile: DeviceProfile, weights: Mapping[str, float]) -> DeviceProfile:
    return dataclasses.replace(profile, weights={**profile.weights, **weights})


def _waves(programs, profile: DeviceProfile):
    return _ceil_div(programs, profile.processors)


def _select_work(ns, k, key_bits, sorted_, threshold, p: DeviceProfile):
    """Per-program time of selecting k of ``ns`` candidates (select_topk.select_and_store)."""
    kp = _next_pow2(k)
    if threshold:
        t = ns * key_bits * p.weight("bisect") + 2 * ns * p.weight("scan") + (key_bits + 3) * p.weight("sync")
        if sorted_:
            stages = _log2(kp) * (_log2(kp) + 1) / 2
            t += kp * stages * p.weight("network") + stages * p.weight("sync")
        return t
    # bitonic top-k: sort runs of kp, then halve ns/kp times, re-merging log2(kp) stages each time
    stages = _log2(kp) * (_log2(kp) + 1) / 2 + _log2(ns / kp) * (_log2(kp) + 1)
    return ns * stages * p.weight("network") + stages * p.weight("sync")


def fused_time(rows, n, k, num_buckets, per_bucket_k, elem_bytes, sorted_, threshold, p: DeviceProfile):
    """Fused kernel: one program per row, stage 1 then stage 2 on registers."""
    key_bits = 16 if elem_bytes == 2 else 32
    ns = num_buckets * _next_pow2(per_bucket_k)
    per_row = (
        n * elem_bytes * (p.processors / p.bandwidth + p.weight("byte"))
        + n * p.weight("element")
        + n * per_bucket_k * p.weight("slot")
        + _select_work(ns, k, key_bits, sorted_, threshold, p)
    )
    return p.weight("launch") + _waves(rows, p) * per_row


def split_time(rows, n, k, num_buckets, per_bucket_k, segments, elem_bytes, sorted_, threshold, p: DeviceProfile):
    """Stage 1 over ``segments`` programs per row, survivors to memory, then stage 2 per row."""
    key_bits = 16 if elem_bytes == 2 else 32
    ns = num_buckets * _next_pow2(per_bucket_k)
    seg_n = n / segments
    stage1 = (
        seg_n * elem_bytes * (p.processors / p.bandwidth + p.weight("byte"))
        + seg_n * p.weight("element")
        + seg_n * per_bucket_k * p.weight("slot")
        + (ns / segments) * 8 * p.processors / p.bandwidth
    )
    stage2 = ns * 8 * p.processors / p.bandwidth + _select_work(ns, k, key_bits, sorted_, threshold, p)
    return 2 * p.weight("launch") + _waves(rows * segments, p) * stage1 + _waves(rows, p) * stage2


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
