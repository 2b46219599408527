"""hire_logits_topk: exact values at every returned index, recall on structured weights, the
softmax normaliser's stated bound, and the dense fallback."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import KERNEL_DEVICE
from topk_compiler.lowering.hire_logits import dense_logits_topk, hire_logits_topk


def low_rank_weight(n, d, rank, noise, seed=0):
    """[n, d]: a rank-``rank`` matrix with a decaying spectrum plus ``noise`` Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    spectrum = 1.0 / torch.arange(1, rank + 1).float() ** 0.5
    w = (torch.randn(n, rank, generator=gen) * spectrum) @ torch.randn(rank, d, generator=gen) / d**0.5
    return w + noise * torch.randn(n, d, generator=gen) / d**0.5


def run(x, w, b, k, *, predictor="lowrank", rank=8, candidates=64, normalize="none", scale=1.0, largest=True,
        sorted=True, rewrite="always", out_dtype=None):
    return hire_logits_topk(x, w, b, k, largest, sorted, scale, normalize, out_dtype or x.dtype, predictor, rank,
                            candidates, rewrite)


def recall(indices, exact_indices):
    return sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(indices, exact_indices)) / exact_indices.numel()


@pytest.mark.parametrize("predictor,rank", [("lowrank", 16), ("int8", 0), ("int4", 0)])
def test_reaches_recall_on_low_rank_plus_noise(predictor, rank):
    w = low_rank_weight(4000, 64, 16, noise=0.05)
    x = torch.randn(64, 64)
    _, indices = run(x, w, None, 10, predictor=predictor, rank=rank, candidates=80)
    exact = torch.topk(x @ w.T, 10).indices
    assert recall(indices, exact) >= 0.95


def test_too_small_a_rank_misses():
    w = low_rank_weight(4000, 64, 32, noise=0.05)
    x = torch.randn(64, 64)
    _, indices = run(x, w, None, 10, rank=1, candidates=20)
    assert recall(indices, torch.topk(x @ w.T, 10).indices) < 0.8


@given(st.integers(1, 5), st.integers(1, 20), st.integers(20, 60), st.booleans(), st.booleans(),
       st.sampled_from(["lowrank", "int8", "int4"]), st.integers(0, 2**31 - 1))
