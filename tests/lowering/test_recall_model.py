import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from topk_compiler import expected_recall, guaranteed_recall, measured_recall
from topk_compiler.lowering.bucketed_reference import bucketed_topk_torch
from topk_compiler.lowering.recall_model import (bucket_shares, bucket_sizes, expected_recall_of_shares,
                                                 guaranteed_recall_of_shares, survivors)


def poisson_recall(lam: float, kb: int) -> float:
    """E[min(Poisson(lam), kb)] / lam, the large-n limit (arXiv 2412.04358)."""
    tail = sum(1 - sum(math.exp(-lam) * lam**x / math.factorial(x) for x in range(j)) for j in range(1, kb + 1))
    return tail / lam


# (n, k, num_buckets, per_bucket_k): k/b from 0.06 to 8, kb from 1 to 8, n not a multiple of b.
POINTS = [
    (4096, 64, 1024, 1), (4096, 256, 256, 2), (8192, 512, 256, 4), (5000, 300, 64, 6),
    (8192, 2048, 1024, 4), (3000, 400, 50, 8), (10000, 100, 128, 1), (1023, 200, 100, 3),
]


@pytest.mark.parametrize("layout", ["interleaved", "contiguous", "shuffled"])
@pytest.mark.parametrize("n,k,b,kb", POINTS)
def test_model_matches_measured_recall_on_random_inputs(n, k, b, kb, layout):
    x = torch.randn(400, n)
    _, idx = bucketed_topk_torch(x, k, largest=True, sorted=False, num_buckets=b, per_bucket_k=kb, layout=layout, seed=1)
    measured = measured_recall(x, idx, k)
    assert abs(measured - expected_recall(n, k, b, kb, layout)) < 0.02


@pytest.mark.parametrize("n,k,b,kb", POINTS)
def test_any_order_bound_is_below_random_order_value_and_above_poisson(n, k, b, kb):
    bound = guaranteed_recall(n, k, b, kb)
    assert bound <= expected_recall(n, k, b, kb) + 1e-9
    if kb < -(-n // b):
        assert bound >= poisson_recall(k / b, kb) - 1e-9


# (n, k, num_buckets): shares from 1 to 180 a bucket, k and n that b divides or not.
SHARE_POINTS = [(14336, 1434, 8), (4096, 1000, 16), (3000, 333, 4), (2000, 64, 32), (1030, 200, 16)]


@pytest.mark.parametrize("layout", ["interleaved", "contiguous", "shuffled"])
@pytest.mark.parametrize("n,k,b", SHARE_POINTS)
def test_shares_model_matches_measured_recall_on_random_inputs(n, k, b, layout):
    """Each bucket keeping its share of k: exactly k survive, and the recall measured on random
    inputs is the model's (the any-order bound's for "shuffled", which sits just below it)."""
    x = torch.randn(200, n)
    _, idx = bucketed_topk_torch(x, k, largest=True, sorted=False, num_buckets=b, per_bucket_k=0, layout=layout,
                                 seed=1, shares=True)
    assert idx.shape == (200, k) and (idx.sort(1).values.diff(dim=1) > 0).all()
    model = (guaranteed_recall_of_shares(n, k, b) if layout == "shuffled"
             else expected_recall_of_shares(n, k, b, layout))
    assert abs(measured_recall(x, idx, k) - model) < 0.02


@given(k=st.integers(0, 5000), b=st.integers(1, 64))
def test_bucket_shares_sum_to_k_and_differ_by_one_at_most(k, b):
    shares = bucket_shares(k, b)
    assert len(shares) == b and sum(shares) == k and max(shares) - min(shares) <= 1
    assert shares == sorted(shares, reverse=True)


@pytest.mark.parametrize("n,k,b", SHARE_POINTS)
def test_shares_recall_lies_between_the_uniform_quotas_around_it(n, k, b):
    """Shares of k // b and k // b + 1 keep fewer than quotas of k // b + 1 everywhere and more
    than k // b everywhere: the recall lies between the two uniform models."""
    shares = expected_recall_of_shares(n, k, b)
    assert expected_recall(n, k, b, k // b) - 1e-12 <= shares <= expected_recall(n, k, b, -(-k // b)) + 1e-12
    assert guaranteed_recall_of_shares(n, k, b) <= shares + 1e-9


def test_large_n_tends_to_poisson_model():
    for lam, kb in [(0.5, 1), (2.0, 4), (4.0, 6)]:
        b = 1024
        k = int(lam * b)
        assert abs(expected_recall(b * 4096, k, b, kb) - poisson_recall(lam, kb)) < 2e-3


@given(n=st.integers(2, 5000), b=st.integers(1, 600), layout=st.sampled_from(["interleaved", "contiguous", "shuffled"]))
def test_bucket_sizes_partition_the_axis(n, b, layout):
    sizes = bucket_sizes(n, b, layout)
    assert sum(count for count in sizes.values()) == b
    assert sum(size * count for size, count in sizes.items()) == n


@given(n=st.integers(10, 3000), data=st.data())
def test_recall_grows_with_per_bucket_k_and_keeping_everything_is_exact(n, data):
    k = data.draw(st.integers(1, n))
    b = data.draw(st.integers(1, n))
    recalls = [expected_recall(n, k, b, kb) for kb in range(1, 6)]
    assert all(0.0 <= r <= 1.0 for r in recalls)
    assert recalls == sorted(recalls)
    assert expected_recall(n, k, b, -(-n // b)) == pytest.approx(1.0)
    assert survivors(n, b, -(-n // b)) == n


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="k <= n"):
        expected_recall(10, 11, 2, 1)
    with pytest.raises(ValueError, match="num_buckets"):
        expected_recall(10, 5, 0, 1)
    with pytest.raises(TypeError, match="per_bucket_k"):
        expected_recall(10, 5, 2, 1.5)


def test_measured_recall_counts_ties_once_and_nan_as_largest():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, float("nan")]])
    assert measured_recall(x, torch.tensor([[4, 1, 2]]), 3) == 1.0
    assert measured_recall(x, torch.tensor([[4, 1, 0]]), 3) == pytest.approx(2 / 3)
    assert measured_recall(x, torch.tensor([[1, 2, 3]]), 3) == pytest.approx(2 / 3)
    assert measured_recall(x, torch.tensor([[0, 3]]), 2, largest=False) == 1.0


@pytest.mark.parametrize("n,k,b,kb", [(2048, 20, 64, 3), (4099, 40, 128, 3), (8192, 64, 256, 3)])
def test_uncertified_probability_matches_simulation(n, k, b, kb):
    """The share of random rows in which some interleaved bucket holds kb or more of the top k
    (k / b <= 1/3, where the planner uses it)."""
    from topk_compiler.lowering.recall_model import uncertified_probability

    trials = 4000
    gen = torch.Generator().manual_seed(n)
    positions = torch.rand(trials, n, generator=gen).topk(k, dim=1).indices  # the top k of a random order
    counts = torch.zeros(trials, b, dtype=torch.int64).scatter_add_(1, positions % b, torch.ones_like(positions))
    simulated = (counts.max(1).values >= kb).float().mean().item()
    model = uncertified_probability(n, k, b, kb)
    assert 0.02 < model < 0.98
    assert abs(model - simulated) < 4 * (model * (1 - model) / trials) ** 0.5 + 0.01
