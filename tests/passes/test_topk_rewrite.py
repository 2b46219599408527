"""TopkRewritePass on Dynamo graphs: what it matches, what it rewrites, what it records.

These run our passes on the graphs Dynamo hands a backend, without Inductor (fast): a snapshot
backend counts ops before and after, and explain() returns the decisions.
"""

import logging

import pytest
import torch

import topk_compiler
from topk_compiler.backend import run_passes
from topk_compiler.config import ApproxTopkConfig

BIG, TINY = (64, 8192), (4, 10)
ALWAYS = {"recall_target": 0.9, "rewrite": "always"}


def count_ops(gm):
    counts = {"topk": 0, "bucketed_topk": 0}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.topk_compiler.bucketed_topk.default:
            counts["bucketed_topk"] += 1
        elif (node.op == "call_method" and node.target == "topk") or (
                node.op == "call_function" and node.target in (torch.topk, torch.ops.aten.topk, torch.ops.aten.topk.default)):
            counts["topk"] += 1
    return counts


def snapshot(fn, *inputs, **options):
    """(op counts before, op counts after, report, outputs) of our passes on fn's Dynamo graph."""
    seen = {}

    def backend(gm, example_inputs):
        seen["before"] = count_ops(gm)
        seen["report"] = run_passes(gm, example_inputs, ApproxTopkConfig.from_options(options))
        seen["after"] = count_ops(gm)
        return gm.forward

    out = torch.compile(fn, backend=backend, fullgraph=True)(*inputs)
    return seen["before"], seen["after"], seen["report"], out


def spellings(x):
    return (
        torch.topk(x, 64)[0],
        x.topk(64, -1, True, False).values,
        torch.topk(x, k=64, dim=1, largest=False, sorted=True).indices,
        torch.ops.aten.topk(x, 64, -1)[1],
        torch.ops.aten.topk.default(x, 64)[0],
        x.t().topk(64, dim=0)[0],
        torch.topk(input=x, k=64, dim=-1)[1],
    )


def test_every_spelling_is_matched_and_rewritten():
    x = torch.randn(*BIG)
    before, after, report, out = snapshot(spellings, x, **ALWAYS)
    assert before == {"topk": 7, "bucketed_topk": 0}
    assert after == {"topk": 0, "bucketed_topk": 7}
    assert [d.rewritten for d in report] == [True] * 7
    assert {d.op for d in report} == {"torch.topk", "Tensor.topk", "aten.topk"}
    assert [d.dim for d in report] == [-1, -1, 1, -1, -1, 0, -1]
    # largest=False (third call) returns the smallest values
    assert (out[2] >= 0).all() and torch.equal(x.gather(1, out[2]).max(1).values <= x.median(1).values,
                                               torch.ones(BIG[0], dtype=torch.bool))


def test_big_site_rewritten_tiny_site_kept_with_reason():
    def two_sites(x, y):
        return torch.topk(x, 64).values.sum() + y.topk(3).values.sum()

    before, after, report, _ = snapshot(two_sites, torch.randn(*BIG), torch.randn(*TINY), **ALWAYS)
    assert before["topk"] == 2 and after == {"topk": 1, "bucketed_topk": 1}
    big, tiny = report
    assert big.rewritten and big.shape == ("64", "8192") and big.k == "64"
    assert big.num_buckets and big.per_bucket_k and big.expected_recall >= 0.9
    assert not tiny.rewritten and "min_elements" in tiny.reason


def test_recall_target_one_and_integer_inputs_stay_exact_on_cpu():
    def sites(x, i):
        return torch.topk(x, 64).values, torch.topk(i, 64).values

    _, after, report, _ = snapshot(sites, torch.randn(*BIG), torch.randint(0, 9, BIG), recall_target=1.0)
    assert after == {"topk": 2, "bucketed_topk": 0}
    assert "torch.int64" in report[1].reason


def test_auto_policy_keeps_exact_where_cost_model_predicts_no_gain():
    # On a CPU, torch.topk beats the plain-torch bucketed implementation at this shape.
    _, after, report, _ = snapshot(lambda x: torch.topk(x, 64).values, torch.randn(*BIG), recall_target=0.9)
    assert after["bucketed_topk"] == 0
    assert "exact predicted faster" in report[0].reason


