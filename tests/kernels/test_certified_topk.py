"""The certified kernel equals torch.topk on every row: rows it certifies from the bucketed
survivors, and rows it flags and recomputes from memory. Without a GPU these run in the Triton
interpreter on CPU tensors; sizes stay small."""

import pytest
import torch

from tests.conftest import KERNEL_DEVICE
from tests.kernels.test_select_topk import assert_exact, special_rows
from topk_compiler.kernels.certified_topk import certified_topk

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def uncertified(x, k, b, kb, largest):
    """The rows whose certificate fails, in plain torch: some interleaved bucket's kb-th
    largest (smallest) element reaches the k-th of the buckets' survivors."""
    x = x.float().cpu() if largest else -x.float().cpu()
    rows, n = x.shape
    padded = torch.full((rows, -(-n // b) * b), float("-inf"))
    padded[:, :n] = x
    buckets = padded.view(rows, -1, b).transpose(1, 2)  # element j -> bucket j mod b
    kept = buckets.topk(min(kb, buckets.shape[2]), dim=2).values
    kth = kept.flatten(1).topk(k, dim=1).values[:, -1:]
    return ((kept >= kth[:, :, None]).sum(2) >= kb).any(1) & (buckets.shape[2] > 0)


@pytest.mark.parametrize("rows,n,k,b,kb", [(6, 2000, 20, 64, 3), (3, 4099, 40, 128, 3), (3, 777, 1, 16, 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_rows_are_exact_and_flagged_as_the_certificate_says(rows, n, k, b, kb, dtype):
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(n)).to(dtype).to(KERNEL_DEVICE)
    values, indices, flags = certified_topk(x, k, num_buckets=b, per_bucket_k=kb, largest=True, sorted=True)
    assert_exact(values, indices, x, k, True, sorted_=True)
    assert (flags.cpu() != 0).tolist() == uncertified(x, k, b, kb, True).tolist()


@pytest.mark.parametrize("select,sort_with,sorted_", [("bisect", "launch", True), ("radix", "program", True),
                                                      ("bisect", "program", False), ("bisect", "rank", True)])
@pytest.mark.parametrize("largest", [True, False])
def test_crowded_rows_are_flagged_recomputed_and_exact(select, sort_with, sorted_, largest):
    """Row 0 puts its 20 largest (or smallest) values into bucket 0 (a period of the bucket count):
    the bucketed survivors miss most of them, the certificate fails and the row is recomputed;
    row 1 is random (and its two survivors a bucket are too few to certify it either)."""
    x = torch.randn(2, 1500, generator=torch.Generator().manual_seed(1))
    x[0, ::64][:20] += 50 if largest else -50
    x = x.to(KERNEL_DEVICE)
    values, indices, flags = certified_topk(x, 20, num_buckets=64, per_bucket_k=2, largest=largest, sorted=sorted_,
                                            select=select, sort_with=sort_with)
    assert (flags.cpu() != 0).tolist() == uncertified(x, 20, 64, 2, largest).tolist() == [True, True]
    assert_exact(values, indices, x, 20, largest, sorted_)


@pytest.mark.parametrize("sorted_", [True, False])
def test_capped_registers_stay_exact(sorted_):
    """A register cap on the certifying launch (ignored by the interpreter) spills on a GPU; the
    rows must stay exact, certified or recomputed."""
    x = torch.randn(4, 8192, generator=torch.Generator().manual_seed(2))
    x[0, ::128][:64] += 50  # crowds bucket 0: that row is recomputed
    x = x.to(torch.float16).to(KERNEL_DEVICE)
    values, indices, flags = certified_topk(x, 64, num_buckets=128, per_bucket_k=8, largest=True, sorted=sorted_,
                                            num_warps=2, max_registers=64)
    assert flags[0].item() != 0
    assert_exact(values, indices, x, 64, True, sorted_)


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_and_ties_stay_exact(dtype):
    """NaN, infinities, many ties and an all-equal row: certified or recomputed, every row equals
    torch.topk (ties at the k-th key are uncertifiable and recomputed)."""
    x = special_rows(dtype, 1200)
    for largest in (True, False):
        values, indices, flags = certified_topk(x, 32, num_buckets=32, per_bucket_k=2, largest=largest, sorted=True)
        assert_exact(values, indices, x, 32, largest, sorted_=True)
        assert flags[3] != 0  # all equal: every bucket's survivors reach the k-th key


def test_a_bound_far_below_the_row_falls_back_to_bisection():
    """Bucket 0 holds 128 values above all others: the survivors keep two, their k-th key is an
    ordinary one, and more elements pass it than the candidate slots hold."""
    x = torch.randn(2, 8192, generator=torch.Generator().manual_seed(3))
    x[0, ::64] += 50
    x = x.to(KERNEL_DEVICE)
    values, indices, flags = certified_topk(x, 64, num_buckets=64, per_bucket_k=2, largest=True, sorted=True,
                                            block=1024)
    assert flags.tolist()[0] != 0
    assert_exact(values, indices, x, 64, True, sorted_=True)
