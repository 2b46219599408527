"""HireLogitsPass: ``topk(linear(x, W[, b]))`` -> ``topk_compiler::hire_logits_topk`` (HiRE).

Matches a top-k over the last dimension of a linear layer's output (any form ``match_linear``
knows) whose weight is a module parameter, with between them, in this order: an optional cast to
float32 (``.float()``, ``.to(torch.float32)``), any number of multiplications or divisions by
positive constants (temperature), and an optional ``softmax`` / ``log_softmax`` over the last
dimension. All of these keep the order, so the top-k indices are those of the logits. A match is
rewritten when its recall target is below 1, the logits feed nothing else, no gradient is needed,
and the HiRE cost model predicts a gain at the example batch size (the op re-checks each batch
size it sees). Every match is recorded; a declined one is left to the top-k pass.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F

from topk_compiler.config import ApproxTopkConfig
from topk_compiler.lowering import hire_cost_model
from topk_compiler.lowering import hire_logits as _registers_the_op  # noqa: F401
from topk_compiler.lowering.hire_predictor import predictor_for
from topk_compiler.passes.base import (
    ApproxTopkPass,
    RewriteDecision,
    RewriteReport,
    example_value,
    shape_strings,
    size_hint,
    source_location,
)
from topk_compiler.passes.hire_settings import site_settings
from topk_compiler.passes.linear_pattern import (
    LinearMatch,
    erase_if_unused,
    is_parameter,
    match_linear,
    single_use,
    weight_tensor,
)
from topk_compiler.passes.topk_rewrite import topk_call

_SOFTMAX = {torch.softmax: "softmax", F.softmax: "softmax", torch.log_softmax: "log_softmax",
            F.log_softmax: "log_softmax", torch.special.softmax: "softmax", torch.special.log_softmax: "log_softmax"}
_SCALE = {operator.mul: "mul", torch.mul: "mul", operator.truediv: "div", torch.div: "div", torch.true_divide: "div"}
_SCALE_METHODS = {"mul": "mul", "__mul__": "mul", "div": "div", "__truediv__": "div", "true_divide": "div"}


@dataclass(frozen=True)
class ChainStep:
    """One order-keeping step between the linear layer and the top-k.

    args:
        node: the step's node.
        kind: "cast", "scale" or "softmax" / "log_softmax".
        value: the factor of a scale step; the dtype of a cast.
        problem: why this step cannot be rewritten (None if it can).
    """

    node: torch.fx.Node
    kind: str
    value: object = None
    problem: str | None = None


def _last_dim(dim, ndim: int) -> bool:
    return isinstance(dim, int) and dim % ndim == ndim - 1


def chain_step(node: torch.fx.Node) -> tuple[ChainStep, torch.fx.Node] | None:
    """(the step, its input node) if ``node`` is an order-keeping step, else None."""
    if not isinstance(node, torch.fx.Node) or node.op not in ("call_function", "call_method") or not node.args:
        return None
    source = node.args[0]
    value = example_value(node)
    ndim = value.dim() if isinstance(value, torch.Tensor) else 0
    name = _SOFTMAX.get(node.target) if node.op == "call_function" else (
        node.target if node.target in ("softmax", "log_softmax") else None)
    if name is not None:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dtype = node.args[2] if len(node.args) > 2 else node.kwargs.get("dtype")
        if not _last_dim(dim, ndim):
            return ChainStep(node, name, problem=f"{name} over dim {dim}, not the last"), source
        if set(node.kwargs) - {"dim", "dtype", "_stacklevel"} or len(node.args) > 3:
            return ChainStep(node, name, problem=f"{name} with arguments {sorted(node.kwargs)}"), source
        if dtype is not None and dtype != torch.float32:
            return ChainStep(node, name, problem=f"{name}(dtype={dtype})"), source
        return ChainStep(node, name, dtype), source
    op = _SCALE.get(node.target) if node.op == "call_function" else _SCALE_METHODS.get(node.target)
    if op is not None and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        if op == "mul" and not isinstance(a, torch.fx.Node):
            a, b = b, a
        if isinstance(a, torch.fx.Node) and isinstance(b, (int, float)) and not isinstance(b, bool):
            if b <= 0:
                problem = f"scaling by {b} (not a positive constant) changes the order"
                return ChainStep(node, "scale", problem=problem), a
            return ChainStep(node, "scale", float(b) if op == "mul" else 1.0 / float(b)), a
        return None
    if node.op == "call_method" and node.target == "float" and len(node.args) == 1 and not node.kwargs:
        return ChainStep(node, "cast", torch.float32), source
    if node.op == "call_method" and node.target == "to":
        target = node.args[1] if len(node.args) == 2 else node.kwargs.get("dtype")
        if isinstance(target, torch.dtype) and len(node.args) + len(node.kwargs) == 2:
            if target != torch.float32:
                return ChainStep(node, "cast", target, problem=f"cast to {target} (only float32 is supported)"), source
            return ChainStep(node, "cast", target), source
    return None


@dataclass(frozen=True)
class LogitsSite:
    """A matched ``topk(chain(linear(x, W, b)))``."""

    topk: torch.fx.Node
    op: str
    bound: dict
    linear: LinearMatch
    chain: tuple[ChainStep, ...]  # from the linear layer to the top-k


def match_logits_site(node: torch.fx.Node) -> LogitsSite | None:
    """The HiRE logits site whose top-k is ``node``, or None."""
    call = topk_call(node)
    if call is None:
        return None
    op, bound = call
    steps = []
    current = bound.get("input")
    while True:
        step = chain_step(current)
        if step is None:
            break
        steps.append(step[0])
        current = step[1]
    linear = match_linear(current)
    if linear is None:
        return None
    return LogitsSite(node, op, bound, linear, tuple(reversed(steps)))


def chain_transform(chain: tuple[ChainStep, ...],
                    logits_dtype: torch.dtype) -> tuple[float, str, torch.dtype, str | None]:
    """(scale, normalize, out_dtype, problem) the op needs for ``chain``."""
    scale, normalize, out_dtype = 1.0, "none", logits_dtype
    for i, step in enumerate(chain):
        if step.problem:
            return scale, normalize, out_dtype, step.problem
        if step.kind == "cast":
            if i != 0:
                return scale, normalize, out_dtype, "a cast after scaling (only a cast right after the linear layer)"
            out_dtype = step.value
        elif step.kind == "scale":
            if normalize != "none":
                return scale, normalize, out_dtype, f"scaling after {normalize}"
            scale *= step.value
        else:
            if normalize != "none":
                return scale, normalize, out_dtype, f"{step.kind} after {normalize}"
            normalize = step.kind
            if step.value is not None:
                if i != 0 and chain[0].kind != "cast" and out_dtype != step.value:
                    return scale, normalize, out_dtype, f"{step.kind}(dtype=...) after scaling"
                out_dtype = step.value
    return scale, normalize, out_dtype, None


def describe_chain(chain: tuple[ChainStep, ...]) -> str:
    parts = []
    for step in chain:
        parts.append(f"scale {step.value:g}" if step.kind == "scale" and step.value is not None else step.kind)
    return " -> ".join(["linear", *parts, "topk"])


@dataclass(frozen=True)
class LogitsFacts:
    """What the op needs from an eligible logits site.

    args:
        weight, bias: the real parameters (bias may be None).
        k, largest, sorted: the top-k's arguments.
        scale, normalize, out_dtype: the chain, as the op's arguments.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    k: int
    largest: bool
    sorted: bool
    scale: float
    normalize: str
    out_dtype: torch.dtype


