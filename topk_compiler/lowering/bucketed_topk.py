"""``torch.ops.topk_compiler.bucketed_topk``: top-k that may approximate, within a recall target.

The op picks its plan (``lowering/plan.py``) from the concrete sizes on every call, so one graph
compiled with dynamic shapes serves every length with the right algorithm. On the GPU the cost
model only shortlists: the first call of a shape times the shortlisted plans on its input and keeps
the fastest (``tuned_plan``), so a prediction the model gets wrong costs one first call, never a
slower model; a latency-bound shape keeps one plan for calls outside a CUDA graph and one for calls
captured in one (``device_timing``). Later calls, and calls under capture, only look the plan up.

Implementations: Triton kernels on CUDA for fp32/fp16/bf16; plain torch ops elsewhere
(``bucketed_reference.py``, or torch.topk itself when exact is chosen or the dtype is not a
float). Outputs are contiguous, with torch.topk's shapes and dtypes; the values' gradient flows
to the selected positions, as torch.topk's does.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch.utils import _python_dispatch

from topk_compiler.config import check_layout, check_recall_target
from topk_compiler.lowering import cost_model, device_timing
from topk_compiler.lowering.bucketed_reference import bucketed_topk_torch
from topk_compiler.lowering.layouts import LAYOUT_IDS, MAX_SEED
from topk_compiler.lowering.plan import MIN_SPEEDUP, TopkPlan, filter_step, plan_topk, races_torch, shortlist
from topk_compiler.lowering.recall_model import survivors

# Loads in flight per lane in stage 1, chosen by the sweep of benchmarks/calibrate_cost_model.py
# on the H100 (benchmarks/results/calibration_h100.json).
UNROLL = 4


def check_arguments(recall_target, num_buckets, per_bucket_k, layout, seed) -> None:
    """Raises ValueError naming the argument for a bad one."""
    check_recall_target(recall_target)
    check_layout(layout)
    for name, value in (("num_buckets", num_buckets), ("per_bucket_k", per_bucket_k)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if (num_buckets is None) != (per_bucket_k is None):
        raise ValueError("give num_buckets and per_bucket_k together, or neither")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an int in [0, {MAX_SEED}], got {seed!r}")


def plan_for(x: torch.Tensor, k: int, dim: int, sorted: bool, recall_target: float, num_buckets: int,
             per_bucket_k: int, layout: str, rewrite: str, min_elements: int) -> TopkPlan:
    """The plan the op runs for this input (0 for num_buckets/per_bucket_k: solver's choice)."""
    n = x.shape[dim]
    if n < min_elements:
        return TopkPlan("exact", "torch", reason=f"reduced length {n} < min_elements ({min_elements})")
    rows = math.prod(x.shape) // n if n else 0
    return plan_topk(rows, n, k, x.dtype, str(x.device), recall_target, layout, sorted,
                     num_buckets or None, per_bucket_k or None, rewrite)


def _races_torch(x: torch.Tensor, k: int, sorted: bool, recall_target: float, num_buckets: int, per_bucket_k: int,
                 layout: str, min_elements: int) -> bool:
    """Whether a call planned as torch.topk along its contiguous last dim on a GPU times our
    kernels against it first (``plan.races_torch``); its [rows, n] view costs no copy."""
    n = x.shape[-1]
    if not x.is_cuda or n < min_elements or not x.is_contiguous():
        return False
    return races_torch(x.numel() // n if n else 0, n, k, x.dtype, str(x.device), recall_target, layout, sorted,
                       num_buckets or None, per_bucket_k or None)


def _run(x2d: torch.Tensor, k: int, largest: bool, sorted: bool, plan: TopkPlan, layout: str, seed: int):
    if plan.kernel == "torch":
        return torch.topk(x2d, k, dim=1, largest=largest, sorted=sorted)
    if plan.kernel == "reference":
        return bucketed_topk_torch(x2d, k, largest=largest, sorted=sorted, num_buckets=plan.num_buckets,
                                   per_bucket_k=plan.per_bucket_k, layout=layout, seed=seed)
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    # Plans are looked up from caches that keep them, so a plan's id names it; the entry keeps
    # its plan too, so that id is never reused for another while the entry lives.
    key = (id(plan), x2d.shape, x2d.stride(0), x2d.dtype, x2d.device, k, largest, sorted, layout, seed)
    entry = _PREPARED.get(key)
    if entry is None or entry[1] is not plan:
        if len(_PREPARED) >= MAX_PREPARED:
            _PREPARED.clear()
        entry = _PREPARED[key] = (_prepare(x2d, k, largest, sorted, plan, layout, seed), plan)
    return entry[0](x2d)


# (plan id, shape, row stride, dtype, device, k, largest, sorted, layout, seed) -> (the plan's
# kernels prepared for such inputs, the plan). Preparing computes every launch argument and fixes
# the launches (``kernels.launch``), so a later call of the shape only allocates and launches:
# host time is most of a small call's cost.
_PREPARED: dict[tuple, tuple] = {}
MAX_PREPARED = 4096


def _prepare(x2d: torch.Tensor, k: int, largest: bool, sorted: bool, plan: TopkPlan, layout: str, seed: int):
    """The function of x2d ([rows, n], unit last stride, this one's shape, dtype and row stride)
    running ``plan``'s Triton kernels; returns (values, indices)."""
    from topk_compiler.kernels import bucketed_topk as bucketed_kernels
    from topk_compiler.kernels import certified_topk as certified_kernels
    from topk_compiler.kernels import filtered_topk as filtered_kernels
    from topk_compiler.kernels import select_topk as select_kernels

    finish = dict(sorted=sorted, select=plan.select, sort_with=plan.sort_with, sort_warps=plan.sort_warps)
    if plan.kernel == "select":
        return select_kernels.prepare_exact_topk(x2d, k, largest=largest, num_warps=plan.num_warps,
                                                 max_registers=plan.max_registers, **finish)
    bucketing = dict(num_buckets=plan.num_buckets, per_bucket_k=plan.per_bucket_k, largest=largest, unroll=UNROLL)
    if plan.kernel == "filtered":
        step = filter_step(x2d.shape[0], k, cost_model.device_profile(str(x2d.device)).processors)
        return filtered_kernels.prepare_filtered_topk(x2d, k, num_warps=plan.num_warps, **bucketing, **finish,
                                                      **({"block": step} if step else {}))
    if plan.kernel == "split_filtered":
        return filtered_kernels.SplitFilteredTopk(x2d, k, segments=plan.segments, num_warps=plan.num_warps,
                                                  **bucketing, **finish)
    layout_args = dict(layout_id=LAYOUT_IDS[layout], seed=seed)
    if plan.kernel == "certified":
        certified = certified_kernels.prepare_certified_topk(x2d, k, num_warps=plan.num_warps,
                                                             max_registers=plan.max_registers, **bucketing,
                                                             **layout_args, **finish)
        return lambda x2d: certified(x2d)[:2]
    if plan.kernel == "wide":
        from topk_compiler.kernels import wide_bucket_topk as wide_kernels

        return wide_kernels.WideBucketTopk(x2d, k, num_buckets=plan.num_buckets, per_bucket_k=plan.per_bucket_k,
                                           largest=largest, num_warps=plan.num_warps, select=plan.select,
                                           **layout_args)
    if plan.kernel == "shares":
        from topk_compiler.kernels import wide_bucket_topk as wide_kernels

        assert not sorted, "the share kernel's output is unsorted"
        return wide_kernels.WideShareTopk(x2d, k, num_buckets=plan.num_buckets, largest=largest,
                                          num_warps=plan.num_warps,
                                          search="bracket" if plan.select == "bracket" else "digits", **layout_args)
    if plan.kernel == "fused":
        return bucketed_kernels.prepare_fused_bucketed_topk(x2d, k, num_warps=plan.num_warps,
                                                            max_registers=plan.max_registers, **bucketing,
                                                            **layout_args, **finish)
    assert plan.kernel == "split", f"unknown kernel {plan.kernel!r}"
    return bucketed_kernels.prepare_split_bucketed_topk(x2d, k, segments=plan.segments, **bucketing, **layout_args,
                                                        **finish)


# Inputs below this many elements are latency-bound: their plans are timed as back-to-back
# replays of a CUDA graph (``device_timing``) and eagerly, larger ones as replays with L2 evicted
# before each (eagerly their device work outlasts the dispatch: the same plan wins).
LATENCY_BOUND_ELEMENTS = 2**20


@dataclass(frozen=True)
class MeasuredPlans:
    """The plans measured fastest for one shape: for calls made outside a CUDA graph, and for
    calls captured in one."""

    eager: TopkPlan
    graph: TopkPlan


# (device, rows, n, k, dtype, largest, sorted, recall target, layout, num_buckets, per_bucket_k,
# rewrite) -> the plans measured fastest.
_TUNED: dict[tuple, MeasuredPlans] = {}
# (device, rows, n, k, dtype, largest, sorted, layout, seed, how it was timed, plan) -> us (None:
# it failed to run). A plan is timed once per shape: shortlists for other recall targets share
# their exact plans and often a bucketing, and timed again their noise could pick differently
# (1 x 1024 fp32 k=16 ran torch.topk at recall 0.9 and 0.99 but our exact kernel at 0.95,
# benchmarks/results/bench_topk.md of 2026-12-02).
_PLAN_TIMES: dict[tuple, float | None] = {}


def pick_measured(approx: list[TopkPlan], exact: list[TopkPlan], time_us, *, exact_only: bool,
                  approx_only: bool) -> TopkPlan:
    """The fastest of the plans by ``time_us(plan)`` (None: the plan failed to run); an approximate
    one must beat the fastest exact one by MIN_SPEEDUP unless ``approx_only`` (moot where no
    approximate plan meets the target: exact ones race then)."""
    approx_only = approx_only and bool(approx)

    def fastest(plans):
        timed = [(t, p) for p in plans if (t := time_us(p)) is not None]
        return min(timed, key=lambda tp: tp[0], default=(None, None))

    t_exact, best_exact = fastest(exact) if not approx_only else (None, None)
    t_approx, best_approx = fastest(approx) if not exact_only else (None, None)
    if best_approx is None and best_exact is None:
        fallback = (approx if approx_only else exact)[0]
        return _with_reason(fallback, "no shortlisted plan could be timed: the cost model's choice")
    if best_approx is None:
        return _with_reason(best_exact, f"measured fastest at the first call ({t_exact:.1f} us)")
    if best_exact is None:
        return _with_reason(best_approx, f"measured fastest approximate plan at the first call ({t_approx:.1f} us)")
    if t_approx * MIN_SPEEDUP <= t_exact:
        return _with_reason(best_approx, f"measured {t_exact / t_approx:.1f}x faster than exact at the first call "
                                         f"({t_approx:.1f} us vs {t_exact:.1f} us)")
    return _with_reason(best_exact, f"exact measured faster at the first call ({t_exact:.1f} us vs bucketed "
                                    f"{t_approx:.1f} us)")


def _with_reason(plan: TopkPlan, reason: str) -> TopkPlan:
    return TopkPlan(**{**plan.__dict__, "reason": reason})


def tuned_plan(x2d: torch.Tensor, k: int, largest: bool, sorted: bool, model_plan: TopkPlan, recall_target: float,
               num_buckets: int, per_bucket_k: int, layout: str, seed: int, rewrite: str) -> TopkPlan:
    """The plan measured fastest for this shape on its device, timed at its first call (cached),
    for calls outside a CUDA graph or captured in one; while a graph is being captured before any
    call was timed, the cost model's ``model_plan``."""
    rows, n = x2d.shape
    key = (str(x2d.device), rows, n, k, x2d.dtype, largest, sorted, recall_target, layout, num_buckets,
           per_bucket_k, rewrite)
    capturing = not device_timing.can_time()
    if key not in _TUNED:
        if capturing:
            return model_plan
        _TUNED[key] = _measure_plans(x2d, k, largest, sorted, recall_target, num_buckets, per_bucket_k, layout, seed,
                                     rewrite)
    return _TUNED[key].graph if capturing else _TUNED[key].eager


def _measure_plans(x2d, k, largest, sorted, recall_target, num_buckets, per_bucket_k, layout, seed,
                   rewrite) -> MeasuredPlans:
    rows, n = x2d.shape
    approx, exact = shortlist(rows, n, k, x2d.dtype, str(x2d.device), recall_target, layout, sorted,
                              num_buckets or None, per_bucket_k or None)
    latency_bound = x2d.numel() < LATENCY_BOUND_ELEMENTS

    def timer(how, measure):
        def time_plan(plan):
            key = (str(x2d.device), rows, n, k, x2d.dtype, largest, sorted, layout, seed, how, plan)
            if key not in _PLAN_TIMES:
                try:
                    _PLAN_TIMES[key] = measure(lambda: _run(x2d, k, largest, sorted, plan, layout, seed))
                except Exception:  # e.g. a launch the device cannot fit: that plan is out of the race
                    _PLAN_TIMES[key] = None
            return _PLAN_TIMES[key]
        return time_plan

    forced = bool(num_buckets)
    exact_only = recall_target >= 1.0 and not forced
    race = dict(exact_only=exact_only, approx_only=(forced or rewrite == "always") and not exact_only)
    graph = pick_measured(list(approx), list(exact),
                          timer("replayed", lambda fn: device_timing.gpu_time_us(fn, cold=not latency_bound)), **race)
    if not latency_bound:
        return MeasuredPlans(eager=graph, graph=graph)
    eager = pick_measured(list(approx), list(exact), timer("eager", device_timing.eager_time_us), **race)
    return MeasuredPlans(eager=eager, graph=graph)


# (shape, dtype, device, k, dim, largest, sorted, recall target, layout, seed, min_elements) ->
# (our op, torch.topk) in us per call outside CUDA graphs.
_EAGER_SITES: dict[tuple, tuple[float, float]] = {}


def eager_site_times_us(shape: tuple[int, ...], dtype: torch.dtype, device: str, k: int, dim: int, largest: bool,
                        sorted: bool, recall_target: float, layout: str, seed: int,
                        min_elements: int) -> tuple[float, float]:
    """(our op, torch.topk): microseconds per call outside CUDA graphs on a random input of this
    shape (``device_timing.eager_time_us``: host clock, calls back to back), measured once. A
    compiled graph that does not replay as CUDA graphs pays each call's dispatch: for a
    latency-bound site it outweighs the kernels, and only a measurement on the host that will
    run the model says which call is shorter (torch.topk's own dispatch grows with the launches
    its algorithm makes)."""
    key = (tuple(shape), dtype, device, k, dim, largest, sorted, recall_target, layout, seed, min_elements)
    if key not in _EAGER_SITES:
        with _real_tensors():
            x = torch.randn(shape, dtype=dtype, device=device)
            op = torch.ops.topk_compiler.bucketed_topk.default
            ours = device_timing.eager_time_us(
                lambda: op(x, k, dim, largest, sorted, recall_target, 0, 0, layout, seed, "auto", min_elements))
            exact = device_timing.eager_time_us(lambda: torch.topk(x, k, dim, largest, sorted))
        _EAGER_SITES[key] = (ours, exact)
    return _EAGER_SITES[key]


def _real_tensors():
    """A context where factories make real tensors even inside a compiler's fake-tensor mode."""
    from torch._subclasses import fake_tensor

    unset = getattr(fake_tensor, "unset_fake_temporarily", None)  # torch 2.11-2.13 have it
    return unset() if unset is not None else contextlib.nullcontext()


def lookup_tuned(rows: int, n: int, k: int, dtype: torch.dtype, device: str, largest: bool, sorted: bool,
                 recall_target: float, layout: str = "interleaved", num_buckets: int = 0, per_bucket_k: int = 0,
                 rewrite: str = "auto", captured: bool = False) -> TopkPlan | None:
    """The plan ``tuned_plan`` measured for these arguments, for calls outside a CUDA graph (or
    with ``captured``, in one), if their shape has run on ``device``."""
    plans = _TUNED.get((device, rows, n, k, dtype, largest, sorted, recall_target, layout, num_buckets,
                        per_bucket_k, rewrite))
    if plans is None:
        return None
    return plans.graph if captured else plans.eager


def _bucketed_topk(
    x: torch.Tensor,
    k: int,
    dim: int,
    largest: bool,
    sorted: bool,
    recall_target: float,
    num_buckets: int,
    per_bucket_k: int,
    layout: str,
    seed: int,
    rewrite: str,
    min_elements: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``x`` along ``dim`` with expected recall >= ``recall_target`` (1.0: exact).

    ``num_buckets``/``per_bucket_k`` = 0 let the solver choose them per call; ``rewrite`` is
    "auto" (approximate only where predicted faster) or "always"; rows shorter than
    ``min_elements`` stay exact.
    """
    if x.is_cuda and x.get_device() != torch.cuda.current_device():
        # Triton launches, and the first call's timings run, on the current device: a tensor on
        # another needs it made current (torch's own ops do this through their device guards).
        with torch.cuda.device(x.device):
            return _bucketed_topk(x, k, dim, largest, sorted, recall_target, num_buckets, per_bucket_k, layout,
                                  seed, rewrite, min_elements)
    if x.dim() == 0:
        # torch.topk of a 0-d tensor returns the tensor for k in {0, 1} on CPU; on CUDA its k=0
        # result is uninitialised memory. Both devices get the CPU answer.
        if k not in (0, 1) or dim not in (0, -1):
            return torch.topk(x, k, dim, largest, sorted)  # raises torch's own error
        return x.clone(), torch.zeros((), dtype=torch.int64, device=x.device)
    if not x.dtype.is_floating_point:
        return torch.topk(x, k, dim, largest, sorted)
    n = x.size(dim)
    if not 0 <= k <= n:
        raise RuntimeError(f"selected index k out of range (k={k}, size {n} along dim {dim})")
    dim = dim % x.dim()
    if num_buckets and 0 < k < n and survivors(n, num_buckets, per_bucket_k, layout) < k:
        raise ValueError(
            f"num_buckets={num_buckets}, per_bucket_k={per_bucket_k} keep only "
            f"{survivors(n, num_buckets, per_bucket_k, layout)} elements of {n}, fewer than k={k}"
        )
    plan = plan_for(x, k, dim, sorted, recall_target, num_buckets, per_bucket_k, layout, rewrite, min_elements)
    last = dim == x.dim() - 1
    if plan.kernel == "torch" and not (last and _races_torch(x, k, sorted, recall_target, num_buckets, per_bucket_k,
                                                             layout, min_elements)):
        values, indices = torch.topk(x, k, dim, largest, sorted)
        return values.contiguous(), indices.contiguous()
    # Every tensor call costs a dispatch: the usual [rows, n] along its last dim takes none here.
    moved = x if last else x.movedim(dim, -1)
    x2d = moved if moved.dim() == 2 else moved.reshape(-1, n)
    if x2d.is_cuda:
        plan = tuned_plan(x2d, k, largest, sorted, plan, recall_target, num_buckets, per_bucket_k, layout, seed,
                          rewrite)
    values, indices = _run(x2d, k, largest, sorted, plan, layout, seed)  # fresh, contiguous [rows, k]
    if moved.dim() != 2:
        out_shape = (*moved.shape[:-1], k)
        values, indices = values.view(out_shape), indices.view(out_shape)
    if last:
        return values, indices
    return values.movedim(-1, dim).contiguous(), indices.movedim(-1, dim).contiguous()


# The op is registered on the dispatcher directly rather than through torch.library.custom_op,
# whose Python layers (an autograd wrapper that re-enters the dispatcher, output alias checks, a
# Dynamo guard) cost more host time than many of the op's kernels: 26 us a call on an H200's host
# (benchmarks/results/profile_stages_h200_host_direct.json). Registered this way a call through
# the dispatcher took 46.8 us against 31.9 for the body alone (profile_stages_h200_host_98d5fb4.json).
# A call that needs no gradient runs the body from the autograd kernel, a call that does goes
# through ``_SelectedValues``.
_LIBRARY = torch.library.Library("topk_compiler", "FRAGMENT")
_LIBRARY.define(
    "bucketed_topk(Tensor x, SymInt k, SymInt dim, bool largest, bool sorted, float recall_target, "
    "SymInt num_buckets, SymInt per_bucket_k, str layout, SymInt seed, str rewrite, SymInt min_elements) "
    "-> (Tensor, Tensor)"
)
_LIBRARY.impl("bucketed_topk", _bucketed_topk, "CompositeExplicitAutograd")
bucketed_topk = torch.ops.topk_compiler.bucketed_topk.default


@torch.library.register_fake("topk_compiler::bucketed_topk", lib=_LIBRARY)
def _(x, k, dim, largest, sorted, recall_target, num_buckets, per_bucket_k, layout, seed, rewrite, min_elements):
    if x.dim() == 0:
        return torch.empty_like(x), torch.empty((), dtype=torch.int64, device=x.device)
    shape = list(x.shape)
    shape[dim] = k
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)


class _SelectedValues(torch.autograd.Function):
    """The op under autograd: the values' gradient flows to the selected positions, as
    torch.topk's does; the indices have none."""

    @staticmethod
    def forward(ctx, x, *arguments):
        with torch._C._AutoDispatchBelowAutograd():
            values, indices = bucketed_topk(x, *arguments)
        ctx.save_for_backward(indices)
        ctx.mark_non_differentiable(indices)
        ctx.dim, ctx.x_shape = arguments[1], x.shape
        return values, indices

    @staticmethod
    def backward(ctx, grad_values, grad_indices):
        (indices,) = ctx.saved_tensors
        grad_x = torch.ops.aten.value_selecting_reduction_backward(grad_values, ctx.dim, indices, ctx.x_shape, True)
        return (grad_x,) + (None,) * 11


def _autograd_kernel(x, *arguments):
    if torch.is_grad_enabled() and x.requires_grad:
        return _SelectedValues.apply(x, *arguments)
    if _plain_eager_call(x):  # nothing below autograd to dispatch to but the body
        return _bucketed_topk(x, *arguments)
    with torch._C._AutoDispatchBelowAutograd():
        return bucketed_topk(x, *arguments)


_LIBRARY.impl("bucketed_topk", _autograd_kernel, "Autograd")


def approx_topk(
    x: torch.Tensor,
    k: int,
    dim: int = -1,
    largest: bool = True,
    sorted: bool = True,
    *,
    recall_target: float = 0.95,
    num_buckets: int | None = None,
    per_bucket_k: int | None = None,
    layout: str = "interleaved",
    seed: int = 0,
) -> torch.return_types.topk:
    """torch.topk that may return an approximate top-k whose expected recall meets ``recall_target``.

    Returns ``(values, indices)`` like torch.topk (int64 indices; ``values == x.gather(dim,
    indices)``). ``recall_target=1.0`` is exact. By default the bucketing is chosen by the cost
    model and exact top-k is used wherever it is predicted faster; ``num_buckets`` and
    ``per_bucket_k`` fix the bucketing instead. ``layout`` (see ``TopkPassConfig``) decides which
    elements share a bucket; "shuffled" keeps the recall guarantee for inputs in any order.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"approx_topk: x must be a Tensor, got {type(x).__name__}")
    check_arguments(recall_target, num_buckets, per_bucket_k, layout, seed)
    args = (x, k, dim, largest, sorted, float(recall_target), num_buckets or 0, per_bucket_k or 0, layout, seed,
            "auto", 0)
    values, indices = _bucketed_topk(*args) if _plain_eager_call(x) else torch.ops.topk_compiler.bucketed_topk(*args)
    return torch.return_types.topk((values, indices))


def _plain_eager_call(x: torch.Tensor) -> bool:
    """Whether a call can skip the op's dispatch: it needs no gradient, nothing traces or
    intercepts it (no torch.compile, vmap, dispatch or function mode), and ``x`` is a plain tensor
    on a real device. ``approx_topk`` then calls the body itself, and the op's autograd kernel
    runs it without dispatching further. (Through custom_op the dispatch took 26 of the 67.7 us
    of host time per eager call on an H200's host, benchmarks/results/profile_stages_h200_host_direct.json.)"""
    if _is_wrapped is None or _function_mode_on is None:  # a torch without these internals: always dispatch
        return False
    return (type(x) is torch.Tensor and x.device.type in ("cpu", "cuda")
            and not (x.requires_grad and torch.is_grad_enabled()) and not torch.compiler.is_compiling()
            and not _is_wrapped(x) and not _function_mode_on()
            and _python_dispatch._get_current_dispatch_mode() is None)


# Internals (present in torch 2.11 and 2.13), looked up once.
_is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
_function_mode_on = getattr(torch._C, "_is_torch_function_mode_enabled", None)
