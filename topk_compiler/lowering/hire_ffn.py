"""``torch.ops.topk_compiler.hire_ffn``: ``linear(act(linear(x, W1, b1)), W2, b2)`` computed on the
neurons a predictor expects to be most active (HiRE, arXiv 2402.09360).

1. A predictor of ``W1`` (low-rank or int8/int4, ``hire_predictor.py``) estimates every neuron's
   pre-activation ``p = x W1^T + b1`` (the bias is added exactly).
2. Row ``m`` keeps the neurons whose predicted pre-activation exceeds the site's threshold,
   ``C_m = {j : p[m, j] > threshold}``: the largest predicted pre-activations, as many as the row
   has (calibration sets the threshold for the recall target; 0 is the sign of the prediction).
   A threshold rather than a fixed count needs no top-k over the neurons, and follows rows that
   activate more or fewer neurons than average.
3. Only those neurons' rows of ``W1`` and columns of ``W2`` are read: on CUDA three Triton
   launches (``kernels/sparse_ffn.py``: compact the batch's union of chosen neurons, the sparse
   FFN over them, the sum of its partial sums), reading the columns of ``W2`` as rows of a cached
   transposed copy (one extra copy of ``W2`` per rewritten FFN, built with the predictor); on CPU
   ``index_select`` and two matmuls. One row (a decode step) with a low-rank predictor takes
   four launches in all: ``x A``; the prediction, which leaves a short list of chosen neurons
   per program (no scores in memory); the sparse FFN over the lists; the sum of its partials.

Row ``m``'s output equals the dense FFN restricted to its neurons ``C_m``:
``sum_{j in C_m} act(x_m . W1[j] + b1[j]) W2[:, j] + b2``. For ReLU (and ReLU^2) a dropped
neuron whose pre-activation is negative contributes exactly 0, so the output is exact whenever
``C_m`` holds every active neuron; the error is the dropped active neurons' contribution. For
GELU a dropped neuron's small negative output is lost as well.

With ``rewrite="auto"`` the op runs the dense FFN where that is faster for the batch it is given
(a batch whose rows together need most neurons): on the GPU as measured at the first call of a
shape (``device_timing.dense_wins``: replayed for calls in a CUDA graph, eagerly for the others,
whose launches' dispatch HiRE pays four times), elsewhere as the HiRE cost model predicts.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from topk_compiler.lowering import cost_model, device_timing, hire_cost_model, hire_predictor
from topk_compiler.lowering.hire_predictor import PREDICTOR_KINDS, predictor_for, transposed_copy

ACTIVATIONS = ("relu", "relu_squared", "gelu")


def activation_fn(name: str):
    if name == "relu":
        return torch.relu
    if name == "relu_squared":
        return lambda h: torch.relu(h).square()
    if name == "gelu":
        return F.gelu
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def check_ffn_arguments(x, w1, b1, w2, b2, activation, predictor, rank, threshold, expected_neurons, rewrite) -> None:
    """Raises ValueError / TypeError naming the argument for a bad one."""
    if not all(isinstance(t, torch.Tensor) for t in (x, w1, w2)):
        raise TypeError("hire_ffn: x, w1 and w2 must be tensors")
    if w1.dim() != 2 or w2.dim() != 2 or x.dim() < 1 or x.shape[-1] != w1.shape[1] or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"hire_ffn: need x [..., d], w1 [d_ff, d], w2 [d_out, d_ff]; got {tuple(x.shape)}, "
                         f"{tuple(w1.shape)}, {tuple(w2.shape)}")
    if not x.dtype.is_floating_point or not x.dtype == w1.dtype == w2.dtype:
        raise ValueError(f"hire_ffn: x, w1, w2 must share one floating dtype, got {x.dtype}, {w1.dtype}, {w2.dtype}")
    for name, b, size in (("b1", b1, w1.shape[0]), ("b2", b2, w2.shape[0])):
        if b is not None and (b.shape != (size,) or b.dtype != x.dtype):
            raise ValueError(f"hire_ffn: {name} must be [{size}] {x.dtype}, got {tuple(b.shape)} {b.dtype}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"hire_ffn: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if predictor not in PREDICTOR_KINDS:
        raise ValueError(f"hire_ffn: predictor must be one of {PREDICTOR_KINDS}, got {predictor!r}")
    if predictor == "lowrank" and rank < 1:
        raise ValueError(f"hire_ffn: rank must be >= 1 for a lowrank predictor, got {rank}")
    if threshold != threshold:
        raise ValueError("hire_ffn: threshold is NaN")
    if expected_neurons < 0:
        raise ValueError(f"hire_ffn: expected_neurons must be >= 0, got {expected_neurons}")
    if rewrite not in ("auto", "always"):
        raise ValueError(f"hire_ffn: rewrite must be 'auto' or 'always', got {rewrite!r}")


@functools.lru_cache(maxsize=4096)
def dense_is_cheaper(rows: int, d: int, d_ff: int, d_out: int, expected_neurons: int, predictor: str, rank: int,
                     dtype: torch.dtype, device: str) -> bool:
    dense = hire_cost_model.dense_ffn_cost(rows, d, d_ff, d_out, dtype, device)
    hire = hire_cost_model.hire_ffn_cost(rows, d, d_ff, d_out, expected_neurons, predictor, rank, dtype, device)
    return not hire_cost_model.worth_rewriting(hire, dense)


def dense_ffn(x, w1, b1, w2, b2, activation):
    """The exact computation the op stands for."""
    return F.linear(activation_fn(activation)(F.linear(x, w1, b1)), w2, b2)


def restricted_ffn(x2d, w1, b1, w2, b2, activation, slots, member):
    """Plain torch: the FFN restricted to the neurons ``slots`` (no padding), rows to ``member``."""
    b1_rows = None if b1 is None else b1.index_select(0, slots)
    h = activation_fn(activation)(F.linear(x2d, w1.index_select(0, slots), b1_rows))
    if member is not None:
        h = h.masked_fill(~member, 0)
    return F.linear(h, w2.index_select(1, slots), b2)


def _hire_ffn(x, w1, b1, w2, b2, activation, predictor, rank, threshold, expected_neurons):
    d_ff, d = w1.shape
    x2d = x.reshape(-1, d).contiguous()
    rows, d_out = x2d.shape[0], w2.shape[0]
    model = predictor_for(w1, predictor, rank)
    if hire_predictor.uses_kernel(x):
        from topk_compiler.kernels.sparse_ffn import lowrank_sparse_ffn_row, sparse_ffn

        w1 = w1 if w1.stride(1) == 1 else w1.contiguous()
        processors = cost_model.device_profile(str(x.device)).processors
        union = math.ceil(hire_cost_model.expected_union(rows, max(expected_neurons, 1), d_ff))
        if hire_cost_model.fuses_prediction(rows, d, d_out, predictor):
            out = lowrank_sparse_ffn_row(x2d, model.a, model.b, w1, b1, transposed_copy(w2), b2, threshold,
                                         activation=activation, expected=union,
                                         programs=hire_cost_model.fused_ffn_programs(d_ff, d_out, processors))
        else:
            programs = hire_cost_model.ffn_programs(union, rows, d_out, processors)
            out = sparse_ffn(x2d, w1, b1, transposed_copy(w2), b2, model.scores(x2d, b1).contiguous(), threshold,
                             activation=activation, programs=programs, expected=union)
    else:
        pred = model.scores(x2d, b1)
        chosen = pred > threshold
        slots = chosen.any(dim=0).nonzero().flatten()
        out = restricted_ffn(x2d, w1, b1, w2, b2, activation, slots, chosen[:, slots] if rows > 1 else None)
    return out.reshape(*x.shape[:-1], d_out)


def runs_dense(x, w1, b1, w2, b2, activation, predictor, rank, threshold, expected_neurons,
               captured: bool | None = None) -> bool:
    """Whether ``hire_ffn`` with ``rewrite="auto"`` runs the dense FFN on ``x``: on the GPU as
    timed at the shape's first call (for this call, or with ``captured`` for calls in a CUDA graph
    or outside one), elsewhere (and while a graph is captured first) as predicted."""
    d_ff, d = w1.shape
    key = ("ffn", str(x.device), tuple(x.shape), x.dtype, tuple(w1.shape), w2.shape[0], b1 is None, b2 is None,
           activation, predictor, rank, threshold, expected_neurons)
    return device_timing.dense_wins(
        key, lambda: dense_is_cheaper(x.numel() // d, d, d_ff, w2.shape[0], expected_neurons, predictor, rank,
                                      x.dtype, str(x.device)),
        lambda: dense_ffn(x, w1, b1, w2, b2, activation),
        lambda: _hire_ffn(x, w1, b1, w2, b2, activation, predictor, rank, threshold, expected_neurons),
        hire_cost_model.MIN_SPEEDUP, measure=hire_predictor.uses_kernel(x), captured=captured)


@torch.library.custom_op("topk_compiler::hire_ffn", mutates_args=())
def hire_ffn(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str,
    predictor: str,
    rank: int,
    threshold: float,
    expected_neurons: int,
    rewrite: str,
) -> torch.Tensor:
    """``linear(act(linear(x, w1, b1)), w2, b2)`` over each row's neurons whose pre-activation,
    as predicted by ``predictor`` ("lowrank" of ``rank``, "int8", "int4"), exceeds ``threshold``.
    ``expected_neurons``: about how many neurons a row keeps (the cost model's and the kernel's
    sizing; it does not change the result)."""
    check_ffn_arguments(x, w1, b1, w2, b2, activation, predictor, rank, threshold, expected_neurons, rewrite)
    rows = x.numel() // w1.shape[1] if w1.shape[1] else 0
    if rows == 0 or rewrite == "auto" and runs_dense(x, w1, b1, w2, b2, activation, predictor, rank, threshold,
                                                     expected_neurons):
        return dense_ffn(x, w1, b1, w2, b2, activation)
    return _hire_ffn(x, w1, b1, w2, b2, activation, predictor, rank, threshold, expected_neurons)


@hire_ffn.register_fake
def _(x, w1, b1, w2, b2, activation, predictor, rank, threshold, expected_neurons, rewrite):
    return x.new_empty((*x.shape[:-1], w2.shape[0]))
