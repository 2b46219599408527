"""Triton kernels. Only ``topk_compiler.lowering`` imports the kernel modules, lazily, so the
package imports and runs (on its plain-torch paths) where Triton is missing."""

import functools
import importlib.util


@functools.cache
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None
