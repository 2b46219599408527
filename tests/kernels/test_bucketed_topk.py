"""Triton bucketed top-k (fused and split) against the plain-torch reference on the same input.

Without a GPU these run in the Triton interpreter on CPU tensors; sizes stay small.
"""

import pytest
import torch

from tests.conftest import KERNEL_DEVICE
from topk_compiler.kernels.bucketed_topk import fused_bucketed_topk, split_bucketed_topk
from topk_compiler.lowering.bucketed_reference import bucketed_topk_torch
from topk_compiler.lowering.layouts import LAYOUT_IDS
from topk_compiler.lowering.order_keys import order_keys

# (rows, n, k, num_buckets, per_bucket_k): odd lengths, k = 1, k up to all survivors, kb 1..8.
CASES = [
    (3, 1023, 20, 64, 2), (2, 777, 50, 32, 3), (2, 300, 40, 16, 4), (2, 513, 1, 128, 1),
    (2, 200, 30, 8, 8), (1, 64, 64, 16, 4), (2, 1000, 96, 32, 5), (2, 4099, 100, 256, 1),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def reference(x, k, b, kb, layout, largest, seed=11):
    return bucketed_topk_torch(x.cpu(), k, largest=largest, sorted=True, num_buckets=b, per_bucket_k=kb,
                               layout=layout, seed=seed)


def assert_matches_reference(values, indices, ref_values, x, sorted_, largest=True):
    """The indices select the values, without repeats, and the values are the reference's (in its
    order once sorted). Tied values may come from other indices than the reference's."""
    values, indices, x = values.cpu(), indices.cpu(), x.cpu()
    torch.testing.assert_close(x.gather(1, indices), values, rtol=0, atol=0, equal_nan=True)
    assert (indices.sort(1).values.diff(dim=1) > 0).all()
    if not sorted_:
        values = values.gather(1, order_keys(values, largest).argsort(dim=1, descending=True, stable=True))
    torch.testing.assert_close(values, ref_values, rtol=0, atol=0, equal_nan=True)


# Ways to finish stage 2: (select, sort_with); the sort runs in the program or as its own launch.
FINISHES = [("bisect", "program"), ("bisect", "launch"), ("radix", "program"), ("radix", "launch"),
            ("bitonic", "program"), ("bisect", "rank"), ("digits", "program"), ("bracket", "launch")]


@pytest.mark.parametrize("rows,n,k,b,kb", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["interleaved", "shuffled", "contiguous"])
def test_fused_equals_reference(rows, n, k, b, kb, dtype, layout):
    x = torch.randn(rows, n).to(dtype).to(KERNEL_DEVICE)
    ref_values, _ = reference(x, k, b, kb, layout, largest=True)
    values, indices = fused_bucketed_topk(x, k, num_buckets=b, per_bucket_k=kb, largest=True, sorted=True,
                                          layout_id=LAYOUT_IDS[layout], seed=11)
    assert_matches_reference(values, indices, ref_values, x, sorted_=True)


@pytest.mark.parametrize("select,sort_with", FINISHES)
@pytest.mark.parametrize("layout", ["interleaved", "shuffled", "contiguous"])
@pytest.mark.parametrize("largest", [True, False])
def test_buckets_with_empty_slots(select, sort_with, layout, largest):
    """per_bucket_k above what some buckets hold (16 buckets of 7 slots over 103 elements: the
    last bucket is short or empty): the empty slots' indices, numbered past 2**16, never reach
    the output (in a bitonic network they once spilt into the keys of 16-bit packed entries)."""
    x = torch.randn(2, 103).to(torch.float16).to(KERNEL_DEVICE)
    ref_values, _ = reference(x, 85, 16, 6, layout, largest=largest)
    values, indices = fused_bucketed_topk(x, 85, num_buckets=16, per_bucket_k=6, largest=largest, sorted=True,
                                          layout_id=LAYOUT_IDS[layout], seed=11, select=select, sort_with=sort_with)
    assert_matches_reference(values, indices, ref_values, x, sorted_=True, largest=largest)


@pytest.mark.parametrize("n", [192, 197, 208, 63])
@pytest.mark.parametrize("layout", ["interleaved", "shuffled", "contiguous"])
@pytest.mark.parametrize("dtype,largest", [(torch.float32, True), (torch.bfloat16, False)])
def test_every_survivor_on_both_sides_of_the_unmasked_steps(n, layout, dtype, largest):
    """k = every survivor (16 buckets x 2), so a survivor lost or invented changes the output.
    Stage 1 runs its steps that lie wholly inside the row without masks and the rest with them:
    lengths where every step is whole (192), one step is partial (197), the contiguous layout's
    buckets exactly fill the row (208), and no step is whole (63)."""
    x = torch.randn(2, n).to(dtype).to(KERNEL_DEVICE)
    ref_values, _ = reference(x, 32, 16, 2, layout, largest=largest)
    values, indices = fused_bucketed_topk(x, 32, num_buckets=16, per_bucket_k=2, largest=largest, sorted=True,
                                          layout_id=LAYOUT_IDS[layout], seed=11)
    assert_matches_reference(values, indices, ref_values, x, sorted_=True, largest=largest)


@pytest.mark.parametrize("rows,n,k,b,kb", CASES[:2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("select,sort_with", FINISHES)
def test_every_finish_and_unroll_equals_reference(rows, n, k, b, kb, dtype, select, sort_with):
    unroll = 1 if select == "bisect" else 8
    x = torch.randn(rows, n).to(dtype).to(KERNEL_DEVICE)
    ref_values, _ = reference(x, k, b, kb, "interleaved", largest=True)
    values, indices = fused_bucketed_topk(x, k, num_buckets=b, per_bucket_k=kb, largest=True, sorted=True,
                                          select=select, sort_with=sort_with, unroll=unroll)
    assert_matches_reference(values, indices, ref_values, x, sorted_=True)


@pytest.mark.parametrize("kb", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("largest", [True, False])
def test_four_entries_merged_at_once_equal_one_at_a_time(kb, dtype, largest):
    """At kb 4 and 8 an unroll of 4 or 8 merges four entries into a lane's slots at once; one
    entry a step pushes them one at a time. Both keep each bucket's kb first entries, ties going
    to the earlier slot, so the results are the same bit for bit: here with many ties, NaNs of
    both signs, infinities and a masked tail (n not a multiple of the buckets)."""
    x = torch.randint(-6, 7, (3, 1100)).float()
    x[0, ::29] = float("nan")
    x[1, 3::31] = -float("nan")
    x[2, ::37] = float("-inf")
    x[2, 5::41] = float("inf")
    x = x.to(dtype).to(KERNEL_DEVICE)
    ref_values, _ = reference(x, 120, 32, kb, "interleaved", largest)
    one_at_a_time = fused_bucketed_topk(x, 120, num_buckets=32, per_bucket_k=kb, largest=largest, sorted=True,
                                        unroll=1)
    for unroll in (4, 8):
        values, indices = fused_bucketed_topk(x, 120, num_buckets=32, per_bucket_k=kb, largest=largest, sorted=True,
                                              unroll=unroll)
        assert_matches_reference(values, indices, ref_values, x, sorted_=True, largest=largest)
        assert torch.equal(indices.cpu(), one_at_a_time[1].cpu())


@pytest.mark.parametrize("sorted_", [True, False])
def test_capped_registers_equal_reference(sorted_):
    """A cap on the registers (which the interpreter ignores) spills on a GPU; the results must
    not change."""
    x = torch.randn(3, 4096).to(torch.bfloat16).to(KERNEL_DEVICE)
    ref_values, _ = reference(x, 512, 256, 4, "interleaved", largest=True)
    values, indices = fused_bucketed_topk(x, 512, num_buckets=256, per_bucket_k=4, largest=True, sorted=sorted_,
                                          num_warps=2, max_registers=48)
    assert_matches_reference(values, indices, ref_values, x, sorted_=sorted_)


@pytest.mark.parametrize("rows,n,k,b,kb", CASES[:3])
@pytest.mark.parametrize("layout", ["interleaved", "shuffled"])
def test_split_equals_reference(rows, n, k, b, kb, layout):
    x = torch.randn(rows, n).to(KERNEL_DEVICE)
    ref_values, _ = reference(x, k, b, kb, layout, largest=False)
    for segments, select, sort_with, sorted_ in ((2, "bisect", "program", True), (b // 8, "radix", "launch", True),
                                                 (4, "bisect", "launch", True), (4, "bisect", "program", False)):
        values, indices = split_bucketed_topk(x, k, num_buckets=b, per_bucket_k=kb, segments=segments,
                                              largest=False, sorted=sorted_, layout_id=LAYOUT_IDS[layout], seed=11,
                                              select=select, sort_with=sort_with)
        assert_matches_reference(values, indices, ref_values, x, sorted_, largest=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unsorted_smallest_and_special_values(dtype):
    x = torch.randn(2, 2000)
    x[0, ::37] = float("nan")
    x[1, ::53] = float("-inf")
    x[1, 5::61] = float("inf")
    x = x.to(dtype).to(KERNEL_DEVICE)
    for largest, select in ((True, "bisect"), (False, "radix")):
        ref_values, _ = reference(x, 300, 128, 4, "interleaved", largest)
        values, indices = fused_bucketed_topk(x, 300, num_buckets=128, per_bucket_k=4, largest=largest, sorted=False,
                                              select=select)
        assert_matches_reference(values, indices, ref_values, x, sorted_=False, largest=largest)


def test_strided_rows():
    x = torch.randn(4, 3000)[::2, :2500].to(KERNEL_DEVICE)  # rows not adjacent in memory
    ref_values, _ = reference(x, 40, 32, 2, "interleaved", True)
    values, indices = fused_bucketed_topk(x, 40, num_buckets=32, per_bucket_k=2, largest=True, sorted=True)
    torch.testing.assert_close(values.cpu(), ref_values, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="70000 loop steps: minutes in the interpreter")
def test_bucket_longer_than_16_bit_positions():
    # 70000 slots in one bucket do not fit 16-bit packing: bf16 falls back to 32-bit positions.
    long_row = torch.randn(1, 70000).to(torch.bfloat16).to(KERNEL_DEVICE)
    ref_values, _ = reference(long_row, 3, 1, 4, "interleaved", True)
    values, _ = fused_bucketed_topk(long_row, 3, num_buckets=1, per_bucket_k=4, largest=True, sorted=True, unroll=4)
    torch.testing.assert_close(values.cpu(), ref_values, rtol=0, atol=0)
