"""Expected recall of bucketed two-stage top-k, and recall as measured.

Stage 1 keeps the top ``per_bucket_k`` (kb) of each of ``num_buckets`` (b) buckets; stage 2 takes
the exact top-k of the survivors. Every true top-k item that survives stage 1 is in the output,
so recall = (true top-k items that survive) / k = sum over buckets of min(X_j, kb) / k, where
X_j counts the true top-k items in bucket j.

* Random input order (any layout): bucket j is a uniformly random subset of its size m_j, so X_j
  is hypergeometric(n, k, m_j). :func:`expected_recall` sums E[min(X_j, kb)] exactly; for large n
  it tends to the Poisson(k/b) model of arXiv 2412.04358.
* Any input order with the "shuffled" layout: each run of b consecutive elements is rotated by an
  independent uniform offset, so a run holding c top-k items puts one into bucket j with
  probability c/b, independently across runs. X_j is then a Poisson-binomial over the G runs with
  mean k/b, and by Hoeffding (1956) E[min(X_j, kb)] is at least its value for Binomial(G, k/(bG)).
  :func:`guaranteed_recall` is that bound, which holds whatever the order (in expectation over
  the rotation offsets); it is slightly below the random-order value.
"""

from __future__ import annotations

import functools
import math

import torch

from topk_compiler.lowering.order_keys import order_keys


def bucket_sizes(n: int, num_buckets: int, layout: str = "interleaved") -> dict[int, int]:
    """``{bucket size: number of buckets of that size}`` for a reduced axis of length n."""
    b = num_buckets
    if layout == "contiguous":
        m = -(-n // b)
        full, rest = divmod(n, m)
        sizes = {m: full}
        if rest:
            sizes[rest] = 1
        empty = b - full - (1 if rest else 0)
        if empty:
            sizes[0] = sizes.get(0, 0) + empty
        return sizes
    # interleaved and shuffled: the first n mod b buckets hold one more element.
    m, extra = divmod(n, b)
    sizes = {}
    if extra:
        sizes[m + 1] = extra
    if b - extra:
        sizes[m] = b - extra
    return sizes


def _log_comb(a: int, b: int) -> float:
    return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)


def _hypergeometric_below(n: int, k: int, m: int, kb: int):
    """(x, P(X = x)) for x < kb, X ~ hypergeometric (population n, k successes, m draws)."""
    log_total = _log_comb(n, m)
    for x in range(max(0, m - (n - k)), kb):
        yield x, math.exp(_log_comb(k, x) + _log_comb(n - k, m - x) - log_total)


def _expected_min_hypergeometric(n: int, k: int, m: int, kb: int) -> float:
    """E[min(X, kb)] for X ~ hypergeometric (population n, k successes, m draws)."""
    if kb >= min(m, k):
        return m * k / n
    # E[min(X, kb)] = kb - sum_{x < kb} (kb - x) P(X = x): only kb terms.
    return kb - sum((kb - x) * p for x, p in _hypergeometric_below(n, k, m, kb))


def _expected_min_binomial(trials: int, p: float, kb: int) -> float:
    """E[min(X, kb)] for X ~ Binomial(trials, p)."""
    if kb >= trials or p <= 0.0:
        return trials * p
    if p >= 1.0:
        return float(min(trials, kb))
    deficit = 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    for x in range(0, kb):
        deficit += (kb - x) * math.exp(_log_comb(trials, x) + x * log_p + (trials - x) * log_q)
    return kb - deficit