def test_site_overrides_by_source_location():
    def sites(x):
        a = torch.topk(x, 64).values  # override target: this line
        b = torch.topk(x, 32).values
        return a, b

    import inspect

    line = inspect.getsourcelines(sites)[1] + 1
    overrides = {f"passes/test_topk_rewrite.py:{line}": {"recall_target": 1.0}}
    _, after, report, _ = snapshot(sites, torch.randn(*BIG), site_overrides=overrides, **ALWAYS)
    assert [d.rewritten for d in report] == [False, True]
    assert report[0].override == f"passes/test_topk_rewrite.py:{line}" and report[0].recall_target == 1.0
    assert report[0].location.endswith(f"test_topk_rewrite.py:{line}")


def test_symbolic_shapes_are_reported_and_planned_per_call():
    seen = {}

    def backend(gm, example_inputs):
        seen["report"] = run_passes(gm, example_inputs, ApproxTopkConfig.from_options(ALWAYS))
        return gm.forward

    fn = torch.compile(lambda x: torch.topk(x, 64), backend=backend, dynamic=True)
    for n in (4096, 5000):
        x = torch.randn(8, n)
        values, indices = fn(x)
        assert torch.equal(x.gather(1, indices), values)
    (decision,) = seen["report"]
    assert decision.rewritten and "dynamic length" in decision.reason
    assert all(not s.isdigit() for s in decision.shape)  # symbols, e.g. ("s77", "s27")


def test_unsupported_arguments_are_kept_exact_and_say_why():
    def with_out(x):
        out = (torch.empty(BIG[0], 64), torch.empty(BIG[0], 64, dtype=torch.long))
        return torch.topk(x, 64, out=out)

    _, after, report, _ = snapshot(with_out, torch.randn(*BIG), **ALWAYS)
    assert after["bucketed_topk"] == 0
    assert not report[0].rewritten and "unsupported argument(s) ['out']" in report[0].reason


def test_explain_reports_without_running_and_logs(caplog):
    calls = []

    class Model(torch.nn.Module):
        def forward(self, x, y):
            calls.append(1)
            return torch.topk(x, 64).indices, y.topk(3).values

    with caplog.at_level(logging.INFO, logger="topk_compiler"):
        report = topk_compiler.explain(Model(), torch.randn(*BIG), torch.randn(*TINY), **ALWAYS)
    assert len(report) == 2 and len(report.rewritten) == 1
    text = str(report)
    assert "REWRITTEN" in text and "kept exact" in text and "num_buckets=" in text and "expected recall" in text
    assert "torch.topk(x, 64)" in text  # the source line
    assert any("REWRITTEN" in r.getMessage() for r in caplog.records)


def test_unknown_options_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['recal_target'\].*recall_target"):
        topk_compiler.explain(lambda x: x.topk(2), torch.randn(3, 4), recal_target=0.9)
    with pytest.raises(ValueError, match="layout"):
        ApproxTopkConfig.from_options({"layout": "diagonal"})
    with pytest.raises(ValueError, match="recall_target"):
        ApproxTopkConfig.from_options({"recall_target": 0})
    with pytest.raises(ValueError, match="site_overrides"):
        ApproxTopkConfig.from_options({"site_overrides": {"model.py": 0.9}})
    with pytest.raises(ValueError, match="min_elements"):
        ApproxTopkConfig.from_options({"min_elements": -1})


def test_outside_cuda_graphs_a_small_site_is_timed_with_its_dispatch(monkeypatch):
    """A latency-bound site (on a GPU, here simulated) is timed at compile time as calls from
    Python: where our op's call is the longer, torch.topk stays, unless the graph replays as CUDA
    graphs (mode="reduce-overhead"), where no call pays the dispatch and nothing is timed."""
    from topk_compiler.lowering.plan import TopkPlan
    from topk_compiler.passes import topk_rewrite

    fast_kernel = TopkPlan("bucketed", "fused", 64, 1, expected_recall=0.96, predicted_us=5.0, torch_topk_us=50.0,
                           reason="predicted 10.0x faster than exact")
    timed = []
    times = {"ours": 66.1, "torch": 18.4}
    monkeypatch.setattr(topk_rewrite, "plan_topk", lambda *args: fast_kernel)
    monkeypatch.setattr(topk_rewrite, "_timed_at_compile_time", lambda x: True)
    monkeypatch.setattr(topk_rewrite, "eager_site_times_us",
                        lambda *args: timed.append(args) or (times["ours"], times["torch"]))
    x = torch.randn(1, 1024)
    (slow,) = topk_compiler.explain(lambda x: torch.topk(x, 16), x)
    assert not slow.rewritten and "measured at compile time, our op 66.1 us a call against torch.topk's 18.4" in slow.reason
    assert timed[0][:5] == ((1, 1024), torch.float32, "cpu", 16, -1)
    times["ours"] = 9.0
    (fast,) = topk_compiler.explain(lambda x: torch.topk(x, 16), x)
    assert fast.rewritten and "our op 9.0 us a call" in fast.reason
    (replayed,) = topk_compiler.explain(lambda x: torch.topk(x, 16), x, mode="reduce-overhead")
    assert replayed.rewritten and len(timed) == 2
    (big,) = topk_compiler.explain(lambda x: torch.topk(x, 16), torch.randn(64, 2**14))
    assert big.rewritten and len(timed) == 2  # 2**20 elements: the device's work decides


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times calls on a GPU")
def test_small_gpu_site_is_timed_at_compile_time():
    """1 x 16384 k=16: predicted faster on the device, then timed as calls from Python."""
    from topk_compiler.lowering import bucketed_topk
    from topk_compiler.lowering.plan import MIN_SPEEDUP

    x = torch.randn(1, 16384, device="cuda")
    (decision,) = topk_compiler.explain(lambda x: torch.topk(x, 16), x, recall_target=0.9)
    assert "measured at compile time" in decision.reason
    (times,) = [t for key, t in bucketed_topk._EAGER_SITES.items() if key[:4] == ((1, 16384), torch.float32, "cuda:0", 16)]
    assert min(times) > 0 and decision.rewritten == (times[0] * MIN_SPEEDUP <= times[1])


