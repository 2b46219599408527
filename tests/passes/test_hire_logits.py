"""HireLogitsPass: which linear -> top-k sites it rewrites, which it keeps exact and why."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from topk_compiler import ApproxTopkConfig, explain
from topk_compiler.backend import run_passes
from topk_compiler.lowering.hire_logits import hire_logits_topk
from topk_compiler.lowering.hire_predictor import PREDICTORS

N, D = 2000, 32
HIRE_OP = torch.ops.topk_compiler.hire_logits_topk.default
# Full rank: the predictor is the weight itself, so the candidates hold the exact top-k.
EXACT_PREDICTOR = {"rewrite": "always", "rank": D, "candidates": 64}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


def ops(gm):
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def compile_with_passes(fn, **options):
    """fn compiled by Dynamo; our passes run on each graph, which then runs eagerly."""
    config = ApproxTopkConfig.from_options(options)
    seen = []

    def backend(gm, example_inputs):
        before = ops(gm)
        report = run_passes(gm, example_inputs, config)
        seen.append((before, ops(gm), report))
        return gm.forward

    return torch.compile(fn, backend=backend), seen


class Head(nn.Module):
    def __init__(self, form, bias=False):
        super().__init__()
        self.form = form
        self.lm_head = nn.Linear(D, N, bias=bias)
        self.emb = nn.Parameter(torch.randn(N, D))
        self.b = nn.Parameter(torch.randn(N))

    def forward(self, x):
        if self.form == "linear":
            return torch.topk(self.lm_head(x), 5)
        if self.form == "matmul_temperature_softmax":
            return (x @ self.emb.T / 0.7).softmax(-1).topk(5)
        if self.form == "matmul_scale_log_softmax":
            return torch.topk(torch.log_softmax(torch.matmul(x, self.emb.t()) * 2.0, dim=-1), 3, dim=-1)
        if self.form == "functional_float_softmax":
            return F.softmax(F.linear(x, self.emb, self.b).float(), dim=-1).topk(4, largest=True)
        if self.form == "matmul_bias_transpose":
            return (x @ self.emb.transpose(0, 1) + self.b).topk(6, sorted=True)
        raise AssertionError(self.form)


FORMS = ["linear", "matmul_temperature_softmax", "matmul_scale_log_softmax", "functional_float_softmax",
         "matmul_bias_transpose"]


@pytest.mark.parametrize("form", FORMS)
def test_rewrites_each_form_and_matches_eager(form):
    model = Head(form, bias=True)
    compiled, seen = compile_with_passes(model, hire=EXACT_PREDICTOR)
    x = torch.randn(3, D)
    with torch.no_grad():
        values, indices = compiled(x)
        expected = model(x)
    ((before, after, report),) = seen
    assert torch.topk in before or "topk" in before
    assert HIRE_OP in after and torch.topk not in after and "topk" not in after
    assert torch._C._nn.linear not in after and "softmax" not in after
    (decision,) = report
    assert decision.rewritten and decision.algorithm == "hire/lowrank"
    assert decision.details["candidates"] == 64 and decision.details["rank"] == D
    assert torch.equal(indices, expected.indices)
    torch.testing.assert_close(values, expected.values, atol=1e-5, rtol=1e-4)


def test_report_details_and_uncalibrated_warning():
    with torch.no_grad():
        report = explain(Head("linear"), torch.randn(1, D), hire={"rewrite": "always"})
    (decision,) = report
    assert decision.rewritten
    for key in ("predictor", "rank", "candidates", "bytes_read", "dense_bytes_read", "predictor_bytes"):
        assert key in decision.details
    assert decision.details["settings"] == "default"
    assert "uncalibrated" in decision.details["warning"]
    assert decision.details["bytes_read"] < decision.details["dense_bytes_read"]


def _site(model):
    with torch.no_grad():
        (decision,) = explain(model, torch.randn(1, D), hire={"rewrite": "always"})
    return decision.location


@pytest.mark.parametrize("options", [
    {"recall_target": 1.0},
    "site_override",
])
def test_recall_target_one_is_not_rewritten(options):
    model = Head("linear")
    if options == "site_override":
        options = {"site_overrides": {f"test_hire_logits.py:{_site(model).rsplit(':', 1)[1]}": 1.0}}
    compiled, seen = compile_with_passes(model, hire=EXACT_PREDICTOR, **options)
    with torch.no_grad():
        compiled(torch.randn(2, D))
    hire_decisions = [d for d in seen[0][2] if d.pass_name == "hire_logits"]
    assert HIRE_OP not in seen[0][1]
    assert [d.rewritten for d in hire_decisions] == [False]
    assert hire_decisions[0].reason == "recall target 1.0: exact"


class Declined(nn.Module):
    def __init__(self, case):
        super().__init__()
        self.case = case
        self.emb = nn.Parameter(torch.randn(N, D))

    def forward(self, x, other):
        if self.case == "logits_reused":
            logits = x @ self.emb.T
            return logits.topk(5), logits.sum()
        if self.case == "negative_scale":
            return (x @ self.emb.T * -1.0).topk(5)
        if self.case == "not_a_parameter":
            return (x @ other.T).topk(5)
        if self.case == "topk_over_rows":
            return (x @ self.emb.T).topk(1, dim=0)
        if self.case == "scale_after_softmax":
            return ((x @ self.emb.T).softmax(-1) * 2.0).topk(5)
        raise AssertionError(self.case)


@pytest.mark.parametrize("case,reason", [
    ("logits_reused", "used elsewhere"), ("negative_scale", "not a positive constant"),
    ("not_a_parameter", "not a module parameter"), ("topk_over_rows", "not the logits' last dimension"),
    ("scale_after_softmax", "scaling after softmax"),
])
def test_declines_with_reason(case, reason):
    with torch.no_grad():
        report = explain(Declined(case), torch.randn(3, D), torch.randn(N, D), hire=EXACT_PREDICTOR)
    hire_decisions = [d for d in report if d.pass_name == "hire_logits"]
    assert len(hire_decisions) == 1 and not hire_decisions[0].rewritten
    assert reason in hire_decisions[0].reason


def test_declines_when_gradients_are_needed():
    report = explain(Head("linear"), torch.randn(2, D), hire=EXACT_PREDICTOR)
    (decision,) = [d for d in report if d.pass_name == "hire_logits"]
    assert not decision.rewritten and "gradients" in decision.reason


def test_cost_model_declines_large_batch_and_rewrites_batch_one():
    head = nn.Linear(256, 30000, bias=False)  # large enough for the predictor to pay on a CPU

    def model(x):
        return torch.topk(head(x), 5)

    with torch.no_grad():
        big = explain(model, torch.randn(4096, 256), hire={"rank": 8, "candidates": 64})
        one = explain(model, torch.randn(1, 256), hire={"rank": 8, "candidates": 64})
    big_decision = [d for d in big if d.pass_name == "hire_logits"][0]
    assert not big_decision.rewritten and "dense predicted cheaper" in big_decision.reason
    assert big_decision.predicted_us > big_decision.exact_us
    (one_decision,) = one  # rewritten: the top-k pass never sees it
    assert one_decision.rewritten and "faster than dense" in one_decision.reason


def test_outside_cuda_graphs_hire_pays_its_launches_dispatch(monkeypatch):
    """The batch-one site above stays dense where HiRE's launches cost the host more than dense
    saves, unless the graph replays as CUDA graphs."""
    from topk_compiler.lowering import cost_model

    monkeypatch.setitem(cost_model.HOST_SECONDS, "cpu", {"torch_op": 1e-5, "our_op": 1e-2, "triton_launch": 1e-4})
    head = nn.Linear(256, 30000, bias=False)

    def model(x):
        return torch.topk(head(x), 5)

    with torch.no_grad():
        eager = explain(model, torch.randn(1, 256), hire={"rank": 8, "candidates": 64})
        (replayed,) = explain(model, torch.randn(1, 256), hire={"rank": 8, "candidates": 64}, mode="reduce-overhead")
    eager_decision = [d for d in eager if d.pass_name == "hire_logits"][0]
    assert not eager_decision.rewritten and "outside CUDA graphs" in eager_decision.reason
    assert replayed.rewritten


def test_calibration_entry_is_used_only_for_a_recall_target_it_meets():
    model = Head("linear")
    key = f"test_hire_logits.py:{_site(model).rsplit(':', 1)[1]}"
    entry = {"predictor": "int8", "rank": 0, "candidates": 40, "recall_target": 0.9, "recall": 0.93, "rows": 100}
    with torch.no_grad():
        (used,) = explain(model, torch.randn(1, D), recall_target=0.9, hire={"rewrite": "always", "calibration": {key: entry}})
        (skipped,) = explain(model, torch.randn(1, D), recall_target=0.99,
                             hire={"rewrite": "always", "calibration": {key: entry}})
    assert used.details["settings"] == "calibration" and used.details["predictor"] == "int8"
    assert used.details["calibrated_recall"] == 0.93 and "warning" not in used.details
    assert skipped.details["settings"] == "default" and "not used" in skipped.details["warning"]


def test_weight_change_rebuilds_the_predictor():
    model = Head("linear")
    compiled, _ = compile_with_passes(model, hire={"rewrite": "always", "rank": 4, "candidates": 16})
    x = torch.randn(4, D)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randn(N, 4) @ torch.randn(4, D))  # rank 4: the predictor is exact
        compiled(x)
        builds = PREDICTORS.builds
        model.lm_head.weight.copy_(torch.randn(N, 4) @ torch.randn(4, D))
        values, indices = compiled(x)
        expected = model(x)
    assert PREDICTORS.builds == builds + 1
    assert torch.equal(indices, expected.indices)


@pytest.mark.compile
def test_inductor_compiled_model_equals_the_eager_op():
    model = Head("matmul_temperature_softmax")
    options = {"hire": {"rewrite": "always", "rank": 8, "candidates": 40}}
    compiled = torch.compile(model, backend="approx_topk", options=options)
    x = torch.randn(2, D)
    with torch.no_grad():
        values, indices = compiled(x)
        expected = hire_logits_topk(x, model.emb, None, 5, True, True, 1 / 0.7, "softmax", torch.float32,
                                    "lowrank", 8, 40, "always")
    assert torch.equal(indices, expected[1])
    torch.testing.assert_close(values, expected[0])
