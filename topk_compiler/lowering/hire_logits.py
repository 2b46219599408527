"""``torch.ops.topk_compiler.hire_logits_topk``: top-k of the logits ``linear(x, W, b)`` (through a
positive scale and softmax / log_softmax) by HiRE predict-then-compute (arXiv 2402.09360).

1. A predictor of ``W`` (``hire_predictor.py``: low-rank or int8/int4) scores every row of ``W``.
2. The k' best predicted rows of each input row are its candidates (``hire_candidates.py``).
3. The exact logits of the candidates only: a gather-matmul reads those rows of ``W``
   (``kernels/gather_matmul.py`` on CUDA; ``index_select`` + matmul on CPU).
4. Exact top-k over the candidates' exact scores. Every returned value is the exact value at its
   index; an index is missed only when the predictor ranked it outside the k' candidates.

With softmax, the normaliser ``Z = sum_j exp(s_j)`` is computed from the exact scores ``s`` on the
candidates ``C`` and the predicted scores ``p`` elsewhere (no more weight bytes are read). Its
error: ``Z_hat / Z - 1 = sum_{j not in C} exp(s_j) (exp(p_j - s_j) - 1) / Z``, so with
``rho = sum_{j not in C} exp(s_j) / Z`` (the probability mass outside the candidates) and
``delta = max_{j not in C} |p_j - s_j|``: ``|Z_hat / Z - 1| <= rho (exp(delta) - 1)``, and every
returned probability is off by the factor ``Z / Z_hat`` (log_softmax: by ``log(Z_hat / Z)``).
The mass ``rho`` outside the top k' is small exactly when the head is peaked.

With ``rewrite="auto"`` the op runs the dense form (F.linear, the same scale and normalisation,
torch.topk) where that is faster for the batch it is given, so a graph compiled for batch 1 stays
fast at batch 256: on the GPU as measured at the first call of a shape
(``device_timing.dense_wins``: replayed for calls in a CUDA graph, eagerly for the others),
elsewhere as the HiRE cost model predicts.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from topk_compiler.lowering import device_timing, hire_cost_model, hire_predictor
from topk_compiler.lowering.hire_candidates import candidate_slots
from topk_compiler.lowering.hire_predictor import PREDICTOR_KINDS, predictor_for

NORMALIZATIONS = ("none", "softmax", "log_softmax")


def check_logits_arguments(x, weight, bias, k, scale, normalize, predictor, rank, candidates, rewrite) -> None:
    """Raises ValueError / TypeError naming the argument for a bad one."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("hire_logits_topk: x and weight must be tensors")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"hire_logits_topk: need x [..., d] and weight [n, d], got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if not x.dtype.is_floating_point or x.dtype != weight.dtype:
        raise ValueError(f"hire_logits_topk: x and weight must share one floating dtype, got {x.dtype} and "
                         f"{weight.dtype}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != weight.dtype):
        raise ValueError(f"hire_logits_topk: bias must be [{weight.shape[0]}] {weight.dtype}, got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    if not 0 <= k <= weight.shape[0]:
        raise ValueError(f"hire_logits_topk: k must be in [0, {weight.shape[0]}], got {k}")
    if not scale > 0:
        raise ValueError(f"hire_logits_topk: scale must be positive (a monotone transform), got {scale}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"hire_logits_topk: normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if predictor not in PREDICTOR_KINDS:
        raise ValueError(f"hire_logits_topk: predictor must be one of {PREDICTOR_KINDS}, got {predictor!r}")
    if predictor == "lowrank" and rank < 1:
        raise ValueError(f"hire_logits_topk: rank must be >= 1 for a lowrank predictor, got {rank}")
    if candidates < 1:
        raise ValueError(f"hire_logits_topk: candidates must be >= 1, got {candidates}")
    if rewrite not in ("auto", "always"):
        raise ValueError(f"hire_logits_topk: rewrite must be 'auto' or 'always', got {rewrite!r}")


@functools.lru_cache(maxsize=4096)
def dense_is_cheaper(rows: int, d: int, n: int, k: int, candidates: int, predictor: str, rank: int,
                     dtype: torch.dtype, device: str, normalize: str) -> bool:
    dense = hire_cost_model.dense_logits_cost(rows, d, n, k, dtype, device, normalize)
    hire = hire_cost_model.hire_logits_cost(rows, d, n, k, candidates, predictor, rank, dtype, device, normalize)
    return not hire_cost_model.worth_rewriting(hire, dense)


def dense_logits_topk(x, weight, bias, k, largest, sorted, scale, normalize, out_dtype):
    """The exact computation the op stands for."""
    y = F.linear(x, weight, bias).to(out_dtype)
    if scale != 1.0:
        y = y * scale
    if normalize == "softmax":
        y = torch.softmax(y, dim=-1)
    elif normalize == "log_softmax":
        y = torch.log_softmax(y, dim=-1)
    values, indices = torch.topk(y, k, dim=-1, largest=largest, sorted=sorted)
    return values.contiguous(), indices.contiguous()


def candidate_logits(x2d, weight, bias, slots, member, fill, use_kernel):
    """[rows, S] fp32 exact logits of the slots; ``fill`` at padding and non-members."""
    if use_kernel:
        from topk_compiler.kernels.gather_matmul import gather_matmul

        return gather_matmul(x2d, weight if weight.stride(1) == 1 else weight.contiguous(), slots, bias,
                             member=member, fill=fill)
    rows_of_w = slots.clamp(min=0)
    exact = F.linear(x2d, weight.index_select(0, rows_of_w), None if bias is None else bias.index_select(0, rows_of_w))
    keep = slots >= 0 if member is None else member
    return exact.to(torch.float32).masked_fill(~keep, fill)


def _hire_logits_topk(x, weight, bias, k, largest, sorted, scale, normalize, out_dtype, predictor, rank, candidates):
    n, d = weight.shape
    x2d = x.reshape(-1, d).contiguous()
    rows = x2d.shape[0]
    use_kernel = hire_predictor.uses_kernel(x)
    pred = predictor_for(weight, predictor, rank).scores(x2d, bias)
    slots, member = candidate_slots(pred, min(max(candidates, k), n), largest, compact=not use_kernel)
    fill = float("-inf") if largest else float("inf")
    exact = candidate_logits(x2d, weight, bias, slots, member, fill, use_kernel)
    # Round as F.linear's output is rounded, then follow the chain in its dtype.
    y = exact.to(x.dtype).to(out_dtype)
    if scale != 1.0:
        y = y * scale
    top_values, top_pos = torch.topk(y, k, dim=1, largest=largest, sorted=sorted)
    indices = slots[top_pos]
    if normalize == "none":
        values = top_values
    else:
        spare = pred.new_full((rows, 1), float("-inf"), dtype=torch.float32)
        mixed = torch.cat([pred.to(torch.float32) * scale, spare], 1)
        target = slots.clamp(min=0).expand(rows, -1)
        keep = (slots >= 0).expand(rows, -1) if member is None else member
        target = torch.where(keep, target, n)  # non-members keep their predicted score: write to the spare column
        mixed.scatter_(1, target, torch.where(keep, y.to(torch.float32), float("-inf")))
        log_z = torch.logsumexp(mixed, dim=1, keepdim=True)
        log_p = top_values.to(torch.float32) - log_z
        values = (log_p if normalize == "log_softmax" else log_p.exp()).to(out_dtype)
    out_shape = (*x.shape[:-1], k)
    return values.reshape(out_shape).contiguous(), indices.reshape(out_shape).contiguous()


def runs_dense(x, weight, bias, k, largest, sorted, scale, normalize, out_dtype, predictor, rank, candidates,
               captured: bool | None = None) -> bool:
    """Whether ``hire_logits_topk`` with ``rewrite="auto"`` runs the dense form on ``x``: on the
    GPU as timed at the shape's first call (for this call, or with ``captured`` for calls in a
    CUDA graph or outside one), elsewhere (and while a graph is captured first) as predicted."""
    n, d = weight.shape
    key = ("logits", str(x.device), tuple(x.shape), x.dtype, (n, d), bias is None, k, largest, sorted, scale,
           normalize, out_dtype, predictor, rank, candidates)
    return device_timing.dense_wins(
        key, lambda: dense_is_cheaper(x.numel() // d, d, n, k, candidates, predictor, rank, x.dtype, str(x.device),
                                      normalize),
        lambda: dense_logits_topk(x, weight, bias, k, largest, sorted, scale, normalize, out_dtype),
        lambda: _hire_logits_topk(x, weight, bias, k, largest, sorted, scale, normalize, out_dtype, predictor, rank,
                                  candidates),
        hire_cost_model.MIN_SPEEDUP, measure=hire_predictor.uses_kernel(x), captured=captured)


@torch.library.custom_op("topk_compiler::hire_logits_topk", mutates_args=())
def hire_logits_topk(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    largest: bool,
    sorted: bool,
    scale: float,
    normalize: str,
    out_dtype: torch.dtype,
    predictor: str,
    rank: int,
    candidates: int,
    rewrite: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim of ``normalize(scale * linear(x, weight, bias).to(out_dtype))``
    (``normalize``: "none", "softmax" or "log_softmax"; ``scale`` > 0), with k' = ``candidates``
    rows scored exactly after the ``predictor`` ("lowrank" of ``rank``, "int8", "int4")."""
    check_logits_arguments(x, weight, bias, k, scale, normalize, predictor, rank, candidates, rewrite)
    rows = x.numel() // weight.shape[1] if weight.shape[1] else 0
    if (rows == 0 or k == 0
            or rewrite == "auto" and runs_dense(x, weight, bias, k, largest, sorted, scale, normalize, out_dtype,
                                                predictor, rank, candidates)):
        return dense_logits_topk(x, weight, bias, k, largest, sorted, scale, normalize, out_dtype)
    return _hire_logits_topk(x, weight, bias, k, largest, sorted, scale, normalize, out_dtype, predictor, rank,
                             candidates)


@hire_logits_topk.register_fake
def _(x, weight, bias, k, largest, sorted, scale, normalize, out_dtype, predictor, rank, candidates, rewrite):
    shape = (*x.shape[:-1], k)
    return x.new_empty(shape, dtype=out_dtype), x.new_empty(shape, dtype=torch.int64)
