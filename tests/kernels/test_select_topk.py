"""Exact Triton selection (rows in registers, candidates from memory) and the separate sort launch,
against torch.topk. Without a GPU these run in the Triton interpreter on CPU tensors."""

import pytest
import torch
import triton
import triton.language as tl

from tests.conftest import KERNEL_DEVICE
from tests.kernels.test_bucketed_topk import FINISHES
from topk_compiler.kernels.select_topk import (compact_positions_by_column, count_fields, exact_topk, key_pad,
                                               kth_key_bisect, kth_key_bracketed, kth_key_by_digits, new_outputs,
                                               select_topk, sort_selected)
from topk_compiler.lowering.order_keys import order_keys

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_exact(values, indices, x, k, largest, sorted_):
    """Same values as torch.topk (in its order once sorted), selected by distinct indices."""
    values, indices, x = values.cpu(), indices.cpu(), x.cpu()
    expected = torch.topk(x, k, dim=1, largest=largest, sorted=True).values
    torch.testing.assert_close(x.gather(1, indices), values, rtol=0, atol=0, equal_nan=True)
    assert (indices.sort(1).values.diff(dim=1) > 0).all()
    if not sorted_:
        values = values.gather(1, order_keys(values, largest).argsort(dim=1, descending=True, stable=True))
    torch.testing.assert_close(values, expected, rtol=0, atol=0, equal_nan=True)


def special_rows(dtype, n):
    """Rows with NaN, +-inf, many ties and all-equal values."""
    x = torch.randn(4, n)
    x[0, ::7] = float("nan")
    x[1, ::5] = float("inf")
    x[1, 2::9] = float("-inf")
    x[2] = torch.randint(0, 4, (n,)).float()
    x[3] = 1.5
    return x.to(dtype).to(KERNEL_DEVICE)


# Odd lengths, k = 1 and k = n, each with one way to finish (every finish appears).
EXACT_CASES = [(1023, 1, "bisect", "program"), (1023, 100, "radix", "launch"), (300, 300, "bisect", "launch"),
               (64, 17, "bitonic", "program"), (200, 50, "radix", "program"), (700, 333, "bisect", "rank"),
               (1023, 100, "digits", "program"), (300, 300, "bracket", "launch"), (700, 333, "bracket", "program")]


