"""Bucketed two-stage top-k (arXiv 2412.04358) in Triton.

Stage 1 streams a row once. A program owns ``BLANES`` buckets, one per lane of a vector; each step
loads one element of every bucket (``BLANES`` consecutive elements for the interleaved and
shuffled layouts, so loads are coalesced) and pushes it through that lane's running top-``KB``,
kept sorted in ``KB`` registers (a max/min pair per slot). An element travels as one integer:
its order key in the high bits and its slot in the bucket (inverted, so the earlier element wins
a tie) in the low bits, so a single integer max/min moves key and position together. The
``UNROLL`` loads of a step are all issued before the first push, so that enough bytes are in
flight to stream at memory bandwidth (one step of 1024 bf16 lanes is only 2 KB).

* ``fused_bucketed_topk``: one program per row holds all of the row's buckets; stage 2 (exact
  top-k of the ``BLANES * KB`` survivors, ``select_topk.select_and_store``) runs on the registers
  in the same program.
* ``bucket_survivors`` + ``select_topk``: for few long rows, ``segments`` programs share a row,
  each owning ``BLANES`` of its buckets, and write their survivors; a second launch selects.
"""

import torch
import triton
import triton.language as tl

from topk_compiler.kernels import cdiv, next_pow2
from topk_compiler.kernels.bucket_layout import element_index, group_rotation
from topk_compiler.kernels.launch import Launch
from topk_compiler.kernels.order_key import order_key
from topk_compiler.kernels.select_topk import (finisher_for, order32, outputs_maker, prepare_select, select_and_store,
                                               select_meta, sorts_entries_in_index_row)

MAX_PER_BUCKET_K = 8
# Loads in flight per lane and step: 8 keeps every tried (lanes, warps) of the planner within
# 2 KB-16 KB in flight per program without spilling (ptxas -v, sm_90a).
UNROLLS = (1, 2, 4, 8)


@triton.jit
def _push(v, r0, r1, r2, r3, r4, r5, r6, r7, KB: tl.constexpr):
    """Insert ``v`` into the per-lane sorted slots r0 >= r1 >= ...; the smallest falls off."""
    hi = tl.maximum(r0, v)
    v = tl.minimum(r0, v)
    r0 = hi
    if KB > 1:
        hi = tl.maximum(r1, v)
        v = tl.minimum(r1, v)
        r1 = hi
    if KB > 2:
        hi = tl.maximum(r2, v)
        v = tl.minimum(r2, v)
        r2 = hi
    if KB > 3:
        hi = tl.maximum(r3, v)
        v = tl.minimum(r3, v)
        r3 = hi
    if KB > 4:
        hi = tl.maximum(r4, v)
        v = tl.minimum(r4, v)
        r4 = hi
    if KB > 5:
        hi = tl.maximum(r5, v)
        v = tl.minimum(r5, v)
        r5 = hi
    if KB > 6:
        hi = tl.maximum(r6, v)
        v = tl.minimum(r6, v)
        r6 = hi
    if KB > 7:
        r7 = tl.maximum(r7, v)
    return r0, r1, r2, r3, r4, r5, r6, r7


@triton.jit
def _exchange(a, b):
    """(larger, smaller)."""
    return tl.maximum(a, b), tl.minimum(a, b)


@triton.jit
def _sort_bitonic4(a, b, c, d):
    """A bitonic sequence of four, sorted descending (two half-cleaners)."""
    a, c = _exchange(a, c)
    b, d = _exchange(b, d)
    a, b = _exchange(a, b)
    c, d = _exchange(c, d)
    return a, b, c, d


