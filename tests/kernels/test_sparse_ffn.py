"""Triton sparse FFN against the dense FFN restricted to each row's chosen neurons (interpreter
without a GPU)."""

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import KERNEL_DEVICE
import topk_compiler.kernels.sparse_ffn as sparse_ffn_module
from topk_compiler.kernels.sparse_ffn import lowrank_sparse_ffn_row, select_neurons, sparse_ffn

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


def threshold_in_gap(pred: torch.Tensor, quantile: float) -> float:
    """A threshold near ``quantile`` of ``pred`` halfway across the widest gap between neighbouring
    values there, so that rounding differences between two ways of computing ``pred`` cannot move
    a neuron across it."""
    v = pred.flatten().float().sort().values
    i = min(max(int(quantile * v.numel()), 8), v.numel() - 9)
    window = v[i - 8:i + 9]
    gap = int((window[1:] - window[:-1]).argmax())
    return float((window[gap] + window[gap + 1]) / 2)


def lowrank_case(d, d_ff, d_out, rank, dtype, seed, bias=True):
    x, w1, b1, w2, b2, _ = ffn(1, d, d_ff, d_out, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    a = (torch.randn(d, rank, generator=gen) / d**0.25).to(dtype).to(KERNEL_DEVICE)
    b = (torch.randn(d_ff, rank, generator=gen) / (d * rank) ** 0.25).to(dtype).to(KERNEL_DEVICE)
    b1 = b1 if bias else None
    # The plain-torch low-rank predictor's roundings: x A, then the scores, in the weight dtype.
    xa = (x.float() @ a.float()).to(dtype).float()
    pred = (xa @ b.float().T + (b1.float() if bias else 0)).to(dtype).float()
    return x, w1, b1, w2, b2, a, b, pred


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("programs,expected", [(1, 60), (7, 0), (7, 60), (400, 60)])  # lists: 1, 7, 300
@pytest.mark.parametrize("bias", [True, False])
def test_lowrank_row_equals_reference(dtype, atol, rtol, programs, expected, bias):
    """Predicted in the kernel, the chosen neurons are those the plain-torch predictor chooses,
    whether one program or many read them from one list or several."""
    x, w1, b1, w2, b2, a, b, pred = lowrank_case(40, 300, 50, 8, dtype, seed=programs, bias=bias)
    t = threshold_in_gap(pred, 0.8)
    out = lowrank_sparse_ffn_row(x, a, b, w1, b1, w2.T.contiguous(), b2 if bias else None, t, programs=programs,
                                 expected=expected)
    assert out.dtype == dtype and out.shape == (1, 50)
    expected = reference(x, w1, b1, w2, b2 if bias else None, pred, t, "relu")
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)
    # Not vacuous: some neurons chosen, not all, and the choice matters.
    assert 0 < int((pred > t).sum()) < 300
    assert not torch.allclose(expected, reference(x, w1, b1, w2, b2 if bias else None, pred, -1e9, "relu"))


@pytest.mark.parametrize("activation", ["relu_squared", "gelu"])
def test_lowrank_row_loops_over_every_tile(monkeypatch, activation):
    """Tiles small enough that every loop runs several steps: the projection's rows of A and
    programs, the prediction's partials of x A and its rank chunks, and the neuron blocks."""
    from topk_compiler.kernels import sparse_ffn as module

    monkeypatch.setattr(module, "_REDUCE_TILE", 64)
    monkeypatch.setattr(module, "MAX_PROJECT_PROGRAMS", 4)
    monkeypatch.setattr(module, "PREDICT_TILE", 512)
    x, w1, b1, w2, b2, a, b, pred = lowrank_case(200, 120, 24, 40, torch.float32, seed=3)
    t = threshold_in_gap(pred, 0.5)
    out = lowrank_sparse_ffn_row(x, a, b, w1, b1, w2.T.contiguous(), b2, t, activation=activation, programs=3,
                                 expected=40)
    torch.testing.assert_close(out, reference(x, w1, b1, w2, b2, pred, t, activation), atol=1e-5, rtol=1e-5)


def test_lowrank_row_none_chosen_gives_the_bias():
    x, w1, b1, w2, b2, a, b, pred = lowrank_case(16, 64, 8, 4, torch.float32, seed=5)
    out = lowrank_sparse_ffn_row(x, a, b, w1, b1, w2.T.contiguous(), b2, float(pred.max()) + 1, programs=5)
    torch.testing.assert_close(out, b2[None, :])


def test_cost_model_copies_the_kernel_constants():
    """lowering/hire_cost_model.py must not import the Triton kernel modules, so it keeps copies."""
    from topk_compiler.kernels import sparse_ffn as kernels
    from topk_compiler.lowering import hire_cost_model

    assert hire_cost_model.SELECT_BLOCK == kernels.SELECT_BLOCK
    assert hire_cost_model.SELECT_EARLIER == kernels.SELECT_EARLIER
    assert hire_cost_model.FFN_ROW_MAX_WIDTH == kernels.ROW_MAX_WIDTH


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="launches chain on Hopper and later")
def test_lowrank_row_chained_launches_in_a_cuda_graph():
    """The four launches chained (each starting while the one before finishes), replayed in a
    CUDA graph over new inputs: each replay equals the eager call on its own input, bit for bit
    (a launch reading its predecessor's output too early would see the previous replay's)."""
    from topk_compiler.kernels import chains_launches

    x, w1, b1, w2, b2, a, b, _ = lowrank_case(512, 4096, 256, 32, torch.bfloat16, seed=11)
    assert chains_launches(x)
    w2t = w2.T.contiguous()
    static_x = x.clone()
    lowrank_sparse_ffn_row(static_x, a, b, w1, b1, w2t, b2, 0.0, programs=132, expected=400)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lowrank_sparse_ffn_row(static_x, a, b, w1, b1, w2t, b2, 0.0, programs=132, expected=400)
    for seed in range(5):
        fresh = torch.randn(1, 512, generator=torch.Generator().manual_seed(seed)).to(x)
        static_x.copy_(fresh)
        graph.replay()
        eager = lowrank_sparse_ffn_row(fresh, a, b, w1, b1, w2t, b2, 0.0, programs=132, expected=400)
        assert torch.equal(out, eager)
        assert not torch.equal(out, b2[None, :])


def test_more_rows_than_the_grid_takes_are_refused_with_a_clear_error():
    rows, d, d_ff = sparse_ffn_module.MAX_ROWS + 1, 2, 4
    x = torch.zeros(rows, d)
    with pytest.raises(AssertionError, match=f"at most {sparse_ffn_module.MAX_ROWS} rows"):
        sparse_ffn(x, torch.zeros(d_ff, d), None, torch.zeros(d_ff, d), None, torch.zeros(rows, d_ff), 0.0)
