"""Whether anything downstream of a top-k can observe the order of its outputs.

``torch.topk`` sorts by default, and at large k sorting the k selected is much of the work
(16 x 14336 fp32, k=1434 at recall 0.95 on an H100: 17.7 us sorted against 11.0 unsorted,
``benchmarks/results/bench_topk_h100_quick_1feb989.md``). Many models never look at that order:
a TopK sparse autoencoder scatters the k values into zeros, a sparse FFN sums the rows its
indices gather weighted by its values (a sampler drawing one of the k does observe it).
``unobserved_order`` follows the values and indices through the graph and says whether every
path ends in such an operation, so that the rewrite can plan the site unsorted.

The argument: unsorted, the op returns ``(values[π], indices[π])`` for some permutation π of each
row along the reduced axis, the same for both. A node *carries* π when its value, computed from
permuted outputs, is its sorted value with one axis permuted by π; elementwise operations, gathers
by the indices and softmax along the reduced axis pass π on. A node is *free* of π when its value
does not change: a scatter by the indices, or a write ``out[rows, indices] = values`` (each row's
indices are distinct, so every target is written once whatever the order), a reduction or a
contraction over the reduced axis, an ``embedding_bag`` whose bags are the rows, a sort along the
reduced axis whose sorted values alone are used. Any other use (the graph's output, a slice of the
reduced axis, a cumulative sum, an op not listed here) observes the order, and the site stays
sorted. Sums and contractions give the same result up to the order of their floating-point
additions; ``UnobservedOrder.exact`` says whether every path ends in an operation whose result is
bit for bit the same.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F

from topk_compiler.passes.base import example_value

# Elementwise: each output element depends only on the elements at its (broadcast) position.
_POINTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow, operator.neg,
    operator.pos, operator.abs, operator.gt, operator.ge, operator.lt, operator.le, operator.eq, operator.ne,
    operator.and_, operator.or_, operator.invert, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.pow, torch.neg, torch.abs, torch.exp,
    torch.log, torch.log1p, torch.expm1, torch.sqrt, torch.rsqrt, torch.square, torch.sign, torch.sigmoid,
    torch.tanh, torch.relu, torch.clamp, torch.clip, torch.maximum, torch.minimum, torch.where, torch.nan_to_num,
    F.relu, F.gelu, F.silu, F.softplus, F.leaky_relu, F.elu, F.sigmoid,
}
_POINTWISE_METHODS = {
    "add", "sub", "mul", "div", "true_divide", "pow", "neg", "abs", "exp", "log", "log1p", "expm1", "sqrt",
    "rsqrt", "square", "sign", "sigmoid", "tanh", "relu", "clamp", "clip", "clamp_min", "clamp_max", "maximum",
    "minimum", "nan_to_num", "gt", "ge", "lt", "le", "eq", "ne", "contiguous", "clone", "detach",
}
# Casts keep a carrier of the indices a carrier of the indices: they stay distinct in a row.
_CAST_METHODS = {"float", "double", "half", "bfloat16", "long", "int", "to", "type", "type_as"}
_SOFTMAX_FUNCTIONS = {torch.softmax, torch.log_softmax, F.softmax, F.log_softmax}
_SOFTMAX_METHODS = {"softmax", "log_softmax"}
# Reductions whose result is the same bit for bit in any order, and those equal up to rounding.
_EXACT_REDUCTIONS = {"amax", "amin", "all", "any"}
_ROUNDED_REDUCTIONS = {"sum", "mean", "prod", "logsumexp"}
_REDUCTION_FUNCTIONS = {getattr(torch, name): name for name in _EXACT_REDUCTIONS | _ROUNDED_REDUCTIONS}
_SCATTER_METHODS = {"scatter", "scatter_", "scatter_add", "scatter_add_", "scatter_reduce", "scatter_reduce_"}
_SCATTER_FUNCTIONS = {torch.scatter: "scatter", torch.scatter_add: "scatter_add",
                      torch.scatter_reduce: "scatter_reduce"}
_MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm}
_MATMUL_METHODS = {"matmul", "bmm"}
_GATHER_FUNCTIONS = {torch.gather, torch.take_along_dim}
_AXES_ORDER_FUNCTIONS = {torch.permute: "permute", torch.transpose: "transpose", torch.swapaxes: "transpose",
                         torch.swapdims: "transpose", torch.t: "t"}
_AXES_ORDER_METHODS = {"permute", "transpose", "t"}
_SORT_FUNCTIONS = {torch.sort: "sort", torch.msort: "msort"}
_SORT_METHODS = {"sort", "msort"}
_SIZE_ATTRIBUTES = {"shape", "dtype", "device", "ndim"}


@dataclass(frozen=True)
class _Carrier:
    """``axes[p]``: the axis of the top-k's outputs that this node's axis ``p`` runs along, None
    for an axis of the node's own (a size-1 axis from ``unsqueeze``, a gathered row's columns).
    ``indices``: the top-k's indices themselves or a cast of them (distinct within a row)."""

    axes: tuple[int | None, ...]
    indices: bool = False


