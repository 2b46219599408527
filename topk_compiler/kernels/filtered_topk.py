"""Exact top-k of rows too long to hold in registers, one program per row, in two passes.

1. Stage 1 of the bucketed top-k (``bucketed_topk.bucket_survivors_of``) keeps the top
   ``per_bucket_k`` of each of ``num_buckets`` interleaved buckets. The survivors are a subset of
   the row, so their k-th largest key ``bound`` is at most the row's k-th largest key: every
   element of the exact top-k has a key >= ``bound``.
2. A second pass over the row (just read by the same program, so mostly from L2) compacts the
   elements with key > ``bound`` into a scratch of ``CAP`` candidates (``candidate_slots``: 2k
   rounded up), and the first k elements equal to it into a second one. About k / recall elements pass, recall being stage 1's.
3. If at least k passed, the exact top-k of the candidates is the row's (``select_and_store``);
   if fewer, the row's top-k is all of them plus the first ties. If more than ``CAP`` passed
   (an order that crowds the large elements into a few buckets, e.g. a period dividing the
   bucket count), the program falls back to ``exact_from_memory``: bisection of the threshold
   over the whole row, one counting pass per key bit. Slow, always exact, and rare.
"""

import torch
import triton
import triton.language as tl

from topk_compiler.kernels import next_pow2
from topk_compiler.kernels.bucketed_topk import bucket_survivors_of, check_stage1, stage1_meta
from topk_compiler.kernels.launch import Launch
from topk_compiler.kernels.order_key import order_key
from topk_compiler.kernels.select_topk import (compact_positions, finisher_for, key_pad, kth_key_bisect, order32,
                                               order_entry, outputs_maker, select_and_store, select_meta,
                                               sort_stored, store_selected)

# Elements per step of the filtering pass: 4096 keeps 16 per thread in flight at 8 warps.
FILTER_BLOCK = 4096


def candidate_slots(k: int) -> int:
    """Slots for the elements above a row's bound (``CAP``): twice k rounded up to a power of two.
    About k / r pass a bound that stage 1 found with recall r (the planner's filtered bucketings
    reach 0.8: 1.25 k), and only the rows a certificate flagged pass more than k by more than a
    few; a row where more pass than this falls back to bisection. The scratch stays far below the
    survivors (2 k against ``num_buckets * per_bucket_k`` slots) and so does the register tile of
    the selection among the candidates."""
    return 2 * next_pow2(k)


@triton.jit
def _row_keys(x_row_ptr, start, n, BLOCK: tl.constexpr, LARGEST: tl.constexpr, KEY_BITS: tl.constexpr):
    offs = start + tl.arange(0, BLOCK)
    valid = offs < n
    keys = tl.where(valid, order_key(tl.load(x_row_ptr + offs, mask=valid, other=0.0), LARGEST), key_pad(KEY_BITS))
    return keys, offs


