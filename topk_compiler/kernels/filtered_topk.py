"""Exact top-k of rows too long to hold in registers, in two passes over the row.

1. Stage 1 of the bucketed top-k (``bucketed_topk.bucket_survivors_of``) keeps the top
   ``per_bucket_k`` of each of ``num_buckets`` interleaved buckets. The survivors are a subset of
   the row, so their k-th largest key is at most the row's k-th largest key, and so is
   ``bound``, that key's BOUND_BITS leading bits: every element of the exact top-k has a key
   >= ``bound``.
2. A second pass over the row compacts the elements with key > ``bound`` into a scratch of
   ``CAP`` candidates (``candidate_slots``: 2k rounded up), each a packed (key, index) entry
   (``select_topk.index_entry``: an int32 for 16-bit keys of rows up to 2**16, else an int64), and
   the first k elements equal to it into a second one. About k / recall elements pass, recall being stage 1's.
3. If at least k passed, the exact top-k of the candidates is the row's (``select_and_store``);
   if fewer, the row's top-k is all of them plus the first ties. If more than ``CAP`` passed
   (an order that crowds the large elements into a few buckets, e.g. a period dividing the
   bucket count), the program falls back to ``exact_from_memory``: bisection of the threshold
   over the whole row, one counting pass per key bit. Slow, always exact, and rare.

``filtered_topk`` runs the three steps in one program per row. Its second pass is a chain of
dependent steps (load, prefix sum, stores) that one program cannot overlap: at 1024 x 32768 bf16
k=2048 it took 336 us on an H200, against 358 for torch.topk. ``split_filtered_topk`` gives each
step a launch of its own, with many light programs: the bound from ``segments`` programs per row
(each the ``ceil(k / segments)``-th largest of its buckets' survivors; the smallest of them has
k keys of the row at or above it, as the segments' buckets are disjoint), the filtering pass
from a program per ``block`` of the row, each reserving its candidates' slots with one atomic
add, then the selection among the candidates, one program per row. Slots are reserved in no
fixed order, so which of several equal elements is returned may vary; the values never do.
"""

import torch
import triton
import triton.language as tl

from topk_compiler.kernels import MAX_GRID_YZ, cdiv, next_pow2
from topk_compiler.kernels.bucketed_topk import bucket_survivors_of, check_stage1, stage1_meta
from topk_compiler.kernels.launch import Launch
from topk_compiler.kernels.order_key import order_key
from topk_compiler.kernels.select_topk import (compact_positions, entry_pad, finisher_for, index_entry, key_pad,
                                               key_lower_bound, order32, order_entry, outputs_maker, select_and_store,
                                               pack32, select_meta, sort_stored, sorts_entries_in_index_row,
                                               store_by_index_entries, store_index_entries, store_selected,
                                               unpack_index_entry, write_index_entries)

# Elements per step of the filtering pass: 4096 keeps 16 per thread in flight at 8 warps.
FILTER_BLOCK = 4096
# Elements and warps of a program of split_filtered_topk's filtering pass: each program waits on
# its load, then on its atomic add, whatever its size. On an H100 the pass took 119 us at 1024 x
# 32768 bf16 k=2048 with (256, 1), 128 with (1024, 4) and (512, 2), 139 with (2048, 8); the whole
# unsorted kernel was fastest with (256, 1) at 4 of 5 shapes, and 2% slower at 64 x 131072
# (benchmarks/results/profile_large_k_h100_packed.json).
SPLIT_FILTER_BLOCK = 256
SPLIT_FILTER_WARPS = 1
# Leading key bits the filtered kernels' bound decides (``select_topk.key_lower_bound``): sign,
# exponent and 5 mantissa bits of a bf16 or fp32 key (8 of fp16). Below the k-th key by at most
# 1/32 of its power of two, it lets a few more elements pass than the exact k-th survivor key
# would, for 2 fewer block-wide counts than bisection of 16-bit keys and 18 fewer of 32-bit ones.
BOUND_BITS = 14


