"""The cost model: concrete and symbolic sizes, the fitted profile, and the planner's shortlist."""

import dataclasses

import pytest
import sympy
import torch

from topk_compiler.kernels import MAX_GRID_YZ, next_pow2
from topk_compiler.lowering import cost_model, plan
from topk_compiler.lowering.calibration import CUDA_WEIGHTS

H100 = cost_model.DeviceProfile("cuda", "NVIDIA H100 80GB HBM3", 132, 3.0e12,
                                {**cost_model._DEFAULT_CUDA_WEIGHTS, **CUDA_WEIGHTS["H100"]})


def h100_shortlists(monkeypatch, *calls, recall_target=0.95):
    """``plan.shortlist`` of each (rows, n, k, dtype) on the H100 profile, Triton available."""
    monkeypatch.setattr(cost_model, "device_profile", lambda device: H100)
    monkeypatch.setattr(plan, "_triton_ok", lambda device, dtype: True)
    plan.shortlist.cache_clear()
    try:
        return [plan.shortlist(*call, "cuda", recall_target) for call in calls]
    finally:
        plan.shortlist.cache_clear()


def test_fitted_weights_cover_every_term():
    assert set(CUDA_WEIGHTS["H100"]) == set(cost_model.WORK_TERMS)
    assert all(w >= 0 for w in CUDA_WEIGHTS["H100"].values())


@pytest.mark.parametrize("formula", ["fused", "split", "select", "filtered", "split_filtered", "certified", "torch"])
def test_formulas_evaluate_symbolically_and_agree_with_concrete_sizes(formula):
    n = sympy.Symbol("n", positive=True, integer=True)
    args = {
        "fused": lambda n_: cost_model.fused_time(64, n_, 256, 512, 2, 2, True, "bisect", "program", H100),
        "split": lambda n_: cost_model.split_time(8, n_, 256, 512, 2, 4, 2, True, "radix", "launch", H100),
        "select": lambda n_: cost_model.select_time(64, n_, 256, 2, True, "bisect", "program", H100),
        "filtered": lambda n_: cost_model.filtered_time(64, n_, 256, 512, 2, 2, False, "bisect", "program", H100),
        "certified": lambda n_: cost_model.certified_time(64, n_, 256, 512, 4, 2, True, "bisect", "launch", 0.1, H100),
        "split_filtered": lambda n_: cost_model.split_filtered_time(64, n_, 256, 512, 2, 4, 2, True, "radix",
                                                                    "program", H100),
        "torch": lambda n_: cost_model.torch_topk_time(64, n_, 256, 2, H100),
    }[formula]
    expr = args(n)
    assert isinstance(expr, sympy.Expr) and expr.free_symbols == {n}
    assert float(expr.subs(n, 32768)) == pytest.approx(float(args(32768)), rel=1e-9)


def test_longer_rows_cost_more():
    times = [cost_model.fused_time(256, n, 64, 512, 2, 2, True, "bisect", "program", H100) for n in (8192, 65536)]
    assert times[0] < times[1]
    times = [cost_model.torch_topk_time(256, n, 64, 2, H100) for n in (8192, 65536)]
    assert times[0] < times[1]


def test_shortlist_always_offers_torch_topk_among_exact_plans(monkeypatch):
    ((approx, exact),) = h100_shortlists(monkeypatch, (16384, 8192, 64, torch.float16))
    # The cheapest SHORTLIST plans by the model, then the other finish of the cheapest bucketing.
    assert 1 <= len(approx) <= plan.SHORTLIST + 1 and any(p.kernel == "torch" for p in exact)
    assert all(p.expected_recall >= 0.95 for p in approx)
    cheapest = [p.predicted_us for p in approx[:plan.SHORTLIST]]
    assert cheapest == sorted(cheapest)