def logits_site_facts(gm: torch.fx.GraphModule, site: LogitsSite, example_inputs: list) -> LogitsFacts | str:
    """The facts of ``site`` if its structure can be rewritten, else why not."""
    bound, linear = site.bound, site.linear
    logits = example_value(bound["input"])
    x = example_value(linear.x)
    k, dim, largest, sorted_ = bound["k"], bound["dim"], bound["largest"], bound["sorted"]
    if not isinstance(logits, torch.Tensor) or not isinstance(x, torch.Tensor):
        return "input is not a tensor"
    weight = weight_tensor(gm, linear.weight, example_inputs)
    if not is_parameter(weight):
        return "the weight is not a module parameter (it may change every call: no predictor to build)"
    bias = weight_tensor(gm, linear.bias, example_inputs) if linear.bias is not None else None
    if linear.bias is not None and not is_parameter(bias):
        return "the bias is not a module parameter"
    if not isinstance(k, int) or not isinstance(largest, bool) or not isinstance(sorted_, bool):
        return "k, largest or sorted is not a constant"
    extra = set(bound) - {"input", "k", "dim", "largest", "sorted"}
    if extra:
        return f"unsupported top-k argument(s) {sorted(extra)}"
    if not _last_dim(dim, logits.dim()):
        return f"top-k over dim {dim}, not the logits' last dimension"
    if any(user.target is not operator.getitem for user in site.topk.users):
        return "the result is used as a whole, not as (values, indices)"
    scale, normalize, out_dtype, problem = chain_transform(site.chain, logits.dtype)
    if problem:
        return f"unsupported step between linear and top-k: {problem}"
    if not single_use([linear.output, *linear.intermediates, *(s.node for s in site.chain)]):
        return "the logits are used elsewhere too (HiRE computes only the candidates')"
    if not x.dtype.is_floating_point or x.dtype != weight.dtype:
        return f"x ({x.dtype}) and weight ({weight.dtype}) differ or are not floating"
    return LogitsFacts(weight, bias, k, largest, sorted_, scale, normalize, out_dtype)