def candidate_slots(k: int) -> int:
    """Slots for the elements above a row's bound (``CAP``): twice k rounded up to a power of two.
    About k / r pass a bound that stage 1 found with recall r (the planner's filtered bucketings
    reach 0.8: 1.25 k), and only the rows a certificate flagged pass more than k by more than a
    few; a row where more pass than this falls back to bisection. The scratch stays far below the
    survivors (2 k against ``num_buckets * per_bucket_k`` slots) and so does the register tile of
    the selection among the candidates."""
    return 2 * next_pow2(k)


def candidate_words(k: int, key_bits: int, n: int) -> int:
    """int32 words of a row's ``candidate_slots`` packed (key, index) entries: one an entry where
    they fit an int32 (``select_topk.pack32``), else two. Packed, the 1024 x 32768 bf16 k=2048
    scratch takes 16 MiB, not the 32 of separate keys and indices: below the 24 MiB of its
    survivors."""
    return candidate_slots(k) * (1 if pack32(key_bits, n) else 2)


@triton.jit
def _entries(scratch_row, PACK32: tl.constexpr):
    """The candidate entries at the start of a row's int32 scratch (``candidate_words``)."""
    entries = scratch_row
    if not PACK32:
        entries = scratch_row.to(tl.pointer_type(tl.int64), bitcast=True)
    return entries


@triton.jit
def _row_keys(x_row_ptr, start, n, BLOCK: tl.constexpr, LARGEST: tl.constexpr, KEY_BITS: tl.constexpr,
              ONE_A_THREAD: tl.constexpr = False):
    """Keys of elements start ... start + BLOCK of a row (padding past n). ONE_A_THREAD: each
    thread's load takes one element, not a 16-byte vector: the layout of the scattered stores of
    ``_store_passing``, so that their pointers and masks need not go through shared memory (the
    split kernel's filtering pass at 1024 x 32768 bf16 took 92 us with it, 120 without,
    benchmarks/results/profile_filter_pass_h100_8a87819.json)."""
    offs = start + tl.arange(0, BLOCK)
    if ONE_A_THREAD:
        offs = tl.max_contiguous(offs, 1)
    valid = offs < n
    keys = tl.where(valid, order_key(tl.load(x_row_ptr + offs, mask=valid, other=0.0), LARGEST), key_pad(KEY_BITS))
    return keys, offs


@triton.jit
def exact_from_memory(x_row_ptr, n, k, values_row_ptr, indices_row_ptr, order_row_ptr,
                      LARGEST: tl.constexpr, KEY_BITS: tl.constexpr, BLOCK: tl.constexpr, K_POW2: tl.constexpr,
                      SORTED: tl.constexpr, SORT_HERE: tl.constexpr, ORDER32: tl.constexpr, PACK32: tl.constexpr):
    """Exact top-k of one row in memory: the k-th largest key by bisection (a counting pass over
    the row per key bit), then one pass compacting the keys above it and the first ties (sorted
    in the program as ``select_and_store`` sorts: by (key, index) entries where they fit)."""
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
        if SORTED and SORT_HERE and (PACK32 or KEY_BITS == 32):
            store_index_entries(keys, offs, chosen, position, order_row_ptr, PACK32)
        else:
            store_selected(keys, offs, chosen, position, x_row_ptr, values_row_ptr, indices_row_ptr, order_row_ptr,
                           SORTED, ORDER32, KEY_BITS, LARGEST)
        above_base += n_above
        tied_base += n_tied
    if SORTED and SORT_HERE:
        tl.debug_barrier()
        if PACK32 or KEY_BITS == 32:
            write_index_entries(k, x_row_ptr, values_row_ptr, indices_row_ptr, order_row_ptr, K_POW2, KEY_BITS,
                                PACK32, LARGEST, True)
        else:
            sort_stored(values_row_ptr, indices_row_ptr, order_row_ptr, k, K_POW2, ORDER32)


@triton.jit
def _passing(keys, bound):
    """Per key, 1 if above ``bound`` plus 1 << 16 if equal to it: the two counts share an int32
    (blocks of at most 2**15), so one reduction or prefix sum counts both."""
    return (keys > bound).to(tl.int32) + ((keys == bound).to(tl.int32) << 16)


