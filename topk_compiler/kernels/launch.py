"""Repeated launches of one kernel that skip Triton's argument binding after the first.

``JITFunction.run`` binds and specializes every argument and looks the compiled kernel up on
every launch. On an H200's host a launch of the fused top-k kernel (27 arguments) took 33 us that
way (benchmarks/results/profile_stages_h200_host_direct.json), longer than many of its kernels;
Meta's measurement of the same path is 12.5 us against 3.4 us for a call of the compiled kernel
(facebookexperimental/triton#1231). Triton's maintainers suggest caching the compiled kernel where
its specialization cannot change (triton-lang/triton#6064), which is what ``Launch`` does.

A ``Launch`` fixes a kernel's grid, its scalar and constexpr arguments and its launch options, so
only the tensors vary. Triton specializes a tensor argument on its dtype and on whether its
address is 16-byte aligned; each combination of those is compiled once, by a launch through the
JIT, and called directly afterwards. Where the JIT gives no compiled kernel back (the
interpreter, or a caller that intercepts launches, as ``benchmarks/compile_check`` does), every
launch goes through the JIT.
"""

from __future__ import annotations

# Keyword arguments of a launch that are compile options, not kernel parameters; one given as
# None is left to the compiler (e.g. ``maxnreg=None``: as many registers as it likes).
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "launch_pdl", "maxnreg")


class Launch:
    """Launches of ``kernel`` on ``grid`` with ``arguments``: every kernel parameter after its
    leading tensor ones, by name, and compile options (``LAUNCH_OPTIONS``). Call it with the
    leading tensors, in order."""

    def __init__(self, kernel, grid: tuple[int, ...], **arguments):
        arguments = {name: value for name, value in arguments.items() if value is not None or name not in LAUNCH_OPTIONS}
        names = list(kernel.arg_names)
        fixed = [name for name in names if name in arguments]
        unknown = set(arguments) - set(names) - set(LAUNCH_OPTIONS)
        assert not unknown, f"{kernel.__name__}: no parameters {sorted(unknown)}"
        self.tensor_count = len(names) - len(fixed)
        assert names[self.tensor_count:] == fixed, (
            f"{kernel.__name__}: give every parameter after the leading tensors {names[:self.tensor_count]}")
        self.kernel, self.grid, self.arguments = kernel, grid, arguments
        self._after_tensors = tuple(arguments[name] for name in fixed)
        # (dtype, 16-byte aligned) of each tensor -> the compiled kernel's launcher on ``grid``.
        self._compiled: dict[tuple, object] = {}

    def __call__(self, *tensors) -> None:
        assert len(tensors) == self.tensor_count, f"expected {self.tensor_count} tensors, got {len(tensors)}"
        specialization = tuple((t.dtype, t.data_ptr() & 15 == 0) for t in tensors)
        run = self._compiled.get(specialization)
        if run is not None:
            run(*tensors, *self._after_tensors)
            return
        compiled = self.kernel[self.grid](*tensors, **self.arguments)
        if compiled is not None and hasattr(compiled, "packed_metadata"):
            self._compiled[specialization] = compiled[(*self.grid, 1, 1)[:3]]  # it reads three sizes
