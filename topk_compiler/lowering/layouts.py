"""Which bucket each element of the reduced axis goes to (the three public layouts).

With ``B`` buckets over a row of length ``n``:

* ``interleaved``: element ``j`` goes to bucket ``j mod B``.
* ``contiguous``: bucket ``q`` holds the run ``[q*m, (q+1)*m)``, ``m = ceil(n / B)``.
* ``shuffled``: each run of ``B`` consecutive elements (a *group*) is rotated by a pseudo-random
  offset ``h(seed, row, group) mod B`` before interleaving: element ``j`` goes to bucket
  ``(j + h) mod B``. Each group still lands one element per bucket, so loads stay coalesced, but
  no input order can line its top-k items up in one bucket.

This module is the specification; the Triton kernels compute the same map
(``kernels/bucket_layout.py``) and the tests hold the two equal.
"""

from __future__ import annotations

import torch

LAYOUT_IDS = {"interleaved": 0, "shuffled": 1, "contiguous": 2}

_MASK32 = 0xFFFFFFFF
# Multipliers below 2**31 so that a 32-bit value times one stays below 2**63 (no int64 overflow).
_ROW_MUL, _GROUP_MUL, _SEED_MUL = 0x27D4EB2F, 0x165667B1, 0x61C88647
_MIX_MUL_1, _MIX_MUL_2 = 0x7FEB352D, 0x5BD1E995

MAX_SEED = 2**31 - 1


def group_rotation(rows: torch.Tensor, groups: torch.Tensor, seed: int) -> torch.Tensor:
    """32-bit hash of (seed, row, group); ``rows`` and ``groups`` broadcast (int64 tensors)."""
    h = ((rows * _ROW_MUL) & _MASK32) + ((groups * _GROUP_MUL) & _MASK32) + ((seed * _SEED_MUL) & _MASK32)
    h = h & _MASK32
    h = h ^ (h >> 16)
    h = (h * _MIX_MUL_1) & _MASK32
    h = h ^ (h >> 15)
    h = (h * _MIX_MUL_2) & _MASK32
    return h ^ (h >> 16)


def bucket_members(
    n: int, num_buckets: int, layout: str, *, rows: int = 1, seed: int = 0, device=None
) -> torch.Tensor:
    """Element index held by slot ``t`` of bucket ``q`` in row ``r``: an int64 tensor
    ``[rows or 1, num_buckets, slots]`` with ``n`` marking an empty slot (past the row's end).

    Rows share one map (first dim 1) except for the shuffled layout, whose rotation is per row.
    """
    b = num_buckets
    slots = -(-n // b)
    q = torch.arange(b, device=device).view(1, b, 1)
    t = torch.arange(slots, device=device).view(1, 1, slots)
    if layout == "interleaved":
        idx = t * b + q
    elif layout == "contiguous":
        idx = q * slots + t
    elif layout == "shuffled":
        r = torch.arange(rows, device=device).view(rows, 1, 1)
        h = group_rotation(r, t, seed) % b
        idx = t * b + (q - h) % b
    else:
        raise ValueError(f"layout must be one of {tuple(LAYOUT_IDS)}, got {layout!r}")
    return torch.where(idx < n, idx, torch.full_like(idx, n))