@triton.jit
def _store_passing(keys, offs, bound, total, above_base, tied_base, k, cand_row, tie_idx_row,
                   CAP: tl.constexpr, PACK32: tl.constexpr):
    """Stores a block's candidates: its keys above ``bound`` (packed with their indices) after
    ``above_base`` others, within the CAP slots, and the indices of its keys equal to it after
    ``tied_base`` others, within k. ``total``: the block's ``_passing`` summed. The slot bound is
    checked once for a block whose candidates all fit, and a block without ties (most) computes
    no tie positions: the split kernel's filtering pass took 46 us so, 59 otherwise, at
    1024 x 16384 fp32 (``profile_filter_pass_h100_8a87819.json``)."""
    above = keys > bound
    packed = tl.cumsum(_passing(keys, bound), axis=0)
    above_pos = above_base + (packed & 0xFFFF) - above.to(tl.int32)
    entries = _entries(cand_row, PACK32) + above_pos
    if above_base + (total & 0xFFFF) <= CAP:
        tl.store(entries, index_entry(keys, offs, PACK32), mask=above)
    else:
        tl.store(entries, index_entry(keys, offs, PACK32), mask=above & (above_pos < CAP))
    if (total >> 16) > 0:
        tied = keys == bound
        tied_pos = tied_base + (packed >> 16) - tied.to(tl.int32)
        tl.store(tie_idx_row + tied_pos, offs.to(tl.int64), mask=tied & (tied_pos < k))


@triton.jit
def select_candidates(x_row_ptr, bound, above, n, k, values_row_ptr, indices_row_ptr, order_row_ptr, cand_row,
                      tie_idx_row,
                      LARGEST: tl.constexpr, KEY_BITS: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr,
                      K_POW2: tl.constexpr, SORTED: tl.constexpr, SELECT: tl.constexpr, SORT_HERE: tl.constexpr,
                      ORDER32: tl.constexpr, PACK32: tl.constexpr):
    """Exact top-k of one row from its candidates: the ``above`` elements above ``bound`` (at most
    its k-th largest key) as entries in the CAP-slot scratch ``cand_row``, the first k ties in
    ``tie_idx_row``; step 3 of the module docstring."""
    if above > CAP:
        exact_from_memory(x_row_ptr, n, k, values_row_ptr, indices_row_ptr, order_row_ptr,
                          LARGEST, KEY_BITS, BLOCK, K_POW2, SORTED, SORT_HERE, ORDER32, PACK32)
    elif above >= k:
        f = tl.arange(0, CAP)
        # A padding entry unpacks to the padding key.
        entries = tl.load(_entries(cand_row, PACK32) + f, mask=f < above, other=entry_pad(PACK32))
        cand_keys, cand_idx = unpack_index_entry(entries, PACK32)
        select_and_store(cand_keys, cand_idx, k, x_row_ptr, values_row_ptr, indices_row_ptr, order_row_ptr,
                         K_POW2=K_POW2, KEY_BITS=KEY_BITS, SORTED=SORTED, SELECT=SELECT, SORT_HERE=SORT_HERE,
                         ORDER32=ORDER32, PACK32=PACK32, LARGEST=LARGEST)
    else:
        # All of the row above the bound, then the first ties to make k (the tie scratch is the
        # output's own index row: position o reads tie o - above before anything writes o).
        o = tl.arange(0, K_POW2)
        in_k = o < k
        from_above = o < above
        above_keys, above_idx = unpack_index_entry(
            tl.load(_entries(cand_row, PACK32) + o, mask=from_above & in_k, other=0), PACK32)
        out_keys = tl.where(from_above, above_keys, bound)
        out_idx = tl.where(from_above, above_idx, tl.load(tie_idx_row + (o - above), mask=(~from_above) & in_k, other=0))
        tl.debug_barrier()
        if SORTED and SORT_HERE and (PACK32 or KEY_BITS == 32):
            # The entries may take the index row: every tie was loaded before the barrier.
            store_by_index_entries(out_keys, out_idx, in_k, o, k, x_row_ptr, values_row_ptr, indices_row_ptr,
                                   order_row_ptr, K_POW2, KEY_BITS, PACK32, LARGEST, True)
        else:
            out_values = tl.load(x_row_ptr + out_idx, mask=in_k)
            tl.store(indices_row_ptr + o, out_idx, mask=in_k)
            tl.store(values_row_ptr + o, out_values, mask=in_k)
            if SORTED:
                tl.store(order_row_ptr + o, order_entry(out_keys, o, ORDER32), mask=in_k)
                if SORT_HERE:
                    tl.debug_barrier()
                    sort_stored(values_row_ptr, indices_row_ptr, order_row_ptr, k, K_POW2, ORDER32)


