"""The wide-bucket kernels (few buckets, a program each, then a merge by rank; or each bucket
keeping its share of k, written in one launch) against the plain-torch bucketed reference with
the same buckets. Without a GPU these run in the Triton
interpreter on CPU tensors; sizes stay small."""

import pytest
import torch

from tests.conftest import KERNEL_DEVICE
from tests.kernels.test_bucketed_topk import assert_matches_reference, reference
from topk_compiler.lowering.bucketed_reference import bucketed_topk_torch
from tests.kernels.test_select_topk import special_rows
from topk_compiler import expected_recall, measured_recall
from topk_compiler.kernels.wide_bucket_topk import MAX_SLOTS, SEARCHES, wide_bucket_topk, wide_share_topk
from topk_compiler.lowering.layouts import LAYOUT_IDS
from topk_compiler.lowering.recall_model import expected_recall_of_shares

# (rows, n, k, num_buckets, per_bucket_k): k from 1 to every survivor, buckets of 1 to 256 slots
# kept, rows that buckets do not divide.
CASES = [(3, 1000, 100, 8, 30), (1, 1000, 240, 8, 30), (2, 513, 1, 4, 1), (2, 300, 37, 16, 3),
         (2, 2000, 500, 4, 256), (1, 1030, 200, 16, 14),
         # 32 programs a row each searching 32 lists: minutes in the interpreter
         pytest.param(4, 8195, 1500, 32, 60, marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                      reason="GPU only"))]


@pytest.mark.parametrize("rows,n,k,b,kb", CASES)
@pytest.mark.parametrize("layout,dtype,largest,select", [
    ("interleaved", torch.float32, True, "bisect"), ("interleaved", torch.bfloat16, False, "bitonic"),
    ("shuffled", torch.bfloat16, True, "bisect"), ("contiguous", torch.float32, False, "bitonic"),
    ("interleaved", torch.float16, True, "bitonic")])
def test_equals_the_reference_with_the_same_buckets(rows, n, k, b, kb, layout, dtype, largest, select):
    x = torch.randn(rows, n).to(dtype).to(KERNEL_DEVICE)
    ref_values, _ = reference(x, k, b, kb, layout, largest)
    values, indices = wide_bucket_topk(x, k, num_buckets=b, per_bucket_k=kb, largest=largest,
                                       layout_id=LAYOUT_IDS[layout], seed=11, select=select)
    assert_matches_reference(values, indices, ref_values, x, sorted_=True, largest=largest)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("select,search", [("bisect", "digits"), ("bisect", "bracket"), ("bitonic", "digits")])
def test_nan_infinities_and_ties(dtype, select, search):
    """NaN rows, infinities, rows of four values and an all-equal row: the output follows the
    reference, each index once, ties to the smaller index within the values' order."""
    x = special_rows(dtype, 600)
    for largest in (True, False):
        ref_values, _ = reference(x, 150, 8, 30, "interleaved", largest)
        values, indices = wide_bucket_topk(x, 150, num_buckets=8, per_bucket_k=30, largest=largest, select=select,
                                           search=search)
        assert_matches_reference(values, indices, ref_values, x, sorted_=True, largest=largest)
    values, indices = wide_bucket_topk(x[3:4], 150, num_buckets=8, per_bucket_k=30, largest=True, select=select,
                                       search=search)
    assert torch.equal(indices.cpu(), indices.cpu().sort(1).values)  # all equal: by index


def test_measured_recall_tracks_the_model():
    n, k, b, kb = 2048, 256, 16, 18
    x = torch.randn(4, n).to(KERNEL_DEVICE)
    _, indices = wide_bucket_topk(x, k, num_buckets=b, per_bucket_k=kb, largest=True)
    model = expected_recall(n, k, b, kb, "interleaved")
    assert model < 0.99  # the cut of each bucket's quota matters here
    assert abs(measured_recall(x.cpu(), indices.cpu(), k) - model) < 0.03  # 1024 top items: sd 0.006


def test_bad_arguments_are_refused():
    x = torch.randn(2, 1000).to(KERNEL_DEVICE)
    with pytest.raises(AssertionError, match="smallest bucket"):
        wide_bucket_topk(x, 100, num_buckets=8, per_bucket_k=126, largest=True)  # buckets of 125
    with pytest.raises(AssertionError, match="survivors"):
        wide_bucket_topk(x, 100, num_buckets=8, per_bucket_k=12, largest=True)
    with pytest.raises(AssertionError, match="bitonic network"):
        wide_bucket_topk(torch.randn(1, 4000).to(KERNEL_DEVICE), 1000, num_buckets=4, per_bucket_k=300,
                         largest=True, select="bitonic")
    with pytest.raises(AssertionError, match="exceed"):
        wide_bucket_topk(torch.empty(1, 4 * MAX_SLOTS + 4), 100, num_buckets=4, per_bucket_k=30, largest=True)


