"""The op and approx_topk: torch.topk's semantics where promised, recall where approximate."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from topk_compiler import approx_topk, expected_recall, guaranteed_recall, measured_recall
from tests.conftest import KERNEL_DEVICE
from topk_compiler.lowering.order_keys import order_keys

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def run_op(x, k, dim=-1, largest=True, sorted=True, recall_target=0.9, layout="interleaved",
           num_buckets=0, per_bucket_k=0, rewrite="always", seed=0):
    """The op as the backend calls it, approximating wherever it can (rewrite="always")."""
    return torch.ops.topk_compiler.bucketed_topk(
        x, k, dim, largest, sorted, recall_target, num_buckets, per_bucket_k, layout, seed, rewrite, 0)


def assert_equal(a, b):
    """Exactly equal, NaN matching NaN (torch.topk itself may return a NaN with other payload bits)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def check_invariants(x, k, dim, largest, sorted_, values, indices):
    dim = dim % max(x.dim(), 1)
    expected_shape = list(x.shape)
    expected_shape[dim] = k
    assert list(values.shape) == expected_shape and list(indices.shape) == expected_shape
    assert indices.dtype == torch.int64 and values.dtype == x.dtype
    assert values.is_contiguous() and indices.is_contiguous()
    n = x.shape[dim]
    assert ((indices >= 0) & (indices < n)).all()
    assert_equal(values, x.gather(dim, indices))
    if k > 1:
        flat = indices.movedim(dim, -1).reshape(-1, k)
        assert (flat.sort(-1).values.diff(dim=-1) > 0).all(), "indices repeat within a row"
    if sorted_ and k > 1:
        keys = order_keys(values.movedim(dim, -1) + 0.0, largest)  # + 0.0: -0.0 ties with 0.0
        assert (keys[..., :-1] >= keys[..., 1:]).all(), "not in torch.topk order"