def test_cpu_profile_keeps_torch_topk():
    chosen = plan.plan_topk(64, 65536, 64, torch.float32, "cpu", 0.95)
    assert chosen.kernel == "torch" and "exact predicted faster" in chosen.reason
    assert dataclasses.asdict(chosen)["predicted_us"] > 0


def test_h200_borrows_the_h100_weights():
    h200 = cost_model._calibrated_weights("NVIDIA H200")
    assert h200 is CUDA_WEIGHTS["H100"]
    assert cost_model._calibrated_weights("NVIDIA A100-SXM4-80GB") is None


def test_fused_warps_keep_the_grid_resident_without_spilling():
    assert plan.fused_warps(16384, 256, 256, 132) == 1  # many rows: one warp each fills the SMs
    assert plan.fused_warps(1024, 1024, 1024, 132) == 4
    assert plan.fused_warps(256, 1024, 1024, 132) == 8  # few rows: every warp a program may have
    assert plan.fused_warps(16384, 1024, 4096, 132) == 8  # 4096 candidates need 8 warps in registers
    assert plan.fused_warps(16384, 32, 32, 132) == 1


def test_shortlist_times_both_warp_counts_of_a_fused_bucketing(monkeypatch):
    """The cost model does not see warps: where the grid-filling count differs from the default,
    the first call times both."""
    ((approx, _),) = h100_shortlists(monkeypatch, (16384, 8192, 64, torch.float16))
    fused = {}
    for p in approx:
        if p.kernel == "fused":
            fused.setdefault((p.num_buckets, p.per_bucket_k), set()).add(p.num_warps)
    best = approx[0]
    assert best.kernel == "fused" and best.num_warps == plan.fused_warps(16384, best.num_buckets, best.num_buckets * next_pow2(best.per_bucket_k), 132)
    assert fused[(best.num_buckets, best.per_bucket_k)] == {best.num_warps, plan.warps_for(best.num_buckets, best.num_buckets * next_pow2(best.per_bucket_k))}


def test_rank_sort_is_timed_for_few_rows_of_large_k_only(monkeypatch):
    """Priced with a borrowed term, the rank sort is always among the plans the first call times
    where it may pay (few rows, large k), and never offered elsewhere."""
    from topk_compiler.kernels import select_topk

    assert cost_model.RANK_BLOCK_I == select_topk.RANK_BLOCK_I
    few_rows, many_rows, small_k = h100_shortlists(monkeypatch, (16, 14336, 1434, torch.float32),
                                                   (1024, 32768, 2048, torch.bfloat16), (16, 14336, 64, torch.float32))
    for plans in few_rows:
        assert sum(p.sort_with == "rank" for p in plans) >= 1
        # Beside the model's SHORTLIST: torch.topk and one plan of each kind whose price is borrowed.
        assert len([p for p in plans if p.sort_with != "rank"
                    and p.kernel not in ("torch", "wide", "split_filtered")]) <= plan.SHORTLIST
    # Fewer rows than half the SMs: the split kernel sorting by rank races too (both its
    # launches spread each row over several programs).
    assert any(p.kernel == "split" and p.sort_with == "rank" for p in few_rows[0])
    assert not any(p.sort_with == "rank" for plans in many_rows + small_k for p in plans)
    t = cost_model.rank_sort_time(16, 1434, H100)
    assert cost_model.rank_sort_time(32, 1434, H100) > t > cost_model.rank_sort_time(16, 700, H100)
    k = sympy.Symbol("k", positive=True, integer=True)
    assert float(cost_model.rank_sort_time(16, k, H100).subs(k, 1434)) == pytest.approx(t, rel=1e-9)


