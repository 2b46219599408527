"""HireFfnPass: which linear -> activation -> linear sites it rewrites, which it keeps exact and why."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from topk_compiler import ApproxTopkConfig, explain
from topk_compiler.backend import run_passes
from topk_compiler.lowering.hire_ffn import hire_ffn

D, D_FF = 24, 256
HIRE_OP = torch.ops.topk_compiler.hire_ffn.default
# Full-rank predictor (exact pre-activations) and the default threshold 0 (predicted active): a ReLU
# FFN rewritten this way computes exactly the dense output.
EXACT_PREDICTOR = {"rewrite": "always", "rank": D}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def ops(gm):
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def compile_with_passes(fn, **options):
    config = ApproxTopkConfig.from_options(options)
    seen = []

    def backend(gm, example_inputs):
        before = ops(gm)
        report = run_passes(gm, example_inputs, config)
        seen.append((before, ops(gm), report))
        return gm.forward

    return torch.compile(fn, backend=backend), seen


class Block(nn.Module):
    """x + FFN(x) in one of several spellings, with few (about 5%) active neurons."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.fc1, self.fc2 = nn.Linear(D, D_FF), nn.Linear(D_FF, D)
        self.seq = nn.Sequential(self.fc1, nn.ReLU(), self.fc2)
        self.gelu = nn.GELU()
        with torch.no_grad():
            self.fc1.bias.copy_(-1.65 * self.fc1.weight.norm(dim=1))

    def forward(self, x):
        if self.form == "sequential":
            return x + self.seq(x)
        if self.form == "functional_relu":
            return x + self.fc2(F.relu(self.fc1(x)))
        if self.form == "method_relu":
            return x + self.fc2(self.fc1(x).relu())
        if self.form == "relu_squared":
            return x + self.fc2(torch.relu(self.fc1(x)) ** 2)
        if self.form == "square_relu":
            return x + self.fc2(torch.square(torch.relu(self.fc1(x))))
        if self.form == "matmul":
            return x + torch.relu(x @ self.fc1.weight.T + self.fc1.bias) @ self.fc2.weight.T
        if self.form == "gelu":
            return x + self.fc2(self.gelu(self.fc1(x)))
        if self.form == "hidden_reused":
            h = torch.relu(self.fc1(x))
            return x + self.fc2(h), h.sum()
        if self.form == "tanh_gelu":
            return x + self.fc2(F.gelu(self.fc1(x), approximate="tanh"))
        raise AssertionError(self.form)


@pytest.mark.parametrize("form", ["sequential", "functional_relu", "method_relu", "relu_squared", "square_relu",
                                  "matmul"])
def test_rewrites_each_relu_form_and_matches_eager(form):
    model = Block(form)
    compiled, seen = compile_with_passes(model, hire=EXACT_PREDICTOR)
    x = torch.randn(3, D)
    with torch.no_grad():
        out, expected = compiled(x), model(x)
    ((before, after, report),) = seen
    assert HIRE_OP in after and HIRE_OP not in before
    assert torch._C._nn.linear not in after and torch.relu not in after and F.relu not in after
    (decision,) = report
    assert decision.rewritten and decision.op == "ffn" and decision.details["threshold"] == 0.0
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_gelu_is_opt_in():
    with torch.no_grad():
        (kept,) = explain(Block("gelu"), torch.randn(1, D), hire=EXACT_PREDICTOR)
        (taken,) = explain(Block("gelu"), torch.randn(1, D), hire={**EXACT_PREDICTOR, "ffn_activations": ["gelu"]})
    assert not kept.rewritten and "not in hire.ffn_activations" in kept.reason
    assert taken.rewritten and taken.details["pattern"] == "linear -> gelu -> linear"


@pytest.mark.parametrize("form,options,reason", [
    ("hidden_reused", {}, "used elsewhere"),
    ("tanh_gelu", {"ffn_activations": ["gelu"]}, "only the exact GELU"),
])
def test_declines_with_reason(form, options, reason):
    with torch.no_grad():
        (decision,) = explain(Block(form), torch.randn(2, D), hire={**EXACT_PREDICTOR, **options})
    assert not decision.rewritten and reason in decision.reason


def test_declines_recall_one_and_gradients():
    with torch.no_grad():
        (exact,) = explain(Block("functional_relu"), torch.randn(2, D), recall_target=1.0, hire=EXACT_PREDICTOR)
    (grad,) = explain(Block("functional_relu"), torch.randn(2, D), hire=EXACT_PREDICTOR)
    assert not exact.rewritten and exact.reason == "recall target 1.0: exact"
    assert not grad.rewritten and "gradients" in grad.reason


def test_declines_weights_that_are_not_parameters():
    w1, w2 = torch.randn(D_FF, D), torch.randn(D, D_FF)

    def ffn(x, w1, w2):
        return F.linear(torch.relu(F.linear(x, w1)), w2)

    with torch.no_grad():
        (decision,) = explain(ffn, torch.randn(2, D), w1, w2, hire=EXACT_PREDICTOR)
    assert not decision.rewritten and "w1 is not a module parameter" in decision.reason


def test_cost_model_declines_a_large_batch():
    big = nn.Sequential(nn.Linear(512, 4096), nn.ReLU(), nn.Linear(4096, 512))
    with torch.no_grad():
        (many,) = explain(big, torch.randn(512, 512), hire={"rank": 32})
        (one,) = explain(big, torch.randn(1, 512), hire={"rank": 32})
    assert not many.rewritten and "dense predicted cheaper" in many.reason
    assert one.rewritten and one.details["bytes_read"] < one.details["dense_bytes_read"]


@pytest.mark.compile
def test_inductor_compiled_model_equals_the_eager_op():
    model = Block("functional_relu")
    compiled = torch.compile(model, backend="approx_topk",
                             options={"hire": {"rewrite": "always", "rank": 6, "ffn_threshold": -0.5}})
    x = torch.randn(2, D)
    with torch.no_grad():
        out = compiled(x)
        expected = x + hire_ffn(x, model.fc1.weight, model.fc1.bias, model.fc2.weight, model.fc2.bias, "relu",
                                "lowrank", 6, -0.5, D_FF // 4, "always")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_outside_cuda_graphs_hire_pays_its_launches_dispatch(monkeypatch):
    """Where HiRE's launches cost the host more than dense saves, the site stays dense unless the
    graph replays as CUDA graphs."""
    from topk_compiler.lowering import cost_model

    monkeypatch.setitem(cost_model.HOST_SECONDS, "cpu", {"torch_op": 1e-5, "our_op": 1e-3, "triton_launch": 1e-4})
    big = nn.Sequential(nn.Linear(512, 4096), nn.ReLU(), nn.Linear(4096, 512))
    with torch.no_grad():
        (eager,) = explain(big, torch.randn(1, 512), hire={"rank": 32})
        (replayed,) = explain(big, torch.randn(1, 512), hire={"rank": 32}, mode="reduce-overhead")
    assert not eager.rewritten and "outside CUDA graphs" in eager.reason and "dense predicted cheaper" in eager.reason
    assert replayed.rewritten
