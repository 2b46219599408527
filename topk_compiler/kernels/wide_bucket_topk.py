"""Bucketed top-k with a few wide buckets, for few rows of large k, in two launches.

The bucketed algorithm with ``num_buckets`` of 4-32 buckets and ``per_bucket_k`` in the hundreds
(the same buckets and the same recall model as the other kernels, ``lowering/layouts.py``):

1. One program per (row, bucket) holds its bucket in registers and writes its top
   ``per_bucket_k`` as (key, inverted index) entries, sorted. ``select="bisect"``: it finds the
   bucket's threshold for its top ``per_bucket_k`` two bits at a time (``kth_key_by_digits``: at
   most 16 block-wide counts for 32-bit keys, where bisection waits on 32, and fewer where a
   threshold above the k-th key's last bits already parts the top from the rest), compacts the
   entries above it to memory and sorts them there. ``select="bitonic"`` (``per_bucket_k`` up to
   256): a bitonic top-k network (``tl.topk``) over all of the bucket's entries, in registers, with
   no count and no round trip through memory.
2. One program per (row, bucket) ranks its bucket's entries among the row's survivors: an
   entry's rank is the number of entries above it in every bucket's sorted list, each count a
   binary search (``per_bucket_k`` entries: about 8 probes a list). The searches in all lists
   advance together, one gather a probe, so a program waits on about 9 dependent loads, not 9
   a list. Entries ranked below k are the row's top-k of the survivors, written straight to
   their sorted place (ties go to the smaller index, as in the other kernels).

The fused kernel selects and sorts a row in one program: 16 x 14336 fp32 k=1434 ran on 16 of 132
SMs and sorted for 29 of its 45 us (benchmarks/results/profile_stages_h200.json). Here both
launches spread each row over ``num_buckets`` programs, and no program sorts more than its own
bucket's survivors. With bisection and one list searched after another, the two launches took
14.6 and 14.5 us alone there (8 buckets of 180; profile_stages_h200_topk_98d5fb4.jsonl): both
are chains of waits, on 32 block-wide counts and on 72 dependent loads. Searching the lists
together took the merge to 7.6 us, two bits a count the selection to 13.9
(profile_stages_h200_wide_fcbc8ba.jsonl). The entries take the survivors' room (one 8-byte
entry each, 4 for 16-bit keys of rows up to 2**16).

Where k / ``num_buckets`` is large, each bucket can keep just its share of k
(``recall_model.bucket_shares``: k // b, one more in the first k % b buckets; ``WideShareTopk``):
the survivors are then exactly k, so stage 2 has nothing to drop and the survivors are the output.
One launch writes them straight to their place, unsorted. The recall is
``recall_model.expected_recall_of_shares``: 0.974 at 16 x 14336, k=1434, 8 buckets, against 0.976
for 8 x 180 survivors. There it took 12.8 us on an H100, unsorted, where the fused kernel had
taken 18.8 and the wide one takes 21.0. Sorted by the rank sort after it, it took 42-48 us
(benchmarks/results/profile_stages_h100_wide_shares_8a87819.json): it is for unsorted output only.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from topk_compiler.kernels import cdiv, chains_launches, next_pow2, smallest_bucket
from topk_compiler.kernels.bucket_layout import element_index
from topk_compiler.kernels.launch import Launch
from topk_compiler.kernels.order_key import order_key
from topk_compiler.kernels.select_topk import (compact_positions, compact_positions_by_column, count_fields,
                                               entry_pad, index_entry, key_pad, pack32, threshold_and_ties, top_entries,
                                               unpack_index_entry, values_of)

# A bucket is held in registers: at most this many slots (16 keys a thread at 8 warps).
MAX_SLOTS = 4096
# Bits of the bucket's threshold decided per block-wide count (kth_key_by_digits). 4 bits held
# [slots, 16] compares at once: 255 registers and spills for 2048 bf16 slots at 8 warps on
# sm_90 (benchmarks/compile_check.py); 2 bits take 78-144.
DIGIT_BITS = 2
SELECTS = ("bisect", "bitonic")
# How "bisect" finds a bucket's threshold: by digits of the key from its top bit
# (``kth_key_by_digits``), or between the least of its groups' largest keys and its largest
# (``kth_key_bracketed``).
SEARCHES = ("digits", "bracket")
# Most entries a bucket's bitonic network keeps (the fused kernel's bound, plan.MAX_BITONIC_K).
MAX_NETWORK_KB = 256


@triton.jit
def _bucket(x_ptr, row, q, n, slots, seed, x_row_stride, NUM_BUCKETS: tl.constexpr, SLOTS_POW2: tl.constexpr,
            LAYOUT: tl.constexpr, LARGEST: tl.constexpr, KEY_BITS: tl.constexpr):
    """Bucket q of ``row`` in registers: (values, order keys, element indices, valid slots); a
    padding slot's key is below every real one."""
    g = tl.arange(0, SLOTS_POW2)
    idx = element_index(row, q, g, NUM_BUCKETS, slots, seed, LAYOUT)
    valid = (g < slots) & (idx < n)
    v = tl.load(x_ptr + row * x_row_stride + idx, mask=valid, other=0.0)
    return v, tl.where(valid, order_key(v, LARGEST), key_pad(KEY_BITS)), idx, valid


