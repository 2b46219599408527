"""Triton sparse FFN against the dense FFN restricted to each row's chosen neurons (interpreter
without a GPU)."""

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import KERNEL_DEVICE
from topk_compiler.kernels.sparse_ffn import select_neurons, sparse_ffn

ACTIVATIONS = {"relu": torch.relu, "relu_squared": lambda h: torch.relu(h) ** 2, "gelu": F.gelu}
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 3e-3, 3e-3)] + (
    [(torch.bfloat16, 3e-2, 3e-2)] if torch.cuda.is_available() else [])


def reference(x, w1, b1, w2, b2, pred, threshold, activation):
    h = ACTIVATIONS[activation](x.float() @ w1.float().T + (b1.float() if b1 is not None else 0))
    h = h.masked_fill(~(pred > threshold), 0).to(x.dtype).float()
    return h @ w2.float().T + (b2.float() if b2 is not None else 0)


def ffn(rows, d, d_ff, d_out, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=gen).to(dtype).to(KERNEL_DEVICE)
    w1 = (torch.randn(d_ff, d, generator=gen) / d**0.5).to(dtype).to(KERNEL_DEVICE)
    b1 = torch.randn(d_ff, generator=gen).to(dtype).to(KERNEL_DEVICE)
    w2 = (torch.randn(d_out, d_ff, generator=gen) / d_ff**0.5).to(dtype).to(KERNEL_DEVICE)
    b2 = torch.randn(d_out, generator=gen).to(dtype).to(KERNEL_DEVICE)
    pred = torch.randn(rows, d_ff, generator=gen).to(KERNEL_DEVICE)
    return x, w1, b1, w2, b2, pred


@pytest.mark.parametrize("rows,n,threshold", [(1, 3000, 1.0), (4, 5000, 2.0), (1, 10, 0.0), (3, 7, 5.0),
                                              (1, 40000, 2.5)])  # 40 blocks: counted in 3 steps
def test_select_neurons_compacts_in_order(rows, n, threshold):
    pred = torch.randn(rows, n, generator=torch.Generator().manual_seed(n)).to(KERNEL_DEVICE)
    slots, count = select_neurons(pred, threshold)
    expected = (pred > threshold).any(dim=0).nonzero().flatten()
    assert int(count) == expected.numel()
    assert torch.equal(slots[: int(count)], expected)


@pytest.mark.parametrize("rows,d,d_ff,d_out", [(1, 40, 300, 50), (3, 33, 200, 17), (20, 16, 120, 24)])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("programs,expected", [(1, 10), (3, 40), (264, 300)])
def test_equals_reference(rows, d, d_ff, d_out, dtype, atol, rtol, programs, expected):
    """Programs that take several neuron blocks, one each, or none (their partial sums are zero)."""
    x, w1, b1, w2, b2, pred = ffn(rows, d, d_ff, d_out, dtype, seed=rows + programs)
    out = sparse_ffn(x, w1, b1, w2.T.contiguous(), b2, pred, 1.0, programs=programs, expected=expected)
    assert out.dtype == dtype and out.shape == (rows, d_out)
    torch.testing.assert_close(out.float(), reference(x, w1, b1, w2, b2, pred, 1.0, "relu"), atol=atol, rtol=rtol)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("activation", ["relu_squared", "gelu"])
def test_activations(rows, activation):
    x, w1, b1, w2, b2, pred = ffn(rows, 24, 100, 16, torch.float32, seed=rows)
    out = sparse_ffn(x, w1, b1, w2.T.contiguous(), b2, pred, 0.5, activation=activation, programs=3, expected=30)
    torch.testing.assert_close(out, reference(x, w1, b1, w2, b2, pred, 0.5, activation), atol=1e-5, rtol=1e-5)


def test_every_neuron_equals_dense_ffn():
    x, w1, b1, w2, _, _ = ffn(2, 24, 40, 12, torch.float32, seed=0)
    pred = torch.zeros(2, 40).to(KERNEL_DEVICE)
    out = sparse_ffn(x, w1, b1, w2.T.contiguous(), None, pred, -1.0, activation="relu", programs=4, expected=40)
    torch.testing.assert_close(out, F.linear(torch.relu(F.linear(x, w1, b1)), w2), atol=1e-4, rtol=1e-5)


def test_no_neurons_gives_the_bias():
    x, w1, _, w2, b2, pred = ffn(3, 8, 10, 6, torch.float32, seed=1)
    out = sparse_ffn(x, w1, None, w2.T.contiguous(), b2, pred, 100.0, programs=5, expected=4)
    torch.testing.assert_close(out, b2.expand(3, 6))