@triton.jit
def _merge4(e0, e1, e2, e3, r0, r1, r2, r3, r4, r5, r6, r7, KB: tl.constexpr):
    """Four entries into the per-lane sorted slots r0 >= r1 >= ... of KB = 4 or 8 at once: the
    four sorted (five exchanges), then merged as a bitonic sequence. At KB = 4 that is 22 min/max
    for four entries where ``_push`` takes 28; at KB = 8, 38 where it takes 60."""
    e0, e1 = _exchange(e0, e1)
    e2, e3 = _exchange(e2, e3)
    e0, e2 = _exchange(e0, e2)
    e1, e3 = _exchange(e1, e3)
    e1, e2 = _exchange(e1, e2)
    # The slots descend and the entries, reversed, ascend: their pairwise maxima fall then rise
    # (a bitonic sequence) and are the KB largest of both; half-cleaners sort them.
    if KB == 4:
        r0, r1, r2, r3 = tl.maximum(r0, e3), tl.maximum(r1, e2), tl.maximum(r2, e1), tl.maximum(r3, e0)
    else:
        r4, r5, r6, r7 = tl.maximum(r4, e3), tl.maximum(r5, e2), tl.maximum(r6, e1), tl.maximum(r7, e0)
        r0, r4 = _exchange(r0, r4)
        r1, r5 = _exchange(r1, r5)
        r2, r6 = _exchange(r2, r6)
        r3, r7 = _exchange(r3, r7)
        r4, r5, r6, r7 = _sort_bitonic4(r4, r5, r6, r7)
    r0, r1, r2, r3 = _sort_bitonic4(r0, r1, r2, r3)
    return r0, r1, r2, r3, r4, r5, r6, r7


@triton.jit
def _slot_entry(x_row_ptr, row, q, g, n, num_buckets, slots, seed, pad,
                LAYOUT: tl.constexpr, LARGEST: tl.constexpr, POS_BITS: tl.constexpr, MASKED: tl.constexpr):
    """Packed (key, inverted slot) of slot ``g`` of the lanes' buckets ``q``; with MASKED, ``pad``
    past the row (without, every lane's element must be in it)."""
    # Offsets within the row in int32 (``check_stage1`` bounds the row's length): 64-bit
    # offsets cost about ten instructions per load on sm_90, a fifth of a step of four slots.
    if LAYOUT == 2:
        offs = q * slots + g
        valid = (offs < n) & (g < slots)
    else:
        base = g * num_buckets
        if LAYOUT == 1:
            rot = group_rotation(row, g, seed).to(tl.int32) & (num_buckets - 1)
            lane = (q - rot) & (num_buckets - 1)
        else:
            lane = q
        offs = base + lane
        valid = lane < (n - base)
    if MASKED:
        key = order_key(tl.load(x_row_ptr + offs, mask=valid, other=0.0), LARGEST)
    else:
        key = order_key(tl.load(x_row_ptr + offs), LARGEST)
    if POS_BITS == 16:
        packed = (key << 16) | (0xFFFF - g)
    else:
        packed = (key.to(tl.int64) << 32) | (0xFFFFFFFF - tl.cast(g, tl.int64))
    if MASKED:
        packed = tl.where(valid, packed, pad)
    return packed


