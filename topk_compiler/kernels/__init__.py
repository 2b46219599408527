"""Triton kernels. Only ``topk_compiler.lowering`` imports the kernel modules, lazily, so the
package imports and runs (on its plain-torch paths) where Triton is missing.

The launchers size their grids and constexprs with ``cdiv`` and ``next_pow2`` below (the planner
too, which imports this package, not the kernel modules) rather than ``triton.cdiv`` /
``triton.next_power_of_2``: those are ConstexprFunction wrappers costing 1.6-2.3 us a call on
the host, and a launch made five to eight such calls (cProfile of ``fused_bucketed_topk`` with
its launch intercepted).
"""

import functools
import importlib.util
import os

# CUDA's limit on a grid's second and third dimensions (the first takes 2**31 - 1). A launcher
# that puts blocks of a row, or of rows, there checks it; the planners offer no plan past it.
MAX_GRID_YZ = 65535


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1)."""
    return 1 << max(0, (x - 1).bit_length())


def smallest_bucket(n: int, num_buckets: int, layout_id: int) -> int:
    """Elements in the smallest bucket of a row of n (``lowering/layouts.py``; layout 2 is
    contiguous: runs of ceil(n / num_buckets), the last short or empty)."""
    if layout_id == 2:
        return max(0, n - (num_buckets - 1) * cdiv(n, num_buckets))
    return n // num_buckets


@functools.cache
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    import torch

    return torch.cuda.get_device_capability(index)


def chains_launches(t) -> bool:
    """Whether kernels on ``t``'s device may launch as programmatic dependents of the kernel
    before them (Hopper and later; not the interpreter): they start, and load what does not
    depend on it, while it finishes, and wait for its writes at ``gdc_wait``.
    ``TOPK_COMPILER_CHAIN_LAUNCHES=0`` turns this off (each launch then waits for the last)."""
    if not t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if os.environ.get("TOPK_COMPILER_CHAIN_LAUNCHES", "1") == "0":
        return False
    return _capability(t.device.index if t.device.index is not None else 0)[0] >= 9