@settings(max_examples=25)
def test_values_are_exact_at_returned_indices(rows, k, candidates, largest, with_bias, predictor, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(300, 24, generator=gen)
    b = torch.randn(300, generator=gen) if with_bias else None
    x = torch.randn(rows, 24, generator=gen)
    values, indices = run(x, w, b, k, predictor=predictor, rank=4, candidates=candidates, scale=0.7,
                          largest=largest)
    logits = F.linear(x, w, b) * 0.7
    assert values.shape == indices.shape == (rows, k)
    torch.testing.assert_close(values, logits.gather(1, indices), atol=1e-5, rtol=1e-5)
    assert (indices.sort(1).values.diff(dim=1) > 0).all()
    keys = values if largest else -values
    assert (keys[:, :-1] >= keys[:, 1:]).all()


def test_all_candidates_is_torch_topk():
    w, b, x = torch.randn(200, 16), torch.randn(200), torch.randn(3, 2, 16)
    values, indices = run(x, w, b, 7, candidates=200)
    expected = torch.topk(F.linear(x, w, b), 7)
    assert torch.equal(indices, expected.indices)
    torch.testing.assert_close(values, expected.values)


def test_rows_do_not_depend_on_their_batch():
    w = low_rank_weight(2000, 32, 8, noise=0.3)
    x = torch.randn(6, 32)
    batched = run(x, w, None, 5, rank=4, candidates=30)
    for m in range(6):
        alone = run(x[m:m + 1], w, None, 5, rank=4, candidates=30)
        assert torch.equal(alone[1], batched[1][m:m + 1])


@pytest.mark.parametrize("normalize", ["softmax", "log_softmax"])
def test_softmax_normaliser_within_stated_bound(normalize):
    w = low_rank_weight(3000, 48, 12, noise=0.3, seed=1) * 4
    x = torch.randn(16, 48)
    kc = 60
    values, indices = run(x, w, None, 5, rank=12, candidates=kc, normalize=normalize)
    s = x @ w.T
    exact = (torch.softmax if normalize == "softmax" else torch.log_softmax)(s, dim=-1).gather(1, indices)
    from topk_compiler.lowering.hire_predictor import build_predictor

    p = build_predictor(w, "lowrank", 12).scores(x)
    candidates = p.topk(kc, dim=1).indices
    outside = torch.ones_like(s, dtype=torch.bool).scatter_(1, candidates, False)
    rho = (s.softmax(-1) * outside).sum(-1)
    delta = ((p - s).abs() * outside).amax(-1)
    bound = rho * (delta.exp() - 1)  # |Z_hat / Z - 1|
    if normalize == "softmax":
        ratio_err = (values / exact - 1).abs()
        assert (ratio_err <= (bound / (1 - bound))[:, None] + 1e-5).all()
    else:
        assert ((values - exact).abs() <= -torch.log1p(-bound)[:, None] + 1e-5).all()
    assert (values - exact).abs().max() > 0  # the normaliser is an estimate, not the exact one


def test_float32_cast_of_half_logits():
    w, x = torch.randn(100, 16).half(), torch.randn(2, 16).half()
    values, indices = run(x, w, None, 4, candidates=100, normalize="softmax", out_dtype=torch.float32)
    expected = torch.softmax(F.linear(x, w).float(), -1).topk(4)
    assert values.dtype == torch.float32 and torch.equal(indices, expected.indices)
    torch.testing.assert_close(values, expected.values)


def test_auto_runs_dense_where_dense_is_cheaper():
    w, x = torch.randn(3000, 32), torch.randn(2048, 32)
    v, i = run(x, w, None, 5, rank=1, candidates=6, rewrite="auto")
    ev, ei = dense_logits_topk(x, w, None, 5, True, True, 1.0, "none", x.dtype)
    assert torch.equal(i, ei) and torch.equal(v, ev)


def test_opcheck():
    w, b, x = torch.randn(300, 16), torch.randn(300), torch.randn(2, 16)
    for normalize in ("none", "softmax"):
        torch.library.opcheck(hire_logits_topk, (x, w, b, 5, True, True, 1.0, normalize, torch.float32, "lowrank", 4,
                                                 40, "always"))


@pytest.mark.parametrize("change,match", [
    (dict(k=500), "k must be"), (dict(scale=-1.0), "scale"), (dict(normalize="sigmoid"), "normalize"),
    (dict(predictor="int2"), "predictor"), (dict(rank=0), "rank"), (dict(candidates=0), "candidates"),
    (dict(rewrite="never"), "rewrite"),
])
def test_bad_arguments(change, match):
    args = dict(k=5, scale=1.0, normalize="none", predictor="lowrank", rank=4, candidates=20, rewrite="always")
    args.update(change)
    with pytest.raises(ValueError, match=match):
        hire_logits_topk(torch.randn(2, 8), torch.randn(300, 8), None, args["k"], True, True, args["scale"],
                         args["normalize"], torch.float32, args["predictor"], args["rank"], args["candidates"],
                         args["rewrite"])
    with pytest.raises(ValueError, match="weight"):
        run(torch.randn(2, 8), torch.randn(300, 9), None, 5)


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("normalize", ["none", "softmax"])
@pytest.mark.parametrize("predictor", ["lowrank", "int4"])
def test_kernel_path_equals_torch_path(monkeypatch, rows, normalize, predictor):
    """The kernel path (Triton kernels; on a CPU machine run by the interpreter) against the
    plain-torch path on the CPU."""
    from topk_compiler.lowering import hire_predictor

    w = low_rank_weight(1500, 32, 8, noise=0.3)
    b = torch.randn(1500) * 0.1
    x = torch.randn(rows, 32)
    expected = run(x, w, b, 6, predictor=predictor, rank=6, candidates=40, normalize=normalize)
    monkeypatch.setattr(hire_predictor, "uses_kernel", lambda t: True)
    got = run(x.to(KERNEL_DEVICE), w.to(KERNEL_DEVICE), b.to(KERNEL_DEVICE), 6, predictor=predictor, rank=6,
              candidates=40, normalize=normalize)
    assert torch.equal(got[1].cpu(), expected[1])
    torch.testing.assert_close(got[0].cpu(), expected[0], atol=1e-4, rtol=1e-4)
