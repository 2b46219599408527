"""Kernel variants that the profile scripts time against the op's own kernels: they must return
what they claim before their timings mean anything. Without a GPU they run in the Triton
interpreter on CPU tensors; sizes stay small."""

import pytest
import torch

from benchmarks.profile_stages import share_prefix_topk
from tests.conftest import KERNEL_DEVICE
from tests.kernels.test_select_topk import special_rows
from topk_compiler import measured_recall
from topk_compiler.lowering.bucketed_reference import bucketed_topk_torch


def _share_reference(x, k, b):
    return bucketed_topk_torch(x.cpu(), k, largest=True, sorted=False, num_buckets=b, per_bucket_k=0,
                               layout="interleaved", shares=True)


@pytest.mark.parametrize("rows", ["normal", "rounded", "special"])
def test_share_threshold_stopping_early_is_exact(rows):
    """``bits0`` (rounds stop once exactly the share lies at or above the threshold) keeps each
    bucket's exact share: the reference's values, each index once, also where many keys tie."""
    x = {"normal": lambda: torch.randn(3, 2000), "rounded": lambda: torch.randn(3, 2000).round(decimals=1),
         "special": lambda: special_rows(torch.float32, 2000)}[rows]().to(KERNEL_DEVICE)
    values, indices = share_prefix_topk(x, 300, 8, 0, 4)
    values, indices = values.cpu(), indices.cpu()
    ref_values, _ = _share_reference(x, 300, 8)
    assert torch.equal(x.cpu().gather(1, indices).isnan(), values.isnan())
    assert (indices.sort(1).values.diff(dim=1) > 0).all()
    torch.testing.assert_close(values.sort(1, descending=True).values, ref_values.sort(1, descending=True).values,
                               rtol=0, atol=0, equal_nan=True)


def test_share_threshold_of_leading_bits_keeps_the_share_and_about_its_recall():
    """Deciding 16 leading bits of fp32 keys keeps k distinct elements, those above the threshold's
    bin and then the bin's first in slot order: on random normal rows its recall is the exact
    shares' within 0.01 (measured: 0.0004 at most), with 12 bits within 0.05 (0.011-0.016), never above."""
    x = torch.randn(4, 4000).to(KERNEL_DEVICE)
    exact = measured_recall(x.cpu(), _share_reference(x, 600, 8)[1], 600)
    for bits, slack in ((16, 0.01), (12, 0.05)):
        values, indices = share_prefix_topk(x, 600, 8, bits, 4)
        values, indices = values.cpu(), indices.cpu()
        assert torch.equal(x.cpu().gather(1, indices), values)
        assert (indices.sort(1).values.diff(dim=1) > 0).all()
        assert exact - slack <= measured_recall(x.cpu(), indices, 600) <= exact + 1e-9
