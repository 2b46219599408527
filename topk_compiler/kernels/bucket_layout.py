"""Triton form of ``lowering/layouts.py``: the element held by slot ``g`` of bucket ``q``.

The specification hashes in int64 with 32-bit masks; here the same hash runs in uint32, whose
products and sums wrap to exactly those low 32 bits (an int64 product costs several
instructions, and the streaming loop hashes once per slot), so both give the same buckets.
"""

import triton
import triton.language as tl


@triton.jit
def group_rotation(row, group, seed):
    """32-bit hash of (seed, row, group), as int64 (see ``lowering/layouts.py``)."""
    # tl.cast: in the interpreter a loop counter may arrive as a plain int
    row, group, seed = tl.cast(row, tl.uint32), tl.cast(group, tl.uint32), tl.cast(seed, tl.uint32)
    h = row * 0x27D4EB2F + group * 0x165667B1 + seed * 0x61C88647
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x5BD1E995
    return (h ^ (h >> 16)).to(tl.int64)


@triton.jit
def element_index(row, q, g, num_buckets, slots, seed, LAYOUT: tl.constexpr):
    """Index (int64) of slot ``g`` of bucket ``q`` in ``row``; ``q``/``g`` may be tensors.

    LAYOUT: 0 interleaved, 1 shuffled, 2 contiguous (``lowering.layouts.LAYOUT_IDS``).

    ``num_buckets`` is a power of two for the shuffled layout; ``slots`` = ceil(n / num_buckets).
    """
    if LAYOUT == 0:
        idx = g.to(tl.int64) * num_buckets + q
    elif LAYOUT == 1:
        h = group_rotation(row, g, seed)
        idx = g.to(tl.int64) * num_buckets + ((q - h) & (num_buckets - 1))
    else:
        idx = q.to(tl.int64) * slots + g
    return idx