@dataclass(frozen=True)
class UnobservedOrder:
    """Where a top-k's outputs end: ``sinks`` names the operations that make them free of their
    order; ``exact`` is False where one of them (a sum, a softmax, a contraction) is equal only
    up to the order of its floating-point additions."""

    sinks: tuple[str, ...]
    exact: bool

    def __str__(self) -> str:
        return ", ".join(dict.fromkeys(self.sinks))


class _Observed(Exception):
    pass


def unobserved_order(topk: torch.fx.Node, dim: int) -> UnobservedOrder | None:
    """How the outputs of ``topk`` (a top-k over axis ``dim`` of its input) end without their
    order being observed, or None if some use can observe it."""
    value = example_value(topk)
    if not isinstance(value, (tuple, list)) or not isinstance(value[0], torch.Tensor):
        return None
    rank = value[0].dim()
    if rank == 0:
        return None
    analysis = _Analysis(dim % rank)
    try:
        for user in topk.users:
            if user.target is not operator.getitem or user.args[1] not in (0, 1):
                return None
            analysis.carriers[user] = _Carrier(tuple(range(rank)), indices=user.args[1] == 1)
        node = topk.next
        while node.op != "root":
            if any(arg in analysis.carriers for arg in node.all_input_nodes):
                analysis.visit(node)
            node = node.next
    except _Observed:
        return None
    return UnobservedOrder(tuple(analysis.sinks), analysis.exact)


