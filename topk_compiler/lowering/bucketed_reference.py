"""Bucketed two-stage top-k in plain torch ops: the CPU implementation, and the reference the
Triton kernels are tested against. Runs on any device and any floating dtype (fp64 included)."""

from __future__ import annotations

import torch

from topk_compiler.lowering.layouts import bucket_members
from topk_compiler.lowering.order_keys import PAD_KEY, order_keys


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of ``x2d`` ([rows, n]) through buckets; returns (values, int64 indices).

    Ties inside a bucket go to the earlier element, as in the kernels.
    """
    rows, n = x2d.shape
    b = num_buckets
    slots = -(-n // b)
    kb = min(per_bucket_k, slots)
    keys = order_keys(x2d, largest)
    # Keys of types up to 32 bits are < 2**31 in magnitude: shifted left with the inverted slot in
    # the low bits, the earlier element wins a tie, as in the kernels' packing.
    slot_bits = max(1, (slots - 1).bit_length())
    padded = torch.full((rows, max(b * slots, n + 1)), PAD_KEY, dtype=torch.int64, device=x2d.device)
    padded[:, :n] = keys
    members = bucket_members(n, b, layout, rows=rows, seed=seed, device=x2d.device)
    if layout == "interleaved":
        bucket_keys = padded[:, : b * slots].view(rows, slots, b).transpose(1, 2)
    elif layout == "contiguous":
        bucket_keys = padded[:, : b * slots].view(rows, b, slots)
    else:
        bucket_keys = padded.gather(1, members.reshape(rows, -1)).view(rows, b, slots)
    if x2d.element_size() <= 4:
        slot_rank = (slots - 1) - torch.arange(slots, device=x2d.device)
        real = bucket_keys != PAD_KEY
        packed = torch.where(real, (bucket_keys << slot_bits) | slot_rank, torch.full_like(bucket_keys, PAD_KEY))
    else:  # 64-bit keys leave no room for the slot; ties then go either way
        packed = bucket_keys
    top_packed, top_slot = packed.topk(kb, dim=-1)
    candidates = members.expand(rows, -1, -1).gather(-1, top_slot)
    _, pick = top_packed.reshape(rows, -1).topk(k, dim=-1, sorted=sorted)
    indices = candidates.reshape(rows, -1).gather(1, pick)
    return x2d.gather(1, indices), indices