def _check(n: int, k: int, num_buckets: int, per_bucket_k: int) -> None:
    for name, value in (("n", n), ("k", k), ("num_buckets", num_buckets), ("per_bucket_k", per_bucket_k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got n={n}, k={k}")
    if num_buckets < 1 or per_bucket_k < 1:
        raise ValueError(f"num_buckets and per_bucket_k must be >= 1, got {num_buckets}, {per_bucket_k}")


@functools.lru_cache(maxsize=65536)
def expected_recall(n: int, k: int, num_buckets: int, per_bucket_k: int, layout: str = "interleaved") -> float:
    """Expected recall of bucketed top-k for an input in random order (exact, finite n)."""
    _check(n, k, num_buckets, per_bucket_k)
    if k == 0:
        return 1.0
    kept = sum(
        count * _expected_min_hypergeometric(n, k, size, per_bucket_k)
        for size, count in bucket_sizes(n, num_buckets, layout).items()
        if size
    )
    return min(1.0, kept / k)


@functools.lru_cache(maxsize=65536)
def guaranteed_recall(n: int, k: int, num_buckets: int, per_bucket_k: int) -> float:
    """Lower bound on the expected recall of the "shuffled" layout for ANY input order."""
    _check(n, k, num_buckets, per_bucket_k)
    if k == 0:
        return 1.0
    runs = -(-n // num_buckets)
    if per_bucket_k >= runs:  # every bucket is kept whole
        return 1.0
    lam = k / num_buckets
    return min(1.0, _expected_min_binomial(runs, lam / runs, per_bucket_k) / lam)


def _sizes_in_order(n: int, num_buckets: int, layout: str) -> list[int]:
    """The size of each bucket in turn (``layouts.py``: the interleaved and shuffled layouts'
    first n mod b buckets hold one more element; the contiguous layout's last ones are short)."""
    b = num_buckets
    if layout == "contiguous":
        m = -(-n // b)
        return [max(0, min(m, n - q * m)) for q in range(b)]
    m, extra = divmod(n, b)
    return [m + (q < extra) for q in range(b)]


def bucket_shares(k: int, num_buckets: int) -> list[int]:
    """How many elements each bucket keeps so that the survivors are exactly k: k // b, one more
    in the first k % b buckets (those that also hold one more element of a row that b does not
    divide, in the interleaved layout)."""
    share, extra = divmod(k, num_buckets)
    return [share + (q < extra) for q in range(num_buckets)]


@functools.lru_cache(maxsize=4096)
def expected_recall_of_shares(n: int, k: int, num_buckets: int, layout: str = "interleaved") -> float:
    """Expected recall, input in random order, where bucket q keeps its share of k (k // b, one
    more for q < k % b) and the survivors are exactly k (``kernels/wide_bucket_topk``): the sum
    of E[min(X_q, share_q)] over the buckets, divided by k."""
    _check(n, k, num_buckets, 1)
    if k == 0:
        return 1.0
    kept = sum(_expected_min_hypergeometric(n, k, size, share)
               for size, share in zip(_sizes_in_order(n, num_buckets, layout), bucket_shares(k, num_buckets)) if size)
    return min(1.0, kept / k)


@functools.lru_cache(maxsize=4096)
def guaranteed_recall_of_shares(n: int, k: int, num_buckets: int) -> float:
    """``guaranteed_recall``'s bound (the "shuffled" layout, any input order) where each bucket
    keeps its share of k: the bound holds bucket by bucket, whatever it keeps."""
    _check(n, k, num_buckets, 1)
    if k == 0:
        return 1.0
    runs = -(-n // num_buckets)
    lam = k / num_buckets
    kept = sum(lam if share >= runs else _expected_min_binomial(runs, lam / runs, share)
               for share in bucket_shares(k, num_buckets))
    return min(1.0, kept / k)


def _tail_hypergeometric(n: int, k: int, m: int, kb: int) -> float:
    """P(X >= kb) for X ~ hypergeometric (population n, k successes, m draws)."""
    if kb > min(m, k):
        return 0.0
    return max(0.0, 1.0 - sum(p for _, p in _hypergeometric_below(n, k, m, kb)))


@functools.lru_cache(maxsize=65536)
def uncertified_probability(n: int, k: int, num_buckets: int, per_bucket_k: int,
                            layout: str = "interleaved") -> float:
    """Probability that a row in random order fails the certificate of
    ``kernels/certified_topk.py``: some bucket holds ``per_bucket_k`` or more of its top k
    (the buckets treated as independent, which for k << n is close)."""
    _check(n, k, num_buckets, per_bucket_k)
    if k == 0:
        return 0.0
    certified = 1.0
    for size, count in bucket_sizes(n, num_buckets, layout).items():
        if size:
            certified *= (1.0 - _tail_hypergeometric(n, k, size, per_bucket_k)) ** count
    return 1.0 - certified


def survivors(n: int, num_buckets: int, per_bucket_k: int, layout: str = "interleaved") -> int:
    """How many real (non-padding) elements stage 1 keeps."""
    return sum(count * min(size, per_bucket_k) for size, count in bucket_sizes(n, num_buckets, layout).items())


def measured_recall(
    x: torch.Tensor, indices: torch.Tensor, k: int, dim: int = -1, largest: bool = True
) -> float:
    """Fraction of the exact top-k (as a multiset of values, so ties count once each) that the
    returned ``indices`` recover, averaged over all rows of ``x`` along ``dim``."""
    if k == 0 or x.numel() == 0:
        return 1.0
    keys = order_keys(x.movedim(dim, -1), largest)
    picked = keys.gather(-1, indices.movedim(dim, -1))
    kth = keys.topk(k, dim=-1).values[..., -1:]
    above = (picked > kth).sum(-1)
    at = (picked == kth).sum(-1)
    needed_at = k - (keys > kth).sum(-1)
    return ((above + torch.minimum(at, needed_at)).double() / k).mean().item()