class _Analysis:
    def __init__(self, reduced: int):
        self.reduced = reduced
        self.carriers: dict[torch.fx.Node, _Carrier] = {}
        self.sinks: list[str] = []
        self.exact = True

    def visit(self, node: torch.fx.Node) -> None:
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
        if node.op == "call_function" and node.target is getattr and node.args[1] in _SIZE_ATTRIBUTES:
            return
        if node.op == "call_method" and node.target in ("size", "dim"):
            return
        carrier = self._carrier_of(node, name)
        if carrier is None:
            raise _Observed(name)
        if carrier is not _FREE:
            self.carriers[node] = carrier

    def _carrier_of(self, node: torch.fx.Node, name: str):
        """The node's carrier, ``_FREE`` where it is free of the order, None where it observes it."""
        fn, method = (node.target, None) if node.op == "call_function" else (None, node.target)
        if node.op not in ("call_function", "call_method"):
            return None
        if fn in _POINTWISE_FUNCTIONS or method in _POINTWISE_METHODS:
            return self._pointwise(node)
        if method in _CAST_METHODS:
            return self._cast(node)
        if method == "unsqueeze" or fn is torch.unsqueeze:
            return self._unsqueeze(node)
        if fn in _AXES_ORDER_FUNCTIONS or method in _AXES_ORDER_METHODS:
            return self._reorder_axes(node, _AXES_ORDER_FUNCTIONS.get(fn, method))
        if fn in _SOFTMAX_FUNCTIONS or method in _SOFTMAX_METHODS:
            return self._softmax(node)
        if fn in _REDUCTION_FUNCTIONS or method in _EXACT_REDUCTIONS | _ROUNDED_REDUCTIONS:
            return self._reduction(node, _REDUCTION_FUNCTIONS.get(fn, method))
        if fn in _SCATTER_FUNCTIONS or method in _SCATTER_METHODS:
            return self._scatter(node, _SCATTER_FUNCTIONS.get(fn, method))
        if fn in _MATMUL_FUNCTIONS or method in _MATMUL_METHODS:
            return self._matmul(node, name)
        if fn is operator.setitem:
            return self._setitem(node)
        if fn is operator.getitem and self._carries(node.args[0]):
            return self._basic_index(node)
        if fn is operator.getitem or fn is F.embedding:
            return self._indexed_rows(node)
        if fn in _GATHER_FUNCTIONS or method in ("gather", "take_along_dim"):
            return self._gather(node)
        if fn is F.embedding_bag:
            return self._embedding_bag(node)
        if fn in _SORT_FUNCTIONS or method in _SORT_METHODS:
            return self._sort(node, _SORT_FUNCTIONS.get(fn, method))
        return None

    # -- helpers -------------------------------------------------------------------------------

    def _carries(self, arg) -> bool:
        return isinstance(arg, torch.fx.Node) and arg in self.carriers

    def _arg(self, node, position, keyword, default=None):
        if len(node.args) > position:
            return node.args[position]
        return node.kwargs.get(keyword, default)

    def _others_carry(self, node, *operands) -> bool:
        """Whether an input of ``node`` other than ``operands`` is a carrier."""
        return any(self._carries(a) for a in node.all_input_nodes if a not in operands)

    def _aligned(self, carrier: torch.fx.Node, rank: int) -> tuple[int | None, ...]:
        """A carrier's axes right-aligned to ``rank`` axes, as broadcasting aligns them."""
        axes = self.carriers[carrier].axes
        return (None,) * (rank - len(axes)) + axes

    def _reduced_position(self, axes) -> int | None:
        return axes.index(self.reduced) if self.reduced in axes else None

    def _free(self, sink: str, exact: bool):
        self.sinks.append(sink)
        self.exact = self.exact and exact
        return _FREE

    # -- the operations ------------------------------------------------------------------------

    def _pointwise(self, node):
        """Elementwise: the operands broadcast (``_broadcast``) to the result's axes."""
        out = example_value(node)
        if not isinstance(out, torch.Tensor):
            return None
        operands = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, torch.fx.Node)]
        axes = self._broadcast(operands, out.dim())
        return None if axes is None else _Carrier(axes)

    def _broadcast(self, operands, rank: int) -> tuple[int | None, ...] | None:
        """The top-k axes of ``operands`` broadcast together to ``rank`` axes: every carrier must
        put the same top-k axes at the same positions, and every other tensor must have size 1
        where the permuted axis lies; None where they do not, or none is a carrier."""
        layouts = {self._aligned(a, rank) for a in operands if self._carries(a)}
        if len(layouts) != 1:
            return None
        axes = layouts.pop()
        position = self._reduced_position(axes)
        for a in operands:
            if self._carries(a):
                continue
            other = example_value(a)
            if not isinstance(other, torch.Tensor):
                return None
            at = position - (rank - other.dim())
            if at >= 0 and other.shape[at] != 1:
                return None
        return axes

    def _cast(self, node):
        source = node.args[0]
        if not self._carries(source):
            return _FREE  # a carrier only lends its dtype or device
        if self._others_carry(node, source):
            return None
        return self.carriers[source]

    def _unsqueeze(self, node):
        source, where = node.args[0], self._arg(node, 1, "dim")
        if not self._carries(source) or not isinstance(where, int):
            return None
        axes = list(self.carriers[source].axes)
        axes.insert(where % (len(axes) + 1), None)
        return _Carrier(tuple(axes), self.carriers[source].indices)

    def _reorder_axes(self, node, how: str):
        """``permute``/``transpose``/``t``: the same elements, their axes in another order."""
        source = node.args[0]
        if not self._carries(source):
            return None
        axes = self.carriers[source].axes
        rank = len(axes)
        if how == "t":
            order = list(range(rank))[::-1]
        elif how == "transpose":
            first, second = self._arg(node, 1, "dim0"), self._arg(node, 2, "dim1")
            if not isinstance(first, int) or not isinstance(second, int):
                return None
            order = list(range(rank))
            order[first % rank], order[second % rank] = order[second % rank], order[first % rank]
        else:
            order = node.args[1:] if len(node.args) > 1 else (self._arg(node, 1, "dims"),)
            if len(order) == 1 and isinstance(order[0], (tuple, list)):
                order = order[0]  # permute((1, 0)) as well as permute(1, 0)
            if len(order) != rank or not all(isinstance(d, int) for d in order):
                return None
        return _Carrier(tuple(axes[d % rank] for d in order), self.carriers[source].indices)

    def _softmax(self, node):
        source, along = node.args[0], self._arg(node, 1, "dim")
        if not self._carries(source) or not isinstance(along, int):
            return None
        axes = self.carriers[source].axes
        along = axes[along % len(axes)]
        # Along the permuted axis or an axis of its own: each slice moves whole under π.
        if along is not None and along != self.reduced:
            return None
        if along == self.reduced:
            self.exact = False  # its denominator adds the row in the order given
        return _Carrier(axes)

    def _reduction(self, node, reduction: str):
        source = node.args[0]
        if not self._carries(source) or self._others_carry(node, source):
            return None
        axes = self.carriers[source].axes
        dims = self._arg(node, 1, "dim")
        keepdim = self._arg(node, 2, "keepdim", False)
        if dims is None and reduction != "logsumexp":
            return self._free(reduction, reduction in _EXACT_REDUCTIONS)
        dims = {d % len(axes) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))
                if isinstance(d, int)}
        if not dims or not isinstance(keepdim, bool):
            return None
        reduced_over = {axes[d] for d in dims}
        if self.reduced in reduced_over:
            # Over the permuted axis (and perhaps others): the rows' results stay in place
            # unless a row axis is reduced too, which sums over rows whatever their order.
            return self._free(reduction, reduction in _EXACT_REDUCTIONS)
        if reduced_over != {None}:
            return None  # over a row axis only: mixes rows permuted differently
        # Over axes of its own only: each element's reduction is computed as it was sorted.
        kept = tuple(None if d in dims else a for d, a in enumerate(axes)) if keepdim else \
            tuple(a for d, a in enumerate(axes) if d not in dims)
        return _Carrier(kept)

    def _scatter(self, node, scatter: str):
        """``base.scatter(dim, index, src)`` with the top-k's indices as ``index`` along the permuted
        axis and ``src`` permuted as they are (or a number): each target gets its own element
        however the pairs are ordered."""
        base, along, index = node.args[0], self._arg(node, 1, "dim"), self._arg(node, 2, "index")
        source = self._arg(node, 3, "src", self._arg(node, 3, "value"))
        if self._carries(base) or not self._carries(index) or not isinstance(along, int):
            return None
        carrier = self.carriers[index]
        if not carrier.indices or self._reduced_position(carrier.axes) != along % len(carrier.axes):
            return None
        if isinstance(source, torch.fx.Node):
            if not self._carries(source) or self.carriers[source].axes != carrier.axes:
                return None
        elif not isinstance(source, (int, float, bool)):
            return None
        if self._others_carry(node, index, source):
            return None
        return self._free(scatter, True)

    def _matmul(self, node, name: str):
        """A contraction of two carriers over the permuted axis of both; batch axes aligned."""
        a, b = node.args[0], node.args[1]
        if not self._carries(a) or not self._carries(b) or len(node.args) != 2 or node.kwargs:
            return None
        left, right = self.carriers[a].axes, self.carriers[b].axes
        if left[-1] != self.reduced or right[-2 if len(right) > 1 else 0] != self.reduced:
            return None
        # The result's rows and columns (left's second to last axis, right's last) must be axes
        # of their own, and the batch axes the same top-k axes at the same positions.
        if (len(left) > 1 and left[-2] is not None) or (len(right) > 1 and right[-1] is not None):
            return None
        batch_left, batch_right = left[:-2], right[:-2]
        width = max(len(batch_left), len(batch_right))
        if (None,) * (width - len(batch_left)) + batch_left != (None,) * (width - len(batch_right)) + batch_right:
            return None
        return self._free(name, False)

    def _basic_index(self, node):
        """``carrier[..., None]``: full slices, None and Ellipsis only, which add axes of its own.
        A place or a part of the permuted axis shows the order; rows picked or sliced would no
        longer line up with the other outputs' rows, which the axes do not record."""
        source, index = node.args
        index = index if isinstance(index, tuple) else (index,)
        if not _only_new_axes(index):
            return None
        axes = self.carriers[source].axes
        explicit = sum(item is not None and item is not Ellipsis for item in index)
        if explicit > len(axes) or sum(item is Ellipsis for item in index) > 1:
            return None
        if Ellipsis not in index:
            index = (*index, Ellipsis)
        at = index.index(Ellipsis)
        index = (*index[:at], *(slice(None),) * (len(axes) - explicit), *index[at + 1:])
        kept = iter(axes)
        return _Carrier(tuple(None if item is None else next(kept) for item in index),
                        self.carriers[source].indices)

    def _setitem(self, node):
        """``base[rows, indices] = values`` (after full slices): a scatter by the indices, where
        ``rows`` are ``arange``s lined up with the top-k's rows (each row's targets its own), or
        ``base[indices] = values`` of a 1-D top-k. ``values``: permuted as the indices, or a number."""
        base, index, value = node.args
        index = index if isinstance(index, tuple) else (index,)
        leading, tensors = _after_full_slices(index)
        if self._carries(base) or not tensors or not all(isinstance(t, torch.fx.Node) for t in tensors):
            return None
        targets = [t for t in tensors if self._carries(t)]
        if len(targets) != 1 or not self.carriers[targets[0]].indices:
            return None
        axes = self.carriers[targets[0]].axes
        shape = example_value(targets[0]).shape
        covered = set()
        for selector in tensors:
            if selector is targets[0]:
                continue
            along = self._rows_of_arange(selector, shape)
            if along is None or axes[along] in (None, self.reduced):
                return None
            covered.add(axes[along])
        if covered != {a for a in axes if a is not None and a != self.reduced}:
            return None  # a row axis without its arange: two rows could write one target
        if isinstance(value, torch.fx.Node):
            written = (None,) * leading + axes  # the full slices' axes, then the indices'
            if not self._carries(value) or self._aligned(value, len(written)) != written:
                return None
        elif not isinstance(value, (int, float, bool)):
            return None
        return self._free("setitem", True)

    @staticmethod
    def _rows_of_arange(selector: torch.fx.Node, shape) -> int | None:
        """The axis of ``shape`` along which ``selector``, an ``arange`` viewed with size-1 axes
        about it (``arange(n)[:, None]``, ``.unsqueeze(1)``, ``.view(-1, 1)``), runs over all of it."""
        node = selector
        while node.op in ("call_method", "call_function") and node.target in (
                "unsqueeze", torch.unsqueeze, "view", "reshape", torch.reshape, operator.getitem):
            if node.target is operator.getitem and not _only_new_axes(
                    node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)):
                return None
            node = node.args[0]
        if node.target is not torch.arange:
            return None
        picked = example_value(selector)
        if not isinstance(picked, torch.Tensor) or picked.dim() > len(shape):
            return None
        sizes = (1,) * (len(shape) - picked.dim()) + tuple(picked.shape)
        running = [d for d, size in enumerate(sizes) if size != 1]
        if len(running) != 1 or sizes[running[0]] != shape[running[0]]:
            return None
        return running[0]

    def _indexed_rows(self, node):
        """``table[indices]``, ``table[:, rows, indices]`` (full slices, then index tensors that
        broadcast together, e.g. an ``arange`` of the rows beside the indices) or
        ``embedding(indices, table)``: the table's entries picked by index, in the indices' order."""
        if node.target is F.embedding:
            index, table = node.args[0], self._arg(node, 1, "weight")
            if len(node.args) != 2 or node.kwargs:
                return None
        else:
            table, index = node.args
        rows = example_value(table)
        if self._carries(table) or not isinstance(rows, torch.Tensor):
            return None
        index = index if isinstance(index, tuple) else (index,)
        leading, tensors = _after_full_slices(index)
        if not tensors or not all(isinstance(t, torch.fx.Node) for t in tensors) or rows.dim() < len(index):
            return None
        values = [example_value(t) for t in tensors]
        # Integer indices only: a boolean mask picks a data-dependent, flattened set.
        if not all(isinstance(v, torch.Tensor) and not v.is_floating_point() and v.dtype != torch.bool
                   for v in values):
            return None
        axes = self._broadcast(list(tensors), max(v.dim() for v in values))
        if axes is None:
            return None
        return _Carrier((None,) * leading + axes + (None,) * (rows.dim() - len(index)))

    def _gather(self, node):
        """``gather(table, dim, index)`` along the permuted axis of ``index``."""
        if node.target is torch.take_along_dim or node.target == "take_along_dim":
            table, index, along = node.args[0], self._arg(node, 1, "indices"), self._arg(node, 2, "dim")
        else:
            table, along, index = node.args[0], self._arg(node, 1, "dim"), self._arg(node, 2, "index")
        if self._carries(table) or not self._carries(index) or not isinstance(along, int):
            return None
        axes = self.carriers[index].axes
        if self._reduced_position(axes) != along % len(axes):
            return None
        return _Carrier(axes)

    def _embedding_bag(self, node):
        """``embedding_bag(indices, table, per_sample_weights=values)`` with a row's k as its bag
        (sparse autoencoders' decoders): a sum, mean or max over the permuted axis."""
        index, table = node.args[0], self._arg(node, 1, "weight")
        weights, mode = node.kwargs.get("per_sample_weights"), node.kwargs.get("mode", "mean")
        if len(node.args) > 2 or set(node.kwargs) - {"weight", "per_sample_weights", "mode"}:
            return None  # offsets, norms, padding: bags other than the rows
        if not self._carries(index) or self._carries(table) or mode not in ("sum", "mean", "max"):
            return None
        axes = self.carriers[index].axes
        if len(axes) != 2 or axes[1] != self.reduced:
            return None
        if weights is not None and (not self._carries(weights) or self.carriers[weights].axes != axes):
            return None
        return self._free(f"embedding_bag({mode})", mode == "max")

    def _sort(self, node, sort: str):
        """A sort along the permuted axis whose sorted values alone are used (sparse attention sorts
        its selected indices by position): they depend on each row's set, not its order. The
        sort's own indices (places in its input) would show the order."""
        source = node.args[0]
        if not self._carries(source) or self._others_carry(node, source):
            return None
        axes = self.carriers[source].axes
        along = 0 if sort == "msort" else self._arg(node, 1, "dim", -1)
        if not isinstance(along, int) or axes[along % len(axes)] != self.reduced:
            return None
        if sort == "sort" and any(user.target is not operator.getitem or user.args[1] != 0 for user in node.users):
            return None
        # Integers sort to the same bits; floats equal as numbers, but a sort may place -0.0
        # beside 0.0, or NaNs of different payloads, in the order it met them.
        source_value = example_value(source)
        exact = isinstance(source_value, torch.Tensor) and not source_value.is_floating_point()
        return self._free(sort, exact)


def _after_full_slices(index: tuple) -> tuple[int, tuple]:
    """(how many full slices ``index`` starts with, the items after them)."""
    leading = 0
    while leading < len(index) and index[leading] == slice(None):
        leading += 1
    return leading, index[leading:]


def _only_new_axes(index: tuple) -> bool:
    """Whether ``index`` only keeps axes whole (full slices, Ellipsis) and adds size-1 ones (None)."""
    return all(item is None or item is Ellipsis or item == slice(None) for item in index)


_FREE = object()