@triton.jit
def _bucket_top(keys, count, KEY_BITS: tl.constexpr, DIGIT_BITS: tl.constexpr, GROUPS: tl.constexpr,
                FIELD_BITS: tl.constexpr, COLUMNS: tl.constexpr):
    """(chosen, position) of the bucket's top ``count`` keys: those above its count-th largest
    key, then the first ties, at positions 0 ... count - 1: in the order of
    ``compact_positions_by_column`` with COLUMNS > 0 (the program's threads), else in slot order;
    its threshold found as ``threshold_and_ties`` says (GROUPS > 0: bracketed, else by digits)."""
    threshold, need = threshold_and_ties(keys, count, KEY_BITS, DIGIT_BITS, GROUPS, FIELD_BITS)
    if COLUMNS > 0:
        return compact_positions_by_column(keys, threshold, need, COLUMNS)
    else:
        zero = tl.zeros([], dtype=tl.int32)
        chosen, position, _, _ = compact_positions(keys, threshold, need, zero, zero)
        return chosen, position


@triton.jit(do_not_specialize=["seed"])
def _bucket_top_kernel(x_ptr, entries_ptr,                        # pointers
                       n, per_bucket_k, slots, seed,              # sizes
                       x_row_stride, entries_row_stride,          # strides
                       NUM_BUCKETS: tl.constexpr, SLOTS_POW2: tl.constexpr, KB_POW2: tl.constexpr,
                       LAYOUT: tl.constexpr, LARGEST: tl.constexpr, KEY_BITS: tl.constexpr,
                       PACK32: tl.constexpr, DIGIT_BITS: tl.constexpr, GROUPS: tl.constexpr,
                       FIELD_BITS: tl.constexpr, COLUMNS: tl.constexpr, NETWORK: tl.constexpr,
                       CHAINED: tl.constexpr):
    """Program (row, q): bucket q's top ``per_bucket_k`` entries, sorted descending, at
    q * per_bucket_k ... of the row's entries (every bucket holds that many elements at least:
    the launcher checks). CHAINED: the merge may launch at once (it waits for these writes)."""
    if CHAINED:
        gdc_launch_dependents()
    row = tl.program_id(0).to(tl.int64)
    q = tl.program_id(1)
    _, keys, idx, valid = _bucket(x_ptr, row, q, n, slots, seed, x_row_stride, NUM_BUCKETS, SLOTS_POW2, LAYOUT,
                                  LARGEST, KEY_BITS)
    out = entries_ptr + row * entries_row_stride + q * per_bucket_k
    o = tl.arange(0, KB_POW2)
    in_kb = o < per_bucket_k
    if NETWORK:
        # Padding slots rank last: the lowest key, and index 0 so that it stays out of the key's bits.
        top = top_entries(index_entry(keys, tl.where(valid, idx, 0), PACK32), KB_POW2)
    else:
        chosen, position = _bucket_top(keys, per_bucket_k, KEY_BITS, DIGIT_BITS, GROUPS, FIELD_BITS, COLUMNS)
        # Compacted to the bucket's place, then sorted there (every load before any store).
        tl.store(out + position, index_entry(keys, idx, PACK32), mask=chosen)
        tl.debug_barrier()
        top = tl.load(out + o, mask=in_kb, other=entry_pad(PACK32))
        if KB_POW2 > 1:
            top = tl.sort(top, descending=True)
        tl.debug_barrier()
    tl.store(out + o, top, mask=in_kb)


