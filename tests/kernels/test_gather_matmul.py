"""Triton gather-matmul against a torch reference (under the interpreter without a GPU)."""

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import KERNEL_DEVICE
from topk_compiler.kernels.gather_matmul import gather_matmul

ACTIVATIONS = {"none": lambda h: h, "relu": torch.relu, "relu_squared": lambda h: torch.relu(h) ** 2, "gelu": F.gelu}
# The interpreter computes tl.dot on bf16 wrongly, so bf16 runs only on a GPU.
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3)] + (
    [(torch.bfloat16, 2e-2, 2e-2)] if torch.cuda.is_available() else [])


def reference(x, w, slots, bias, member, activation, fill):
    rows = w[slots.clamp(min=0)].float()
    out = x.float() @ rows.T
    if bias is not None:
        out = out + bias[slots.clamp(min=0)].float()
    out = ACTIVATIONS[activation](out)
    keep = (slots >= 0).expand_as(out)
    if member is not None:
        keep = keep & member
    return out.masked_fill(~keep, fill)


@pytest.mark.parametrize("rows,d,n,s", [(1, 70, 50, 7), (3, 33, 40, 19), (17, 64, 100, 40), (1, 1, 5, 1)])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
def test_equals_reference(rows, d, n, s, dtype, atol, rtol, activation):
    gen = torch.Generator().manual_seed(rows * 100 + s)
    x = torch.randn(rows, d, generator=gen).to(dtype).to(KERNEL_DEVICE)
    w = torch.randn(n, d, generator=gen).to(dtype).to(KERNEL_DEVICE)
    bias = torch.randn(n, generator=gen).to(dtype).to(KERNEL_DEVICE)
    slots = torch.randint(-1, n, (s,), generator=gen).to(KERNEL_DEVICE)
    member = (torch.rand(rows, s, generator=gen) > 0.3).to(KERNEL_DEVICE) if rows > 1 else None
    out = gather_matmul(x, w, slots, bias, member=member, activation=activation, fill=float("-inf"))
    expected = reference(x, w, slots, bias, member, activation, float("-inf"))
    assert torch.equal(out.isneginf(), expected.isneginf())
    finite = ~expected.isneginf()
    torch.testing.assert_close(out[finite], expected[finite], atol=atol, rtol=rtol)


def test_relu_squared_and_no_bias():
    x = torch.randn(2, 20).to(KERNEL_DEVICE)
    w = torch.randn(30, 20).to(KERNEL_DEVICE)
    slots = torch.tensor([0, 29, 5, -1, 5]).to(KERNEL_DEVICE)
    out = gather_matmul(x, w, slots, None, activation="relu_squared", fill=0.0)
    torch.testing.assert_close(out, reference(x, w, slots, None, None, "relu_squared", 0.0), atol=1e-5, rtol=1e-5)


def test_empty():
    x = torch.randn(2, 8).to(KERNEL_DEVICE)
    w = torch.randn(4, 8).to(KERNEL_DEVICE)
    assert gather_matmul(x, w, torch.empty(0, dtype=torch.int64).to(KERNEL_DEVICE)).shape == (2, 0)
