"""HireFfnPass: ``linear(act(linear(x, W1, b1)), W2, b2)`` -> ``topk_compiler::hire_ffn`` (HiRE).

Matches two linear layers (any form ``match_linear`` knows) around an activation: ReLU
(``torch.relu``, ``F.relu``, ``Tensor.relu``, ``nn.ReLU``), ReLU squared (``relu(h) ** 2``,
``torch.square(relu(h))``, ``relu(h).pow(2)``) or GELU (``F.gelu``, ``nn.GELU``, exact form). A
match is rewritten when its activation is in ``hire.ffn_activations`` (GELU is opt-in: a dropped
neuron's small negative output is lost), its weights are module parameters, the intermediate
values feed nothing else, no gradient is needed, its recall target is below 1 and the HiRE cost
model predicts a gain at the example batch size (the op re-checks each batch size it sees). The
site's location is that of the second linear layer. Every match is recorded.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F

from topk_compiler.config import ApproxTopkConfig
from topk_compiler.lowering import hire_cost_model
from topk_compiler.lowering import hire_ffn as _registers_the_op  # noqa: F401
from topk_compiler.lowering.hire_predictor import predictor_for, transposed_copy
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

_RELU_FUNCTIONS = (torch.relu, F.relu, torch.ops.aten.relu.default)
_GELU_FUNCTIONS = (F.gelu, torch._C._nn.gelu, torch.ops.aten.gelu.default)
_POW_FUNCTIONS = (operator.pow, torch.pow)


def _relu_input(node) -> torch.fx.Node | None:
    if not isinstance(node, torch.fx.Node) or not node.args:
        return None
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        if set(node.kwargs) - {"inplace"} or len(node.args) > 2:
            return None
        return node.args[0]
    if node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1:
        return node.args[0]
    return None


def match_activation(node) -> tuple[str, torch.fx.Node, tuple[torch.fx.Node, ...]] | None:
    """(activation name, its input, its nodes, outermost first) if ``node`` is an activation."""
    if not isinstance(node, torch.fx.Node):
        return None
    h = _relu_input(node)
    if h is not None:
        return "relu", h, (node,)
    if node.op == "call_function" and node.target in _GELU_FUNCTIONS and node.args:
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return ("gelu" if approximate == "none" else f"gelu(approximate={approximate!r})"), node.args[0], (node,)
    squared = None
    if node.op == "call_function" and node.target in _POW_FUNCTIONS and len(node.args) == 2 and node.args[1] == 2:
        squared = node.args[0]
    elif node.op == "call_method" and node.target == "pow" and len(node.args) == 2 and node.args[1] == 2:
        squared = node.args[0]
    elif node.op == "call_function" and node.target is torch.square and len(node.args) == 1:
        squared = node.args[0]
    elif node.op == "call_method" and node.target == "square" and len(node.args) == 1:
        squared = node.args[0]
    elif (node.op == "call_function" and node.target in (operator.mul, torch.mul) and len(node.args) == 2
          and node.args[0] is node.args[1]):
        squared = node.args[0]
    if squared is not None:
        h = _relu_input(squared)
        if h is not None:
            return "relu_squared", h, (node, squared)
    return None


@dataclass(frozen=True)
class FfnFacts:
    """What the op needs from an eligible FFN site: the real parameters and the activation."""

    w1: torch.Tensor
    b1: torch.Tensor | None
    w2: torch.Tensor
    b2: torch.Tensor | None
    activation: str


def ffn_site_facts(gm: torch.fx.GraphModule, up: LinearMatch, act, down: LinearMatch, example_inputs: list,
                   activations: tuple[str, ...]) -> FfnFacts | str:
    """The facts of the FFN ``down(act(up(x)))`` if its structure can be rewritten, else why not."""
    activation, _, act_nodes = act
    x, hidden = example_value(up.x), example_value(up.output)
    if not isinstance(x, torch.Tensor) or not isinstance(hidden, torch.Tensor):
        return "input is not a tensor"
    nodes = {"w1": up.weight, "b1": up.bias, "w2": down.weight, "b2": down.bias}
    tensors = {name: weight_tensor(gm, n, example_inputs) if n is not None else None for name, n in nodes.items()}
    for name, n in nodes.items():
        if n is not None and not is_parameter(tensors[name]):
            return f"{name} is not a module parameter (no predictor to build once)"
    if activation not in activations:
        if activation.startswith("gelu("):
            return f"{activation}: only the exact GELU is supported"
        return f"activation {activation} not in hire.ffn_activations {activations}"
    if not single_use([up.output, *up.intermediates, *act_nodes, *down.intermediates]):
        return "the hidden activations are used elsewhere too"
    w1, w2 = tensors["w1"], tensors["w2"]
    if not x.dtype.is_floating_point or not x.dtype == w1.dtype == w2.dtype:
        return f"x, w1, w2 do not share one floating dtype ({x.dtype}, {w1.dtype}, {w2.dtype})"
    return FfnFacts(w1, tensors["b1"], w2, tensors["b2"], activation)


def ffn_sites(graph: torch.fx.Graph):
    """(up, activation, down) of every linear -> activation -> linear in ``graph``."""
    for node in list(graph.nodes):
        down = match_linear(node)
        act = match_activation(down.x) if down is not None else None
        up = match_linear(act[1]) if act is not None else None
        if up is not None:
            yield up, act, down


class HireFfnPass(ApproxTopkPass):
    """linear -> ReLU / ReLU^2 / GELU -> linear  ==>  HiRE predicted-active neurons only."""

    name = "hire_ffn"

    def __init__(self, config: ApproxTopkConfig, report: RewriteReport):
        super().__init__(report)
        self.config = config
        self.replays_cuda_graphs = config.replays_cuda_graphs()

    def apply(self, gm: torch.fx.GraphModule, example_inputs: list) -> int:
        return sum(self._visit(gm, up, act, down, example_inputs) for up, act, down in ffn_sites(gm.graph))

    def _visit(self, gm, up, act, down, example_inputs) -> int:
        activation, _, act_nodes = act
        node = down.output
        location, code = source_location(node)
        override_key, override = self.config.override_for(location)
        recall_target = override.recall_target if override.recall_target is not None else self.config.recall_target
        x = example_value(up.x)
        hidden = example_value(up.output)
        info = dict(pass_name=self.name, node=node.name, location=location, code=code, op="ffn",
                    shape=shape_strings(hidden) if isinstance(hidden, torch.Tensor) else (),
                    dtype=str(getattr(x, "dtype", "?")), device=str(getattr(x, "device", "?")), k="-", dim=None,
                    override=override_key)
        details = {"pattern": f"linear -> {activation} -> linear"}

        def keep(reason: str, **extra) -> int:
            self.record(RewriteDecision(**info, recall_target=recall_target, rewritten=False, reason=reason,
                                        details=details, **extra))
            return 0

        facts = ffn_site_facts(gm, up, act, down, example_inputs, self.config.hire.ffn_activations)
        if isinstance(facts, str):
            return keep(facts)
        if example_value(node).requires_grad:
            return keep("needs gradients (grad mode on): HiRE rewrites inference; run under torch.no_grad()")
        if recall_target >= 1.0:
            return keep("recall target 1.0: exact")
        w1, w2 = facts.w1, facts.w2
        d_ff, d = w1.shape
        d_out = w2.shape[0]
        settings = site_settings(self.config, location, "ffn", d_ff, d)
        details.update(predictor=settings.predictor, rank=settings.rank, threshold=settings.threshold,
                       expected_neurons=settings.candidates, settings=settings.source)
        if settings.calibrated_recall is not None:
            details["calibrated_recall"] = settings.calibrated_recall
        if settings.warning:
            details["warning"] = settings.warning
        rows = 1
        for size in x.shape[:-1]:
            rows = rows * size
        dynamic = isinstance(rows, torch.SymInt)
        rows_hint = size_hint(rows)
        device = str(x.device)
        dense = hire_cost_model.dense_ffn_cost(rows_hint, d, d_ff, d_out, x.dtype, device)
        hire = hire_cost_model.hire_ffn_cost(rows_hint, d, d_ff, d_out, settings.candidates, settings.predictor,
                                             settings.rank, x.dtype, device)
        hire, dense, verdict = hire_cost_model.as_called(hire, dense, device, self.replays_cuda_graphs)
        e = hire_cost_model.element_size(x.dtype)
        details.update(bytes_read=int(hire.bytes), dense_bytes_read=int(dense.bytes),
                       predictor_bytes=hire_cost_model.predictor_bytes(settings.predictor, d_ff, d, settings.rank, e))
        if x.is_cuda:
            details["extra_memory_bytes"] = d_out * d_ff * e  # the transposed copy of W2
        estimates = dict(predicted_us=hire.us, exact_us=dense.us)
        policy = self.config.hire.rewrite
        if policy == "auto" and not dynamic and not hire_cost_model.worth_rewriting(hire, dense):
            return keep(verdict, **estimates)

        predictor_for(w1, settings.predictor, settings.rank)  # built now, at compile time
        if x.is_cuda:
            transposed_copy(w2)
        graph = gm.graph
        with graph.inserting_before(node):
            new = graph.call_function(
                torch.ops.topk_compiler.hire_ffn.default,
                (up.x, up.weight, up.bias, down.weight, down.bias, activation, settings.predictor, settings.rank,
                 settings.threshold, settings.candidates, policy),
            )
        new.meta.update({key: node.meta[key] for key in ("stack_trace", "nn_module_stack", "source_fn_stack",
                                                         "example_value") if key in node.meta})
        node.replace_all_uses_with(new)
        erase_if_unused(graph, [*down.nodes, *act_nodes, *up.nodes])

        if policy == "always":
            reason = f"rewrite='always' ({verdict})"
        elif dynamic:
            reason = f"dynamic batch: dense or HiRE decided per call (at the example size: {verdict})"
        else:
            reason = verdict
        self.record(RewriteDecision(**info, recall_target=recall_target, rewritten=True, reason=reason,
                                    algorithm=f"hire/{settings.predictor}", details=details, **estimates))
        return 1
