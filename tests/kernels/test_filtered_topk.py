"""The exact filtered kernel equals torch.topk on every path: candidates above the bound (the usual
case), fewer than k above it (ties at the bound), and too many (the in-kernel fallback).
Without a GPU these run in the Triton interpreter on CPU tensors; sizes stay small."""

import pytest
import torch

from tests.conftest import KERNEL_DEVICE
from tests.kernels.test_select_topk import assert_exact, special_rows
from topk_compiler.kernels.filtered_topk import filtered_topk, split_filtered_topk

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("rows,n,k,b,kb", [(3, 1000, 40, 32, 2), (2, 4099, 100, 128, 2), (2, 777, 1, 16, 1),
                                           (1, 2000, 64, 64, 2)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_filtered_equals_torch_topk(rows, n, k, b, kb, dtype):
    x = torch.randn(rows, n).to(dtype).to(KERNEL_DEVICE)
    values, indices = filtered_topk(x, k, num_buckets=b, per_bucket_k=kb, largest=True, sorted=True, block=512)
    assert_exact(values, indices, x, k, True, sorted_=True)


@pytest.mark.parametrize("select,sort_with,sorted_", [("bisect", "launch", True), ("radix", "program", True),
                                                      ("bisect", "program", False), ("bisect", "rank", True)])
def test_filtered_finishes_and_smallest(select, sort_with, sorted_):
    x = torch.randn(2, 1500).to(KERNEL_DEVICE)
    values, indices = filtered_topk(x, 70, num_buckets=64, per_bucket_k=2, largest=False, sorted=sorted_,
                                    select=select, sort_with=sort_with, block=256)
    assert_exact(values, indices, x, 70, False, sorted_)


@pytest.mark.parametrize("sort_with", ["launch", "program"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_filtered_special_values_ties_and_fallback(dtype, sort_with):
    """Row 3 is all equal (no key above the bound: the ties make k); a period of 16 puts every
    large value into bucket 0, so too many pass the bound and the fallback runs. Sorted in the
    program, each path sorts (key, index) entries in the output's index row."""
    x = special_rows(dtype, 1200)
    periodic = torch.randn(1, 1200)
    periodic[0, ::16] += 50
    x = torch.cat([x, periodic.to(dtype).to(KERNEL_DEVICE)])
    for largest in (True, False):
        values, indices = filtered_topk(x, 32, num_buckets=16, per_bucket_k=2, largest=largest, sorted=True,
                                        sort_with=sort_with, block=256)
        assert_exact(values, indices, x, 32, largest, sorted_=True)


@pytest.mark.parametrize("rows,n,k,b,kb,segments", [(3, 1000, 40, 32, 2, 1), (2, 4099, 100, 128, 2, 4),
                                                    (2, 777, 1, 16, 1, 2), (1, 2000, 64, 64, 2, 8)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_filtered_equals_torch_topk(rows, n, k, b, kb, segments, dtype):
    x = torch.randn(rows, n).to(dtype).to(KERNEL_DEVICE)
    values, indices = split_filtered_topk(x, k, num_buckets=b, per_bucket_k=kb, segments=segments, largest=True,
                                          sorted=True, block=256)
    assert_exact(values, indices, x, k, True, sorted_=True)


@pytest.mark.parametrize("select,sort_with,sorted_", [("bisect", "launch", True), ("radix", "program", True),
                                                      ("bisect", "program", False), ("radix", "rank", True)])
def test_split_filtered_finishes_and_smallest(select, sort_with, sorted_):
    x = torch.randn(2, 1500).to(KERNEL_DEVICE)
    values, indices = split_filtered_topk(x, 70, num_buckets=64, per_bucket_k=2, segments=2, largest=False,
                                          sorted=sorted_, select=select, sort_with=sort_with, block=128)
    assert_exact(values, indices, x, 70, False, sorted_)


@pytest.mark.parametrize("sort_with", ["launch", "program"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_split_filtered_special_values_ties_and_fallback(dtype, sort_with):
    """As for the one-program kernel: the all-equal row is made of ties, the periodic one passes
    more candidates than the slots hold and falls back to bisection; blocks of the filtering pass
    reserve their slots in any order."""
    x = special_rows(dtype, 1200)
    periodic = torch.randn(1, 1200)
    periodic[0, ::16] += 50
    x = torch.cat([x, periodic.to(dtype).to(KERNEL_DEVICE)])
    for largest in (True, False):
        values, indices = split_filtered_topk(x, 32, num_buckets=16, per_bucket_k=2, segments=2, largest=largest,
                                              sorted=True, sort_with=sort_with, block=128)
        assert_exact(values, indices, x, 32, largest, sorted_=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_filtered_16_bit_rows_over_2_16(dtype):
    """16-bit keys pack with their index into an int32 entry only in rows up to 2**16 elements;
    past that the entries are int64 (``select_topk.pack32``)."""
    x = torch.randn(1, 2**16 + 300).to(dtype).to(KERNEL_DEVICE)
    x[0, -5:] = 30.0  # the largest, with indices past 2**16, must come back whole
    for largest in (True, False):
        values, indices = split_filtered_topk(x, 50, num_buckets=256, per_bucket_k=1, segments=2, largest=largest,
                                              sorted=True, block=4096)
        assert_exact(values, indices, x, 50, largest, sorted_=True)
    values, indices = filtered_topk(x, 50, num_buckets=256, per_bucket_k=1, largest=True, sorted=True, block=4096)
    assert_exact(values, indices, x, 50, True, sorted_=True)


@pytest.mark.parametrize("bound_bits,digit_bits", [(32, 1), (14, 2), (6, 2), (4, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_filtered_bound_bits(bound_bits, digit_bits, dtype):
    """The bound keeps only its leading bits, always below the k-th key: more candidates pass
    the coarser it is (with 4 bits, more than the slots hold: the fallback), never fewer."""
    x = torch.randn(2, 1500).to(dtype).to(KERNEL_DEVICE)
    values, indices = split_filtered_topk(x, 70, num_buckets=64, per_bucket_k=2, segments=2, largest=True,
                                          sorted=True, block=256, bound_bits=bound_bits,
                                          bound_digit_bits=digit_bits)
    assert_exact(values, indices, x, 70, True, sorted_=True)


def test_split_filtered_refuses_rows_of_more_blocks_than_the_grid_takes():
    from topk_compiler.kernels import MAX_GRID_YZ

    x = torch.zeros(1, 256 * MAX_GRID_YZ + 1, dtype=torch.bfloat16)
    with pytest.raises(AssertionError, match="more than 65535 blocks"):
        split_filtered_topk(x, 2048, num_buckets=1024, per_bucket_k=4, largest=True, sorted=False)