def test_a_site_planned_as_torch_topk_is_rewritten_where_our_kernels_race_it(monkeypatch):
    """Where the shortlist prices one of our kernels close to torch.topk (``plan.races_torch``,
    on a GPU; here simulated), the site is rewritten and says so: the op times both at its first
    call. Elsewhere, and along a dim other than the last, it stays torch.topk."""
    from topk_compiler.passes import topk_rewrite

    asked = []
    monkeypatch.setattr(topk_rewrite, "races_torch", lambda *args: asked.append(args[:5]) or True)
    x = torch.randn(*BIG)
    _, after, report, out = snapshot(lambda x: torch.topk(x, 64), x, recall_target=1.0)
    assert after == {"topk": 0, "bucketed_topk": 1}
    assert report[0].rewritten and "timed against it at the first call" in report[0].reason
    assert asked == [(64, 8192, 64, torch.float32, "cpu")]
    assert torch.equal(out.values, torch.topk(x, 64).values) and torch.equal(out.indices, torch.topk(x, 64).indices)
    _, after, report, _ = snapshot(lambda x: torch.topk(x, 8, dim=0), x, recall_target=1.0)
    assert after == {"topk": 1, "bucketed_topk": 0} and not report[0].rewritten
    monkeypatch.setattr(topk_rewrite, "races_torch", lambda *args: False)
    _, after, _, _ = snapshot(lambda x: torch.topk(x, 64), x, recall_target=1.0)
    assert after == {"topk": 1, "bucketed_topk": 0}


def scatter_of_topk(x):
    t = torch.topk(x, 64)
    return torch.zeros_like(x).scatter(-1, t.indices, t.values.relu())


def passes_on(fn, *inputs, **options):
    """(fn's graph after our passes, the report, fn's compiled outputs)."""
    seen = {}

    def backend(gm, example_inputs):
        seen["report"] = run_passes(gm, example_inputs, ApproxTopkConfig.from_options(options))
        seen["gm"] = gm
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, fullgraph=True)(*inputs)
    return seen["gm"], seen["report"], out


def topk_nodes(gm):
    return [n for n in gm.graph.nodes
            if n.target in (torch.topk, "topk", torch.ops.topk_compiler.bucketed_topk.default)]


def test_a_site_whose_order_nothing_observes_runs_unsorted():
    x = torch.randn(*BIG)
    gm, report, out = passes_on(scatter_of_topk, x, **ALWAYS)
    (op,) = topk_nodes(gm)
    assert op.target is torch.ops.topk_compiler.bucketed_topk.default and op.args[4] is False
    assert "its order is not observed: it ends in scatter" in report[0].details["sorted"]
    assert "sorted=no" in str(report[0])
    kept = out != 0
    assert (kept.sum(1) <= 64).all() and torch.equal(out[kept], x[kept]) and (x[kept] > 0).all()

    gm, report, _ = passes_on(scatter_of_topk, x, skip_unobserved_sort=False, **ALWAYS)
    assert topk_nodes(gm)[0].args[4] is True and "sorted" not in report[0].details


