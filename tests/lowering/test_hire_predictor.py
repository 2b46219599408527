"""HiRE predictors: the low-rank one is the truncated SVD, the quantized ones round-trip, and the
cache rebuilds a predictor when its weight changes."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from topk_compiler.lowering.hire_predictor import (
    PREDICTORS,
    build_predictor,
    pack_int4,
    predictor_for,
    rows_fit_kernels,
    transposed_copy,
    unpack_int4,
)


def test_lowrank_scores_are_the_truncated_svd():
    w = torch.randn(60, 20, dtype=torch.float64).float()
    x = torch.randn(5, 20)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    for rank in (1, 5, 20):
        expected = x @ (u[:, :rank] * s[:rank] @ vh[:rank]).T
        got = build_predictor(w, "lowrank", rank).scores(x)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_lowrank_bias_and_rank_clipped():
    w, b, x = torch.randn(10, 4), torch.randn(10), torch.randn(3, 4)
    p = build_predictor(w, "lowrank", 99)
    assert p.rank == 4
    torch.testing.assert_close(p.scores(x, b), x @ w.T + b, atol=1e-4, rtol=1e-4)


@given(st.integers(1, 9), st.integers(1, 17), st.integers(0, 2**31 - 1))
def test_int4_packing_round_trips(n, d, seed):
    q = torch.randint(-8, 8, (n, d), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (n, (d + 1) // 2)
    assert torch.equal(unpack_int4(packed, d), q)


@pytest.mark.parametrize("kind,bound", [("int8", 0.5 / 127), ("int4", 0.5 / 7)])
def test_quantized_error_is_half_a_step(kind, bound):
    w = torch.randn(40, 33)
    p = build_predictor(w, kind)
    err = (p.dequantized_rows(0, 40) - w).abs() / w.abs().amax(dim=1, keepdim=True)
    assert err.max() <= bound + 1e-6
    x = torch.randn(2, 33)
    torch.testing.assert_close(p.scores(x), x @ p.dequantized_rows(0, 40).T)


def test_bad_arguments():
    with pytest.raises(ValueError, match="predictor"):
        build_predictor(torch.randn(3, 3), "int2")
    with pytest.raises(ValueError, match="rank"):
        build_predictor(torch.randn(3, 3), "lowrank", 0)
    with pytest.raises(ValueError, match="2-D"):
        build_predictor(torch.randn(3), "int8")


def test_cache_builds_once_and_rebuilds_when_the_weight_changes():
    PREDICTORS.clear()
    w = torch.nn.Parameter(torch.randn(30, 8))
    first = predictor_for(w, "lowrank", 4)
    builds = PREDICTORS.builds
    assert predictor_for(w, "lowrank", 4) is first and PREDICTORS.builds == builds
    assert predictor_for(w, "int8") is not first  # another kind: another entry
    with torch.no_grad():
        w.mul_(-1)  # bumps the version counter
    second = predictor_for(w, "lowrank", 4)
    assert second is not first
    x = torch.randn(2, 8)
    torch.testing.assert_close(second.scores(x), -first.scores(x), atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        w.data = torch.randn(30, 8)  # new storage
    third = predictor_for(w, "lowrank", 4)
    assert third is not second
    torch.testing.assert_close(third.scores(x), build_predictor(w, "lowrank", 4).scores(x))


def test_cache_entry_dies_with_its_weight():
    PREDICTORS.clear()
    w = torch.randn(30, 8)
    predictor_for(w, "int8")
    del w
    predictor_for(torch.randn(5, 5), "int8")  # any insertion sweeps dead entries
    assert len(PREDICTORS) == 1


def test_transposed_copy_is_cached_and_follows_the_weight():
    w = torch.randn(6, 9)
    t = transposed_copy(w)
    assert torch.equal(t, w.T) and t.is_contiguous() and transposed_copy(w) is t
    w.add_(1)
    assert torch.equal(transposed_copy(w), w.T)


def test_inference_tensors_have_no_version_but_are_cached():
    with torch.inference_mode():
        w = torch.randn(20, 6)
        assert predictor_for(w, "int4") is predictor_for(w, "int4")


def test_rows_past_the_kernels_grids_take_the_plain_torch_path():
    from topk_compiler.kernels.sparse_ffn import MAX_ROWS

    d = 2
    assert rows_fit_kernels(torch.empty(MAX_ROWS, d))
    assert rows_fit_kernels(torch.empty(4, MAX_ROWS // 4, d))
    assert not rows_fit_kernels(torch.empty(MAX_ROWS + 1, d))
    assert not rows_fit_kernels(torch.empty(2, MAX_ROWS // 2 + 1, d))
