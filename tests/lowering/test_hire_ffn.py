"""hire_ffn: the dense FFN restricted to each row's neurons predicted above the threshold."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import KERNEL_DEVICE
from topk_compiler.lowering.hire_ffn import activation_fn, dense_ffn, hire_ffn
from topk_compiler.lowering.hire_predictor import build_predictor


def relu_ffn(d=32, d_ff=256, d_out=24, rank=6, active=0.1, seed=0):
    """An FFN whose W1 is low rank plus noise and whose bias leaves about ``active`` of the
    neurons active for Gaussian inputs."""
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(d_ff, rank, generator=gen) @ torch.randn(rank, d, generator=gen) / rank**0.5
    w1 += 0.05 * torch.randn(d_ff, d, generator=gen)
    b1 = -w1.norm(dim=1) * torch.distributions.Normal(0, 1).icdf(torch.tensor(1 - active))
    w2 = torch.randn(d_out, d_ff, generator=gen) / d_ff**0.5
    return w1, b1, w2, torch.randn(d_out, generator=gen)


def run(x, w1, b1, w2, b2, activation="relu", predictor="lowrank", rank=6, threshold=0.0, expected=30,
        rewrite="always"):
    return hire_ffn(x, w1, b1, w2, b2, activation, predictor, rank, threshold, expected, rewrite)


@pytest.mark.parametrize("activation", ["relu", "relu_squared", "gelu"])
def test_every_neuron_selected_equals_dense(activation):
    w1, b1, w2, b2 = relu_ffn()
    x = torch.randn(5, 32)
    out = run(x, w1, b1, w2, b2, activation, threshold=-1e9)
    torch.testing.assert_close(out, dense_ffn(x, w1, b1, w2, b2, activation), atol=1e-5, rtol=1e-5)


@given(st.integers(1, 4), st.floats(-2.0, 2.0), st.sampled_from(["relu", "relu_squared", "gelu"]),
       st.sampled_from(["lowrank", "int8", "int4"]), st.integers(0, 2**31 - 1))
@settings(max_examples=25)
def test_equals_dense_restricted_to_each_rows_neurons(rows, threshold, activation, predictor, seed):
    gen = torch.Generator().manual_seed(seed)
    w1, b1, w2, b2 = relu_ffn(seed=seed % 7)
    x = torch.randn(rows, 32, generator=gen)
    out = run(x, w1, b1, w2, b2, activation, predictor, threshold=threshold)
    chosen = build_predictor(w1, predictor, 6).scores(x, b1) > threshold
    h = activation_fn(activation)(F.linear(x, w1, b1)) * chosen
    torch.testing.assert_close(out, F.linear(h, w2, b2), atol=1e-5, rtol=1e-5)


def test_relu_exact_with_an_exact_predictor_and_the_sign():
    w1, b1, w2, b2 = relu_ffn(active=0.05)
    x = torch.randn(8, 32)
    out = run(x, w1, b1, w2, b2, predictor="lowrank", rank=32, threshold=0.0)  # rank 32 = W1 itself
    torch.testing.assert_close(out, dense_ffn(x, w1, b1, w2, b2, "relu"), atol=1e-5, rtol=1e-5)


def test_lower_threshold_recovers_more_of_the_output():
    w1, b1, w2, b2 = relu_ffn(active=0.1)
    x = torch.randn(200, 32)
    dense = dense_ffn(x, w1, b1, w2, b2, "relu")
    errors = [((run(x, w1, b1, w2, b2, threshold=t) - dense).norm() / (dense - b2).norm()).item()
              for t in (1.0, 0.0, -2.0)]
    assert errors[0] > 0.05 and 0 < errors[1] < errors[0] / 3 and errors[2] < 1e-6


def test_rows_do_not_depend_on_their_batch():
    w1, b1, w2, b2 = relu_ffn()
    x = torch.randn(6, 32)
    batched = run(x, w1, b1, w2, b2, threshold=-0.2)
    for m in range(6):
        torch.testing.assert_close(run(x[m:m + 1], w1, b1, w2, b2, threshold=-0.2), batched[m:m + 1])


def test_shape_and_dtype_kept():
    w1, b1, w2, b2 = (t.half() for t in relu_ffn())
    x = torch.randn(2, 3, 32).half()
    out = run(x, w1, b1, w2, None)
    assert out.shape == (2, 3, 24) and out.dtype == torch.float16


def test_auto_runs_dense_where_dense_is_cheaper():
    w1, b1, w2, b2 = relu_ffn()
    x = torch.randn(512, 32)
    assert torch.equal(run(x, w1, b1, w2, b2, threshold=1.0, rewrite="auto"), dense_ffn(x, w1, b1, w2, b2, "relu"))


def test_opcheck():
    w1, b1, w2, b2 = relu_ffn()
    torch.library.opcheck(hire_ffn, (torch.randn(3, 32), w1, b1, w2, b2, "relu", "int8", 0, 0.0, 30, "always"))
    torch.library.opcheck(hire_ffn, (torch.randn(1, 32), w1, None, w2, None, "gelu", "lowrank", 4, -0.1, 30, "always"))


@pytest.mark.parametrize("change,match", [
    (dict(activation="tanh"), "activation"), (dict(predictor="svd"), "predictor"), (dict(rank=0), "rank"),
    (dict(threshold=float("nan")), "threshold"), (dict(expected=-1), "expected_neurons"),
    (dict(rewrite="sometimes"), "rewrite"),
])
def test_bad_arguments(change, match):
    w1, b1, w2, b2 = relu_ffn()
    with pytest.raises(ValueError, match=match):
        run(torch.randn(2, 32), w1, b1, w2, b2, **change)
    with pytest.raises(ValueError, match="w2"):
        run(torch.randn(2, 32), w1, b1, w2.T, b2)


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("predictor", ["lowrank", "int8"])
def test_kernel_path_equals_torch_path(monkeypatch, rows, predictor):
    """The kernel path (Triton kernels, transposed W2; on a CPU machine run by the interpreter)
    against the plain-torch path on the CPU."""
    from topk_compiler.lowering import hire_predictor

    w1, b1, w2, b2 = relu_ffn()
    x = torch.randn(rows, 32)
    expected = run(x, w1, b1, w2, b2, predictor=predictor, threshold=-0.3)
    monkeypatch.setattr(hire_predictor, "uses_kernel", lambda t: True)
    on = [t.to(KERNEL_DEVICE) for t in (x, w1, b1, w2, b2)]
    got = run(*on, predictor=predictor, threshold=-0.3)
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-4)
