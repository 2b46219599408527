"""Linear layers in the Dynamo FX graph, in the forms Dynamo records them, and their weights.

``match_linear`` recognises ``F.linear(x, W[, b])`` (what ``nn.Linear`` becomes), ``x @ W.T``,
``torch.matmul(x, W.t())`` and the like (``W.T``, ``W.t()``, ``W.transpose(0, 1)``,
``W.permute(1, 0)``), and ``x @ W.T + b``. ``weight_tensor`` finds the real tensor behind a weight
node (a placeholder's example input, or a module attribute), which the HiRE passes need to build
a predictor at compile time.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F

from topk_compiler.passes.base import example_value

_LINEAR = (torch._C._nn.linear, F.linear, torch.ops.aten.linear.default)
_MATMUL = (operator.matmul, torch.matmul, torch.mm)
_ADD = (operator.add, torch.add)


@dataclass(frozen=True)
class LinearMatch:
    """``output = linear(x, weight, bias)``, with ``weight`` [n, d] as F.linear takes it.

    args:
        output: the node whose value is the linear's output.
        x, weight, bias: the argument nodes (bias may be None).
        nodes: the pattern's own nodes, output first (erased once nothing uses them).
        intermediates: nodes whose values only the pattern uses when the pattern is the layer
            (the product under ``x @ W.T + b``); a transposed weight may be shared.
    """

    output: torch.fx.Node
    x: Any
    weight: torch.fx.Node
    bias: torch.fx.Node | None
    nodes: tuple[torch.fx.Node, ...]
    intermediates: tuple[torch.fx.Node, ...] = ()


def _is_call(node: Any, functions=(), methods=()) -> bool:
    if not isinstance(node, torch.fx.Node):
        return False
    return ((node.op == "call_function" and node.target in functions)
            or (node.op == "call_method" and node.target in methods))


def _transposed(node: Any) -> torch.fx.Node | None:
    """``w`` if ``node`` is the transpose of a 2-D ``w``, else None."""
    if not isinstance(node, torch.fx.Node) or not node.args:
        return None
    w = node.args[0]
    value = example_value(w) if isinstance(w, torch.fx.Node) else None
    if not isinstance(value, torch.Tensor) or value.dim() != 2:
        return None
    rest = tuple(node.args[1:])
    if _is_call(node, (torch.t, torch.ops.aten.t.default), ("t",)) and not rest:
        return w
    if node.op == "call_function" and node.target is getattr and rest in (("T",), ("mT",)):
        return w
    if _is_call(node, (torch.transpose,), ("transpose",)) and sorted(d % 2 for d in rest) == [0, 1]:
        return w
    if _is_call(node, (torch.permute,), ("permute",)):
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        if tuple(dims) == (1, 0):
            return w
    return None


def _bound(node: torch.fx.Node, names: tuple[str, ...]) -> dict:
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def match_linear(node: Any) -> LinearMatch | None:
    """The linear layer whose output ``node`` is, or None."""
    if _is_call(node, _LINEAR):
        bound = _bound(node, ("input", "weight", "bias"))
        weight = bound.get("weight")
        if not isinstance(weight, torch.fx.Node) or "input" not in bound:
            return None
        return LinearMatch(node, bound["input"], weight, bound.get("bias"), (node,))
    if _is_call(node, _MATMUL, ("matmul", "__matmul__")) and len(node.args) == 2 and not node.kwargs:
        x, wt = node.args
        weight = _transposed(wt)
        if weight is None:
            return None
        return LinearMatch(node, x, weight, None, (node, wt))
    if _is_call(node, _ADD, ("add", "__add__")) and len(node.args) == 2 and not node.kwargs:
        for product, bias in (node.args, node.args[::-1]):
            inner = match_linear(product) if _is_call(product, _MATMUL, ("matmul", "__matmul__")) else None
            b = example_value(bias)
            if inner is not None and isinstance(b, torch.Tensor) and b.dim() == 1:
                return LinearMatch(node, inner.x, inner.weight, bias, (node, *inner.nodes), (product,))
    return None


def weight_tensor(gm: torch.fx.GraphModule, node: Any, example_inputs: list) -> torch.Tensor | None:
    """The real tensor behind a placeholder or get_attr node (None for anything computed)."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "placeholder":
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        index = placeholders.index(node)
        value = example_inputs[index] if index < len(example_inputs) else None
        return value if isinstance(value, torch.Tensor) else None
    if node.op == "get_attr":
        value: Any = gm
        for part in str(node.target).split("."):
            value = getattr(value, part, None)
        return value if isinstance(value, torch.Tensor) else None
    return None


def is_parameter(value: Any) -> bool:
    """Weights HiRE builds a predictor for: module parameters (fixed from one call to the next)."""
    return isinstance(value, torch.nn.Parameter)


def erase_if_unused(graph: torch.fx.Graph, nodes) -> None:
    """Erases ``nodes`` (in the order given) that nothing uses any more."""
    for node in nodes:
        if isinstance(node, torch.fx.Node) and not node.users and node.op not in ("placeholder", "output", "get_attr"):
            graph.erase_node(node)


def single_use(nodes) -> bool:
    return all(len(node.users) == 1 for node in nodes)