class HireLogitsPass(ApproxTopkPass):
    """linear -> (cast, scale, softmax) -> topk  ==>  HiRE predictor + exact logits of k' candidates."""

    name = "hire_logits"

    def __init__(self, config: ApproxTopkConfig, report: RewriteReport):
        super().__init__(report)
        self.config = config
        self.replays_cuda_graphs = config.replays_cuda_graphs()

    def apply(self, gm: torch.fx.GraphModule, example_inputs: list) -> int:
        rewritten = 0
        for node in list(gm.graph.nodes):
            site = match_logits_site(node)
            if site is not None:
                rewritten += self._visit(gm, site, example_inputs)
        return rewritten

    def _visit(self, gm: torch.fx.GraphModule, site: LogitsSite, example_inputs: list) -> int:
        node, bound, linear = site.topk, site.bound, site.linear
        location, code = source_location(node)
        logits = example_value(bound["input"])
        x = example_value(linear.x)
        k, dim = bound["k"], bound["dim"]
        override_key, override = self.config.override_for(location)
        recall_target = override.recall_target if override.recall_target is not None else self.config.recall_target
        info = dict(pass_name=self.name, node=node.name, location=location, code=code, op=site.op,
                    shape=shape_strings(logits) if isinstance(logits, torch.Tensor) else (),
                    dtype=str(getattr(logits, "dtype", "?")), device=str(getattr(logits, "device", "?")),
                    k=str(example_value(k)), dim=dim if isinstance(dim, int) else None, override=override_key)
        details = {"pattern": describe_chain(site.chain)}

        def keep(reason: str, **extra) -> int:
            self.record(RewriteDecision(**info, recall_target=recall_target, rewritten=False, reason=reason,
                                        details=details, **extra))
            return 0

        facts = logits_site_facts(gm, site, example_inputs)
        if isinstance(facts, str):
            return keep(facts)
        if logits.requires_grad:
            return keep("needs gradients (grad mode on): HiRE rewrites inference; run under torch.no_grad()")
        if recall_target >= 1.0:
            return keep("recall target 1.0: exact")
        weight, k = facts.weight, facts.k
        n, d = weight.shape
        settings = site_settings(self.config, location, "logits", n, d, k)
        details.update(predictor=settings.predictor, rank=settings.rank, candidates=settings.candidates,
                       settings=settings.source)
        if settings.calibrated_recall is not None:
            details["calibrated_recall"] = settings.calibrated_recall
        if settings.warning:
            details["warning"] = settings.warning
        if k == 0 or settings.candidates >= n:
            return keep(f"k = 0, or k'={settings.candidates} candidates cover all {n} rows: nothing to save")
        rows = 1
        for size in x.shape[:-1]:
            rows = rows * size
        dynamic = isinstance(rows, torch.SymInt)
        rows_hint = size_hint(rows)
        device = str(x.device)
        dense = hire_cost_model.dense_logits_cost(rows_hint, d, n, k, x.dtype, device, facts.normalize)
        hire = hire_cost_model.hire_logits_cost(rows_hint, d, n, k, settings.candidates, settings.predictor,
                                                settings.rank, x.dtype, device, facts.normalize)
        hire, dense, verdict = hire_cost_model.as_called(hire, dense, device, self.replays_cuda_graphs)
        e = hire_cost_model.element_size(x.dtype)
        details.update(bytes_read=int(hire.bytes), dense_bytes_read=int(dense.bytes),
                       predictor_bytes=hire_cost_model.predictor_bytes(settings.predictor, n, d, settings.rank, e))
        estimates = dict(predicted_us=hire.us, exact_us=dense.us)
        policy = self.config.hire.rewrite
        if policy == "auto" and not dynamic and not hire_cost_model.worth_rewriting(hire, dense):
            return keep(verdict, **estimates)

        predictor_for(weight, settings.predictor, settings.rank)  # built now, at compile time
        graph = gm.graph
        with graph.inserting_before(node):
            new = graph.call_function(
                torch.ops.topk_compiler.hire_logits_topk.default,
                (linear.x, linear.weight, linear.bias, k, facts.largest, facts.sorted, facts.scale, facts.normalize,
                 facts.out_dtype, settings.predictor, settings.rank, settings.candidates, policy),
            )
        new.meta.update({key: node.meta[key] for key in ("stack_trace", "nn_module_stack", "source_fn_stack")
                         if key in node.meta})
        if "example_value" in node.meta:
            new.meta["example_value"] = tuple(node.meta["example_value"])
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        erase_if_unused(graph, [*(s.node for s in reversed(site.chain)), *linear.nodes])

        if policy == "always":
            reason = f"rewrite='always' ({verdict})"
        elif dynamic:
            reason = f"dynamic batch: dense or HiRE decided per call (at the example size: {verdict})"
        else:
            reason = verdict
        self.record(RewriteDecision(**info, recall_target=recall_target, rewritten=True, reason=reason,
                                    algorithm=f"hire/{settings.predictor}", details=details, **estimates))
        return 1