@triton.jit(do_not_specialize=["seed"])
def _bucket_share_kernel(x_ptr, values_ptr, indices_ptr,  # pointers
                         n, k, slots, seed,                # sizes
                         x_row_stride, out_row_stride,     # strides
                         NUM_BUCKETS: tl.constexpr, SLOTS_POW2: tl.constexpr, LAYOUT: tl.constexpr,
                         LARGEST: tl.constexpr, KEY_BITS: tl.constexpr, DIGIT_BITS: tl.constexpr,
                         GROUPS: tl.constexpr, FIELD_BITS: tl.constexpr, COLUMNS: tl.constexpr):
    """Program (row, q): bucket q's top ``share`` (its share of k), written to the outputs after
    the shares of the buckets before it, unsorted. Every bucket holds its share at least (the
    launcher checks)."""
    row = tl.program_id(0).to(tl.int64)
    q = tl.program_id(1)
    v, keys, idx, _ = _bucket(x_ptr, row, q, n, slots, seed, x_row_stride, NUM_BUCKETS, SLOTS_POW2, LAYOUT, LARGEST,
                              KEY_BITS)
    extra = k % NUM_BUCKETS
    chosen, position = _bucket_top(keys, k // NUM_BUCKETS + (q < extra).to(tl.int32), KEY_BITS, DIGIT_BITS, GROUPS,
                                   FIELD_BITS, COLUMNS)
    position += q * (k // NUM_BUCKETS) + tl.minimum(q, extra)
    out = row * out_row_stride + position
    # The loaded values themselves: no key to rebuild, no NaN to load again.
    tl.store(values_ptr + out, v, mask=chosen)
    tl.store(indices_ptr + out, idx, mask=chosen)


@triton.jit
def _merge_by_rank_kernel(entries_ptr, x_ptr, values_ptr, indices_ptr,      # pointers
                          per_bucket_k, k,                                   # sizes
                          entries_row_stride, x_row_stride, out_row_stride,  # strides
                          NUM_BUCKETS: tl.constexpr, KB_POW2: tl.constexpr, LOG_KB: tl.constexpr,
                          LARGEST: tl.constexpr, KEY_BITS: tl.constexpr, PACK32: tl.constexpr,
                          CHAINED: tl.constexpr):
    """Program (row, q): each entry of bucket q's sorted list to output place = its rank among
    the row's entries, if below k. The rank is the count of entries above it in every list (its
    own included: there, its position). Entries are distinct (each holds its index), so the
    ranks are a permutation and no two entries share a place. CHAINED: launched as a
    programmatic dependent of the selection, whose writes it waits for."""
    if CHAINED:
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    q = tl.program_id(1)
    base = entries_ptr + row * entries_row_stride
    o = tl.arange(0, KB_POW2)
    in_kb = o < per_bucket_k
    pad = entry_pad(PACK32)
    mine = tl.load(base + q * per_bucket_k + o, mask=in_kb, other=pad)
    # Binary lifting over every bucket's descending list at once ([bucket, entry]): the longest
    # prefix of each list whose last entry is above the entry.
    lists = base + (tl.arange(0, NUM_BUCKETS) * per_bucket_k)[:, None]
    above = tl.zeros([NUM_BUCKETS, KB_POW2], dtype=tl.int32)
    for step in tl.static_range(LOG_KB):
        probe = above + (KB_POW2 >> (step + 1)) - 1
        theirs = tl.load(lists + probe, mask=probe < per_bucket_k, other=pad)
        above = tl.where(theirs > mine[None, :], above + (KB_POW2 >> (step + 1)), above)
    # The lifting steps cover KB_POW2 - 1 places; the last one is checked alone.
    last = tl.load(lists + above, mask=above < per_bucket_k, other=pad)
    rank = tl.sum(above + (last > mine[None, :]).to(tl.int32), axis=0)
    keep = in_kb & (rank < k)
    keys, idx = unpack_index_entry(mine, PACK32)
    out = row * out_row_stride + rank
    tl.store(indices_ptr + out, idx, mask=keep)
    tl.store(values_ptr + out, values_of(keys, idx, keep, x_ptr + row * x_row_stride, KEY_BITS, LARGEST), mask=keep)


def merge_warps(num_buckets: int, kb_pow2: int) -> int:
    """Warps of the merge: 4, or 8 where its [bucket, entry] probes pass 16 a thread."""
    return 8 if num_buckets * kb_pow2 > 2048 else 4


def _bracket_groups(search: str, slots: int, count: int) -> int:
    """``kth_key_bracketed``'s groups for a bucket of ``slots`` keeping ``count``: at least
    ``count`` (its bracket then holds them), as many as the slots at most; 0 for digits."""
    assert search in SEARCHES, f"search must be one of {SEARCHES}, got {search!r}"
    return min(next_pow2(slots), next_pow2(count)) if search == "bracket" else 0


def _field_bits(search: str, digit_bits: int, slots: int) -> int:
    """``kth_key_by_digits``'s FIELD_BITS for a bucket of ``slots``: its counts share one int32
    where they fit (``select_topk.count_fields``); 0 for a bracketed search, which does not count
    by digits."""
    return count_fields(digit_bits, slots) if search == "digits" else 0


def _columns(layout_id: int, slots: int, num_warps: int) -> int:
    """``_bucket_top``'s COLUMNS: the program's threads where a bucket's slots are strided in the
    row (interleaved, shuffled; sm_90, 16 x 14336 fp32 in 16 buckets of 4 warps: 792 -> 544
    instructions, 44 -> 9 shuffles); 0 for contiguous buckets, whose vector loads give a thread
    adjacent slots, so the column view would move them (664 -> 744, 9 more barriers)."""
    return 0 if layout_id == 2 else min(32 * num_warps, next_pow2(slots))


def _checked_buckets(name: str, x2d: torch.Tensor, num_buckets: int, layout_id: int, digit_bits: int):
    """(rows, n, slots a bucket, key bits) of x2d in ``num_buckets`` wide buckets, after the checks
    both wide kernels make of their arguments."""
    assert x2d.dim() == 2 and x2d.stride(1) == 1, f"{name}: x2d must be [rows, n], unit last stride"
    assert x2d.dtype in (torch.float32, torch.float16, torch.bfloat16), f"unsupported dtype {x2d.dtype}"
    assert num_buckets & (num_buckets - 1) == 0, f"num_buckets must be a power of two, got {num_buckets}"
    assert layout_id in (0, 1, 2), f"unknown layout id {layout_id}"
    assert digit_bits in (1, 2, 4), f"digit_bits must be 1, 2 or 4, got {digit_bits}"
    rows, n = x2d.shape
    slots = cdiv(n, num_buckets)
    assert slots <= MAX_SLOTS, f"{name}: buckets of {slots} slots exceed {MAX_SLOTS}"
    return rows, n, slots, 16 if x2d.element_size() == 2 else 32


class WideShareTopk:
    """Top-k through ``num_buckets`` wide buckets that each keep their share of k (module
    docstring), unsorted, prepared for inputs of one shape, dtype and row stride: call it with x2d
    for (values, indices). ``select`` is its launch, on (x2d, values, indices). ``search``: how a
    bucket's threshold is found (``SEARCHES``); ``digit_bits``: by digits, the threshold's bits
    decided per block-wide count (``kth_key_by_digits``; 1, 2 or 4)."""

    def __init__(self, x2d: torch.Tensor, k: int, *, num_buckets: int, largest: bool, layout_id: int = 0,
                 seed: int = 0, num_warps: int = 8, digit_bits: int = DIGIT_BITS, search: str = "digits"):
        rows, n, slots, key_bits = _checked_buckets("wide_share_topk", x2d, num_buckets, layout_id, digit_bits)
        assert 0 < k and cdiv(k, num_buckets) <= smallest_bucket(n, num_buckets, layout_id), (
            f"wide_share_topk: shares of k={k} in {num_buckets} buckets exceed the smallest bucket of {n} elements")
        self.select = Launch(_bucket_share_kernel, (rows, num_buckets), n=n, k=k, slots=slots, seed=seed,
                             x_row_stride=x2d.stride(0), out_row_stride=k, NUM_BUCKETS=num_buckets,
                             SLOTS_POW2=next_pow2(slots), LAYOUT=layout_id, LARGEST=largest,
                             KEY_BITS=key_bits, DIGIT_BITS=digit_bits,
                             GROUPS=_bracket_groups(search, slots, cdiv(k, num_buckets)),
                             FIELD_BITS=_field_bits(search, digit_bits, slots),
                             COLUMNS=_columns(layout_id, slots, num_warps), num_warps=num_warps)
        self._rows, self._k, self._dtype, self._device = rows, k, x2d.dtype, x2d.device

    def __call__(self, x2d: torch.Tensor):
        values = torch.empty((self._rows, self._k), dtype=self._dtype, device=self._device)
        indices = torch.empty((self._rows, self._k), dtype=torch.int64, device=self._device)
        if self._rows:
            self.select(x2d, values, indices)
        return values, indices


def wide_share_topk(x2d: torch.Tensor, k: int, **options):
    """Bucketed top-k of each row of ``x2d`` through few wide buckets each keeping its share of k
    (module docstring), unsorted. ``options``: those of ``WideShareTopk``."""
    return WideShareTopk(x2d, k, **options)(x2d)


class WideBucketTopk:
    """``wide_bucket_topk`` prepared for inputs of one shape, dtype and row stride: call it with
    x2d for (values, indices); ``select`` and ``merge`` are its two launches (``launch.Launch``),
    on (x2d, entries) and (entries, x2d, values, indices). ``select``: how each bucket's top is
    found (module docstring); with "bisect", ``search`` how its threshold is found (``SEARCHES``)
    and ``digit_bits`` the threshold's bits decided per block-wide count by digits
    (``kth_key_by_digits``; 1, 2 or 4)."""

    def __init__(self, x2d: torch.Tensor, k: int, *, num_buckets: int, per_bucket_k: int, largest: bool,
                 layout_id: int = 0, seed: int = 0, num_warps: int = 8, select: str = "bisect",
                 digit_bits: int = DIGIT_BITS, search: str = "digits"):
        rows, n, slots, key_bits = _checked_buckets("wide_bucket_topk", x2d, num_buckets, layout_id, digit_bits)
        assert 0 < per_bucket_k <= smallest_bucket(n, num_buckets, layout_id), (
            f"wide_bucket_topk: per_bucket_k={per_bucket_k} above the smallest bucket of {n} elements in {num_buckets}")
        survivors = num_buckets * per_bucket_k
        assert 0 < k <= survivors, f"wide_bucket_topk: need 0 < k <= {survivors} survivors, got k={k}"
        assert select in SELECTS, f"select must be one of {SELECTS}, got {select!r}"
        assert select != "bitonic" or per_bucket_k <= MAX_NETWORK_KB, (
            f"wide_bucket_topk: a bitonic network keeps at most {MAX_NETWORK_KB} a bucket, got {per_bucket_k}")
        packed = pack32(key_bits, n)
        kb_pow2 = next_pow2(per_bucket_k)
        # On Hopper the merge launches while the selection runs (``kernels.chains_launches``): a
        # launch's gap is a tenth of a 10 us call.
        chained = chains_launches(x2d)
        self.select = Launch(_bucket_top_kernel, (rows, num_buckets), n=n, per_bucket_k=per_bucket_k, slots=slots,
                             seed=seed, x_row_stride=x2d.stride(0), entries_row_stride=survivors,
                             NUM_BUCKETS=num_buckets, SLOTS_POW2=next_pow2(slots), KB_POW2=kb_pow2, LAYOUT=layout_id,
                             LARGEST=largest, KEY_BITS=key_bits, PACK32=packed, DIGIT_BITS=digit_bits,
                             GROUPS=_bracket_groups(search, slots, per_bucket_k),
                             FIELD_BITS=_field_bits(search, digit_bits, slots),
                             COLUMNS=_columns(layout_id, slots, num_warps), NETWORK=select == "bitonic",
                             CHAINED=chained, num_warps=num_warps)
        self.merge = Launch(_merge_by_rank_kernel, (rows, num_buckets), per_bucket_k=per_bucket_k, k=k,
                            entries_row_stride=survivors, x_row_stride=x2d.stride(0), out_row_stride=k,
                            NUM_BUCKETS=num_buckets, KB_POW2=kb_pow2, LOG_KB=kb_pow2.bit_length() - 1,
                            LARGEST=largest, KEY_BITS=key_bits, PACK32=packed, CHAINED=chained,
                            num_warps=merge_warps(num_buckets, kb_pow2), launch_pdl=chained)
        self._rows, self._k, self._survivors = rows, k, survivors
        self._dtype, self._device = x2d.dtype, x2d.device
        self._entry_dtype = torch.int32 if packed else torch.int64

    def new_entries(self) -> torch.Tensor:
        return torch.empty((self._rows, self._survivors), dtype=self._entry_dtype, device=self._device)

    def __call__(self, x2d: torch.Tensor):
        values = torch.empty((self._rows, self._k), dtype=self._dtype, device=self._device)
        indices = torch.empty((self._rows, self._k), dtype=torch.int64, device=self._device)
        if self._rows:
            entries = self.new_entries()
            self.select(x2d, entries)
            self.merge(entries, x2d, values, indices)
        return values, indices


def wide_bucket_topk(x2d: torch.Tensor, k: int, **options):
    """Bucketed top-k of each row of ``x2d`` through few wide buckets (module docstring), sorted.
    ``options``: those of ``WideBucketTopk``."""
    return WideBucketTopk(x2d, k, **options)(x2d)