@triton.jit
def _stream(x_row_ptr, row, q, start, stop, n, num_buckets, slots, seed, pad, r0, r1, r2, r3, r4, r5, r6, r7,
            KB: tl.constexpr, LAYOUT: tl.constexpr, UNROLL: tl.constexpr, LARGEST: tl.constexpr,
            POS_BITS: tl.constexpr, MASKED: tl.constexpr):
    """Slots ``start``, ``start + UNROLL``, ... below ``stop`` pushed through the lanes' slots."""
    for g0 in range(start, stop, UNROLL):
        # Every load of the step first, then the pushes that wait on them.
        e0 = _slot_entry(x_row_ptr, row, q, g0, n, num_buckets, slots, seed, pad, LAYOUT, LARGEST, POS_BITS, MASKED)
        if UNROLL > 1:
            e1 = _slot_entry(x_row_ptr, row, q, g0 + 1, n, num_buckets, slots, seed, pad, LAYOUT, LARGEST, POS_BITS,
                             MASKED)
        if UNROLL > 2:
            e2 = _slot_entry(x_row_ptr, row, q, g0 + 2, n, num_buckets, slots, seed, pad, LAYOUT, LARGEST, POS_BITS,
                             MASKED)
            e3 = _slot_entry(x_row_ptr, row, q, g0 + 3, n, num_buckets, slots, seed, pad, LAYOUT, LARGEST, POS_BITS,
                             MASKED)
        if UNROLL > 4:
            e4 = _slot_entry(x_row_ptr, row, q, g0 + 4, n, num_buckets, slots, seed, pad, LAYOUT, LARGEST, POS_BITS,
                             MASKED)
            e5 = _slot_entry(x_row_ptr, row, q, g0 + 5, n, num_buckets, slots, seed, pad, LAYOUT, LARGEST, POS_BITS,
                             MASKED)
            e6 = _slot_entry(x_row_ptr, row, q, g0 + 6, n, num_buckets, slots, seed, pad, LAYOUT, LARGEST, POS_BITS,
                             MASKED)
            e7 = _slot_entry(x_row_ptr, row, q, g0 + 7, n, num_buckets, slots, seed, pad, LAYOUT, LARGEST, POS_BITS,
                             MASKED)
        if (KB == 4 or KB == 8) and UNROLL >= 4:
            r0, r1, r2, r3, r4, r5, r6, r7 = _merge4(e0, e1, e2, e3, r0, r1, r2, r3, r4, r5, r6, r7, KB)
            if UNROLL > 4:
                r0, r1, r2, r3, r4, r5, r6, r7 = _merge4(e4, e5, e6, e7, r0, r1, r2, r3, r4, r5, r6, r7, KB)
        else:
            r0, r1, r2, r3, r4, r5, r6, r7 = _push(e0, r0, r1, r2, r3, r4, r5, r6, r7, KB)
            if UNROLL > 1:
                r0, r1, r2, r3, r4, r5, r6, r7 = _push(e1, r0, r1, r2, r3, r4, r5, r6, r7, KB)
            if UNROLL > 2:
                r0, r1, r2, r3, r4, r5, r6, r7 = _push(e2, r0, r1, r2, r3, r4, r5, r6, r7, KB)
                r0, r1, r2, r3, r4, r5, r6, r7 = _push(e3, r0, r1, r2, r3, r4, r5, r6, r7, KB)
            if UNROLL > 4:
                r0, r1, r2, r3, r4, r5, r6, r7 = _push(e4, r0, r1, r2, r3, r4, r5, r6, r7, KB)
                r0, r1, r2, r3, r4, r5, r6, r7 = _push(e5, r0, r1, r2, r3, r4, r5, r6, r7, KB)
                r0, r1, r2, r3, r4, r5, r6, r7 = _push(e6, r0, r1, r2, r3, r4, r5, r6, r7, KB)
                r0, r1, r2, r3, r4, r5, r6, r7 = _push(e7, r0, r1, r2, r3, r4, r5, r6, r7, KB)
    return r0, r1, r2, r3, r4, r5, r6, r7


@triton.jit
def bucket_survivors_of(x_row_ptr, row, seg, n, num_buckets, slots, seed,
                        BLANES: tl.constexpr, KB: tl.constexpr, KBP: tl.constexpr, LAYOUT: tl.constexpr,
                        UNROLL: tl.constexpr, LARGEST: tl.constexpr, KEY_BITS: tl.constexpr,
                        POS_BITS: tl.constexpr):
    """Stage 1 for buckets ``seg*BLANES ...`` of one row: (keys, indices) of the survivors,
    [BLANES*KBP], lane-major (a lane's KBP slots are adjacent, in no particular order)."""
    q = seg * BLANES + tl.arange(0, BLANES)
    if POS_BITS == 16:
        pad = tl.full([BLANES], -2147483648, tl.int32)
    else:
        pad = tl.full([BLANES], -9223372036854775808, tl.int64)
    r0, r1, r2, r3, r4, r5, r6, r7 = pad, pad, pad, pad, pad, pad, pad, pad
    # Steps whose every slot holds an element of the row in every lane run without masks (a
    # compare and a select per element fewer); the rest, at most the last few, with them.
    if LAYOUT == 2:
        full = tl.where(n == num_buckets * slots, slots - slots % UNROLL, 0)
    else:
        full = n // (num_buckets * UNROLL) * UNROLL
    r0, r1, r2, r3, r4, r5, r6, r7 = _stream(x_row_ptr, row, q, 0, full, n, num_buckets, slots, seed, pad,
                                             r0, r1, r2, r3, r4, r5, r6, r7, KB, LAYOUT, UNROLL, LARGEST, POS_BITS,
                                             False)
    r0, r1, r2, r3, r4, r5, r6, r7 = _stream(x_row_ptr, row, q, full, slots, n, num_buckets, slots, seed, pad,
                                             r0, r1, r2, r3, r4, r5, r6, r7, KB, LAYOUT, UNROLL, LARGEST, POS_BITS,
                                             True)
    if KBP == 1:
        s = r0
    elif KBP == 2:
        s = tl.reshape(tl.join(r0, r1), [2 * BLANES])
    elif KBP == 4:
        s = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), [4 * BLANES])
    else:
        s = tl.reshape(tl.join(tl.join(tl.join(r0, r1), tl.join(r2, r3)),
                               tl.join(tl.join(r4, r5), tl.join(r6, r7))), [8 * BLANES])
    pos_max = (1 << POS_BITS) - 1
    g = pos_max - (s & pos_max)
    keys = (s >> POS_BITS).to(tl.int32)
    if KEY_BITS == 16 and POS_BITS == 32:
        keys = tl.maximum(keys, -32768)  # the int64 pad shifted down: bring it to the 16-bit pad
    lane = seg * BLANES + tl.arange(0, BLANES * KBP) // KBP
    # int32 indices (rows are shorter than 2**31): half the registers of int64 for stage 2
    idx = element_index(row, lane, g, num_buckets, slots, seed, LAYOUT).to(tl.int32)
    return keys, idx


