"""Exact top-k of m candidates per row, and the sort of the k selected.

Candidates are (int32 order key, element index) pairs held in registers by one program. Three
ways to select, picked by the cost model (``SELECT``):

* ``bitonic`` (0): pack key and index into one integer and let ``tl.topk`` (a bitonic top-k
  network) produce the k largest already sorted. Cheap only when k is small next to m.
* ``bisect`` (1): the k-th largest key by bisection over its bits, one block-wide count per bit.
* ``radix`` (2): the k-th largest key by 8-bit digits, one ``tl.histogram`` per digit (2 for
  16-bit keys, 4 for 32-bit ones) instead of one count per bit.
* ``digits`` (3): a threshold two bits a block-wide count, stopping where exactly k keys lie at
  or above it (``kth_key_by_digits``).
* ``bracket`` (4): a threshold searched between two of the candidates' keys
  (``kth_key_bracketed``).

After ``bisect``/``radix`` the keys above the threshold, and as many ties as needed, are
compacted in candidate order with a single prefix sum (above and tied counts packed in one
int32). Unsorted, each selected candidate's packed (key, index) entry is scattered to its place
in the output's index row and the row is reloaded in order to write values and indices: one
scatter of one integer per candidate keeps far fewer registers live than scattering an index
and a value. With sorted output, a packed (key, output position) per selected
element is written beside them and sorted, and the values and indices are permuted by it:
in the same program (``sort_with="program"``), by ``sort_selected``, a separate launch of few
warps per row (``"launch"``), or by ``rank_sort`` (``"rank"``): each entry's place is the number
of the row's entries above it, counted by many programs per row, for few rows whose sort would
otherwise run on few SMs (it compares every pair: rows * k**2 work). (torch.argsort of the
entries plus two gathers was measured too and never won:
benchmarks/results/calibration_h100_sweep2.json, e.g. +120 us at 1024 x 2048.)

Values are rebuilt from their keys, bit for bit, instead of gathered from the input again: a
gather is a dependent round trip to memory that one program per SM cannot hide. NaNs share one
key, so a selected NaN alone is loaded from the input, keeping its payload. A row sorted in its
program whose index fits beside its key (16-bit keys and rows of at most 2**16, or 32-bit keys
in an int64) is sorted on (key, index) entries alone: nothing else is stored before the sort or
loaded after it.
"""

import torch
import triton
import triton.language as tl

from topk_compiler.kernels import cdiv, next_pow2
from topk_compiler.kernels.launch import Launch
from topk_compiler.kernels.order_key import nan_key, order_key, value_of_key

SELECT_METHODS = {"bitonic": 0, "bisect": 1, "radix": 2, "digits": 3, "bracket": 4}
# Rounds of the bracketed search (``kth_key_bracketed``) that cut its span in value before key
# order. On random normal fp32 buckets of 16 x 14336, k=1434, 16 buckets (a call: 256 of them),
# 4 took 5.7 rounds on average and 9.9 at a call's slowest bucket, where the digits take 8.4 and
# 12.4 and cutting in key order alone 7.8 and 12.9; 8 buckets: 6.3 and 9.9 against 8.9 and 12.4
# (benchmarks/simulate_threshold_rounds.py: the kernels' arithmetic replayed in numpy).
BRACKET_VALUE_ROUNDS = tl.constexpr(4)
SORT_WITH = ("program", "launch", "rank")
# The rank sort's tile: each program ranks RANK_BLOCK_I entries against RANK_BLOCK_J others a step.
RANK_BLOCK_I = 64
RANK_BLOCK_J = 256
RANK_SORT_WARPS = 4


@triton.jit
def key_pad(KEY_BITS: tl.constexpr):
    """The padding key: below every real key (``order_key`` leaves the type's minimum free)."""
    return -(1 << (KEY_BITS - 1))


@triton.jit
def kth_key_bisect(keys, k, KEY_BITS: tl.constexpr):
    """Largest T with count(keys >= T) >= k, bit by bit on the offset-binary key."""
    half = tl.full([], 1, tl.int64) << (KEY_BITS - 1)
    t_off = tl.zeros([], dtype=tl.int64)
    for i in range(KEY_BITS):
        cand_off = t_off + (tl.full([], 1, tl.int64) << (KEY_BITS - 1 - i))
        count = tl.sum((keys >= (cand_off - half).to(tl.int32)).to(tl.int32), axis=0)
        t_off = tl.where(count >= k, cand_off, t_off)
    return (t_off - half).to(tl.int32)