@triton.jit
def exact_from_memory(x_row_ptr, n, k, values_row_ptr, indices_row_ptr, order_row_ptr,
                      LARGEST: tl.constexpr, KEY_BITS: tl.constexpr, BLOCK: tl.constexpr, K_POW2: tl.constexpr,
                      SORTED: tl.constexpr, SORT_HERE: tl.constexpr, ORDER32: tl.constexpr):
    """Exact top-k of one row in memory: the k-th largest key by bisection (a counting pass over
    the row per key bit), then one pass compacting the keys above it and the first ties."""
    half = tl.full([], 1, tl.int64) << (KEY_BITS - 1)
    t_off = tl.zeros([], dtype=tl.int64)
    for i in range(KEY_BITS):
        cand_off = t_off + (tl.full([], 1, tl.int64) << (KEY_BITS - 1 - i))
        cand = (cand_off - half).to(tl.int32)
        count = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, n, BLOCK):
            keys, _ = _row_keys(x_row_ptr, start, n, BLOCK, LARGEST, KEY_BITS)
            count += (keys >= cand).to(tl.int32)
        t_off = tl.where(tl.sum(count, axis=0) >= k, cand_off, t_off)
    threshold = (t_off - half).to(tl.int32)
    above = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        keys, _ = _row_keys(x_row_ptr, start, n, BLOCK, LARGEST, KEY_BITS)
        above += (keys > threshold).to(tl.int32)
    need = k - tl.sum(above, axis=0)
    above_base = tl.zeros([], dtype=tl.int32)
    tied_base = tl.zeros([], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        keys, offs = _row_keys(x_row_ptr, start, n, BLOCK, LARGEST, KEY_BITS)
        chosen, position, n_above, n_tied = compact_positions(keys, threshold, need, above_base, tied_base)
        store_selected(keys, offs, chosen, position, x_row_ptr, values_row_ptr, indices_row_ptr, order_row_ptr,
                       SORTED, ORDER32, KEY_BITS, LARGEST)
        above_base += n_above
        tied_base += n_tied
    if SORTED and SORT_HERE:
        tl.debug_barrier()
        sort_stored(values_row_ptr, indices_row_ptr, order_row_ptr, k, K_POW2, ORDER32)


@triton.jit
def filter_and_select(x_row_ptr, bound, n, k, values_row_ptr, indices_row_ptr, order_row_ptr, cand_keys_row,
                      cand_idx_row, tie_idx_row,
                      LARGEST: tl.constexpr, KEY_BITS: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr,
                      K_POW2: tl.constexpr, SORTED: tl.constexpr, SELECT: tl.constexpr, SORT_HERE: tl.constexpr,
                      ORDER32: tl.constexpr, PACK32: tl.constexpr):
    """Exact top-k of one row given ``bound``, at most its k-th largest key: the elements above
    it compacted into the CAP-slot scratch, the first k ties into ``tie_idx_row``, then steps 3
    of the module docstring."""
    above_base = tl.zeros([], dtype=tl.int32)
    tied_base = tl.zeros([], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        keys, offs = _row_keys(x_row_ptr, start, n, BLOCK, LARGEST, KEY_BITS)
        above = keys > bound
        tied = keys == bound
        packed = tl.cumsum(above.to(tl.int32) + (tied.to(tl.int32) << 16), axis=0)
        above_pos = above_base + (packed & 0xFFFF) - above.to(tl.int32)
        tied_pos = tied_base + (packed >> 16) - tied.to(tl.int32)
        keep = above & (above_pos < CAP)
        tl.store(cand_keys_row + above_pos, keys, mask=keep)
        tl.store(cand_idx_row + above_pos, offs.to(tl.int32), mask=keep)
        tl.store(tie_idx_row + tied_pos, offs.to(tl.int64), mask=tied & (tied_pos < k))
        above_base += tl.sum(above.to(tl.int32), axis=0)
        tied_base += tl.sum(tied.to(tl.int32), axis=0)
    tl.debug_barrier()

    if above_base > CAP:
        exact_from_memory(x_row_ptr, n, k, values_row_ptr, indices_row_ptr, order_row_ptr,
                          LARGEST, KEY_BITS, BLOCK, K_POW2, SORTED, SORT_HERE, ORDER32)
    elif above_base >= k:
        f = tl.arange(0, CAP)
        in_c = f < above_base
        cand_keys = tl.load(cand_keys_row + f, mask=in_c, other=key_pad(KEY_BITS))
        cand_idx = tl.load(cand_idx_row + f, mask=in_c, other=0)
        select_and_store(cand_keys, cand_idx, k, x_row_ptr, values_row_ptr, indices_row_ptr, order_row_ptr,
                         K_POW2=K_POW2, KEY_BITS=KEY_BITS, SORTED=SORTED, SELECT=SELECT, SORT_HERE=SORT_HERE,
                         ORDER32=ORDER32, PACK32=PACK32, LARGEST=LARGEST)
    else:
        # All of the row above the bound, then the first ties to make k (the tie scratch is the
        # output's own index row: position o reads tie o - above_base before anything writes o).
        o = tl.arange(0, K_POW2)
        in_k = o < k
        from_above = o < above_base
        out_keys = tl.where(from_above, tl.load(cand_keys_row + o, mask=from_above & in_k, other=0), bound)
        out_idx = tl.where(from_above, tl.load(cand_idx_row + o, mask=from_above & in_k, other=0).to(tl.int64),
                           tl.load(tie_idx_row + (o - above_base), mask=(~from_above) & in_k, other=0))
        out_values = tl.load(x_row_ptr + out_idx, mask=in_k)
        tl.debug_barrier()
        tl.store(indices_row_ptr + o, out_idx, mask=in_k)
        tl.store(values_row_ptr + o, out_values, mask=in_k)
        if SORTED:
            tl.store(order_row_ptr + o, order_entry(out_keys, o, ORDER32), mask=in_k)
            if SORT_HERE:
                tl.debug_barrier()
                sort_stored(values_row_ptr, indices_row_ptr, order_row_ptr, k, K_POW2, ORDER32)


@triton.jit
def _filtered_topk_kernel(x_ptr, values_ptr, indices_ptr, order_ptr, cand_keys_ptr, cand_idx_ptr, tie_idx_ptr,  # pointers
                          n, k, num_buckets, slots,                                                           # sizes
                          x_row_stride, out_row_stride, cand_row_stride,                                      # strides
                          BLANES: tl.constexpr, KB: tl.constexpr, KBP: tl.constexpr, LAYOUT: tl.constexpr,
                          UNROLL: tl.constexpr, LARGEST: tl.constexpr, KEY_BITS: tl.constexpr,
                          POS_BITS: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr, K_POW2: tl.constexpr,
                          SORTED: tl.constexpr, SELECT: tl.constexpr, SORT_HERE: tl.constexpr,
                          ORDER32: tl.constexpr, PACK32: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row_ptr = x_ptr + row * x_row_stride
    survivors, _ = bucket_survivors_of(x_row_ptr, row, 0, n, num_buckets, slots, 0,
                                       BLANES, KB, KBP, LAYOUT, UNROLL, LARGEST, KEY_BITS, POS_BITS)
    bound = kth_key_bisect(survivors, k, KEY_BITS)
    filter_and_select(x_row_ptr, bound, n, k, values_ptr + row * out_row_stride, indices_ptr + row * out_row_stride,
                      order_ptr + row * out_row_stride, cand_keys_ptr + row * cand_row_stride,
                      cand_idx_ptr + row * cand_row_stride, tie_idx_ptr + row * out_row_stride,
                      LARGEST, KEY_BITS, CAP, BLOCK, K_POW2, SORTED, SELECT, SORT_HERE, ORDER32, PACK32)


def prepare_filtered_topk(x2d: torch.Tensor, k: int, *, num_buckets: int, per_bucket_k: int, largest: bool,
                          sorted: bool, select: str = "bisect", sort_with: str = "program", sort_warps: int = 1,
                          unroll: int = 4, block: int = FILTER_BLOCK, num_warps: int = 8):
    """The function of x2d (this one's shape, dtype and row stride) running ``filtered_topk`` with
    these arguments, its launch fixed (``launch.Launch``)."""
    check_stage1(x2d, k, num_buckets, per_bucket_k, 0, unroll)
    assert select != "bitonic", "filtered_topk: the candidates are selected by bisect or radix"
    rows, n = x2d.shape
    slots, meta = stage1_meta(x2d, num_buckets, per_bucket_k, num_buckets, 0, unroll, largest)
    assert num_buckets * meta["KBP"] >= next_pow2(k), (
        f"filtered_topk: {num_buckets} x {per_bucket_k} survivors hold fewer than k={k}")
    cap = candidate_slots(k)
    make_outputs = outputs_maker(x2d, k, meta["KEY_BITS"], sorted)
    launch = Launch(_filtered_topk_kernel, (rows,), n=n, k=k, num_buckets=num_buckets, slots=slots,
                    x_row_stride=x2d.stride(0), out_row_stride=k, cand_row_stride=cap, **meta, CAP=cap, BLOCK=block,
                    **select_meta(k, meta["KEY_BITS"], n, sorted=sorted, select=select, sort_with=sort_with),
                    num_warps=num_warps)
    finish = finisher_for(rows, k, order32_entries=order32(meta["KEY_BITS"], k), sorted=sorted, select=select,
                          sort_with=sort_with, sort_warps=sort_warps)
    scratch_shape, device = (rows, cap), x2d.device

    def run(x2d):
        values, indices, order = make_outputs()
        if rows:
            cand_keys = torch.empty(scratch_shape, dtype=torch.int32, device=device)
            cand_idx = torch.empty(scratch_shape, dtype=torch.int32, device=device)
            # The first ties are written to the output's index row before it is filled.
            launch(x2d, values, indices, order, cand_keys, cand_idx, indices)
        return finish(values, indices, order)

    return run


def filtered_topk(x2d: torch.Tensor, k: int, **options):
    """Exact top-k of each row of ``x2d`` ([rows, n], unit last stride); ``num_buckets`` and
    ``per_bucket_k`` only set how tight the bound is (and so how many candidates pass), never
    which elements are returned. ``options``: those of ``prepare_filtered_topk``."""
    return prepare_filtered_topk(x2d, k, **options)(x2d)