def share_reference(x, k, b, layout, largest, seed=11):
    return bucketed_topk_torch(x.cpu(), k, largest=largest, sorted=True, num_buckets=b, per_bucket_k=0,
                               layout=layout, seed=seed, shares=True)


# (rows, n, k, num_buckets): shares from 0 to 125 (every element of a bucket), k and n that the
# buckets divide or not.
SHARE_CASES = [(3, 1000, 101, 8), (2, 1000, 1000, 8), (2, 513, 4, 4), (2, 300, 37, 16), (1, 1030, 200, 16),
               (2, 300, 5, 16)]


@pytest.mark.parametrize("rows,n,k,b", SHARE_CASES)
@pytest.mark.parametrize("layout,dtype,largest", [
    ("interleaved", torch.float32, True), ("interleaved", torch.bfloat16, False), ("shuffled", torch.bfloat16, True),
    ("contiguous", torch.float32, False), ("interleaved", torch.float16, True)])
@pytest.mark.parametrize("search", SEARCHES)
def test_shares_equal_the_reference_with_the_same_buckets(rows, n, k, b, layout, dtype, largest, search):
    x = torch.randn(rows, n).to(dtype).to(KERNEL_DEVICE)
    ref_values, _ = share_reference(x, k, b, layout, largest)
    values, indices = wide_share_topk(x, k, num_buckets=b, largest=largest, layout_id=LAYOUT_IDS[layout], seed=11,
                                      search=search)
    assert values.shape == indices.shape == (rows, k) and indices.dtype == torch.int64
    assert_matches_reference(values, indices, ref_values, x, sorted_=False, largest=largest)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("search", SEARCHES)
def test_shares_nan_infinities_and_ties(dtype, search):
    """NaN rows, infinities, rows of four values and an all-equal row: the reference's values
    (NaN kept as torch.topk ranks it: largest), each index once."""
    x = special_rows(dtype, 600)
    for largest in (True, False):
        ref_values, _ = share_reference(x, 150, 8, "interleaved", largest)
        values, indices = wide_share_topk(x, 150, num_buckets=8, largest=largest, search=search)
        assert_matches_reference(values, indices, ref_values, x, sorted_=False, largest=largest)


def test_shares_measured_recall_tracks_the_model():
    n, k, b = 2048, 256, 16
    x = torch.randn(4, n).to(KERNEL_DEVICE)
    _, indices = wide_share_topk(x, k, num_buckets=b, largest=True)
    model = expected_recall_of_shares(n, k, b)
    assert model < 0.93  # shares of 16 a bucket cut many buckets' top items
    assert abs(measured_recall(x.cpu(), indices.cpu(), k) - model) < 0.03  # 1024 top items: sd 0.006


def test_shares_bad_arguments_are_refused():
    x = torch.randn(2, 1000).to(KERNEL_DEVICE)
    with pytest.raises(AssertionError, match="smallest bucket"):
        wide_share_topk(x, 1001, num_buckets=8, largest=True)
    with pytest.raises(AssertionError, match="smallest bucket"):
        wide_share_topk(x, 900, num_buckets=16, largest=True, layout_id=2)  # last bucket 55, shares 57
    wide_share_topk(x, 900, num_buckets=16, largest=True)  # interleaved: 62 at least
    with pytest.raises(AssertionError, match="exceed"):
        wide_share_topk(torch.empty(1, 4 * MAX_SLOTS + 4), 100, num_buckets=4, largest=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kernel", ["wide", "shares"])
def test_replays_in_a_cuda_graph(kernel):
    """No host synchronisation (and on Hopper the wide kernel's merge launches as a programmatic
    dependent of its selection): captured and replayed over new inputs, each kernel equals eager
    calls bit for bit."""
    from topk_compiler.kernels.wide_bucket_topk import WideBucketTopk, WideShareTopk

    x = torch.randn(16, 14336, device="cuda")
    if kernel == "wide":
        run = WideBucketTopk(x, 1434, num_buckets=8, per_bucket_k=180, largest=True)
    else:
        run = WideShareTopk(x, 1434, num_buckets=8, largest=True)
    run(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        values, indices = run(x)
    for _ in range(3):
        x.normal_()
        graph.replay()
        expected_values, expected_indices = run(x)
        assert torch.equal(values, expected_values) and torch.equal(indices, expected_indices)