@triton.jit(do_not_specialize=["seed"])
def _fused_bucketed_topk_kernel(x_ptr, values_ptr, indices_ptr, order_ptr, certificate_ptr,  # pointers
                                n, k, num_buckets, slots, seed,                          # sizes
                                x_row_stride, out_row_stride,                            # strides
                                BLANES: tl.constexpr, KB: tl.constexpr, KBP: tl.constexpr,
                                LAYOUT: tl.constexpr, UNROLL: tl.constexpr, LARGEST: tl.constexpr,
                                KEY_BITS: tl.constexpr, POS_BITS: tl.constexpr, K_POW2: tl.constexpr,
                                SORTED: tl.constexpr, SELECT: tl.constexpr, SORT_HERE: tl.constexpr,
                                ORDER32: tl.constexpr, PACK32: tl.constexpr, CERTIFY: tl.constexpr):
    """CERTIFY: certificate [2, rows]: [0, row] = 0 where the top-k of the survivors is the
    row's (no bucket's KB-th survivor reaches their k-th largest key, so every element stage 1
    dropped is below it); [1, row] = that key (at most the row's k-th largest: the survivors are
    a subset)."""
    row = tl.program_id(0).to(tl.int64)
    x_row_ptr = x_ptr + row * x_row_stride
    keys, idx = bucket_survivors_of(x_row_ptr, row, 0, n, num_buckets, slots, seed,
                                    BLANES, KB, KBP, LAYOUT, UNROLL, LARGEST, KEY_BITS, POS_BITS)
    kth = select_and_store(keys, idx, k, x_row_ptr, values_ptr + row * out_row_stride,
                           indices_ptr + row * out_row_stride, order_ptr + row * out_row_stride,
                           K_POW2=K_POW2, KEY_BITS=KEY_BITS, SORTED=SORTED, SELECT=SELECT, SORT_HERE=SORT_HERE,
                           ORDER32=ORDER32, PACK32=PACK32, LARGEST=LARGEST)
    if CERTIFY:
        # A bucket's KB-th survivor reaches the k-th key when KB of its survivors do (its KBP
        # slots are adjacent); one that kept fewer than KB real elements dropped none.
        reaching = tl.sum(tl.reshape((keys >= kth).to(tl.int32), [BLANES, KBP]), axis=1)
        tl.store(certificate_ptr + row, tl.max((reaching >= KB).to(tl.int32), axis=0))
        tl.store(certificate_ptr + tl.num_programs(0) + row, kth)


