"""Exact top-k from the bucketed one: each row's result certified, or recomputed.

Stage 1 keeps the top ``per_bucket_k`` (kb) of each bucket, so an element it drops is at most its
bucket's kb-th survivor. Where no bucket's kb-th survivor reaches the k-th largest survivor key
T, every dropped element is below T and the top-k of the survivors is the row's own: exact, for
the cost of one streaming pass. ``_fused_bucketed_topk_kernel`` with CERTIFY checks this per row
and flags the rows it cannot certify (a bucket holding kb or more of the row's top k: rare for
inputs in random order when k / num_buckets is small; ``recall_model.uncertified_probability``).
A second launch recomputes only the flagged rows, and its other programs return at once: the
k-th survivor key is a bound on the row's k-th key, so one more pass over the row compacts the
elements above it and selects among them (``filtered_topk.filter_and_select``, which falls back
to bisection over the row if too many pass). Always exact; fast unless many rows are flagged (an
order that crowds large elements into few buckets; the "shuffled" layout spreads any order).
"""

import torch
import triton
import triton.language as tl

from topk_compiler.kernels import next_pow2
from topk_compiler.kernels.bucketed_topk import _fused_bucketed_topk_kernel, check_stage1, stage1_meta
from topk_compiler.kernels.filtered_topk import FILTER_BLOCK, candidate_slots, candidate_words, filter_and_select
from topk_compiler.kernels.launch import Launch
from topk_compiler.kernels.select_topk import (finisher_for, order32, outputs_maker, select_meta,
                                               sorts_entries_in_index_row)


@triton.jit
def _recompute_flagged_kernel(x_ptr, certificate_ptr, values_ptr, indices_ptr, order_ptr, scratch_ptr,  # pointers
                              n, k,                                                                    # sizes
                              x_row_stride, out_row_stride, scratch_row_stride,                        # strides
                              LARGEST: tl.constexpr, KEY_BITS: tl.constexpr, CAP: tl.constexpr,
                              BLOCK: tl.constexpr, K_POW2: tl.constexpr, SORTED: tl.constexpr,
                              SELECT: tl.constexpr, SORT_HERE: tl.constexpr, ORDER32: tl.constexpr,
                              PACK32: tl.constexpr):
    """Rows whose certificate failed: the exact top-k from their bound. A row's scratch holds CAP
    candidate entries (``filtered_topk.candidate_words``)."""
    row = tl.program_id(0).to(tl.int64)
    if tl.load(certificate_ptr + row) != 0:
        scratch_row = scratch_ptr + row * scratch_row_stride
        # The first ties go to the output's index row before it is rewritten (as in filtered_topk).
        filter_and_select(x_ptr + row * x_row_stride, tl.load(certificate_ptr + tl.num_programs(0) + row), n, k,
                          values_ptr + row * out_row_stride, indices_ptr + row * out_row_stride,
                          order_ptr + row * out_row_stride, scratch_row, indices_ptr + row * out_row_stride,
                          LARGEST, KEY_BITS, CAP, BLOCK, K_POW2, SORTED, SELECT, SORT_HERE, ORDER32, PACK32)


def prepare_certified_topk(x2d: torch.Tensor, k: int, *, num_buckets: int, per_bucket_k: int, largest: bool,
                           sorted: bool, layout_id: int = 0, seed: int = 0, select: str = "bisect",
                           sort_with: str = "program", sort_warps: int = 1, unroll: int = 4, num_warps: int = 8,
                           recompute_warps: int = 8, block: int = FILTER_BLOCK, max_registers: int = 0):
    """The function of x2d (this one's shape, dtype and row stride) running ``certified_topk``
    with these arguments, its launches fixed (``launch.Launch``); ``max_registers`` caps a thread
    of the certifying launch (as ``prepare_fused_bucketed_topk``'s)."""
    check_stage1(x2d, k, num_buckets, per_bucket_k, layout_id, unroll)
    assert select != "bitonic", "certified_topk: the survivors are selected by bisect or radix"
    rows, n = x2d.shape
    slots, meta = stage1_meta(x2d, num_buckets, per_bucket_k, num_buckets, layout_id, unroll, largest)
    assert num_buckets * meta["KBP"] >= next_pow2(k), (
        f"certified_topk: {num_buckets} x {per_bucket_k} survivors hold fewer than k={k}")
    cap = candidate_slots(k)
    words = candidate_words(k, meta["KEY_BITS"], n)
    make_outputs = outputs_maker(x2d, k, meta["KEY_BITS"], sorted, select, sorts_entries_in_index_row(
        meta["KEY_BITS"], n, sorted=sorted, select=select, sort_with=sort_with))
    finish = select_meta(k, meta["KEY_BITS"], n, sorted=sorted, select=select, sort_with=sort_with)
    certify = Launch(_fused_bucketed_topk_kernel, (rows,), n=n, k=k, num_buckets=num_buckets, slots=slots, seed=seed,
                     x_row_stride=x2d.stride(0), out_row_stride=k, **meta, **finish, CERTIFY=True,
                     num_warps=num_warps, maxnreg=max_registers or None)
    recompute = Launch(_recompute_flagged_kernel, (rows,), n=n, k=k, x_row_stride=x2d.stride(0), out_row_stride=k,
                       scratch_row_stride=words, LARGEST=largest, KEY_BITS=meta["KEY_BITS"], CAP=cap, BLOCK=block,
                       **finish, num_warps=recompute_warps)
    sort = finisher_for(rows, k, order32_entries=order32(meta["KEY_BITS"], k), sorted=sorted, select=select,
                        sort_with=sort_with, sort_warps=sort_warps)
    device = x2d.device

    def run(x2d):
        values, indices, order = make_outputs()
        # One allocation each (a torch.empty costs about 5 us of host time on an H200's host):
        # flags and bounds; candidate entries, written only by the programs of flagged rows.
        certificate = torch.empty((2, rows), dtype=torch.int32, device=device)
        scratch = torch.empty((rows, words), dtype=torch.int32, device=device)
        if rows:
            certify(x2d, values, indices, order, certificate)
            recompute(x2d, certificate, values, indices, order, scratch)
        values, indices = sort(values, indices, order)
        return values, indices, certificate[0]

    return run


def certified_topk(x2d: torch.Tensor, k: int, **options):
    """Exact top-k of each row of ``x2d`` ([rows, n], unit last stride); the bucketing sets only
    the speed. Returns (values, indices, flags): flags[row] != 0 where the row was recomputed.
    ``options``: those of ``prepare_certified_topk``."""
    return prepare_certified_topk(x2d, k, **options)(x2d)
