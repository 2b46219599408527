"""Bucketed two-stage top-k in plain torch ops: the CPU implementation, and the reference the
Triton kernels are tested against. Runs on any device and any floating dtype (fp64 included)."""

from __future__ import annotations

import torch

from topk_compiler.lowering.layouts import bucket_members
from topk_compiler.lowering.order_keys import order_keys


def bucketed_topk_torch(
    x2d: torch.Tensor,
    k: int,
    *,
    largest: bool,
    sorted: bool,
    num_buckets: int,
    per_bucket_k: int,
    layout: str,
    seed: int = 0,
    shares: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of ``x2d`` ([rows, n]) through buckets; returns (values, int64 indices).

    With one slot per bucket, a tie in a bucket goes to its earlier element, as in the kernels;
    with more, tied elements may survive in either order (their values are equal). ``shares``:
    bucket q keeps its share of k (k // b, one more for q < k % b; ``per_bucket_k`` is ignored),
    so the survivors are exactly k, as ``kernels/wide_bucket_topk.WideShareTopk`` does.
    """
    rows, n = x2d.shape
    b = num_buckets
    slots = -(-n // b)
    kb = min(-(-k // b) if shares else per_bucket_k, slots)
    keys = order_keys(x2d, largest)
    padded = torch.full((rows, max(b * slots, n + 1)), torch.iinfo(keys.dtype).min, dtype=keys.dtype,
                        device=x2d.device)
    padded[:, :n] = keys
    members = bucket_members(n, b, layout, rows=rows, seed=seed, device=x2d.device)
    if layout == "interleaved":
        grid, slot_dim = padded[:, : b * slots].view(rows, slots, b), 1
    elif layout == "contiguous":
        grid, slot_dim = padded[:, : b * slots].view(rows, b, slots), 2
    else:
        grid, slot_dim = padded.gather(1, members.reshape(rows, -1)).view(rows, b, slots), 2
    if kb == 1:  # max returns the first of tied maxima
        top, top_slot = grid.max(dim=slot_dim, keepdim=True)
    else:
        top, top_slot = grid.topk(kb, dim=slot_dim)
    if slot_dim == 1:
        top, top_slot = top.transpose(1, 2), top_slot.transpose(1, 2)
    if shares and k % b:
        # The last of each bucket past the first k % b drops out: below every key, as padding is.
        top[:, k % b:, -1] = torch.iinfo(keys.dtype).min
    candidates = members.expand(rows, -1, -1).gather(-1, top_slot)
    _, pick = top.reshape(rows, -1).topk(k, dim=-1, sorted=sorted)
    indices = candidates.reshape(rows, -1).gather(1, pick)
    return x2d.gather(1, indices), indices