@triton.jit(do_not_specialize=["seed"])
def _bucket_survivors_kernel(x_ptr, keys_ptr, idx_ptr,                             # pointers
                             n, num_buckets, slots, seed,                          # sizes
                             x_row_stride, cand_row_stride,                        # strides
                             BLANES: tl.constexpr, KB: tl.constexpr, KBP: tl.constexpr,
                             LAYOUT: tl.constexpr, UNROLL: tl.constexpr, LARGEST: tl.constexpr,
                             KEY_BITS: tl.constexpr, POS_BITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    keys, idx = bucket_survivors_of(x_ptr + row * x_row_stride, row, seg, n, num_buckets, slots, seed,
                                    BLANES, KB, KBP, LAYOUT, UNROLL, LARGEST, KEY_BITS, POS_BITS)
    f = seg * (BLANES * KBP) + tl.arange(0, BLANES * KBP)
    tl.store(keys_ptr + row * cand_row_stride + f, keys)
    tl.store(idx_ptr + row * cand_row_stride + f, idx)


def check_stage1(x2d: torch.Tensor, k: int, num_buckets: int, per_bucket_k: int, layout_id: int, unroll: int) -> None:
    assert x2d.dim() == 2 and x2d.stride(1) == 1, f"need [rows, n] with unit last stride, got {tuple(x2d.shape)}/{x2d.stride()}"
    assert x2d.dtype in (torch.float32, torch.float16, torch.bfloat16), f"unsupported dtype {x2d.dtype}"
    assert 1 <= per_bucket_k <= MAX_PER_BUCKET_K, f"per_bucket_k must be in [1, {MAX_PER_BUCKET_K}], got {per_bucket_k}"
    assert num_buckets & (num_buckets - 1) == 0, f"num_buckets must be a power of two, got {num_buckets}"
    assert 0 < k <= x2d.shape[1], f"need 0 < k <= n, got k={k}, n={x2d.shape[1]}"
    assert layout_id in (0, 1, 2), f"unknown layout id {layout_id}"
    assert unroll in UNROLLS, f"unroll must be one of {UNROLLS}, got {unroll}"
    n = x2d.shape[1]
    assert (cdiv(n, num_buckets) + unroll) * num_buckets < 2**31, f"rows of {n} elements overflow int32 offsets"


def bit_widths(x2d: torch.Tensor, slots: int) -> tuple[int, int]:
    """(bits of the order key, bits of the slot in a packed stage-1 entry)."""
    key_bits = 16 if x2d.element_size() == 2 else 32
    pos_bits = 16 if key_bits == 16 and slots <= 2**16 else 32
    return key_bits, pos_bits


def stage1_meta(x2d: torch.Tensor, num_buckets: int, per_bucket_k: int, blanes: int, layout_id: int, unroll: int,
                largest: bool) -> tuple[int, dict]:
    """(slots per bucket, the stage-1 constexprs) for ``bucket_survivors_of``."""
    slots = cdiv(x2d.shape[1], num_buckets)
    key_bits, pos_bits = bit_widths(x2d, slots)
    return slots, dict(BLANES=blanes, KB=per_bucket_k, KBP=next_pow2(per_bucket_k), LAYOUT=layout_id,
                       UNROLL=unroll, LARGEST=largest, KEY_BITS=key_bits, POS_BITS=pos_bits)


def prepare_fused_bucketed_topk(x2d: torch.Tensor, k: int, *, num_buckets: int, per_bucket_k: int, largest: bool,
                                sorted: bool, layout_id: int = 0, seed: int = 0, select: str = "bisect",
                                sort_with: str = "program", sort_warps: int = 1, unroll: int = 4,
                                num_warps: int = 8, max_registers: int = 0):
    """The function of x2d (this one's shape, dtype and row stride) running ``fused_bucketed_topk``
    with these arguments, its launches fixed (``launch.Launch``). ``max_registers`` (0: the
    compiler's choice) caps the registers a thread: the kernel's most register-hungry part, stage
    2, then sets how many programs share an SM while stage 1 streams, so a cap can trade a few
    spills in stage 2 for more bytes in flight in stage 1."""
    check_stage1(x2d, k, num_buckets, per_bucket_k, layout_id, unroll)
    rows, n = x2d.shape
    slots, meta = stage1_meta(x2d, num_buckets, per_bucket_k, num_buckets, layout_id, unroll, largest)
    in_index_row = sorts_entries_in_index_row(meta["KEY_BITS"], n, sorted=sorted, select=select, sort_with=sort_with)
    make_outputs = outputs_maker(x2d, k, meta["KEY_BITS"], sorted, select, in_index_row)
    launch = Launch(_fused_bucketed_topk_kernel, (rows,), n=n, k=k, num_buckets=num_buckets, slots=slots, seed=seed,
                    x_row_stride=x2d.stride(0), out_row_stride=k, **meta,
                    **select_meta(k, meta["KEY_BITS"], n, sorted=sorted, select=select, sort_with=sort_with),
                    CERTIFY=False, num_warps=num_warps, maxnreg=max_registers or None)
    finish = finisher_for(rows, k, order32_entries=order32(meta["KEY_BITS"], k), sorted=sorted, select=select,
                          sort_with=sort_with, sort_warps=sort_warps)

    def run(x2d):
        values, indices, order = make_outputs()
        if rows:
            launch(x2d, values, indices, order, indices)  # no certificate: a placeholder pointer
        return finish(values, indices, order)

    return run


def fused_bucketed_topk(x2d: torch.Tensor, k: int, **options):
    """Stage 1 and stage 2 in one program per row of ``x2d`` ([rows, n], unit last stride); with
    ``sorted``, ``sort_with`` says where the k selected are sorted (``select_topk.finisher_for``).
    ``options``: those of ``prepare_fused_bucketed_topk``."""
    return prepare_fused_bucketed_topk(x2d, k, **options)(x2d)


def prepare_bucket_survivors(x2d: torch.Tensor, *, num_buckets: int, per_bucket_k: int, segments: int, largest: bool,
                             layout_id: int = 0, seed: int = 0, unroll: int = 4, num_warps: int = 4):
    """(the function of x2d giving ``bucket_survivors``, the bits of its keys)."""
    check_stage1(x2d, 1, num_buckets, per_bucket_k, layout_id, unroll)
    assert num_buckets % segments == 0, f"segments ({segments}) must divide num_buckets ({num_buckets})"
    rows, n = x2d.shape
    slots, meta = stage1_meta(x2d, num_buckets, per_bucket_k, num_buckets // segments, layout_id, unroll, largest)
    shape, device = (rows, num_buckets * meta["KBP"]), x2d.device
    launch = Launch(_bucket_survivors_kernel, (rows, segments), n=n, num_buckets=num_buckets, slots=slots, seed=seed,
                    x_row_stride=x2d.stride(0), cand_row_stride=shape[1], **meta, num_warps=num_warps)

    def run(x2d):
        keys = torch.empty(shape, dtype=torch.int32, device=device)
        idx = torch.empty(shape, dtype=torch.int32, device=device)
        if rows:
            launch(x2d, keys, idx)
        return keys, idx

    return run, meta["KEY_BITS"]


def bucket_survivors(x2d: torch.Tensor, **options):
    """Stage 1 with ``segments`` programs per row: survivors' keys and indices, [rows, num_buckets * KBP]
    int32, and the bits of the keys. ``options``: those of ``prepare_bucket_survivors``."""
    run, key_bits = prepare_bucket_survivors(x2d, **options)
    keys, idx = run(x2d)
    return keys, idx, key_bits


def prepare_split_bucketed_topk(x2d: torch.Tensor, k: int, *, num_buckets: int, per_bucket_k: int, segments: int,
                                largest: bool, sorted: bool, layout_id: int = 0, seed: int = 0,
                                select: str = "bisect", sort_with: str = "program", sort_warps: int = 1,
                                unroll: int = 4, num_warps: int = 4, select_num_warps: int | None = None):
    """The function of x2d running ``split_bucketed_topk`` with these arguments."""
    if select_num_warps is None:
        select_num_warps = 16 if num_buckets * next_pow2(per_bucket_k) > 4096 else 8
    survivors, key_bits = prepare_bucket_survivors(
        x2d, num_buckets=num_buckets, per_bucket_k=per_bucket_k, segments=segments, largest=largest,
        layout_id=layout_id, seed=seed, unroll=unroll, num_warps=num_warps,
    )
    m = num_buckets * next_pow2(per_bucket_k)
    assert 0 < k <= m, f"split_bucketed_topk: need 0 < k <= {m} survivors, got k={k}"
    select_survivors = prepare_select(x2d, k, m, m, key_bits=key_bits, sorted=sorted, select=select,
                                      sort_with=sort_with, sort_warps=sort_warps, raw=False, largest=largest,
                                      num_warps=select_num_warps)

    def run(x2d):
        keys, idx = survivors(x2d)
        return select_survivors(keys, idx, x2d)

    return run


def split_bucketed_topk(x2d: torch.Tensor, k: int, **options):
    """Stage 1 over ``segments`` programs per row, then a second launch for stage 2 (by default
    16 warps past 4096 candidates, where 8 spill: ``python -m benchmarks.compile_check``).
    ``options``: those of ``prepare_split_bucketed_topk``."""
    return prepare_split_bucketed_topk(x2d, k, **options)(x2d)
