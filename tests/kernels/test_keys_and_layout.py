"""The Triton order key and bucket layout equal their torch specifications."""

import pytest
import torch
import triton
import triton.language as tl

from tests.conftest import KERNEL_DEVICE
from topk_compiler.kernels.bucket_layout import element_index, group_rotation
from topk_compiler.kernels.order_key import order_key
from topk_compiler.lowering import layouts
from topk_compiler.lowering.layouts import bucket_members
from topk_compiler.lowering.order_keys import order_keys


@triton.jit
def _order_key_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, LARGEST: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, order_key(tl.load(x_ptr + offs, mask=offs < n), LARGEST), mask=offs < n)


@triton.jit(do_not_specialize=["seed"])
def _members_kernel(out_ptr, num_buckets, slots, seed, LAYOUT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    q = offs // slots
    g = offs % slots
    idx = element_index(row, q, g, num_buckets, slots, seed, LAYOUT)
    tl.store(out_ptr + row * num_buckets * slots + offs, idx, mask=offs < num_buckets * slots)


@triton.jit(do_not_specialize=["seed"])
def _rotation_kernel(rows_ptr, out_ptr, seed, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, group_rotation(tl.load(rows_ptr + offs), offs * 40503, seed))


def test_group_rotation_matches_the_specification_where_its_products_wrap():
    """The kernel hashes in uint32, the specification in int64 with 32-bit masks: large rows,
    groups and the largest seed make every product pass 2**32."""
    rows = torch.tensor([0, 1, 2**20 + 7, 2**31 - 1] * 16, dtype=torch.int64)
    for seed in (0, 12345, layouts.MAX_SEED):
        out = torch.empty(64, dtype=torch.int64, device=KERNEL_DEVICE)
        _rotation_kernel[(1,)](rows.to(KERNEL_DEVICE), out, seed, BLOCK=64)
        expected = layouts.group_rotation(rows, torch.arange(64) * 40503, seed)
        assert torch.equal(out.cpu(), expected)


SPECIAL = [0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 3.0e38, -3.0e38, float("inf"), float("-inf"), float("nan"), -float("nan"), 65504.0, 1e-7]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("largest", [True, False])
def test_order_key_matches_torch_specification(dtype, largest):
    x = torch.cat([torch.tensor(SPECIAL), torch.randn(50) * 100]).to(dtype).to(KERNEL_DEVICE)
    out = torch.empty(x.numel(), dtype=torch.int32, device=KERNEL_DEVICE)
    _order_key_kernel[(1,)](x, out, x.numel(), BLOCK=triton.next_power_of_2(x.numel()), LARGEST=largest)
    assert torch.equal(out.long(), order_keys(x, largest))


@pytest.mark.parametrize("layout,layout_id", [("interleaved", 0), ("shuffled", 1), ("contiguous", 2)])
@pytest.mark.parametrize("n,b", [(1000, 64), (64, 64), (777, 16), (130, 8)])
def test_element_index_matches_bucket_members(layout, layout_id, n, b):
    rows, seed = 3, 12345
    slots = -(-n // b)
    out = torch.empty(rows, b * slots, dtype=torch.int64, device=KERNEL_DEVICE)
    _members_kernel[(rows,)](out, b, slots, seed, LAYOUT=layout_id, BLOCK=triton.next_power_of_2(b * slots))
    expected = bucket_members(n, b, layout, rows=rows, seed=seed).expand(rows, -1, -1).reshape(rows, -1)
    ours = torch.where(out.cpu() < n, out.cpu(), torch.full_like(out.cpu(), n))
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("layout", ["interleaved", "contiguous", "shuffled"])
def test_every_element_is_in_exactly_one_bucket(layout):
    n, b = 1000, 64
    members = bucket_members(n, b, layout, rows=2, seed=3)
    for row in members:
        real = row[row < n]
        assert torch.equal(real.sort().values, torch.arange(n))
