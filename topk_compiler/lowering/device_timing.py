"""GPU time of a call, measured at a shape's first call to choose between ways of computing it.

The ops time their candidate plans once per shape (``bucketed_topk.tuned_plan``, and dense
against HiRE in ``hire_logits`` / ``hire_ffn``) and keep the fastest. What is timed is the
device's work: the call is captured in a CUDA graph and its replays are timed between two
events. Timing eager calls instead measures the host's dispatch wherever the kernels are shorter
than it (a few rows, a decode step: H200 runs of benchmarks/bench_topk.py, 2026-12-01, timed
torch.topk at 75 us eager and our plans at 218 us eager but 14 us replayed for 1 x 16384), and
picked plans that lose under CUDA graphs, where such shapes run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Replays timed per plan, after one call that compiles and one that is captured.
REPLAYS = 10


def _replayed_us(fn: Callable[[], object], replays: int) -> float:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads may use the GPU meanwhile
        fn()
    graph.replay()  # the first replay uploads the graph
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / replays


def _eager_us(fn: Callable[[], object], replays: int) -> float:
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def gpu_time_us(fn: Callable[[], object], replays: int = REPLAYS) -> float:
    """Microseconds of device time per call of ``fn`` (its first call, which compiles, untimed).

    A call that cannot be captured (it synchronises with the host) is timed eagerly instead.
    """
    fn()
    torch.cuda.synchronize()
    try:
        return _replayed_us(fn, replays)
    except RuntimeError:
        torch.cuda.synchronize()
        return _eager_us(fn, replays)


def can_time() -> bool:
    """Nothing can be timed while a CUDA graph is being captured (the ops then keep the cost
    model's choice)."""
    return not torch.cuda.is_current_stream_capturing()


# (op, shapes, dtype, parameters) -> (dense us, HiRE us) measured at its first call.
_DENSE_VS_HIRE: dict[tuple, tuple[float, float]] = {}


def dense_wins(key: tuple, model_prefers_dense: bool, dense: Callable[[], object], hire: Callable[[], object],
               min_speedup: float) -> bool:
    """Whether a HiRE op runs its dense form: on the GPU by the times of both forms at ``key``'s
    first call (HiRE must be ``min_speedup`` faster), else by the cost model's verdict."""
    if key not in _DENSE_VS_HIRE:
        if not can_time():
            return model_prefers_dense
        _DENSE_VS_HIRE[key] = (gpu_time_us(dense), gpu_time_us(hire))
    dense_us, hire_us = _DENSE_VS_HIRE[key]
    return hire_us * min_speedup > dense_us


def measured_dense_vs_hire(key: tuple) -> tuple[float, float] | None:
    """(dense us, HiRE us) that ``dense_wins`` measured for ``key``, if it has."""
    return _DENSE_VS_HIRE.get(key)