@triton.jit
def filter_and_select(x_row_ptr, bound, n, k, values_row_ptr, indices_row_ptr, order_row_ptr, cand_row,
                      tie_idx_row,
                      LARGEST: tl.constexpr, KEY_BITS: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr,
                      K_POW2: tl.constexpr, SORTED: tl.constexpr, SELECT: tl.constexpr, SORT_HERE: tl.constexpr,
                      ORDER32: tl.constexpr, PACK32: tl.constexpr):
    """Exact top-k of one row given ``bound``, at most its k-th largest key: one program passes
    over the row storing the candidates (``_store_passing``), then selects among them."""
    above_base = tl.zeros([], dtype=tl.int32)
    tied_base = tl.zeros([], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        keys, offs = _row_keys(x_row_ptr, start, n, BLOCK, LARGEST, KEY_BITS)
        total = tl.sum(_passing(keys, bound), axis=0)
        _store_passing(keys, offs, bound, total, above_base, tied_base, k, cand_row, tie_idx_row, CAP, PACK32)
        above_base += total & 0xFFFF
        tied_base += total >> 16
    tl.debug_barrier()
    select_candidates(x_row_ptr, bound, above_base, n, k, values_row_ptr, indices_row_ptr, order_row_ptr,
                      cand_row, tie_idx_row, LARGEST, KEY_BITS, CAP, BLOCK, K_POW2, SORTED,
                      SELECT, SORT_HERE, ORDER32, PACK32)


@triton.jit
def _filtered_topk_kernel(x_ptr, values_ptr, indices_ptr, order_ptr, cand_ptr, tie_idx_ptr,  # pointers
                          n, k, num_buckets, slots,                                                           # sizes
                          x_row_stride, out_row_stride, cand_row_stride,                                      # strides
                          BLANES: tl.constexpr, KB: tl.constexpr, KBP: tl.constexpr, LAYOUT: tl.constexpr,
                          UNROLL: tl.constexpr, LARGEST: tl.constexpr, KEY_BITS: tl.constexpr,
                          POS_BITS: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr, K_POW2: tl.constexpr,
                          SORTED: tl.constexpr, SELECT: tl.constexpr, SORT_HERE: tl.constexpr,
                          ORDER32: tl.constexpr, PACK32: tl.constexpr, BOUND_BITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row_ptr = x_ptr + row * x_row_stride
    survivors, _ = bucket_survivors_of(x_row_ptr, row, 0, n, num_buckets, slots, 0,
                                       BLANES, KB, KBP, LAYOUT, UNROLL, LARGEST, KEY_BITS, POS_BITS)
    bound = key_lower_bound(survivors, k, KEY_BITS, BOUND_BITS, 1)
    filter_and_select(x_row_ptr, bound, n, k, values_ptr + row * out_row_stride, indices_ptr + row * out_row_stride,
                      order_ptr + row * out_row_stride, cand_ptr + row * cand_row_stride,
                      tie_idx_ptr + row * out_row_stride,
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
    words = candidate_words(k, meta["KEY_BITS"], n)
    make_outputs = outputs_maker(x2d, k, meta["KEY_BITS"], sorted, select, sorts_entries_in_index_row(
        meta["KEY_BITS"], n, sorted=sorted, select=select, sort_with=sort_with))
    launch = Launch(_filtered_topk_kernel, (rows,), n=n, k=k, num_buckets=num_buckets, slots=slots,
                    x_row_stride=x2d.stride(0), out_row_stride=k, cand_row_stride=words, **meta, CAP=cap, BLOCK=block,
                    **select_meta(k, meta["KEY_BITS"], n, sorted=sorted, select=select, sort_with=sort_with),
                    BOUND_BITS=min(BOUND_BITS, meta["KEY_BITS"]), num_warps=num_warps)
    finish = finisher_for(rows, k, order32_entries=order32(meta["KEY_BITS"], k), sorted=sorted, select=select,
                          sort_with=sort_with, sort_warps=sort_warps)
    scratch_shape, device = (rows, words), x2d.device

    def run(x2d):
        values, indices, order = make_outputs()
        if rows:
            candidates = torch.empty(scratch_shape, dtype=torch.int32, device=device)
            # The first ties are written to the output's index row before it is filled.
            launch(x2d, values, indices, order, candidates, indices)
        return finish(values, indices, order)

    return run


def filtered_topk(x2d: torch.Tensor, k: int, **options):
    """Exact top-k of each row of ``x2d`` ([rows, n], unit last stride); ``num_buckets`` and
    ``per_bucket_k`` only set how tight the bound is (and so how many candidates pass), never
    which elements are returned. ``options``: those of ``prepare_filtered_topk``."""
    return prepare_filtered_topk(x2d, k, **options)(x2d)


@triton.jit
def _row_bound_kernel(x_ptr, scratch_ptr,                                     # pointers
                      n, k_segment, num_buckets, slots,                       # sizes
                      x_row_stride, scratch_row_stride,                       # strides
                      BLANES: tl.constexpr, KB: tl.constexpr, KBP: tl.constexpr, UNROLL: tl.constexpr,
                      LARGEST: tl.constexpr, KEY_BITS: tl.constexpr, POS_BITS: tl.constexpr, CAP: tl.constexpr,
                      SEGMENTS: tl.constexpr, PACK32: tl.constexpr, BOUND_BITS: tl.constexpr,
                      DIGIT_BITS: tl.constexpr):
    """Program (row, s): a lower bound of the ``k_segment``-th largest survivor key of buckets
    s * BLANES ..., its BOUND_BITS leading bits (``key_lower_bound``), into the row's scratch
    (``split_scratch``); program (row, 0) also zeroes the row's counts."""
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    keys, _ = bucket_survivors_of(x_ptr + row * x_row_stride, row, seg, n, num_buckets, slots, 0,
                                  BLANES, KB, KBP, 0, UNROLL, LARGEST, KEY_BITS, POS_BITS)
    scratch_row = scratch_ptr + row * scratch_row_stride
    tl.store(_row_bounds(scratch_row, CAP, PACK32) + seg,
             key_lower_bound(keys, k_segment, KEY_BITS, BOUND_BITS, DIGIT_BITS))
    if seg == 0:
        tl.store(_row_counts(scratch_row, CAP, SEGMENTS, PACK32) + tl.arange(0, 2), tl.zeros([2], dtype=tl.int32))


@triton.jit
def _row_bounds(scratch_row, CAP: tl.constexpr, PACK32: tl.constexpr):
    """Where the segments' bounds lie, after the CAP entries (``split_scratch``)."""
    if PACK32:
        bounds = scratch_row + CAP
    else:
        bounds = scratch_row + 2 * CAP
    return bounds


@triton.jit
def _row_bound(scratch_row, CAP: tl.constexpr, SEGMENTS: tl.constexpr, PACK32: tl.constexpr):
    return tl.min(tl.load(_row_bounds(scratch_row, CAP, PACK32) + tl.arange(0, SEGMENTS)), axis=0)


@triton.jit
def _row_counts(scratch_row, CAP: tl.constexpr, SEGMENTS: tl.constexpr, PACK32: tl.constexpr):
    """Where the row's counts of candidates above the bound and tied with it lie (``split_scratch``)."""
    return _row_bounds(scratch_row, CAP, PACK32) + SEGMENTS


@triton.jit
def _filter_block_kernel(x_ptr, scratch_ptr, tie_idx_ptr,                       # pointers
                         n, k,                                                  # sizes
                         x_row_stride, scratch_row_stride, tie_row_stride,      # strides
                         LARGEST: tl.constexpr, KEY_BITS: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr,
                         SEGMENTS: tl.constexpr, PACK32: tl.constexpr):
    """Program (row, b): the candidates of elements b * BLOCK ... of the row, stored after those of
    the row's blocks that reserved their slots before it."""
    row = tl.program_id(0).to(tl.int64)
    scratch_row = scratch_ptr + row * scratch_row_stride
    bound = _row_bound(scratch_row, CAP, SEGMENTS, PACK32)
    keys, offs = _row_keys(x_ptr + row * x_row_stride, tl.program_id(1) * BLOCK, n, BLOCK, LARGEST, KEY_BITS,
                           ONE_A_THREAD=True)
    total = tl.sum(_passing(keys, bound), axis=0)
    n_tied = total >> 16
    counts = _row_counts(scratch_row, CAP, SEGMENTS, PACK32)
    above_base = tl.atomic_add(counts, total & 0xFFFF, sem="relaxed")
    # Ties are rare: most blocks reserve none (a masked atomic returns nothing, and none is stored).
    tied_base = tl.atomic_add(counts + 1, n_tied, mask=n_tied > 0, sem="relaxed")
    _store_passing(keys, offs, bound, total, above_base, tied_base, k, scratch_row,
                   tie_idx_ptr + row * tie_row_stride, CAP, PACK32)


@triton.jit
def _select_candidates_kernel(x_ptr, scratch_ptr, values_ptr, indices_ptr, order_ptr,  # pointers
                              n, k,                                                    # sizes
                              x_row_stride, scratch_row_stride, out_row_stride,        # strides
                              LARGEST: tl.constexpr, KEY_BITS: tl.constexpr, CAP: tl.constexpr,
                              BLOCK: tl.constexpr, SEGMENTS: tl.constexpr, K_POW2: tl.constexpr,
                              SORTED: tl.constexpr, SELECT: tl.constexpr, SORT_HERE: tl.constexpr,
                              ORDER32: tl.constexpr, PACK32: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    scratch_row = scratch_ptr + row * scratch_row_stride
    # The ties went to the output's index row (``select_candidates`` reads them before it writes).
    select_candidates(x_ptr + row * x_row_stride, _row_bound(scratch_row, CAP, SEGMENTS, PACK32),
                      tl.load(_row_counts(scratch_row, CAP, SEGMENTS, PACK32)), n, k, values_ptr + row * out_row_stride,
                      indices_ptr + row * out_row_stride, order_ptr + row * out_row_stride, scratch_row,
                      indices_ptr + row * out_row_stride, LARGEST, KEY_BITS, CAP, BLOCK, K_POW2,
                      SORTED, SELECT, SORT_HERE, ORDER32, PACK32)


def split_scratch(words: int, segments: int) -> int:
    """int32 words of a row's scratch in ``split_filtered_topk``: the ``words`` of its candidate
    entries (``candidate_words``), the segments' bounds, the counts of elements above the bound
    and tied with it, and a word to keep the next row's int64 entries 8-byte aligned."""
    return words + segments + 2 + segments % 2


class SplitFilteredTopk:
    """``split_filtered_topk`` prepared for inputs of one shape, dtype and row stride, its three
    launches fixed (``launch.Launch``): ``bound``, ``filter_blocks`` and ``select`` (each a
    function of the tensors it reads and writes), called in turn by ``__call__``.
    ``bound_warps``, ``filter_warps`` and ``num_warps``: warps of a program of each (the bound's
    by default a warp per 32 of its lanes, at most 8); ``bound_bits``: leading key bits of the
    bound (at most the key's), decided ``bound_digit_bits`` a block-wide count."""

    def __init__(self, x2d: torch.Tensor, k: int, *, num_buckets: int, per_bucket_k: int, largest: bool,
                 sorted: bool, segments: int = 1, select: str = "bisect", sort_with: str = "program",
                 sort_warps: int = 1, unroll: int = 4, block: int = SPLIT_FILTER_BLOCK, bound_warps: int | None = None,
                 filter_warps: int = SPLIT_FILTER_WARPS, bound_bits: int = BOUND_BITS, bound_digit_bits: int = 1,
                 num_warps: int = 8):
        check_stage1(x2d, k, num_buckets, per_bucket_k, 0, unroll)
        assert select != "bitonic", "split_filtered_topk: the candidates are selected by bisect or radix"
        assert num_buckets % segments == 0 and segments & (segments - 1) == 0, (
            f"split_filtered_topk: segments ({segments}) must be a power of two dividing num_buckets ({num_buckets})")
        assert block <= 2**15, f"split_filtered_topk: blocks of at most 2**15 elements, got {block}"
        rows, n = x2d.shape
        assert cdiv(n, block) <= MAX_GRID_YZ, (
            f"split_filtered_topk: a row of {n} elements is more than {MAX_GRID_YZ} blocks of {block}")
        slots, meta = stage1_meta(x2d, num_buckets, per_bucket_k, num_buckets // segments, 0, unroll, largest)
        k_segment = cdiv(k, segments)
        assert num_buckets // segments * meta["KBP"] >= k_segment, (
            f"split_filtered_topk: {num_buckets // segments} x {per_bucket_k} survivors a segment hold fewer than "
            f"k / segments = {k_segment}")
        cap, key_bits = candidate_slots(k), meta["KEY_BITS"]
        bound_warps = bound_warps or min(8, max(1, meta["BLANES"] // 32))
        words, packed = candidate_words(k, key_bits, n), pack32(key_bits, n)
        bound_bits = min(bound_bits, key_bits)
        assert bound_bits > 0 and bound_digit_bits in (1, 2, 4) and bound_bits % bound_digit_bits == 0, (
            f"split_filtered_topk: bound_digit_bits ({bound_digit_bits}) of 1, 2 or 4 dividing bound_bits ({bound_bits})")
        self.scratch_shape, self.device, self.rows = (rows, split_scratch(words, segments)), x2d.device, rows
        self.counts_at = words + segments  # the scratch's column of candidates counted above the bound
        common = dict(LARGEST=largest, KEY_BITS=key_bits, CAP=cap)
        self.bound = Launch(_row_bound_kernel, (rows, segments), n=n, k_segment=k_segment, num_buckets=num_buckets,
                            slots=slots, x_row_stride=x2d.stride(0), scratch_row_stride=self.scratch_shape[1],
                            **{name: meta[name] for name in ("BLANES", "KB", "KBP", "UNROLL", "POS_BITS")}, **common,
                            SEGMENTS=segments, PACK32=packed, BOUND_BITS=bound_bits,
                            DIGIT_BITS=bound_digit_bits, num_warps=bound_warps)
        self.filter_blocks = Launch(_filter_block_kernel, (rows, cdiv(n, block)), n=n, k=k, x_row_stride=x2d.stride(0),
                                    scratch_row_stride=self.scratch_shape[1], tie_row_stride=k, **common, BLOCK=block,
                                    SEGMENTS=segments, PACK32=packed, num_warps=filter_warps)
        self.select = Launch(_select_candidates_kernel, (rows,), n=n, k=k, x_row_stride=x2d.stride(0),
                             scratch_row_stride=self.scratch_shape[1], out_row_stride=k, **common, BLOCK=block,
                             SEGMENTS=segments,
                             **select_meta(k, key_bits, n, sorted=sorted, select=select, sort_with=sort_with),
                             num_warps=num_warps)
        self.new_outputs = outputs_maker(x2d, k, key_bits, sorted, select, sorts_entries_in_index_row(
            key_bits, n, sorted=sorted, select=select, sort_with=sort_with))
        self.finish = finisher_for(rows, k, order32_entries=order32(key_bits, k), sorted=sorted, select=select,
                                   sort_with=sort_with, sort_warps=sort_warps)

    def new_scratch(self) -> torch.Tensor:
        return torch.empty(self.scratch_shape, dtype=torch.int32, device=self.device)

    def __call__(self, x2d: torch.Tensor):
        values, indices, order = self.new_outputs()
        if self.rows:
            scratch = self.new_scratch()
            self.bound(x2d, scratch)
            self.filter_blocks(x2d, scratch, indices)
            self.select(x2d, scratch, values, indices, order)
        return self.finish(values, indices, order)


def split_filtered_topk(x2d: torch.Tensor, k: int, **options):
    """``filtered_topk`` in three launches of many programs (module docstring). ``options``:
    those of ``SplitFilteredTopk``."""
    return SplitFilteredTopk(x2d, k, **options)(x2d)