@st.composite
def topk_inputs(draw):
    ndim = draw(st.integers(1, 3))
    shape = [draw(st.integers(1, 6)) for _ in range(ndim)]
    dim = draw(st.integers(-ndim, ndim - 1))
    shape[dim] = draw(st.integers(1, 3000))
    k = draw(st.integers(0, shape[dim]))
    dtype = draw(st.sampled_from(FLOATS))
    special = draw(st.sampled_from(["none", "nan", "inf", "ties"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    x = torch.randn(shape, dtype=torch.float64, generator=gen)
    if special == "nan":
        x[torch.rand(shape, generator=gen) < 0.05] = float("nan")
    elif special == "inf":
        x[torch.rand(shape, generator=gen) < 0.05] = float("inf")
        x[torch.rand(shape, generator=gen) < 0.05] = float("-inf")
    elif special == "ties":
        x = x.round()
    if draw(st.booleans()):  # non-contiguous: a transposed copy
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    return x.to(dtype), k, dim, draw(st.booleans()), draw(st.booleans())


@given(topk_inputs(), st.sampled_from([0.5, 0.9, 0.99]), st.sampled_from(["interleaved", "contiguous", "shuffled"]))
def test_invariants_hold_for_any_input(device, inputs, recall_target, layout):
    x, k, dim, largest, sorted_ = inputs
    x = x.to(device)
    values, indices = run_op(x, k, dim, largest, sorted_, recall_target, layout)
    check_invariants(x, k, dim, largest, sorted_, values, indices)


def _same_as_torch_topk_here(x, k, dim, largest, sorted_, values, indices) -> bool:
    here = torch.topk(x, k, dim, largest, sorted_)
    return torch.equal(indices, here.indices) and torch.allclose(values, here.values, rtol=0, atol=0, equal_nan=True)


@given(topk_inputs())
def test_recall_target_one_is_exact(device, inputs):
    x, k, dim, largest, sorted_ = inputs
    x = x.to(device)
    values, indices = run_op(x, k, dim, largest, sorted_, recall_target=1.0)
    if x.device.type != "cpu" and _same_as_torch_topk_here(x, k, dim, largest, sorted_, values, indices):
        # Where the op runs torch.topk itself (k = n, or a plan that torch.topk won at the first
        # call), it returns what torch.topk returns on this device, and torch.topk on CUDA does not
        # always keep the CPU's NaN order: on an H100 (2026-12-06) it put two bf16 NaNs first
        # with largest=False, as on an H200 (2026-12-01) at k = n.
        return
    check_invariants(x, k, dim, largest, sorted_, values, indices)
    # The reference is torch.topk on the CPU, with its documented NaN order (NaN largest).
    expected = torch.topk(x.cpu(), k, dim, largest, sorted=True).values.to(x.device)
    assert_equal(values.sort(dim, descending=largest).values if not sorted_ else values,
                     expected.sort(dim, descending=largest).values if not sorted_ else expected)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("recall_target", [0.8, 0.9, 0.95, 0.99])
def test_measured_recall_meets_target_on_random_inputs(device, dtype, recall_target):
    x = torch.randn(512, 4096, device=device).to(dtype)
    for k in (16, 128, 512):
        _, indices = run_op(x, k, recall_target=recall_target)
        assert measured_recall(x, indices, k) >= recall_target - 0.02


@pytest.mark.parametrize("largest", [True, False])
def test_fixed_bucketing_matches_recall_model(device, largest):
    x = torch.randn(1000, 2048, device=device)
    _, indices = run_op(x, 128, largest=largest, num_buckets=256, per_bucket_k=1)
    assert abs(measured_recall(x, indices, 128, largest=largest) - expected_recall(2048, 128, 256, 1)) < 0.02


def periodic_rows(rows, n, period, device):
    """Large values at positions 0 mod period: interleaved buckets (num_buckets a multiple of the
    period) put them all in a few buckets."""
    x = torch.randn(rows, n, device=device)
    x[:, ::period] += 10.0
    return x


def test_adversarial_orders_hurt_fixed_layouts_but_not_shuffled(device):
    n, k, b, kb = 4096, 256, 256, 2
    sorted_rows = torch.randn(200, n, device=device).sort(-1).values
    periodic = periodic_rows(200, n, 16, device)
    bound = guaranteed_recall(n, k, b, kb)
    for x in (sorted_rows, periodic):
        _, idx = run_op(x, k, layout="shuffled", num_buckets=b, per_bucket_k=kb, seed=7)
        assert measured_recall(x, idx, k) >= bound - 0.02
    _, idx = run_op(periodic, k, layout="interleaved", num_buckets=b, per_bucket_k=kb)
    assert measured_recall(periodic, idx, k) < 0.2
    _, idx = run_op(sorted_rows, k, layout="contiguous", num_buckets=b, per_bucket_k=kb)
    assert measured_recall(sorted_rows, idx, k) < 0.2


@pytest.mark.parametrize("dtype", FLOATS)
def test_special_values_follow_torch_topk(device, dtype):
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[1.0, nan, 3.0, -inf, inf, 2.0, nan, -1.0] * 300], dtype=dtype, device=device)
    for largest in (True, False):
        for k in (1, 3, 601, 2400):
            for recall_target in (1.0, 0.9):
                values, _ = run_op(x, k, largest=largest, recall_target=recall_target)
                expected = torch.topk(x, k, largest=largest).values
                if recall_target == 1.0:
                    assert_equal(values, expected)
                else:  # NaN ranks first (largest) or last, as in torch.topk
                    assert values[0, 0].isnan() == expected[0, 0].isnan()


def test_all_equal_rows_and_ties(device):
    x = torch.ones(8, 5000, device=device)
    values, indices = run_op(x, 700)
    check_invariants(x, 700, -1, True, True, values, indices)
    assert (values == 1).all()


def test_edge_shapes_match_torch_topk(device):
    cases = [
        (torch.tensor(2.5), 1), (torch.tensor(2.5), 0), (torch.randn(7), 3), (torch.randn(0, 50), 5),
        (torch.randn(4, 0), 0), (torch.randn(3, 9), 0), (torch.randn(3, 9), 9), (torch.randn(2, 1), 1),
    ]
    for x, k in cases:
        expected = torch.topk(x, k)  # on CPU: CUDA's k=0 result for a 0-d input is uninitialised
        x = x.to(device)
        values, indices = approx_topk(x, k)
        expected = torch.return_types.topk((expected.values.to(device), expected.indices.to(device)))
        assert values.shape == expected.values.shape and indices.shape == expected.indices.shape
        assert_equal(values, expected.values)


def test_k_out_of_range_raises_like_torch(device):
    x = torch.randn(3, 5, device=device)
    for k in (6, -1):
        with pytest.raises(RuntimeError) as ours:
            approx_topk(x, k)
        with pytest.raises(RuntimeError):
            torch.topk(x, k)
        assert "out of range" in str(ours.value)
    with pytest.raises(IndexError):
        approx_topk(x, 2, dim=2)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_integer_inputs_are_exact(device, dtype):
    x = torch.randint(0, 100, (4, 3000), device=device).to(dtype)
    values, indices = approx_topk(x, 50, recall_target=0.5)
    assert torch.equal(values, torch.topk(x, 50).values)
    assert torch.equal(x.gather(1, indices), values)


def test_gradient_flows_to_selected_positions(device):
    x = torch.randn(6, 3000, device=device, dtype=torch.float64, requires_grad=True)
    values, indices = run_op(x, 40)
    weights = torch.randn_like(values)
    (values * weights).sum().backward()
    expected = torch.zeros_like(x).scatter(1, indices, weights)
    assert torch.equal(x.grad, expected)
    x_exact = x.detach().clone().requires_grad_(True)
    torch.topk(x_exact, 40).values.sum().backward()
    x.grad = None
    run_op(x, 40, recall_target=1.0)[0].sum().backward()
    assert torch.equal(x.grad, x_exact.grad)


def test_approx_topk_skips_the_dispatch_only_where_nothing_needs_it(device, monkeypatch):
    """An eager call without autograd runs the op's body directly, with the op's results; a call
    that needs a gradient, or runs under a function mode, goes through the op."""
    from topk_compiler.lowering import bucketed_topk as op_module

    x = torch.randn(8, 3000, device=device)
    direct = approx_topk(x, 40, recall_target=0.9)
    dispatched = torch.ops.topk_compiler.bucketed_topk(x, 40, -1, True, True, 0.9, 0, 0, "interleaved", 0, "auto", 0)
    assert_equal(direct.values, dispatched[0])
    assert_equal(direct.indices, dispatched[1])

    calls = []
    monkeypatch.setattr(op_module, "_bucketed_topk", lambda *args: calls.append(args) or dispatched)
    approx_topk(x, 40, recall_target=0.9)
    assert len(calls) == 1
    x_grad = x.clone().requires_grad_(True)
    approx_topk(x_grad, 40, recall_target=0.9).values.sum().backward()
    assert x_grad.grad is not None and len(calls) == 1
    with torch.no_grad():
        approx_topk(x_grad, 40, recall_target=0.9)
    assert len(calls) == 2

    class Recorder(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    seen = []
    with Recorder():  # a function mode sees the op
        approx_topk(x, 40, recall_target=0.9)
    assert "topk_compiler.bucketed_topk" in seen


def test_opcheck(device):
    x = torch.randn(4, 2048, device=device, requires_grad=True)
    for args in [(x, 64, -1, True, True, 0.9, 0, 0, "interleaved", 0, "always", 0),
                 (x, 64, 1, False, False, 1.0, 0, 0, "shuffled", 3, "auto", 0),
                 (x.detach(), 3, 0, True, True, 0.9, 0, 0, "contiguous", 0, "always", 0)]:
        torch.library.opcheck(torch.ops.topk_compiler.bucketed_topk.default, args)


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(4, 100)
    with pytest.raises(ValueError, match="recall_target"):
        approx_topk(x, 5, recall_target=0.0)
    with pytest.raises(ValueError, match="recall_target"):
        approx_topk(x, 5, recall_target=1.5)
    with pytest.raises(ValueError, match="layout"):
        approx_topk(x, 5, layout="striped")
    with pytest.raises(ValueError, match="together"):
        approx_topk(x, 5, num_buckets=8)
    with pytest.raises(ValueError, match="num_buckets"):
        approx_topk(x, 5, num_buckets=0, per_bucket_k=1)
    with pytest.raises(ValueError, match="fewer than k"):
        approx_topk(x, 50, num_buckets=8, per_bucket_k=2)
    with pytest.raises(ValueError, match="seed"):
        approx_topk(x, 5, seed=-1)
    with pytest.raises(TypeError, match="Tensor"):
        approx_topk([1.0, 2.0], 1)
    with pytest.raises(RuntimeError, match="bool"):
        approx_topk(torch.ones(4, 3000, dtype=torch.bool), 3)


def _plan(kernel, predicted_us, algorithm="bucketed"):
    from topk_compiler.lowering.plan import TopkPlan

    return TopkPlan(algorithm, kernel, predicted_us=predicted_us)


def test_first_call_picks_the_measured_fastest_plan_not_the_predicted_one():
    from topk_compiler.lowering.bucketed_topk import pick_measured

    fused, split = _plan("fused", 10.0), _plan("split", 20.0)
    torch_topk, select = _plan("torch", 300.0, "exact"), _plan("select", 100.0, "exact")
    measured = {fused: 90.0, split: 40.0, torch_topk: 100.0, select: 250.0}
    chosen = pick_measured([fused, split], [select, torch_topk], measured.get, exact_only=False, approx_only=False)
    assert chosen.kernel == "split" and "2.5x faster than exact" in chosen.reason
    assert pick_measured([fused, split], [select, torch_topk], measured.get, exact_only=True,
                         approx_only=False).kernel == "torch"


def test_first_call_keeps_exact_unless_approximation_is_measured_faster_by_the_margin():
    from topk_compiler.lowering.bucketed_topk import pick_measured
    from topk_compiler.lowering.plan import MIN_SPEEDUP

    fused, torch_topk = _plan("fused", 10.0), _plan("torch", 300.0, "exact")
    almost = {fused: 100.0 / MIN_SPEEDUP * 1.01, torch_topk: 100.0}
    assert pick_measured([fused], [torch_topk], almost.get, exact_only=False, approx_only=False).kernel == "torch"
    # rewrite="always" (or a fixed bucketing) takes the fastest approximation whatever exact costs
    assert pick_measured([fused], [torch_topk], almost.get, exact_only=False, approx_only=True).kernel == "fused"
    # a plan that fails to run (None) is out of the race
    failing = {fused: None, torch_topk: 100.0}
    assert pick_measured([fused], [torch_topk], failing.get, exact_only=False, approx_only=False).kernel == "torch"
    # rewrite="always" where no bucketing meets the target (short rows, high targets): exact races
    assert pick_measured([], [torch_topk], failing.get, exact_only=False, approx_only=True).kernel == "torch"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_an_input_on_another_gpu_than_the_current_one():
    """Triton launches on the current device; the op makes the input's device current, as torch's
    own ops do, for its timings and its kernels."""
    x = torch.randn(64, 16384, device="cuda:1")
    assert torch.cuda.current_device() == 0
    for recall_target in (0.95, 1.0):
        values, indices = approx_topk(x, 100, recall_target=recall_target)
        assert values.device == x.device and torch.cuda.current_device() == 0
        assert_equal(values, x.gather(1, indices))
        if recall_target == 1.0:
            assert_equal(values, torch.topk(x, 100).values)
        else:
            assert measured_recall(x, indices, 100) >= 0.9


@pytest.mark.skipif(not torch.cuda.is_available(), reason="plans are timed on the GPU only")
def test_first_call_on_the_gpu_records_the_plan_it_runs():
    from topk_compiler.lowering.bucketed_topk import lookup_tuned

    x = torch.randn(64, 16384, device="cuda")
    approx_topk(x, 16, recall_target=0.95)
    assert lookup_tuned(64, 16384, 16, x.dtype, str(x.device), True, True, 0.95) is not None


def test_a_latency_bound_shape_keeps_a_plan_for_eager_calls_and_one_for_graphs(monkeypatch):
    """Timed at the first call both ways: our kernel wins replayed, torch.topk eagerly (our op's
    dispatch); calls outside a graph get torch.topk, captured calls our kernel."""
    from topk_compiler.lowering import bucketed_topk as op_module
    from topk_compiler.lowering.plan import TopkPlan

    fused = TopkPlan("bucketed", "fused", 256, 1, predicted_us=10.0)
    torch_topk = TopkPlan("exact", "torch", predicted_us=20.0)
    times = {"graph": {"fused": 6.0, "torch": 18.0}, "eager": {"fused": 39.0, "torch": 18.6}}
    monkeypatch.setattr(op_module, "shortlist", lambda *args: ((fused,), (torch_topk,)))
    monkeypatch.setattr(op_module, "_run", lambda x2d, k, largest, sorted, plan, layout, seed: plan)
    monkeypatch.setattr(op_module.device_timing, "gpu_time_us", lambda fn, cold: times["graph"][fn().kernel])
    monkeypatch.setattr(op_module.device_timing, "eager_time_us", lambda fn: times["eager"][fn().kernel])
    monkeypatch.setattr(op_module, "_TUNED", {})
    monkeypatch.setattr(op_module, "_PLAN_TIMES", {})
    x = torch.randn(1, 1024)
    args = (x, 16, True, True, fused, 0.95, 0, 0, "interleaved", 0, "auto")
    monkeypatch.setattr(op_module.device_timing, "can_time", lambda: True)
    assert op_module.tuned_plan(*args).kernel == "torch"
    monkeypatch.setattr(op_module.device_timing, "can_time", lambda: False)  # captured
    assert op_module.tuned_plan(*args).kernel == "fused"
    assert op_module.lookup_tuned(1, 1024, 16, x.dtype, str(x.device), True, True, 0.95).kernel == "torch"
    assert op_module.lookup_tuned(1, 1024, 16, x.dtype, str(x.device), True, True, 0.95, captured=True).kernel == "fused"
    # A large input is timed replayed with L2 flushed only, and both kinds of call run its winner.
    monkeypatch.setattr(op_module.device_timing, "eager_time_us", lambda fn: pytest.fail("timed eagerly"))
    monkeypatch.setattr(op_module.device_timing, "can_time", lambda: True)
    big = torch.empty(1024, 1024)
    assert op_module.tuned_plan(big, *args[1:]).kernel == "fused"


def test_a_plan_is_timed_once_per_shape_whatever_the_recall_target(monkeypatch):
    """Shortlists for two recall targets share torch.topk and a bucketing: each plan is timed
    once, so noise cannot choose differently for them, and a new shape times its own."""
    from topk_compiler.lowering import bucketed_topk as op_module
    from topk_compiler.lowering.plan import TopkPlan

    shared = TopkPlan("bucketed", "fused", 256, 2, predicted_us=10.0)
    tighter = TopkPlan("bucketed", "fused", 256, 1, predicted_us=9.0)
    torch_topk = TopkPlan("exact", "torch", predicted_us=20.0)
    shortlists = {0.9: ((tighter, shared), (torch_topk,)), 0.95: ((shared,), (torch_topk,))}
    timed = []
    monkeypatch.setattr(op_module, "shortlist", lambda rows, n, k, dtype, device, target, *rest: shortlists[target])
    monkeypatch.setattr(op_module, "_run", lambda x2d, k, largest, sorted, plan, layout, seed: plan)
    monkeypatch.setattr(op_module.device_timing, "gpu_time_us",
                        lambda fn, cold: timed.append(fn()) or {"torch": 30.0}.get(fn().kernel, fn().predicted_us))
    monkeypatch.setattr(op_module.device_timing, "can_time", lambda: True)
    monkeypatch.setattr(op_module, "_TUNED", {})
    monkeypatch.setattr(op_module, "_PLAN_TIMES", {})
    for target in (0.9, 0.95):
        for x in (torch.empty(1024, 1024), torch.empty(1024, 2048)):
            op_module.tuned_plan(x, 16, True, True, shared, target, 0, 0, "interleaved", 0, "auto")
    assert sorted(timed, key=repr) == sorted([tighter, shared, torch_topk] * 2, key=repr)


def test_a_shape_prepares_its_kernels_once_and_every_call_computes_its_own_input(monkeypatch):
    """Later calls of a shape reuse the launches prepared at its first (``_prepare``) and still
    return their own input's top-k; another shape or plan prepares its own."""
    from topk_compiler.lowering import bucketed_topk as op_module
    from topk_compiler.lowering.bucketed_reference import bucketed_topk_torch
    from topk_compiler.lowering.plan import TopkPlan

    prepared = []
    real_prepare = op_module._prepare
    monkeypatch.setattr(op_module, "_prepare", lambda *args: prepared.append(args[1:]) or real_prepare(*args))
    monkeypatch.setattr(op_module, "_PREPARED", {})
    fused = TopkPlan("bucketed", "fused", num_buckets=16, per_bucket_k=2, select="bisect", num_warps=2)
    select = TopkPlan("exact", "select", select="radix", sort_with="launch", num_warps=2)
    for x in (torch.randn(3, 200), torch.randn(3, 200), torch.randn(5, 150)):
        x = x.to(KERNEL_DEVICE)
        values, indices = op_module._run(x, 7, True, True, fused, "interleaved", 0)
        expected = bucketed_topk_torch(x, 7, largest=True, sorted=True, num_buckets=16, per_bucket_k=2,
                                       layout="interleaved", seed=0)
        assert_equal(values, expected[0])
        assert_equal(indices, expected[1])
        values, _ = op_module._run(x, 7, True, True, select, "interleaved", 0)
        assert_equal(values, torch.topk(x, 7).values)
    assert [(args[0], args[3]) for args in prepared] == [(7, fused), (7, select)] * 2


def test_a_wide_bucket_plan_runs_the_wide_kernel():
    from topk_compiler.lowering import bucketed_topk as op_module
    from topk_compiler.lowering.bucketed_reference import bucketed_topk_torch
    from topk_compiler.lowering.plan import TopkPlan

    x = torch.randn(2, 700).to(KERNEL_DEVICE)
    for layout, select in (("interleaved", "bisect"), ("shuffled", "bitonic")):
        wide = TopkPlan("bucketed", "wide", num_buckets=8, per_bucket_k=40, select=select, num_warps=4)
        values, indices = op_module._run(x, 300, True, True, wide, layout, 5)
        expected = bucketed_topk_torch(x, 300, largest=True, sorted=True, num_buckets=8, per_bucket_k=40,
                                       layout=layout, seed=5)
        assert_equal(values, expected[0])
        assert_equal(values, x.gather(1, indices))


def test_a_share_plan_runs_the_share_kernel():
    """Each bucket keeps its share of k, in any layout, its threshold found by digits or bracketed:
    the reference's values, unsorted."""
    from topk_compiler.lowering import bucketed_topk as op_module
    from topk_compiler.lowering.bucketed_reference import bucketed_topk_torch
    from topk_compiler.lowering.plan import TopkPlan

    x = torch.randn(2, 700).to(KERNEL_DEVICE)
    for layout, select in (("interleaved", "bisect"), ("shuffled", "bracket"), ("contiguous", "bisect")):
        shares = TopkPlan("bucketed", "shares", num_buckets=8, per_bucket_k=38, select=select, num_warps=4)
        values, indices = op_module._run(x, 300, True, False, shares, layout, 5)
        expected = bucketed_topk_torch(x, 300, largest=True, sorted=True, num_buckets=8, per_bucket_k=0,
                                       layout=layout, seed=5, shares=True)
        assert_equal(values.sort(1, descending=True).values, expected[0])
        assert_equal(values, x.gather(1, indices))


def test_a_split_filtered_plan_is_exact():
    """The exact plan of three launches, its bound over two programs a row, both orientations."""
    from topk_compiler.lowering import bucketed_topk as op_module
    from topk_compiler.lowering.plan import TopkPlan

    x = torch.randn(3, 1500).to(KERNEL_DEVICE)
    split = TopkPlan("exact", "split_filtered", num_buckets=64, per_bucket_k=2, segments=2, select="radix",
                     sort_with="program", num_warps=2)
    for largest in (True, False):
        values, indices = op_module._run(x, 70, largest, True, split, "interleaved", 0)
        assert_equal(values, torch.topk(x, 70, largest=largest).values)
        assert_equal(values, x.gather(1, indices))


@settings(max_examples=12)  # every shortlisted kernel runs, in the interpreter without a GPU
@given(topk_inputs(), st.sampled_from([0.5, 0.9, 0.99, 1.0]), st.sampled_from(["interleaved", "contiguous", "shuffled"]))
def test_every_plan_a_first_call_may_pick_keeps_the_invariants(inputs, recall_target, layout):
    """The first call on a GPU times its shortlist and keeps the fastest, so every plan of the
    shortlist must be right, not only the cost model's pick. Rows as the op hands them to the
    kernels ([rows, n], at most 3 rows here); exact plans must equal torch.topk."""
    from unittest import mock

    from topk_compiler.lowering import bucketed_topk as op_module
    from topk_compiler.lowering import cost_model, plan
    from tests.lowering.test_cost_model import H100

    x, k, dim, largest, sorted_ = inputs
    n = x.shape[dim]
    x2d = x.movedim(dim, -1).reshape(-1, n)[:3].contiguous()
    if x.dtype == torch.float64 or not 0 < k < n:
        return  # torch.topk's own cases (no kernel runs)
    x2d = x2d.to(KERNEL_DEVICE)
    with mock.patch.object(plan, "_triton_ok", lambda device, dtype: True), \
            mock.patch.object(cost_model, "device_profile", lambda device: H100):
        plan.shortlist.cache_clear()
        try:
            approx, exact = plan.shortlist(x2d.shape[0], n, k, x.dtype, "cuda", recall_target, layout, sorted_)
        finally:
            plan.shortlist.cache_clear()
    expected = torch.topk(x2d.cpu(), k, dim=1, largest=largest, sorted=True).values
    for p in approx + exact:
        if p.kernel == "wide" and KERNEL_DEVICE == "cpu":
            continue  # minutes in the interpreter at these k; tests/kernels/test_wide_bucket_topk.py covers it
        values, indices = op_module._run(x2d, k, largest, sorted_, p, layout, 0)
        values, indices = values.cpu(), indices.cpu()
        check_invariants(x2d.cpu(), k, -1, largest, sorted_, values, indices)
        if p.algorithm == "exact":
            got = values if sorted_ else values.gather(1, order_keys(values, largest).argsort(1, descending=True))
            assert_equal(got, expected)


def test_a_torch_topk_plan_that_races_our_kernels_still_returns_torch_topk(monkeypatch):
    """A call planned as torch.topk that times our kernels first (``plan.races_torch``) goes the
    [rows, n] way, and whichever plan wins returns torch.topk's answer in the input's shape."""
    from topk_compiler.lowering import bucketed_topk as op_module

    raced = []
    monkeypatch.setattr(op_module, "_races_torch", lambda x, *args: raced.append(x.shape) or True)
    x = torch.randn(3, 5, 700)
    values, indices = approx_topk(x, 40, recall_target=1.0)
    expected = torch.topk(x, 40)
    assert raced == [x.shape]
    assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)
    # Along another dim the plan is torch.topk's without a race: its [rows, n] would be a copy.
    values, _ = approx_topk(x, 2, dim=1, recall_target=1.0)
    assert raced == [x.shape] and torch.equal(values, torch.topk(x, 2, dim=1).values)