def test_an_exact_site_drops_its_order_only_where_results_stay_bit_for_bit():
    x = torch.randn(*BIG)
    gm, report, out = passes_on(scatter_of_topk, x, recall_target=1.0)
    (node,) = topk_nodes(gm)
    assert node.target is torch.topk and node.kwargs["sorted"] is False and "scatter" in report[0].details["sorted"]
    assert torch.equal(out, scatter_of_topk(x))

    def weighted_sum(x):
        v, i = torch.topk(x, 64)
        return (v * i).sum(-1)  # a sum: equal only up to rounding in another order

    gm, report, out = passes_on(weighted_sum, x, recall_target=1.0)
    (node,) = topk_nodes(gm)
    assert node.target is torch.topk and "sorted" not in node.kwargs and "sorted" not in report[0].details
    assert torch.equal(out, weighted_sum(x))


def test_indices_sorted_by_position_leave_the_top_k_unsorted_even_where_exact():
    def attended_positions(x):
        return torch.topk(x, 64).indices.sort(dim=-1).values  # a sparse-attention index list

    x = torch.randn(*BIG)
    gm, report, out = passes_on(attended_positions, x, recall_target=1.0)
    (node,) = topk_nodes(gm)
    assert node.target is torch.topk and node.kwargs["sorted"] is False
    assert "it ends in sort" in report[0].details["sorted"]
    assert torch.equal(out, attended_positions(x))

    gm, report, out = passes_on(attended_positions, x, **ALWAYS)
    (op,) = topk_nodes(gm)
    assert op.target is torch.ops.topk_compiler.bucketed_topk.default and op.args[4] is False
    exact = attended_positions(x)
    recall = torch.stack([torch.isin(row, want).float().mean() for row, want in zip(out, exact)]).mean()
    assert bool((out[:, 1:] > out[:, :-1]).all()) and recall >= 0.85  # expected 0.9


def test_a_site_kept_as_torch_topk_drops_its_order():
    # On a CPU torch.topk is predicted faster than the bucketed op: the site stays torch.topk,
    # asked for its outputs unsorted, and computes what the model did.
    x = torch.randn(*BIG)
    gm, report, out = passes_on(scatter_of_topk, x, recall_target=0.9)
    (node,) = topk_nodes(gm)
    assert not report[0].rewritten and node.target is torch.topk and node.kwargs["sorted"] is False
    assert torch.equal(out, scatter_of_topk(x))


def test_an_unobserved_order_is_found_through_symbolic_shapes():
    """With dynamic=True the shapes the analysis broadcasts are symbolic (rows s0, length s1)."""
    table = torch.randn(5000, 5)

    def decoded(x):
        v, i = torch.topk(x, 64)
        rows = torch.arange(x.shape[0]).unsqueeze(1)
        return torch.zeros_like(x).scatter(-1, i, v.relu()), (x[rows, i] * v).sum(-1), \
            (v[:, :32, None] * table[i[:, :32]]).sum(1)

    seen = {}

    def backend(gm, example_inputs):
        seen["report"] = run_passes(gm, example_inputs, ApproxTopkConfig.from_options(ALWAYS))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(decoded, backend=backend, dynamic=True)
    for n in (4096, 5000):
        compiled(torch.randn(3, n))
    (decision,) = seen["report"]
    assert decision.shape[1].startswith("s") and decision.rewritten
    # The first 32 of the k: a part of the permuted axis observes the order, and the site keeps its sort.
    assert "sorted" not in decision.details

    def scattered_and_gathered(x):
        v, i = torch.topk(x, 64)
        rows = torch.arange(x.shape[0]).unsqueeze(1)
        return torch.zeros_like(x).scatter(-1, i, v.relu()), (x[rows, i] * v).sum(-1), \
            (v[..., None] * table[i]).sum(1)

    torch._dynamo.reset()
    compiled = torch.compile(scattered_and_gathered, backend=backend, dynamic=True)
    for n in (4096, 5000):
        compiled(torch.randn(3, n))
    (decision,) = seen["report"]
    assert decision.shape[1].startswith("s") and decision.details["sorted"].endswith("it ends in scatter, sum)")

    def written_by_rows(x):
        v, i = torch.topk(x, 64)
        out = torch.zeros_like(x)
        out[torch.arange(x.shape[0])[:, None], i] = v
        return out

    torch._dynamo.reset()
    compiled = torch.compile(written_by_rows, backend=backend, dynamic=True)
    for rows, n in ((3, 4096), (5, 5000)):
        x = torch.randn(rows, n)
        out = compiled(x)
        kept = out != 0
        assert torch.equal(out[kept], x[kept]) and bool((kept.sum(1) == 64).all())
    (decision,) = seen["report"]
    assert decision.shape[0].startswith("s") and decision.details["sorted"].endswith("it ends in setitem)")