def test_wide_buckets_race_for_few_rows_of_large_k_only(monkeypatch):
    """The wide-bucket plan, with the fewest slots per bucket meeting the target, is among the
    plans a first call times for few rows of large k, with each of its finishes where a bitonic
    network may keep the bucket's top; not for many rows or small k."""
    from topk_compiler.kernels.wide_bucket_topk import DIGIT_BITS, MAX_NETWORK_KB, MAX_SLOTS

    assert plan.MAX_WIDE_SLOTS == MAX_SLOTS and cost_model.WIDE_DIGIT_BITS == DIGIT_BITS
    assert plan.MAX_BITONIC_K == MAX_NETWORK_KB
    few_rows, many_rows, small_k = (approx for approx, _ in h100_shortlists(
        monkeypatch, (16, 14336, 1434, torch.float32), (1024, 32768, 2048, torch.bfloat16),
        (16, 14336, 64, torch.float32)))
    wides = [p for p in few_rows if p.kernel == "wide"]
    assert sorted(p.select for p in wides) == ["bisect", "bitonic"]
    wide = wides[0]
    b, kb = wide.num_buckets, wide.per_bucket_k
    assert next_pow2(kb) <= plan.MAX_BITONIC_K
    assert wide.expected_recall >= 0.95 and b * kb >= 1434 and 16 * b <= plan.WIDE_PROGRAMS_PER_SM * 132
    assert kb == -(-1434 // b) or plan.recall_of(14336, 1434, b, kb - 1, "interleaved") < 0.95
    assert not any(p.kernel == "wide" for p in many_rows + small_k)
    for select in ("bisect", "bitonic"):
        assert (cost_model.wide_time(64, 14336, 1434, b, kb, 4, select, H100)
                > cost_model.wide_time(16, 14336, 1434, b, kb, 4, select, H100))


def test_the_model_prices_the_candidate_slots_the_exact_kernels_allocate():
    from topk_compiler.kernels.filtered_topk import candidate_slots

    for k in (1, 50, 64, 100, 1434, 2048):
        assert cost_model._candidate_slots(k) == candidate_slots(k)
        assert candidate_slots(k) >= 2 * k


def test_certified_exact_plans_for_long_rows_of_small_k(monkeypatch):
    """256 x 128256 fp32 k=50: the certified kernel is among the exact plans, with two or more
    slots a bucket, survivors in registers, and most calls certified."""
    ((_, exact),) = h100_shortlists(monkeypatch, (256, 128256, 50, torch.float32), recall_target=1.0)
    certified = [p for p in exact if p.kernel == "certified"]
    assert certified and all(p.algorithm == "exact" and p.select != "bitonic" for p in certified)
    for b, kb, flagged in plan.certified_bucketings(256, 128256, 50, 4):
        assert kb >= 2 and b * next_pow2(kb) <= plan.MAX_REGISTER_SURVIVORS[4] and flagged <= 1 - plan.CERTIFIED_CALLS


def test_shortlist_times_both_finishes_of_the_cheapest_fused_bucketing(monkeypatch):
    """Small k: the bitonic network and the threshold-then-sort finish of the cheapest bucketing
    are both timed at the first call; large k has no network (k > MAX_BITONIC_K) to add."""
    small_k, large_k = (approx for approx, _ in h100_shortlists(
        monkeypatch, (16384, 8192, 64, torch.float16), (1024, 32768, 2048, torch.bfloat16)))
    lead = small_k[0]
    same = [p for p in small_k if (p.kernel, p.num_buckets, p.per_bucket_k, p.num_warps)
            == (lead.kernel, lead.num_buckets, lead.per_bucket_k, lead.num_warps)]
    assert {p.select == "bitonic" for p in same} == {True, False}
    assert not any(p.select == "bitonic" for p in large_k)
    assert len(large_k) == len(set(large_k))


def test_torch_topk_plans_race_our_kernels_predicted_close_to_it(monkeypatch):
    """Where the model picks torch.topk but prices a Triton plan within TIME_WITHIN of it, the
    first call on a GPU times both; where every Triton plan is far off, or on a CPU, it does not."""
    monkeypatch.setattr(cost_model, "device_profile", lambda device: H100)
    monkeypatch.setattr(plan, "_triton_ok", lambda device, dtype: True)
    plan.shortlist.cache_clear()
    plan.races_torch.cache_clear()
    try:
        close = (1024, 16384, 2048, torch.float32)
        far = (4, 2**20, 2**19, torch.float32)
        assert plan.plan_topk(*close, "cuda", 1.0).kernel == "torch" and plan.races_torch(*close, "cuda", 1.0)
        assert plan.plan_topk(*far, "cuda", 1.0).kernel == "torch" and not plan.races_torch(*far, "cuda", 1.0)
        assert not plan.races_torch(*close, "cpu", 1.0)
        _, exact = plan.shortlist(*close, "cuda", 1.0)
        torch_us = next(p.predicted_us for p in exact if p.kernel == "torch")
        assert any(p.kernel != "torch" and p.predicted_us <= plan.TIME_WITHIN * torch_us for p in exact)
    finally:
        plan.shortlist.cache_clear()
        plan.races_torch.cache_clear()


def test_fused_plans_cap_registers_where_many_programs_share_an_sm(monkeypatch):
    """16 survivors a thread over many rows: capped (stage 1 then streams with more programs an
    SM), fp32 keys less tightly; few rows, fewer survivors a thread or 16 warps: not capped. The
    exact selection is raced capped and not."""
    (large_k, _), (few_rows, _), (fp32, _), (_, exact) = h100_shortlists(
        monkeypatch, (1024, 32768, 2048, torch.bfloat16), (64, 131072, 2048, torch.bfloat16),
        (1024, 16384, 2048, torch.float32), (4096, 4096, 512, torch.bfloat16), recall_target=0.95)
    lead = large_k[0]
    assert (lead.kernel, lead.num_buckets * next_pow2(lead.per_bucket_k), lead.num_warps) == ("fused", 4096, 8)
    assert lead.max_registers == plan.REGISTER_CAP
    assert all(p.max_registers == 0 for p in few_rows)
    assert fp32[0].kernel == "fused" and fp32[0].max_registers == plan.WIDE_KEY_REGISTER_CAP
    assert {p.max_registers for p in exact if p.kernel == "select"} == {0, plan.REGISTER_CAP}
    ((_, certified),) = h100_shortlists(monkeypatch, (256, 128256, 50, torch.float32), recall_target=1.0)
    lead = certified[0]
    assert lead.kernel == "certified" and lead.num_buckets * next_pow2(lead.per_bucket_k) == 4096
    assert {p.max_registers for p in certified if (p.kernel, p.num_buckets, p.per_bucket_k)
            == (lead.kernel, lead.num_buckets, lead.per_bucket_k)} == {0, plan.WIDE_KEY_REGISTER_CAP}
    assert plan.register_cap(1024, 2048, 8, 2, 132) == 0  # 8 a thread: caps measured no faster
    assert plan.register_cap(1024, 8192, 16, 2, 132) == 0
    assert plan.register_cap(4096, 1024, 2, 2, 132) == plan.REGISTER_CAP


def test_filtered_kernel_steps_shorter_where_its_rows_fill_the_gpu():
    """Measured at 1024 x 32768 k=2048: 2048 elements a step against the kernel's 4096 (one
    program an SM); few rows or few candidates keep the default."""
    assert plan.filter_step(1024, 2048, 132) == plan.FILTER_STEP
    assert plan.filter_step(16, 2048, 132) is None
    assert plan.filter_step(1024, 256, 132) is None


def test_split_filtered_plans_race_wherever_they_run(monkeypatch):
    """Priced with another kernel's terms, the split filtered kernel is in every exact shortlist
    (here the cheapest of it at 1024 x 32768, where the model prices it far above torch.topk), its
    bound over enough programs a row to fill the SMs at few rows, each with a warp of lanes and
    survivors for its share of k."""
    few, many = h100_shortlists(monkeypatch, (64, 131072, 2048, torch.bfloat16), (1024, 32768, 2048, torch.bfloat16),
                                recall_target=1.0)
    for (_, exact), rows in ((few, 64), (many, 1024)):
        split = [p for p in exact if p.kernel == "split_filtered"]
        assert split and all(p.algorithm == "exact" and p.select != "bitonic" for p in split)
        for p in split:
            assert p.num_buckets // p.segments >= plan.MIN_SEGMENT_LANES
            assert p.num_buckets // p.segments * next_pow2(p.per_bucket_k) >= -(-2048 // p.segments)
            assert p.segments == (1 if rows >= H100.processors else 4)
    assert all(p.num_warps == plan.warps_for(4096, 4096) for p in exact if p.kernel == "split_filtered")


def test_filtered_costs_use_the_kernels_constants():
    from topk_compiler.kernels.filtered_topk import BOUND_BITS, SPLIT_FILTER_BLOCK

    assert cost_model.SPLIT_FILTER_BLOCK == SPLIT_FILTER_BLOCK
    assert cost_model.BOUND_BITS == BOUND_BITS


def test_no_split_filtered_plan_past_the_grid(monkeypatch):
    """The split kernel's filtering pass puts a row's blocks on the grid's second dimension
    (at most 65535): a longer row gets no such plan, and its exact plans are others."""
    longest = cost_model.SPLIT_FILTER_BLOCK * MAX_GRID_YZ
    assert list(plan.split_filtered_options(1, longest, 2048, 2, 132))
    assert not list(plan.split_filtered_options(1, longest + 1, 2048, 2, 132))
    (_, shorter), (_, longer) = h100_shortlists(monkeypatch, (1, longest, 2048, torch.bfloat16),
                                                (1, 2**24, 2048, torch.bfloat16), recall_target=1.0)
    assert any(p.kernel == "split_filtered" for p in shorter)
    assert longer and all(p.kernel != "split_filtered" for p in longer)


def test_share_plans_race_for_unsorted_few_rows_of_large_k_only(monkeypatch):
    """Each bucket keeping its share of k (one launch, unsorted) is among the plans a first call
    times for few rows of large k, at every bucket count whose recall meets the target; never for
    sorted output (sorted by rank after it, it measured twice the wide kernel's time), many rows
    or small k."""
    for sorted_ in (False, True):
        monkeypatch.setattr(cost_model, "device_profile", lambda device: H100)
        monkeypatch.setattr(plan, "_triton_ok", lambda device, dtype: True)
        plan.shortlist.cache_clear()
        try:
            few_rows, many_rows, small_k = (
                plan.shortlist(rows, n, k, dtype, "cuda", 0.95, "interleaved", sorted_)[0]
                for rows, n, k, dtype in ((16, 14336, 1434, torch.float32), (1024, 32768, 2048, torch.bfloat16),
                                          (16, 14336, 64, torch.float32)))
        finally:
            plan.shortlist.cache_clear()
        shares = [p for p in few_rows if p.kernel == "shares"]
        expected = [] if sorted_ else [b for b in plan.WIDE_BUCKET_CHOICES
                                       if plan.recall_of_shares(14336, 1434, b, "interleaved") >= 0.95]
        # Each bucket count by digits and bracketed: the first call races both.
        assert sorted((p.num_buckets, p.select) for p in shares) == [(b, s) for b in expected
                                                                     for s in ("bisect", "bracket")]
        assert sorted_ or len(expected) >= 2
        for share in shares:
            b = share.num_buckets
            assert share.per_bucket_k == -(-1434 // b) and share.expected_recall >= 0.95
            assert plan.recall_of_shares(14336, 1434, b, "interleaved") == share.expected_recall
            # 8 keys a thread: 4 warps over buckets of 1024 slots, 8 over 2048 and 4096.
            assert share.num_warps == {16: 4, 8: 8, 4: 8}[b]
        assert not any(p.kernel == "shares" for p in many_rows + small_k)
    assert cost_model.shares_time(32, 14336, 1434, 8, 4, H100) > cost_model.shares_time(16, 14336, 1434, 8, 4, H100)