@pytest.mark.parametrize("n,k,select,sort_with", EXACT_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_topk_equals_torch(n, k, select, sort_with, dtype):
    x = torch.randn(3, n).to(dtype).to(KERNEL_DEVICE)
    for largest in (True, False):
        values, indices = exact_topk(x, k, largest=largest, sorted=True, select=select, sort_with=sort_with)
        assert_exact(values, indices, x, k, largest, sorted_=True)


@pytest.mark.parametrize("sorted_", [True, False])
def test_exact_topk_with_capped_registers_equals_torch(sorted_):
    """A register cap (ignored by the interpreter) spills on a GPU; the results must not change."""
    x = torch.randn(3, 4096).to(torch.bfloat16).to(KERNEL_DEVICE)
    values, indices = exact_topk(x, 512, largest=True, sorted=sorted_, select="bisect", sort_with="program",
                                 max_registers=48)
    assert_exact(values, indices, x, 512, True, sorted_=sorted_)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("select", ["bisect", "radix", "digits", "bracket"])
def test_exact_topk_special_values_and_ties(dtype, select):
    x = special_rows(dtype, 500)
    for largest, sorted_ in ((True, True), (False, False)):
        values, indices = exact_topk(x, 60, largest=largest, sorted=sorted_, select=select, sort_with="launch")
        assert_exact(values, indices, x, 60, largest, sorted_)


INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
# A quiet NaN with payload bits, and its negative, for each dtype (as integers).
NAN_PAYLOADS = {torch.float32: (0x7FC0_1234, -0x003F_EDCC), torch.float16: (0x7E05, -0x01FB),
                torch.bfloat16: (0x7FC5, -0x003B)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("select,sort_with,sorted_", [("bisect", "program", True), ("radix", "launch", True),
                                                      ("bitonic", "program", True), ("bisect", "program", False),
                                                      ("bisect", "rank", True), ("digits", "program", True),
                                                      ("bracket", "program", False)])
def test_values_are_the_inputs_bit_for_bit(dtype, select, sort_with, sorted_):
    """Values rebuilt from keys: -0.0 stays -0.0, each NaN keeps its own payload and sign."""
    x = torch.randn(2, 200)
    x[:, 3::11] = 0.0
    x[:, 5::11] = -0.0
    x = x.to(dtype)
    bits = x.view(INT_VIEW[dtype])
    bits[:, 7::13] = NAN_PAYLOADS[dtype][0]
    bits[:, 9::13] = NAN_PAYLOADS[dtype][1]
    x = x.to(KERNEL_DEVICE)
    for largest in (True, False):
        values, indices = exact_topk(x, 120, largest=largest, sorted=sorted_, select=select, sort_with=sort_with)
        # Gathered as integers: a float gather may itself rewrite NaN bits.
        assert torch.equal(values.cpu().view(INT_VIEW[dtype]), bits.gather(1, indices.cpu()))
        assert_exact(values, indices, x, 120, largest, sorted_)
        # Every NaN comes first when largest (none when not); some of the -0.0 are chosen.
        assert values.isnan().sum() == (2 * 30 if largest else 0)
        assert (values.cpu().view(INT_VIEW[dtype]) == bits[:, 5:6]).any()


@pytest.mark.parametrize("select,sort_with", [("bisect", "launch"), ("radix", "program"), ("bitonic", "program")])
@pytest.mark.parametrize("largest", [True, False])
def test_select_topk_over_candidates_in_memory(select, sort_with, largest):
    """Candidates are (key, index) pairs of a subset of the row: the top k of that subset, with
    values rebuilt from keys of either orientation."""
    x = torch.randn(2, 900).to(KERNEL_DEVICE)
    idx = torch.stack([torch.randperm(900)[:300] for _ in range(2)]).to(torch.int32).to(KERNEL_DEVICE)
    keys = order_keys(x.cpu(), largest).gather(1, idx.cpu().long()).to(torch.int32).to(KERNEL_DEVICE)
    values, indices = select_topk(keys, idx, x, 50, key_bits=32, sorted=True, largest=largest, select=select,
                                  sort_with=sort_with)
    subset = x.cpu().gather(1, idx.cpu().long())
    torch.testing.assert_close(values.cpu(), subset.topk(50, dim=1, largest=largest).values, rtol=0, atol=0)
    assert torch.equal(x.cpu().gather(1, indices.cpu()), values.cpu())


@pytest.mark.parametrize("entries", [torch.int32, torch.int64])
def test_sort_selected_orders_rows_by_their_entries(entries):
    """Entries pack (key, inverted position): the row comes out by key, descending, and equal
    keys keep their order."""
    rows, k = 3, 37
    keys = torch.randint(-5, 5, (rows, k))
    position = torch.arange(k).expand(rows, k)
    if entries == torch.int32:
        order = (keys << 16) | (0xFFFF - position)
    else:
        order = (keys << 32) | (0xFFFFFFFF - position)
    values = torch.randn(rows, k)
    indices = torch.randint(0, 10**6, (rows, k))
    expected = torch.sort(keys, dim=1, descending=True, stable=True).indices
    v, i = values.clone().to(KERNEL_DEVICE), indices.clone().to(KERNEL_DEVICE)
    sort_selected(v, i, order.to(entries).to(KERNEL_DEVICE), num_warps=1)
    assert torch.equal(v.cpu(), values.gather(1, expected)) and torch.equal(i.cpu(), indices.gather(1, expected))


def test_new_outputs_use_int32_order_entries_for_16_bit_keys():
    x = torch.randn(2, 10)
    assert new_outputs(x, 4, 16, True)[2].dtype == torch.int32
    assert new_outputs(x, 4, 32, True)[2].dtype == torch.int64


def test_rows_sorted_in_their_program_keep_their_entries_in_the_index_row():
    """(key, index) entries sorted in the program go to the output's index row (no allocation for
    them); every other sort needs entries of its own."""
    from topk_compiler.kernels.select_topk import outputs_maker, sorts_entries_in_index_row

    program = dict(sorted=True, select="bisect", sort_with="program")
    assert sorts_entries_in_index_row(32, 10**6, **program)
    assert sorts_entries_in_index_row(16, 2**16, **program)
    assert not sorts_entries_in_index_row(16, 2**16 + 1, **program)  # positions too wide to pack
    assert not sorts_entries_in_index_row(32, 1000, sorted=True, select="bisect", sort_with="launch")
    assert not sorts_entries_in_index_row(32, 1000, sorted=False, select="bisect", sort_with="program")
    x = torch.randn(2, 10)
    values, indices, order = outputs_maker(x, 4, 32, True, "bisect", entries_in_index_row=True)()
    assert order is indices
    _, indices, order = outputs_maker(x, 4, 32, True, "bisect")()
    assert order is not indices and order.dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_selection_sorting_in_its_program_with_entries_in_the_index_row(dtype):
    x = special_rows(dtype, 700)
    for k in (1, 333, 700):
        values, indices = exact_topk(x, k, largest=True, sorted=True, select="bisect", sort_with="program")
        assert_exact(values, indices, x, k, True, sorted_=True)


def key_rows(key_bits: int, m: int) -> torch.Tensor:
    """Five rows of ``m`` int64 keys of ``key_bits``: random over every key, ties among six, half
    of each extreme key, one key, and random over a narrow range."""
    lo, hi = -(2 ** (key_bits - 1)) + 1, 2 ** (key_bits - 1) - 1
    keys = torch.randint(lo, hi, (5, m), dtype=torch.int64)
    keys[1] = torch.randint(-3, 3, (m,))
    keys[2, :m // 2], keys[2, m // 2:] = lo, hi
    keys[3] = 7
    keys[4] = torch.randint(1000, 1040, (m,))
    return keys


@triton.jit
def _kth_key_kernel(keys_ptr, out_ptr, k, m, NS: tl.constexpr, KEY_BITS: tl.constexpr, DIGIT_BITS: tl.constexpr,
                    FIELD_BITS: tl.constexpr):
    row = tl.program_id(0)
    f = tl.arange(0, NS)
    keys = tl.load(keys_ptr + row * m + f, mask=f < m, other=key_pad(KEY_BITS))
    tl.store(out_ptr + 3 * row, kth_key_bisect(keys, k, KEY_BITS))
    threshold, at_or_above = kth_key_by_digits(keys, k, KEY_BITS, DIGIT_BITS, FIELD_BITS)
    tl.store(out_ptr + 3 * row + 1, threshold)
    tl.store(out_ptr + 3 * row + 2, at_or_above)


@pytest.mark.parametrize("key_bits", [16, 32])
@pytest.mark.parametrize("digit_bits,packed", [(2, False), (2, True), (4, False)])
def test_thresholds_part_the_top_k_from_the_rest(key_bits, digit_bits, packed):
    """Bisection returns the k-th largest key; the search by digits a threshold T with at most k
    keys above it and at least k at or above it (the k-th key, or one below it where exactly k
    lie at or above), so the keys above T then T's first ties are the top k, with the count at or
    above T it returns. On rows of ties, of
    the extreme keys, and of fewer candidates than the block (padding below every key); the
    random row of 32-bit keys stops early (k = 1 and 37: T below the k-th key). ``packed``: the
    digits' counts share one int32 in fields of 7 bits, which 127 keys fill (a row of equal keys
    counts 127 at every digit it reaches)."""
    m = 127 if packed else 100
    keys = key_rows(key_bits, m)
    field_bits = count_fields(digit_bits, m) if packed else 0
    assert field_bits == (7 if packed else 0)
    for k in (1, 37, m):
        out = torch.empty(5, 3, dtype=torch.int32, device=KERNEL_DEVICE)
        _kth_key_kernel[(5,)](keys.to(torch.int32).to(KERNEL_DEVICE), out, k, m, NS=128, KEY_BITS=key_bits,
                              DIGIT_BITS=digit_bits, FIELD_BITS=field_bits)
        expected = keys.sort(dim=1, descending=True).values[:, k - 1].to(torch.int32)
        assert torch.equal(out.cpu()[:, 0], expected)
        by_digits = out.cpu()[:, 1:2].to(torch.int64)
        assert ((keys > by_digits).sum(1) <= k).all() and ((keys >= by_digits).sum(1) >= k).all()
        assert torch.equal(out.cpu()[:, 2].to(torch.int64), (keys >= by_digits).sum(1))
        if key_bits == 32 and k < m:
            assert by_digits[0, 0] < expected[0]
        if packed:
            separate = torch.empty_like(out)
            _kth_key_kernel[(5,)](keys.to(torch.int32).to(KERNEL_DEVICE), separate, k, m, NS=128, KEY_BITS=key_bits,
                                  DIGIT_BITS=digit_bits, FIELD_BITS=0)
            assert torch.equal(out, separate)


@triton.jit
def _by_column_kernel(keys_ptr, out_ptr, threshold, need, NS: tl.constexpr, COLUMNS: tl.constexpr):
    f = tl.arange(0, NS)
    keys = tl.load(keys_ptr + f)
    chosen, position = compact_positions_by_column(keys, threshold, need, COLUMNS)
    tl.store(out_ptr + f, tl.where(chosen, position, -1))


@pytest.mark.parametrize("columns", [1, 32, 128, 256])
def test_compaction_by_column_numbers_the_chosen_column_by_column(columns):
    """Keys above the threshold, then its first ``need`` ties, numbered 0, 1, ... in the order of
    the [256 / columns, columns] view's columns (key c, c + columns, ... before c + 1): on a row
    with many ties at the threshold, and on one with none of them chosen."""
    ns = 256
    keys = torch.randint(-3, 4, (ns,), dtype=torch.int32)
    order = torch.arange(ns).reshape(ns // columns, columns).T.reshape(-1)  # slots, column by column
    for threshold, need in ((1, 5), (0, 0), (-4, 0)):
        out = torch.empty(ns, dtype=torch.int32, device=KERNEL_DEVICE)
        _by_column_kernel[(1,)](keys.to(KERNEL_DEVICE), out, threshold, need, NS=ns, COLUMNS=columns)
        in_order = keys[order]
        ties_seen = torch.cumsum((in_order == threshold).int(), 0) - (in_order == threshold).int()
        chosen = (in_order > threshold) | ((in_order == threshold) & (ties_seen < need))
        expected = torch.full((ns,), -1, dtype=torch.int32)
        expected[order[chosen]] = torch.arange(int(chosen.sum()), dtype=torch.int32)
        assert torch.equal(out.cpu(), expected)


def test_counts_share_an_int32_only_where_no_field_can_carry():
    assert count_fields(2, 896) == 10 and count_fields(2, 1023) == 10  # 3 fields of 10 bits
    assert count_fields(2, 1024) == 0 and count_fields(2, 1792) == 0  # 1024 needs 11 bits: 33
    assert count_fields(1, 4096) == 13 and count_fields(4, 3) == 2 and count_fields(4, 4) == 0


@triton.jit
def _bracketed_kernel(keys_ptr, out_ptr, k, m, NS: tl.constexpr, KEY_BITS: tl.constexpr, GROUPS: tl.constexpr,
                      VALUE_ROUNDS: tl.constexpr):
    row = tl.program_id(0)
    f = tl.arange(0, NS)
    keys = tl.load(keys_ptr + row * m + f, mask=f < m, other=key_pad(KEY_BITS))
    threshold, at_or_above = kth_key_bracketed(keys, k, KEY_BITS, GROUPS, VALUE_ROUNDS)
    tl.store(out_ptr + 2 * row, threshold)
    tl.store(out_ptr + 2 * row + 1, at_or_above)


@pytest.mark.parametrize("key_bits", [16, 32])
@pytest.mark.parametrize("groups", [4, 32, 128])
@pytest.mark.parametrize("value_rounds", [0, 4, 99])
def test_bracketed_thresholds_part_the_top_k_from_the_rest(key_bits, groups, value_rounds):
    """The search between two keys returns a threshold T as the search by digits does (at most k
    keys above, at least k at or above, and that count), whether its first bracket holds the top k
    (k <= groups, every group holding a key) or not (k > groups, or groups of padding alone past
    100 keys in 128 slots: it widens), cutting its span in key order, in value for a few rounds, or
    in value throughout. Rows of random keys, of ties, of the extreme keys (the keys of NaN and
    -inf among 32-bit ones), of one key, of keys over a narrow range, and of random normal floats."""
    m = 100
    floats = torch.stack([torch.randn(m), torch.randn(m) * 1e-30])
    floats[0, :3] = torch.tensor([float("nan"), float("-inf"), float("inf")])
    keys = key_rows(key_bits, m)
    if key_bits == 32:
        keys = torch.cat([keys, order_keys(floats[:1], largest=True), order_keys(floats[1:], largest=False)])
    for k in (1, 2, 37, 99, m):
        out = torch.empty(len(keys), 2, dtype=torch.int32, device=KERNEL_DEVICE)
        _bracketed_kernel[(len(keys),)](keys.to(torch.int32).to(KERNEL_DEVICE), out, k, m, NS=128, KEY_BITS=key_bits,
                                GROUPS=groups, VALUE_ROUNDS=value_rounds)
        threshold = out.cpu()[:, 0:1].to(torch.int64)
        assert ((keys > threshold).sum(1) <= k).all() and ((keys >= threshold).sum(1) >= k).all()
        assert torch.equal(out.cpu()[:, 1].to(torch.int64), (keys >= threshold).sum(1))
