"""GPU time of a call, measured at a shape's first call to choose between ways of computing it.

The ops time their candidate plans once per shape (``bucketed_topk.tuned_plan``, and dense
against HiRE in ``hire_logits`` / ``hire_ffn``) and keep the fastest. Two ways to time, for two
regimes (H200 runs of benchmarks/bench_topk.py, 2026-12-01, results in benchmarks/results/):

* Latency-bound calls (a few rows, a decode step) are captured in a CUDA graph and its replays
  are timed: timed eagerly, the host's dispatch hides the device's work (1 x 16384 fp32, k=16:
  torch.topk 75 us eager and our plans 218 us eager, but 14 us replayed), and such calls run
  under CUDA graphs in practice. Timed this way our plans won at every latency-bound shape.
* Larger calls are replayed too, each replay after a write of twice the L2 (60 MB on an H200)
  that evicts the input, as ``triton.testing.do_bench`` does. Replaying one graph over the same
  buffers without it kept part of them in L2, which favoured plans that are slower once memory
  is cold (256 x 128256 fp32, k=50: 180 us instead of 86 us under do_bench). Timed eagerly
  instead, a call whose device work is shorter than its dispatch (about 60-80 us for our op) is
  measured as its dispatch, and every plan ties: on an H200 that kept 256 x 128256 fp32 k=50 at
  82 us eagerly where its kernel takes 54 us (benchmarks/results/profile_stages_h200.json).

A choice timed as replays holds for calls captured in a CUDA graph. A latency-bound call made
outside one pays the host's dispatch as well, which can reverse the choice (1 x 1024 fp32 k=16:
our plan 6.3 us replayed and 39 us eagerly, torch.topk 18 us and 18.6 us), so those shapes are
also timed eagerly (``eager_time_us``) and calls outside a graph follow that choice.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

# Replays timed per plan, after one call that compiles and one that is captured.
REPLAYS = 10
# Batches of REPLAYS back-to-back eager calls; the shortest batch counts. The host can stall a
# batch (another process, an interrupt) but never hurry one: on an H200 machine's host a run of
# benchmarks/bench_topk.py timed one plan at 64x131072 eagerly at 56-75 us (20th-80th
# percentile) where its replays took 42.7 us and a run before timed it at 41.9 us eagerly, and
# a first call timed in such a stretch chose the slower of two plans at 16x14336
# (benchmarks/results/bench_topk.md of 2026-12-02).
EAGER_BATCHES = 5


# Bytes written before each replay of a cold timing, per L2 byte (do_bench writes 256 MB). The
# buffer lives only while a shape's plans are timed (the caching allocator keeps it for reuse).
_FLUSH_PER_L2_BYTE = 2


def _flush_buffer() -> torch.Tensor:
    index = torch.cuda.current_device()
    l2 = getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 0) or 64 * 2**20
    return torch.empty(_FLUSH_PER_L2_BYTE * l2, dtype=torch.int8, device=torch.device("cuda", index))


def _replayed_us(fn: Callable[[], object], replays: int, cold: bool) -> float:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # other threads may use the GPU meanwhile
        fn()
    graph.replay()  # the first replay uploads the graph
    if not cold:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / replays
    flush = _flush_buffer()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
    for start, end in events:
        flush.zero_()  # takes longer than the host needs to enqueue the replay: no idle gap is timed
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) * 1e3 for start, end in events)
    return times[len(times) // 2]


def eager_time_us(fn: Callable[[], object], replays: int = REPLAYS, batches: int = EAGER_BATCHES) -> float:
    """Microseconds per call of ``fn`` made from Python outside a CUDA graph (its first call,
    which compiles, untimed): calls back to back, timed on the host's clock up to the end of the
    last one's device work, so a call pays whichever of its dispatch and its device work is
    longer, as in a model that runs eagerly; the shortest of ``batches`` batches of ``replays``.

    Not CUDA events: the driver may hold an event's record back until the next launch, so events
    around a call on an idle device leave its host code out (an H200 timed 2 ms of Python before a
    kernel as 12 us that way).
    """
    fn()
    torch.cuda.synchronize()
    return min(_eager_us(fn, replays) for _ in range(batches))


def _eager_us(fn: Callable[[], object], replays: int) -> float:
    start = time.perf_counter()
    for _ in range(replays):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e6 / replays


def gpu_time_us(fn: Callable[[], object], cold: bool, replays: int = REPLAYS) -> float:
    """Microseconds per call of ``fn`` (its first call, which compiles, untimed), as replays of a
    CUDA graph of it: back to back, or with ``cold`` each after L2 is evicted (the median).

    A call that cannot be captured (it synchronises with the host) is timed eagerly.
    """
    fn()
    torch.cuda.synchronize()
    try:
        return _replayed_us(fn, replays, cold)
    except RuntimeError:
        torch.cuda.synchronize()
    return _eager_us(fn, replays)


def can_time() -> bool:
    """Nothing can be timed while a CUDA graph is being captured (the ops then keep the cost
    model's choice, or the one timed for graphs at an earlier call)."""
    return not torch.cuda.is_current_stream_capturing()


# (op, shapes, dtype, parameters) -> (dense us, HiRE us) as replayed graphs, then called eagerly,
# measured at its first call.
_DENSE_VS_HIRE: dict[tuple, tuple[float, float, float, float]] = {}


def dense_wins(key: tuple, model_prefers_dense: Callable[[], bool], dense: Callable[[], object],
               hire: Callable[[], object], min_speedup: float, measure: bool, captured: bool | None = None) -> bool:
    """Whether a HiRE op runs its dense form: with ``measure`` (its kernels run on the GPU) by the
    times of both forms at ``key``'s first call (HiRE must be ``min_speedup`` faster), else by the
    cost model's verdict (asked only then: most calls find the times). A decode step is latency-bound: a call captured in a CUDA graph follows
    the forms' replayed times, any other call their eager times (the host's dispatch included).
    ``captured``: the choice for calls in a graph (True) or outside one (False) rather than for
    this call (None)."""
    if not measure:
        return model_prefers_dense()
    capturing = not can_time()
    if key not in _DENSE_VS_HIRE:
        if capturing:
            return model_prefers_dense()
        _DENSE_VS_HIRE[key] = (gpu_time_us(dense, cold=False), gpu_time_us(hire, cold=False),
                               eager_time_us(dense), eager_time_us(hire))
    dense_graph, hire_graph, dense_eager, hire_eager = _DENSE_VS_HIRE[key]
    if capturing if captured is None else captured:
        return hire_graph * min_speedup > dense_graph
    return hire_eager * min_speedup > dense_eager
