"""TopkRewritePass: every top-k in the graph -> ``topk_compiler::bucketed_topk`` where it pays.

Matches ``torch.topk``, ``Tensor.topk`` and ``torch.ops.aten.topk`` with any ``dim``, ``largest``,
``sorted``, positional or keyword. A site is rewritten when its recall target is below 1 and the
planner (``lowering/plan.py``) predicts the bucketed op faster than exact on the input's device,
or when the recall target is 1 and our exact Triton selection beats torch.topk. With a dynamic
reduced length the op re-plans on every call, so such sites are rewritten whenever they are
eligible. A latency-bound site of a graph that will not replay as CUDA graphs is also timed at
compile time, our op against torch.topk, each as a call from Python: there each call pays the
host's dispatch, which can outweigh what the kernels save. Everything else stays exact, with
the reason recorded.

A site asked for sorted output whose order nothing downstream can observe
(``output_order.unobserved_order``: a scatter into zeros, a weighted sum of gathered rows) is
planned and run unsorted (``skip_unobserved_sort``). An exact site (recall target 1) is so only
where every path ends bit for bit the same in any order (a scatter, ``amax``), not in a sum:
exact means torch.topk's outputs, up to which of values tied at the k-th it selects.
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from topk_compiler.config import ApproxTopkConfig
from topk_compiler.lowering import device_timing
from topk_compiler.lowering.bucketed_topk import LATENCY_BOUND_ELEMENTS, eager_site_times_us
from topk_compiler.lowering.plan import MIN_SPEEDUP, TIME_WITHIN, plan_topk, races_torch
from topk_compiler.passes.base import (
    ApproxTopkPass,
    RewriteDecision,
    RewriteReport,
    example_value,
    shape_strings,
    size_hint,
    source_location,
)
from topk_compiler.passes.output_order import unobserved_order

_TOPK_PARAMS = ("input", "k", "dim", "largest", "sorted")
_DEFAULTS = {"dim": -1, "largest": True, "sorted": True}


def topk_call(node: torch.fx.Node) -> tuple[str, dict] | None:
    """(op name, bound arguments) if ``node`` is a top-k call, else None."""
    if node.op == "call_function" and node.target is torch.topk:
        name = "torch.topk"
    elif node.op == "call_method" and node.target == "topk":
        name = "Tensor.topk"
    elif node.op == "call_function" and node.target in (torch.ops.aten.topk.default, torch.ops.aten.topk):
        name = "aten.topk"
    else:
        return None
    bound = dict(_DEFAULTS)
    bound.update(zip(_TOPK_PARAMS, node.args))
    for key, value in node.kwargs.items():
        bound["input" if key == "self" else key] = value
    return name, bound


class TopkRewritePass(ApproxTopkPass):
    """aten/torch top-k -> topk_compiler.bucketed_topk wherever the cost model says it pays."""

    name = "topk_rewrite"

    def __init__(self, config: ApproxTopkConfig, report: RewriteReport):
        super().__init__(report)
        self.recall_target = config.recall_target
        self.config = config.topk
        self.overrides = config
        self.replays_cuda_graphs = config.replays_cuda_graphs()

    def apply(self, gm: torch.fx.GraphModule, example_inputs: list) -> int:
        rewritten = 0
        for node in list(gm.graph.nodes):
            call = topk_call(node)
            if call is not None:
                rewritten += self._visit(gm.graph, node, *call)
        return rewritten

    def _visit(self, graph: torch.fx.Graph, node: torch.fx.Node, op: str, bound: dict) -> int:
        location, code = source_location(node)
        override_key, override = self.overrides.override_for(location)
        recall_target = override.recall_target if override.recall_target is not None else self.recall_target
        layout = override.layout or self.config.layout
        num_buckets = override.num_buckets if override.num_buckets is not None else self.config.num_buckets
        per_bucket_k = override.per_bucket_k if override.per_bucket_k is not None else self.config.per_bucket_k
        min_elements = override.min_elements if override.min_elements is not None else self.config.min_elements

        x = example_value(bound["input"])
        k = bound["k"]
        dim, largest, sorted_ = bound["dim"], bound["largest"], bound["sorted"]
        info = dict(pass_name=self.name, node=node.name, location=location, code=code, op=op,
                    recall_target=recall_target, override=override_key)

        def keep(reason: str, **extra) -> int:
            shape = shape_strings(x) if isinstance(x, torch.Tensor) else ()
            self.record(RewriteDecision(**info, shape=shape, dtype=str(getattr(x, "dtype", "?")),
                                        device=str(getattr(x, "device", "?")), k=str(example_value(k)),
                                        dim=dim if isinstance(dim, int) else None, rewritten=False,
                                        reason=reason, **extra))
            return 0

        if not isinstance(x, torch.Tensor):
            return keep("input is not a tensor")
        if not all(isinstance(v, bool) for v in (largest, sorted_)) or not isinstance(dim, int):
            return keep("dim, largest or sorted is not a constant")
        if set(bound) - set(_TOPK_PARAMS):
            return keep(f"unsupported argument(s) {sorted(set(bound) - set(_TOPK_PARAMS))}")
        if any(user.target is not operator.getitem for user in node.users):
            return keep("the result is used as a whole, not as (values, indices)")
        if not x.dtype.is_floating_point:
            return keep(f"{x.dtype} input: exact top-k")
        if x.dim() == 0:
            return keep("0-d input")
        k_value = example_value(k)
        if isinstance(k, torch.fx.Node) and not isinstance(k_value, (int, torch.SymInt)):
            return keep("k is not an int")
        n = x.shape[dim]
        rows = 1
        for i, size in enumerate(x.shape):
            if i != dim % x.dim():
                rows = rows * size
        dynamic_length = isinstance(n, torch.SymInt) or isinstance(k_value, torch.SymInt)
        n_hint, k_hint, rows_hint = size_hint(n), size_hint(k_value), size_hint(rows)
        if not dynamic_length and n_hint < min_elements:
            return keep(f"reduced length {n_hint} < min_elements ({min_elements})")
        if not dynamic_length and (k_hint == 0 or k_hint >= n_hint):
            return keep("nothing to approximate (k = 0 or k = n)")

        order = None
        if sorted_ and self.config.skip_unobserved_sort:
            order = unobserved_order(node, dim)
            if order is not None and recall_target >= 1.0 and not order.exact:
                order = None
        if order is not None:
            sorted_ = False
            info["details"] = {"sorted": f"no (its order is not observed: it ends in {order})"}
        plan = plan_topk(rows_hint, n_hint, k_hint, x.dtype, str(x.device), recall_target, layout, sorted_,
                         num_buckets, per_bucket_k, self.config.rewrite)
        estimates = dict(expected_recall=plan.expected_recall, predicted_us=plan.predicted_us,
                         exact_us=plan.torch_topk_us)
        # A site planned as torch.topk whose shortlist prices one of our kernels close to it is
        # rewritten all the same: the op times both at its first call and may run torch.topk.
        races = (plan.kernel == "torch" and not dynamic_length and dim % x.dim() == x.dim() - 1
                 and x.is_contiguous() and races_torch(rows_hint, n_hint, k_hint, x.dtype, str(x.device),
                                                       recall_target, layout, sorted_, num_buckets, per_bucket_k))
        if plan.kernel == "torch" and not (dynamic_length and recall_target < 1.0) and not races:
            if order is not None:
                node.args, node.kwargs = (bound["input"], k), dict(dim=dim, largest=largest, sorted=False)
            return keep(plan.reason, **estimates)
        measured = ""
        if (not (dynamic_length or self.replays_cuda_graphs or num_buckets) and self.config.rewrite == "auto"
                and rows_hint * n_hint < LATENCY_BOUND_ELEMENTS and _timed_at_compile_time(x)):
            ours_us, torch_us = eager_site_times_us(
                tuple(size_hint(s) for s in x.shape), x.dtype, str(x.device), k_hint, dim, largest, sorted_,
                recall_target, layout, self.config.seed, min_elements)
            measured = (f"outside CUDA graphs each call pays the host's dispatch: measured at compile time, our op "
                        f"{ours_us:.1f} us a call against torch.topk's {torch_us:.1f}")
            if ours_us * (MIN_SPEEDUP if plan.algorithm == "bucketed" else 1.0) > torch_us:
                return keep(f"{measured}; mode='reduce-overhead' replays CUDA graphs and rewrites it", **estimates)

        with graph.inserting_before(node):
            new = graph.call_function(
                torch.ops.topk_compiler.bucketed_topk.default,
                (bound["input"], k, dim, largest, sorted_, recall_target, num_buckets or 0, per_bucket_k or 0,
                 layout, self.config.seed, self.config.rewrite, min_elements),
            )
        new.meta.update({key: node.meta[key] for key in ("stack_trace", "nn_module_stack", "source_fn_stack")
                         if key in node.meta})
        if "example_value" in node.meta:
            new.meta["example_value"] = tuple(node.meta["example_value"])
        node.replace_all_uses_with(new)
        graph.erase_node(node)

        reason = plan.reason
        if races:
            reason = (f"{reason}, but our kernels priced within {TIME_WITHIN}x of torch.topk are timed against it at "
                      f"the first call on the device")
        if measured:
            reason = f"{reason}; {measured}"
        if dynamic_length:
            reason = f"dynamic length: planned per call (at the example size: {plan.kernel}, {plan.reason})"
        self.record(RewriteDecision(
            **info, shape=shape_strings(x), dtype=str(x.dtype), device=str(x.device), k=str(k_value), dim=dim,
            rewritten=True, reason=reason, algorithm=f"{plan.algorithm}/{plan.kernel}",
            num_buckets=plan.num_buckets or None, per_bucket_k=plan.per_bucket_k or None, **estimates,
        ))
        return 1


def _timed_at_compile_time(x) -> bool:
    """Whether a site's calls can be timed on its device now: a GPU, and no CUDA graph being
    captured."""
    return x.is_cuda and device_timing.can_time()