@triton.jit
def key_lower_bound(keys, k, KEY_BITS: tl.constexpr, BITS: tl.constexpr, DIGIT_BITS: tl.constexpr):
    """The largest T whose low KEY_BITS - BITS bits are zero with count(keys >= T) >= k: at most
    the k-th largest key, and that key itself with BITS = KEY_BITS. Decided DIGIT_BITS bits a
    round (BITS a multiple of it): each round counts the keys at or above every value of the
    next digit at once (one reduction over [keys, 2**DIGIT_BITS]), so a program waits on
    BITS / DIGIT_BITS block-wide counts, comparing 2**DIGIT_BITS / DIGIT_BITS times as often as
    bisection (DIGIT_BITS = 1, one compare a key a round). Fewer BITS than the key's are for a
    bound that only has to lie below the k-th key: the rounds that would place it between keys
    of nearly equal value are skipped, and a few more keys pass it."""
    half = tl.full([], 1, tl.int64) << (KEY_BITS - 1)
    t_off = tl.zeros([], dtype=tl.int64)
    if DIGIT_BITS == 1:
        for i in tl.static_range(BITS):
            cand_off = t_off + (tl.full([], 1, tl.int64) << (KEY_BITS - 1 - i))
            count = tl.sum((keys >= (cand_off - half).to(tl.int32)).to(tl.int32), axis=0)
            t_off = tl.where(count >= k, cand_off, t_off)
    else:
        for r in tl.static_range(BITS // DIGIT_BITS):
            shift = KEY_BITS - DIGIT_BITS * (r + 1)
            digit, _ = _next_digit(keys, k, t_off, shift, half, 0, DIGIT_BITS, 0)
            t_off += digit.to(tl.int64) << shift
    return (t_off - half).to(tl.int32)


def count_fields(digit_bits: int, most_counted: int) -> int:
    """``FIELD_BITS`` of ``kth_key_by_digits`` for a program of at most ``most_counted`` real keys
    (padding is never counted above digit 0): the bits of one count where the counts above digit 0
    fit one int32 together, else 0 (a count each)."""
    bits = most_counted.bit_length()
    return bits if ((1 << digit_bits) - 1) * bits <= 31 else 0


@triton.jit
def _next_digit(keys, k, t_off, shift, half, counted, DIGIT_BITS: tl.constexpr, FIELD_BITS: tl.constexpr):
    """One round of a threshold search by digits: counting the keys at or above every value of
    the next digit at once, the largest digit whose count is at least k, and that count (the least
    of those >= k: counts fall as the digit grows). Digit 0 keeps the threshold so far, whose
    count is at least k, so both are defined.

    FIELD_BITS = 0: one reduction over [keys, 2**DIGIT_BITS]. Else each key adds a 1 to the
    FIELD_BITS-bit field of every digit above 0 that it reaches, and one block-wide sum of int32
    gives all the counts (no field can carry: FIELD_BITS holds every real key); digit 0's count is
    ``counted``, the round before's. Triton holds [keys, 4] as each key in four lanes, each comparing
    it against one digit: 32 compares a thread at 1024 keys over 4 warps and shuffle trees to sum
    and pick, where the fields take 24 compares for a thread's 8 keys and a warp sums them in one
    ``redux.sum``. At 16 x 14336 fp32 (buckets of 896, 4 warps) a round on sm_90 went from 148 to
    112 instructions and 9 shuffles to 2 (interleaved buckets; contiguous 154 to 108), registers
    from 90 to 69 (``benchmarks/compile_check.py``)."""
    if FIELD_BITS == 0:
        digits = tl.arange(0, 1 << DIGIT_BITS)
        cand = (t_off + (digits.to(tl.int64) << shift) - half).to(tl.int32)
        count = tl.sum((keys[:, None] >= cand[None, :]).to(tl.int32), axis=0)
        return (tl.max(tl.where(count >= k, digits, 0), axis=0),
                tl.min(tl.where(count >= k, count, 2147483647), axis=0))
    else:
        fields = tl.zeros(keys.shape, dtype=tl.int32)
        for d in tl.static_range(1, 1 << DIGIT_BITS):
            cand = (t_off + (tl.full([], d, tl.int64) << shift) - half).to(tl.int32)
            fields += tl.where(keys >= cand, 1 << (FIELD_BITS * (d - 1)), 0)
        total = tl.sum(fields, axis=0)
        digit = tl.zeros([], dtype=tl.int32)
        count = counted
        for d in tl.static_range(1, 1 << DIGIT_BITS):
            count_d = (total >> (FIELD_BITS * (d - 1))) & ((1 << FIELD_BITS) - 1)
            digit = tl.where(count_d >= k, d, digit)
            count = tl.where(count_d >= k, count_d, count)
        return digit, count


@triton.jit
def kth_key_by_digits(keys, k, KEY_BITS: tl.constexpr, DIGIT_BITS: tl.constexpr, FIELD_BITS: tl.constexpr):
    """(T, the count of keys at or above T): a threshold T for the top k keys, DIGIT_BITS bits a
    block-wide count (as ``key_lower_bound``), for a program whose few candidates leave it
    latency-bound. The rounds stop at the first threshold with exactly k keys at or above it, which
    is then below the k-th key with none between; else T is the k-th key. Either way the keys above
    T, then its first ties up to k, are the top k (``compact_positions``), and where the count is k
    they are all the keys at or above T. On random normal buckets of 1792 keys the
    rounds stop after 9 on average, 13 at most, not 16 (32-bit keys). At 16 x 14336 fp32 k=1434 on
    H200s, 8 warps over buckets of 1024 and 2048 slots: the share kernel took 11.3-12.4 us, not
    12.4-13.6 (benchmarks/results/profile_stages_h200_shares_early_exit.json, against the base runs
    of profile_stages_h200_shares_variants.json)."""
    half = tl.full([], 1, tl.int64) << (KEY_BITS - 1)
    t_off = tl.zeros([], dtype=tl.int64)
    shift = tl.full([], KEY_BITS, tl.int64)
    # From -1, so that k = 0 (a bucket's share of a small k) still runs rounds: they end with no
    # key above the threshold, and the compaction keeps none of its ties.
    at_or_above = tl.full([], -1, tl.int32)
    # Keys at or above the threshold so far: every key (padding too) at the least one.
    counted = tl.full([], keys.shape[0], tl.int32)
    while (shift > 0) & (at_or_above != k):
        shift -= DIGIT_BITS
        digit, at_or_above = _next_digit(keys, k, t_off, shift, half, counted, DIGIT_BITS, FIELD_BITS)
        counted = at_or_above
        t_off += digit.to(tl.int64) << shift
    return (t_off - half).to(tl.int32), at_or_above


@triton.jit
def _least_and_most(least_a, most_a, least_b, most_b):
    return tl.minimum(least_a, least_b), tl.maximum(most_a, most_b)


@triton.jit
def _quarter_points(lo, hi, by_value):
    """lo and three points that cut [lo, hi) in four: evenly in key order, or with ``by_value`` (32-bit
    keys) evenly in the value that a key's bits hold as a float, where those points lie strictly
    inside and in order (NaNs and infinities as ends can break either); each round then leaves a
    strictly smaller part of [lo, hi)."""
    span = hi - lo
    first, second, third = lo + span // 4, lo + span // 2, lo + span * 3 // 4
    if by_value:
        low = value_of_key(lo.to(tl.int32), tl.float32, True)
        width = value_of_key((hi - 1).to(tl.int32), tl.float32, True) - low
        a = order_key(low + width * 0.25, True).to(tl.int64)
        b = order_key(low + width * 0.5, True).to(tl.int64)
        c = order_key(low + width * 0.75, True).to(tl.int64)
        inside = (lo < a) & (a <= b) & (b <= c) & (c < hi)
        first, second, third = tl.where(inside, a, first), tl.where(inside, b, second), tl.where(inside, c, third)
    return first, second, third


@triton.jit
def kth_key_bracketed(keys, k, KEY_BITS: tl.constexpr, GROUPS: tl.constexpr, VALUE_ROUNDS: tl.constexpr):
    """(T, the count of keys at or above T) as ``kth_key_by_digits``, searched between two of the
    block's keys instead of over every key value. The slots split into GROUPS strided groups (j,
    j + GROUPS, ...); the least of the groups' largest keys, ``lo``, has a key of each group at
    or above it, so k keys where k <= GROUPS and every group holds a key, and no key lies above
    the largest, ``hi - 1``. Each round counts the keys at or above lo and three points inside
    [lo, hi) at once (one reduction over [keys, 4], as a round of digits) and keeps the part where
    the count falls below k, until a point has exactly k at or above it or one value is left (the
    k-th key). The first VALUE_ROUNDS rounds of 32-bit keys cut the span evenly in value, later
    ones in key order: a bucket's values crowd around a few binades, which key order spreads
    over hundreds of millions of keys (lo, about the bucket's median, often lies near 0). Where
    the first count finds fewer than k at or above ``lo`` (k > GROUPS, or padding), the search
    widens to every key below it."""
    slots: tl.constexpr = keys.shape[0]
    tops = tl.max(tl.reshape(keys, [slots // GROUPS, GROUPS]), axis=0)
    least, most = tl.reduce((tops, tops), 0, _least_and_most)  # one block-wide reduction, not two
    lo = least.to(tl.int64)
    hi = most.to(tl.int64) + 1
    part = tl.arange(0, 4)
    # -1 until a round has counted the keys at or above lo: the first always runs.
    at_or_above = tl.full([], -1, tl.int32)
    rounds = tl.zeros([], dtype=tl.int32)
    while ((hi - lo > 1) | (at_or_above < 0)) & (at_or_above != k):
        first, second, third = _quarter_points(lo, hi, (KEY_BITS == 32) & (rounds < VALUE_ROUNDS))
        points = tl.where(part == 0, lo, tl.where(part == 1, first, tl.where(part == 2, second, third)))
        count = tl.sum((keys[:, None] >= points.to(tl.int32)[None, :]).to(tl.int32), axis=0)
        j = tl.max(tl.where(count >= k, part, -1), axis=0)
        rounds += 1
        if j < 0:
            hi = lo
            lo = tl.full([], key_pad(KEY_BITS), tl.int64)
        else:
            at_or_above = tl.min(tl.where(count >= k, count, 2147483647), axis=0)
            hi = tl.where(j == 3, hi, tl.where(j == 2, third, tl.where(j == 1, second, first)))
            lo = tl.where(j == 0, lo, tl.where(j == 1, first, tl.where(j == 2, second, third)))
    return lo.to(tl.int32), at_or_above


@triton.jit
def threshold_and_ties(keys, k, KEY_BITS: tl.constexpr, DIGIT_BITS: tl.constexpr, GROUPS: tl.constexpr,
                       FIELD_BITS: tl.constexpr):
    """(T, need): a threshold for the top k keys, found between two keys (``kth_key_bracketed``)
    with GROUPS > 0, else by digits (``kth_key_by_digits``), and how many of T's ties join the
    keys above it (``compact_positions``). Where exactly k keys lie at or above T (the rounds
    stopped early, or no tie straddles it) every tie is kept: one block-wide count fewer on the
    program's chain. At 16 x 14336 fp32 k=1434 on an H100 the share kernel took 10.5 us (16
    buckets, 4 warps) and 11.9 (8, 8) against 11.5 and 12.5 counting every time
    (benchmarks/results/profile_stages_h100_shares_skip_count_1feb989.json)."""
    if GROUPS > 0:
        threshold, at_or_above = kth_key_bracketed(keys, k, KEY_BITS, GROUPS, BRACKET_VALUE_ROUNDS)
    else:
        threshold, at_or_above = kth_key_by_digits(keys, k, KEY_BITS, DIGIT_BITS, FIELD_BITS)
    need = k
    if at_or_above != k:
        need = k - tl.sum((keys > threshold).to(tl.int32), axis=0)
    return threshold, need


@triton.jit
def radix_digit(keys, P: tl.constexpr, KEY_BITS: tl.constexpr):
    """Digit ``P`` (0 = most significant, 8 bits) of the offset-binary form of int32 ``keys``."""
    digit = (keys >> (KEY_BITS - 8 * (P + 1))) & 0xFF
    if P == 0:
        digit = digit ^ 0x80  # the sign bit, flipped: offset binary orders like the signed key
    return digit


@triton.jit
def radix_prefix_match(keys, t, P: tl.constexpr, KEY_BITS: tl.constexpr):
    """Do the ``P`` leading digits of ``keys`` equal the decided digits ``t`` (offset binary)?"""
    decided: tl.constexpr = 8 * P
    return (keys >> (KEY_BITS - decided)) == (t - (1 << (decided - 1))).to(tl.int32)


@triton.jit
def radix_step(h, t, above, k):
    """From the histogram ``h`` of the next digit (among keys matching the decided prefix ``t``):
    the digit holding the k-th largest key, appended to ``t``, and ``above`` plus the count of
    matching keys in larger digits."""
    bins = tl.arange(0, 256)
    suffix = tl.cumsum(h, axis=0, reverse=True)  # matching keys with digit >= d
    d = tl.max(tl.where(above + suffix >= k, bins, 0), axis=0)
    above += tl.sum(tl.where(bins > d, h, 0), axis=0)
    return (t << 8) | d.to(tl.int64), above


@triton.jit
def radix_threshold(t, KEY_BITS: tl.constexpr):
    """The int32 key whose offset-binary digits are ``t``."""
    return (t - (tl.full([], 1, tl.int64) << (KEY_BITS - 1))).to(tl.int32)


@triton.jit
def kth_key_radix(keys, k, KEY_BITS: tl.constexpr):
    """Largest T with count(keys >= T) >= k, one 8-bit digit per histogram."""
    t = tl.zeros([], dtype=tl.int64)
    above = tl.zeros([], dtype=tl.int32)
    for p in tl.static_range(KEY_BITS // 8):
        digit = radix_digit(keys, p, KEY_BITS)
        if p == 0:
            h = tl.histogram(digit, 256)
        else:
            h = tl.histogram(digit, 256, mask=radix_prefix_match(keys, t, p, KEY_BITS))
        t, above = radix_step(h, t, above, k)
    return radix_threshold(t, KEY_BITS)


@triton.jit
def compact_positions(keys, threshold, need, above_base, tied_base):
    """Which candidates to keep (keys above ``threshold``, then the first ``need`` ties in
    candidate order) and their output positions, after ``above_base`` kept keys above the
    threshold and ``tied_base`` ties seen earlier. Returns (chosen, position, above count, tie
    count) of this block. One prefix sum: the above and tie counts share an int32 (16 bits
    each; blocks hold at most 2**15 candidates)."""
    above = keys > threshold
    tied = keys == threshold
    packed = above.to(tl.int32) + (tied.to(tl.int32) << 16)
    chosen, position = _chosen_and_position(above, tied, tl.cumsum(packed, axis=0) - packed, need, above_base,
                                            tied_base)
    return chosen, position, tl.sum(above.to(tl.int32), axis=0), tl.sum(tied.to(tl.int32), axis=0)


@triton.jit
def _chosen_and_position(above, tied, before, need, above_base, tied_base):
    """Which keys to keep and their places, from ``before``: each key's count of the keys above
    the threshold (low 16 bits) and of its ties (high 16 bits) that come before it."""
    above_before = above_base + (before & 0xFFFF)
    tied_before = tied_base + (before >> 16)
    chosen = above | (tied & (tied_before < need))
    return chosen, above_before + tl.minimum(tied_before, need)


@triton.jit
def compact_positions_by_column(keys, threshold, need, COLUMNS: tl.constexpr):
    """``compact_positions`` of one block (no bases), numbering the chosen keys column by column
    of its [n / COLUMNS, COLUMNS] view (keys c, c + COLUMNS, ... before c + 1), so another
    order of the same selection. With COLUMNS the block's threads, a thread's keys are a column:
    Triton holds a 1-D block that loads no two adjacent keys (a wide bucket's strided slots) as
    keys t, t + threads, ... of thread t, and scanned it as n / threads warp-wide scans, one a
    register (40 shuffles for a bucket of 1024 slots over 4 warps). Here a thread counts its
    column, one scan over the threads' counts places the columns, and each key's place in its
    column is counted in the thread."""
    ROWS: tl.constexpr = keys.shape[0] // COLUMNS
    above = keys > threshold
    tied = keys == threshold
    packed = tl.reshape(above.to(tl.int32) + (tied.to(tl.int32) << 16), [ROWS, COLUMNS])
    column = tl.sum(packed, axis=0)
    before = tl.cumsum(packed, axis=0) - packed + (tl.cumsum(column, axis=0) - column)[None, :]
    zero = tl.zeros([], dtype=tl.int32)
    return _chosen_and_position(above, tied, tl.reshape(before, [keys.shape[0]]), need, zero, zero)


@triton.jit
def order_entry(keys, position, ORDER32: tl.constexpr):
    """Packed (key, output position) that sorts descending into torch.topk's order; a tie goes
    to the earlier position. int32 for 16-bit keys (positions < 2**16), else int64."""
    if ORDER32:
        entry = (keys << 16) | (0xFFFF - position)
    else:
        entry = (keys.to(tl.int64) << 32) | (0xFFFFFFFF - position.to(tl.int64))
    return entry


@triton.jit
def values_of(keys, idx, mask, x_row_ptr, KEY_BITS: tl.constexpr, LARGEST: tl.constexpr):
    """The input values at ``idx`` whose keys are ``keys``: rebuilt from the keys, loaded only for
    NaNs."""
    is_nan = keys == nan_key(KEY_BITS, LARGEST)
    rebuilt = value_of_key(keys, x_row_ptr.dtype.element_ty, LARGEST)
    return tl.where(is_nan, tl.load(x_row_ptr + idx, mask=mask & is_nan), rebuilt)


@triton.jit
def store_selected(keys, idx, chosen, position, x_row_ptr, values_row_ptr, indices_row_ptr, order_row_ptr,
                   SORTED: tl.constexpr, ORDER32: tl.constexpr, KEY_BITS: tl.constexpr, LARGEST: tl.constexpr):
    tl.store(indices_row_ptr + position, idx.to(tl.int64), mask=chosen)
    tl.store(values_row_ptr + position, values_of(keys, idx, chosen, x_row_ptr, KEY_BITS, LARGEST), mask=chosen)
    if SORTED:
        tl.store(order_row_ptr + position, order_entry(keys, position, ORDER32), mask=chosen)


@triton.jit
def index_entry(keys, idx, PACK32: tl.constexpr):
    """Packed (key, inverted element index): sorts descending into torch.topk's order, a tie to
    the smaller index. PACK32: 16-bit keys and indices below 2**16 share an int32, else an int64."""
    if PACK32:
        entry = (keys << 16) | (0xFFFF - idx.to(tl.int32))
    else:
        entry = (keys.to(tl.int64) << 32) | (0xFFFFFFFF - idx.to(tl.int64))
    return entry


@triton.jit
def unpack_index_entry(entry, PACK32: tl.constexpr):
    """(int32 key, int64 index) of ``index_entry``'s packing."""
    if PACK32:
        keys = entry >> 16
        idx = (0xFFFF - (entry & 0xFFFF)).to(tl.int64)
    else:
        keys = (entry >> 32).to(tl.int32)
        idx = 0xFFFFFFFF - (entry & 0xFFFFFFFF)
    return keys, idx


@triton.jit
def entry_pad(PACK32: tl.constexpr):
    """Below every packed entry (``index_entry``, ``order_entry``): the int32 or int64 minimum."""
    if PACK32:
        pad = -2147483648
    else:
        pad = -9223372036854775808
    return pad


@triton.jit
def top_entries(entry, K_POW2: tl.constexpr):
    """The K_POW2 largest of the packed ``entry`` values, sorted descending, by a bitonic network."""
    if K_POW2 == 1:
        top = tl.max(entry, axis=0, keep_dims=True)
    elif K_POW2 < entry.numel:
        top = tl.topk(entry, K_POW2)
    else:
        top = tl.sort(entry, descending=True)
    return top


@triton.jit
def store_index_entries(keys, idx, chosen, position, order_row_ptr, PACK32: tl.constexpr):
    """The chosen candidates' (key, inverted index) entries, stored at their positions."""
    if PACK32:
        order_row_ptr = order_row_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    tl.store(order_row_ptr + position, index_entry(keys, idx, PACK32), mask=chosen)


@triton.jit
def store_by_index_entries(keys, idx, chosen, position, k, x_row_ptr, values_row_ptr, indices_row_ptr,
                           order_row_ptr, K_POW2: tl.constexpr, KEY_BITS: tl.constexpr, PACK32: tl.constexpr,
                           LARGEST: tl.constexpr, SORT: tl.constexpr):
    """Stores the chosen candidates' (key, inverted index) entries at their positions
    (``store_index_entries``), then writes the row from them (``write_index_entries``)."""
    store_index_entries(keys, idx, chosen, position, order_row_ptr, PACK32)
    tl.debug_barrier()
    write_index_entries(k, x_row_ptr, values_row_ptr, indices_row_ptr, order_row_ptr, K_POW2, KEY_BITS, PACK32,
                        LARGEST, SORT)


@triton.jit
def write_index_entries(k, x_row_ptr, values_row_ptr, indices_row_ptr, order_row_ptr, K_POW2: tl.constexpr,
                        KEY_BITS: tl.constexpr, PACK32: tl.constexpr, LARGEST: tl.constexpr, SORT: tl.constexpr):
    """Loads a row's k stored (key, inverted index) entries in order (with SORT, sorted into
    torch.topk's order; ties go to the smaller index), and writes the values (rebuilt from the
    keys) and indices from them. PACK32: 16-bit keys and indices below 2**16 share an int32,
    else an int64. ``order_row_ptr`` may be the index row itself (the launcher then allocates no
    entries): int32 entries fill the first half of its bytes, and every entry is loaded before
    any index is stored."""
    if PACK32:
        order_row_ptr = order_row_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    o = tl.arange(0, K_POW2)
    in_k = o < k
    entry = tl.load(order_row_ptr + o, mask=in_k, other=entry_pad(PACK32))
    if SORT and K_POW2 > 1:
        entry = tl.sort(entry, descending=True)
    tl.debug_barrier()
    sorted_keys, sorted_idx = unpack_index_entry(entry, PACK32)
    tl.store(indices_row_ptr + o, sorted_idx, mask=in_k)
    tl.store(values_row_ptr + o, values_of(sorted_keys, sorted_idx, in_k, x_row_ptr, KEY_BITS, LARGEST), mask=in_k)


@triton.jit
def sort_stored(values_row_ptr, indices_row_ptr, order_row_ptr, k, K_POW2: tl.constexpr, ORDER32: tl.constexpr):
    """Sorts one row's k stored (value, index) pairs by their order entries, in place.

    Every thread's reads are done before the barrier, every write after it.
    """
    o = tl.arange(0, K_POW2)
    in_k = o < k
    if ORDER32:
        entry = tl.load(order_row_ptr + o, mask=in_k, other=-2147483648)
        pos_mask = 0xFFFF
    else:
        entry = tl.load(order_row_ptr + o, mask=in_k, other=-9223372036854775808)
        pos_mask = 0xFFFFFFFF
    if K_POW2 > 1:
        entry = tl.sort(entry, descending=True)
    position = (pos_mask - (entry & pos_mask)).to(tl.int32)
    values = tl.load(values_row_ptr + position, mask=in_k)
    indices = tl.load(indices_row_ptr + position, mask=in_k)
    tl.debug_barrier()
    tl.store(values_row_ptr + o, values, mask=in_k)
    tl.store(indices_row_ptr + o, indices, mask=in_k)


@triton.jit
def select_and_store(keys, idx, k, x_row_ptr, values_row_ptr, indices_row_ptr, order_row_ptr,
                     K_POW2: tl.constexpr, KEY_BITS: tl.constexpr, SORTED: tl.constexpr,
                     SELECT: tl.constexpr, SORT_HERE: tl.constexpr, ORDER32: tl.constexpr,
                     PACK32: tl.constexpr, LARGEST: tl.constexpr):
    """Writes the k candidates with the largest keys (int64 indices, values rebuilt from keys);
    returns the k-th largest key.

    keys: int32 [NS], padding = ``key_pad``, made by ``order_key`` with LARGEST; idx: [NS]
    element indices; at least k real candidates. With SORTED and not SORT_HERE, the row is left
    unsorted with its order entries stored for ``sort_selected`` or ``rank_sort``. PACK32: 16-bit keys and
    indices < 2**16 share an int32 (in the network, or in the entries sorted here).
    """
    if SELECT == 0:
        if PACK32:
            # A padding candidate's index may pass 2**16 (stage 1 numbers its empty slots past the
            # row): zeroed, so that it cannot spill into the key bits and outrank real ones.
            idx = tl.where(keys == key_pad(KEY_BITS), 0, idx)
        top_keys, top_idx = unpack_index_entry(top_entries(index_entry(keys, idx, PACK32), K_POW2), PACK32)
        o = tl.arange(0, K_POW2)
        in_k = o < k
        tl.store(indices_row_ptr + o, top_idx, mask=in_k)
        tl.store(values_row_ptr + o, values_of(top_keys, top_idx, in_k, x_row_ptr, KEY_BITS, LARGEST), mask=in_k)
        threshold = tl.min(tl.where(in_k, top_keys, 2147483647), axis=0)
    else:
        if SELECT < 3:
            if SELECT == 1:
                threshold = kth_key_bisect(keys, k, KEY_BITS)
            else:
                threshold = kth_key_radix(keys, k, KEY_BITS)
            need = k - tl.sum((keys > threshold).to(tl.int32), axis=0)
        elif SELECT == 3:
            threshold, need = threshold_and_ties(keys, k, KEY_BITS, 2, 0, 0)
        else:
            # Groups of at least k (the bracket then holds the top k), at most the candidates.
            threshold, need = threshold_and_ties(keys, k, KEY_BITS, 2, min(K_POW2, keys.shape[0]), 0)
        zero = tl.zeros([], dtype=tl.int32)
        chosen, position, _, _ = compact_positions(keys, threshold, need, zero, zero)
        if not SORTED:
            # Through entries rather than store_selected's scatter of indices and values: that
            # keeps a 64-bit address per candidate live for each output, 168-184 registers a
            # thread at 4096 candidates (one program an SM while stage 1 streams), against ~100.
            store_by_index_entries(keys, idx, chosen, position, k, x_row_ptr, values_row_ptr, indices_row_ptr,
                                   indices_row_ptr, K_POW2, KEY_BITS, PACK32, LARGEST, False)
        elif SORT_HERE and (PACK32 or KEY_BITS == 32):
            store_by_index_entries(keys, idx, chosen, position, k, x_row_ptr, values_row_ptr, indices_row_ptr,
                                   order_row_ptr, K_POW2, KEY_BITS, PACK32, LARGEST, True)
        else:
            store_selected(keys, idx, chosen, position, x_row_ptr, values_row_ptr, indices_row_ptr, order_row_ptr,
                           SORTED, ORDER32, KEY_BITS, LARGEST)
            if SORTED and SORT_HERE:
                tl.debug_barrier()
                sort_stored(values_row_ptr, indices_row_ptr, order_row_ptr, k, K_POW2, ORDER32)
    return threshold


@triton.jit
def _select_topk_kernel(keys_ptr, idx_ptr, x_ptr, values_ptr, indices_ptr, order_ptr,  # pointers
                        k, m,                                                          # sizes
                        cand_row_stride, x_row_stride, out_row_stride,                 # strides
                        NS: tl.constexpr, K_POW2: tl.constexpr, KEY_BITS: tl.constexpr,
                        SORTED: tl.constexpr, SELECT: tl.constexpr, SORT_HERE: tl.constexpr,
                        ORDER32: tl.constexpr, PACK32: tl.constexpr, RAW: tl.constexpr,
                        LARGEST: tl.constexpr):
    """One row: candidates from (keys_ptr, idx_ptr), or with RAW the whole input row itself
    (LARGEST: the orientation of the keys, made here with RAW)."""
    row = tl.program_id(0).to(tl.int64)
    f = tl.arange(0, NS)
    in_m = f < m
    if RAW:
        v = tl.load(x_ptr + row * x_row_stride + f, mask=in_m, other=0.0)
        keys = tl.where(in_m, order_key(v, LARGEST), key_pad(KEY_BITS))
        idx = f
    else:
        keys = tl.load(keys_ptr + row * cand_row_stride + f, mask=in_m, other=key_pad(KEY_BITS))
        idx = tl.load(idx_ptr + row * cand_row_stride + f, mask=in_m, other=0)
    select_and_store(keys, idx, k, x_ptr + row * x_row_stride, values_ptr + row * out_row_stride,
                     indices_ptr + row * out_row_stride, order_ptr + row * out_row_stride,
                     K_POW2=K_POW2, KEY_BITS=KEY_BITS, SORTED=SORTED, SELECT=SELECT, SORT_HERE=SORT_HERE,
                     ORDER32=ORDER32, PACK32=PACK32, LARGEST=LARGEST)


@triton.jit
def _sort_selected_kernel(values_ptr, indices_ptr, order_ptr,      # pointers
                          k,                                       # sizes
                          out_row_stride,                          # strides
                          K_POW2: tl.constexpr, ORDER32: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    sort_stored(values_ptr + row * out_row_stride, indices_ptr + row * out_row_stride,
                order_ptr + row * out_row_stride, k, K_POW2, ORDER32)


@triton.jit
def _rank_sort_kernel(values_ptr, indices_ptr, order_ptr, sorted_values_ptr, sorted_indices_ptr,  # pointers
                      k,                                                                        # sizes
                      row_stride,                                                               # strides
                      BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """Program (row, c) moves the row's entries c * BLOCK_I ... to their ranks: the number of the
    row's entries above each. Entries are distinct (each holds its position), so the ranks are a
    permutation and no two programs write one place."""
    row = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    in_i = i < k
    base = row * row_stride
    mine = tl.load(order_ptr + base + i, mask=in_i)
    rank = tl.zeros([BLOCK_I], dtype=tl.int32)
    for j0 in range(0, k, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        in_j = j < k
        theirs = tl.load(order_ptr + base + j, mask=in_j)
        rank += tl.sum(((theirs[None, :] > mine[:, None]) & in_j[None, :]).to(tl.int32), axis=1)
    tl.store(sorted_values_ptr + base + rank, tl.load(values_ptr + base + i, mask=in_i), mask=in_i)
    tl.store(sorted_indices_ptr + base + rank, tl.load(indices_ptr + base + i, mask=in_i), mask=in_i)


def rank_sort(values: torch.Tensor, indices: torch.Tensor, order: torch.Tensor, *, num_warps: int = 4):
    """(values, indices) of each row in the order of its entries, descending (``select_and_store``
    with SORTED and not SORT_HERE), into new tensors."""
    rows, k = values.shape
    assert values.stride() == indices.stride() == order.stride() == (k, 1), "rank_sort: contiguous [rows, k] rows"
    return sort_finisher(rows, k, sort_with="rank", sort_warps=num_warps)(values, indices, order)


def order32(key_bits: int, k: int) -> bool:
    """Order entries fit an int32: 16-bit keys and positions below 2**16."""
    return key_bits == 16 and k <= 2**16


def sorts_entries_in_index_row(key_bits: int, n: int, *, sorted: bool, select: str, sort_with: str) -> bool:
    """Whether ``select_and_store`` sorts (key, index) entries in its program
    (``store_by_index_entries``), which can use the output's index row for them."""
    meta = select_meta(1, key_bits, n, sorted=sorted, select=select, sort_with=sort_with)
    return sorted and select != "bitonic" and meta["SORT_HERE"] and (meta["PACK32"] or key_bits == 32)


def outputs_maker(x2d: torch.Tensor, k: int, key_bits: int, sorted: bool, select: str = "bisect",
                  entries_in_index_row: bool = False):
    """A function making new (values, indices, order entries) for ``select_and_store`` on rows of
    ``x2d``; the entries only where they are written (sorted output that a bitonic network does
    not already sort) and ``entries_in_index_row`` does not put them in the index row (for
    kernels that reach ``select_and_store`` only: ``sorts_entries_in_index_row``). An allocation
    fewer costs about 5 us of host time less a call on an H200's host."""
    shape, dtype, device = (x2d.shape[0], k), x2d.dtype, x2d.device
    separate = sorted and select != "bitonic" and not entries_in_index_row
    order_dtype = (torch.int32 if order32(key_bits, k) else torch.int64) if separate else None

    def make():
        values = torch.empty(shape, dtype=dtype, device=device)
        indices = torch.empty(shape, dtype=torch.int64, device=device)
        order = indices if order_dtype is None else torch.empty(shape, dtype=order_dtype, device=device)
        return values, indices, order

    return make


def new_outputs(x2d: torch.Tensor, k: int, key_bits: int, sorted: bool, select: str = "bisect"):
    """(values, indices, order entries) for ``select_and_store`` (``outputs_maker``)."""
    return outputs_maker(x2d, k, key_bits, sorted, select)()


def sort_selected(values: torch.Tensor, indices: torch.Tensor, order: torch.Tensor, *, num_warps: int = 1) -> None:
    """Sorts each row of (values, indices) in place by its order entries (``select_and_store``
    with SORTED and not SORT_HERE)."""
    rows, k = values.shape
    assert values.stride() == indices.stride() == order.stride() == (k, 1), "sort_selected: contiguous [rows, k] rows"
    sort_finisher(rows, k, sort_with="launch", sort_warps=num_warps,
                  order32_entries=order.dtype == torch.int32)(values, indices, order)


def pack32(key_bits: int, n: int) -> bool:
    """A 16-bit key and an index of a row of at most 2**16 share an int32 (``index_entry``)."""
    return key_bits == 16 and n <= 2**16


def select_meta(k: int, key_bits: int, n: int, *, sorted: bool, select: str, sort_with: str) -> dict:
    """The constexprs ``select_and_store`` takes beside KEY_BITS, from the launcher's arguments."""
    assert select in SELECT_METHODS, f"select must be one of {list(SELECT_METHODS)}, got {select!r}"
    assert sort_with in SORT_WITH, f"sort_with must be one of {SORT_WITH}, got {sort_with!r}"
    return dict(K_POW2=next_pow2(k), SORTED=sorted, SELECT=SELECT_METHODS[select],
                SORT_HERE=sort_with == "program" or select == "bitonic", ORDER32=order32(key_bits, k),
                PACK32=pack32(key_bits, n))


def _sorted_already(values, indices, order):
    return values, indices


def sort_finisher(rows: int, k: int, *, sort_with: str, sort_warps: int, order32_entries: bool = False):
    """The function of (values, indices, order entries), new contiguous [rows, k] outputs of
    ``select_and_store``, returning them sorted: by ``sort_selected`` in place ("launch"), by
    ``_rank_sort_kernel`` into new tensors ("rank"), or as they are ("program").
    ``order32_entries``: the entries are int32."""
    if sort_with == "program" or not rows or not k:
        return _sorted_already
    if sort_with == "launch":
        launch = Launch(_sort_selected_kernel, (rows,), k=k, out_row_stride=k, K_POW2=next_pow2(k),
                        ORDER32=order32_entries, num_warps=sort_warps)

        def sort_in_place(values, indices, order):
            launch(values, indices, order)
            return values, indices

        return sort_in_place
    assert sort_with == "rank", f"sort_with must be one of {SORT_WITH}, got {sort_with!r}"
    launch = Launch(_rank_sort_kernel, (rows, cdiv(k, RANK_BLOCK_I)), k=k, row_stride=k, BLOCK_I=RANK_BLOCK_I,
                    BLOCK_J=RANK_BLOCK_J, num_warps=sort_warps)

    def sort_by_rank(values, indices, order):
        sorted_values, sorted_indices = torch.empty_like(values), torch.empty_like(indices)
        launch(values, indices, order, sorted_values, sorted_indices)
        return sorted_values, sorted_indices

    return sort_by_rank


def finisher_for(rows: int, k: int, *, order32_entries: bool, sorted: bool, select: str, sort_with: str,
                 sort_warps: int):
    """``sort_finisher`` for outputs that ``select_and_store`` wrote with these arguments (a
    bitonic network, or unsorted output, leaves nothing to sort)."""
    separate = sorted and select != "bitonic" and sort_with != "program"
    return sort_finisher(rows, k, sort_with=sort_with if separate else "program",
                         sort_warps=sort_warps if sort_with == "launch" else RANK_SORT_WARPS,
                         order32_entries=order32_entries)


def prepare_select(x2d: torch.Tensor, k: int, m: int, cand_row_stride: int, *, key_bits: int, sorted: bool,
                   select: str, sort_with: str, sort_warps: int, raw: bool, largest: bool, num_warps: int,
                   max_registers: int = 0):
    """The function of (keys, idx, x2d) that selects the top k of m candidates per row of
    ``x2d``-shaped inputs (with ``raw``, of x2d's own rows); ``max_registers`` (0: the
    compiler's choice) caps a thread's registers."""
    rows = x2d.shape[0]
    in_index_row = sorts_entries_in_index_row(key_bits, x2d.shape[1], sorted=sorted, select=select,
                                              sort_with=sort_with)
    make_outputs = outputs_maker(x2d, k, key_bits, sorted, select, in_index_row)
    launch = Launch(_select_topk_kernel, (rows,), k=k, m=m, cand_row_stride=cand_row_stride,
                    x_row_stride=x2d.stride(0), out_row_stride=k, NS=next_pow2(m), KEY_BITS=key_bits,
                    **select_meta(k, key_bits, x2d.shape[1], sorted=sorted, select=select, sort_with=sort_with),
                    RAW=raw, LARGEST=largest, num_warps=num_warps, maxnreg=max_registers or None)
    finish = finisher_for(rows, k, order32_entries=order32(key_bits, k), sorted=sorted, select=select,
                          sort_with=sort_with, sort_warps=sort_warps)

    def run(keys, idx, x2d):
        values, indices, order = make_outputs()
        if rows:
            launch(keys, idx, x2d, values, indices, order)
        return finish(values, indices, order)

    return run


def select_topk(keys: torch.Tensor, idx: torch.Tensor, x2d: torch.Tensor, k: int, *, key_bits: int, sorted: bool,
                largest: bool, select: str = "radix", sort_with: str = "launch", sort_warps: int = 1,
                num_warps: int = 8):
    """Top k of the candidates ``keys``/``idx`` ([rows, m] int32 each) of the rows of ``x2d``;
    ``largest``: the orientation the keys were made with."""
    rows, m = keys.shape
    assert idx.shape == keys.shape and keys.dtype == torch.int32, "select_topk: int32 [rows, m] keys and indices"
    assert x2d.dim() == 2 and x2d.shape[0] == rows and x2d.stride(1) == 1, "select_topk: x2d must be [rows, n], unit last stride"
    assert 0 < k <= m, f"select_topk: need 0 < k <= m, got k={k}, m={m}"
    assert idx.stride(0) == keys.stride(0), "select_topk: keys and indices share a row stride"
    return prepare_select(x2d, k, m, keys.stride(0), key_bits=key_bits, sorted=sorted, select=select,
                          sort_with=sort_with, sort_warps=sort_warps, raw=False, largest=largest,
                          num_warps=num_warps)(keys, idx, x2d)


def prepare_exact_topk(x2d: torch.Tensor, k: int, *, largest: bool, sorted: bool, select: str = "radix",
                       sort_with: str = "launch", sort_warps: int = 1, num_warps: int = 8, max_registers: int = 0):
    """The function of x2d ([rows, n], unit last stride, this one's shape, dtype and row stride)
    giving the exact top-k of each row, the row held in registers (``max_registers``: as
    ``prepare_select``)."""
    assert x2d.dim() == 2 and x2d.stride(1) == 1, "exact_topk: x2d must be [rows, n], unit last stride"
    assert x2d.dtype in (torch.float32, torch.float16, torch.bfloat16), f"exact_topk: unsupported dtype {x2d.dtype}"
    assert 0 < k <= x2d.shape[1], f"exact_topk: need 0 < k <= n, got k={k}, n={x2d.shape[1]}"
    key_bits = 16 if x2d.element_size() == 2 else 32
    run = prepare_select(x2d, k, x2d.shape[1], 0, key_bits=key_bits, sorted=sorted, select=select,
                         sort_with=sort_with, sort_warps=sort_warps, raw=True, largest=largest, num_warps=num_warps,
                         max_registers=max_registers)
    return lambda x2d: run(x2d, x2d, x2d)


def exact_topk(x2d: torch.Tensor, k: int, *, largest: bool, sorted: bool, select: str = "radix",
               sort_with: str = "launch", sort_warps: int = 1, num_warps: int = 8, max_registers: int = 0):
    """Exact top-k of each row of ``x2d`` ([rows, n], unit last stride), the row held in registers."""
    return prepare_exact_topk(x2d, k, largest=largest, sorted=sorted, select=select, sort_with=sort_with,
                              sort_warps=sort_warps, num_warps=num_warps, max_registers=max_registers)(x2d)
