"""output_order.unobserved_order on Dynamo graphs, checked against what the graphs compute.

Each function below runs twice: as written, and with its top-k returning every row's outputs
in a random order (values and indices permuted alike, as an unsorted top-k may). Where the
analysis says the order is unobserved the two results must agree (bit for bit where it says
exact); the order-dependent functions must change, and the analysis must say so.
"""

import pytest
import torch
import torch.nn.functional as F

from topk_compiler.passes.output_order import unobserved_order
from topk_compiler.passes.topk_rewrite import topk_call


def shuffled_topk(x, k, dim=-1, largest=True, sorted=True):
    values, indices = torch.topk(x, k, dim, largest, sorted)
    order = torch.rand(values.shape, generator=torch.Generator().manual_seed(7)).argsort(dim=dim)
    return values.gather(dim, order), indices.gather(dim, order)


def verdicts_and_shuffled(fn, *inputs):
    """(the analysis of each top-k, fn's result with every top-k's rows permuted)."""
    seen = {}

    def backend(gm, example_inputs):
        seen["verdicts"] = []
        for node in gm.graph.nodes:
            call = topk_call(node)
            if call is not None:
                seen["verdicts"].append(unobserved_order(node, call[1]["dim"]))
                node.op, node.target = "call_function", shuffled_topk
        gm.recompile()
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, fullgraph=True)(*inputs)
    return seen["verdicts"], out


X, W2T, EMB, COLUMNS = torch.randn(3, 64), torch.randn(64, 5), torch.randn(64, 6), torch.randn(64, 8)


def sae(x):
    t = torch.topk(x, 8)
    buf = torch.zeros_like(x)
    buf.scatter_(-1, t.indices, F.relu(t.values))
    return buf


def scatter_then_matmul(x):
    v, i = x.topk(8, dim=-1)
    return torch.zeros_like(x).scatter(-1, i, v) @ W2T


def scatter_add_of_casts(x):
    v, i = torch.topk(x, 8)
    return torch.zeros(3, 64, dtype=torch.float64).scatter_add(-1, i.long(), v.double() * 2)


def mask_of_selected(x):
    return torch.zeros_like(x).scatter(-1, x.topk(8).indices, 1.0)


def gathered_rows_weighted(x):
    v, i = x.topk(8)
    return (v.unsqueeze(-1) * W2T[i]).sum(-2)


def gathered_rows_contracted(x):
    v, i = x.topk(8)
    return (v.unsqueeze(-2) @ W2T[i]).squeeze(-2)


def embedding_bag(x):
    v, i = x.topk(8)
    return (F.embedding(i, EMB) * v.softmax(-1).unsqueeze(-1)).sum(1)


def expected_value(x):
    v, _ = torch.topk(x.softmax(-1), 8)
    p = v / v.sum(-1, keepdim=True)
    return (p * torch.log(p)).sum(-1)


def largest_and_any(x):
    v, i = x.topk(8, largest=False)
    return v.amax(-1), (i > 40).any(-1), (v.exp() * 2 + 1).amin(dim=(0, 1))


def along_rows(x):
    v, i = x.t().topk(2, dim=0)
    return torch.zeros(64, 3).scatter(0, i, v)


def three_dims(x):
    v, i = x.view(3, 4, 16).topk(5)
    return torch.zeros(3, 4, 16).scatter(2, i, torch.tanh(v)), v.sum(dim=(0, 2))


def one_row(x):
    v, i = x[0].topk(8)
    return v @ W2T[i], torch.gather(x[1], 0, i).mul(v).sum()


def sparse_decoder(x):
    a, i = x.topk(8)
    return F.embedding_bag(i, W2T, per_sample_weights=a.relu(), mode="sum"), F.embedding_bag(i, EMB, mode="max")


def picked_by_row_and_index(x):
    v, i = x.topk(8)
    rows = torch.arange(3).unsqueeze(1)
    return (x[rows, i] * v).sum(-1), (EMB.t()[:, i] * v).sum(-1)  # [3] and [6, 3]


def own_axis_then_sum(x):
    v, i = x.topk(8)
    rows = W2T[i].softmax(-1).amax(-1)  # over the gathered rows' own axis: still permuted
    return (rows * v).sum(-1)


def positions_in_order(x):
    return x.topk(8).indices.sort(-1).values  # sparse attention reads its selected keys in order


def values_sorted_again(x):
    v, _ = torch.sort(x.topk(8, largest=False).values, dim=1, descending=True)
    return v


def rows_sorted_by_msort(x):
    return torch.msort(x.t().topk(2, dim=0).indices)


def weights_broadcast(x):
    v, i = x.topk(8)
    return (v[..., None] * W2T[i]).sum(1)


def transposed(x):
    v, i = x.topk(8)
    return torch.zeros(64, 3).scatter(0, i.t(), v.transpose(0, 1)), (torch.permute(v, (1, 0)) * 2).sum(0)


def written_by_rows(x):
    v, i = x.topk(8)
    buf = torch.zeros_like(x)
    buf[torch.arange(x.shape[0]).unsqueeze(1), i] = v.exp()
    counts = torch.zeros(5, 3, 64)
    counts[:, torch.arange(3)[:, None], i] += 1.0
    one = torch.zeros(64)
    one[x[0].topk(8).indices] = 2.0
    return buf, counts, one


def written_by_place(x):
    v, i = x.topk(8)
    buf = torch.zeros_like(x)
    buf[torch.arange(3)[:, None], i] = torch.arange(8.0)  # each place's own number
    return buf


UNOBSERVED = [  # (function, exact)
    (sae, True), (scatter_then_matmul, True), (scatter_add_of_casts, True), (mask_of_selected, True),
    (gathered_rows_weighted, False), (gathered_rows_contracted, False), (embedding_bag, False),
    (expected_value, False), (largest_and_any, True), (along_rows, True), (three_dims, False), (one_row, False),
    (own_axis_then_sum, False), (sparse_decoder, False), (picked_by_row_and_index, False),
    (positions_in_order, True), (values_sorted_again, False), (rows_sorted_by_msort, True),
    (weights_broadcast, False), (transposed, False), (written_by_rows, True),
]

ORDER_DEPENDENT = [
    lambda x: x.topk(8).values,
    lambda x: x.topk(8).values.cumsum(-1)[:, -2],
    lambda x: x.topk(8).indices[:, 0],
    lambda x: x.topk(8).values @ torch.ones(8, 2).cumsum(0),
    lambda x: x.topk(8).values.softmax(0).sum(-1),
    lambda x: x.topk(8).values * torch.arange(8.0),
    lambda x: x.topk(8).values.max(-1).indices,
    lambda x: torch.zeros_like(x).scatter(-1, x.topk(8).indices, torch.arange(8.0).expand(3, 8)),
    lambda x: torch.gather(COLUMNS, 0, x.topk(8).indices).sum(-1),  # row i[r, j] of column j
    lambda x: (x.topk(8).values * x[:, :8]).sum(-1),
    lambda x: (x[torch.arange(3).unsqueeze(1), x.topk(8).indices] * torch.arange(8.0)).sum(-1),
    lambda x: COLUMNS[x.topk(8).indices, torch.arange(8)].sum(-1),  # a row by index, a column by place
    lambda x: F.embedding_bag(x.topk(8).indices, W2T, per_sample_weights=torch.arange(8.0).expand(3, 8), mode="sum"),
    lambda x: x.topk(8).values.sort(-1).indices,  # places in the top-k's order
    lambda x: (lambda s: s.values + s.indices)(x.topk(8).indices.sort(-1)),
    lambda x: x.topk(8).indices.sort(0).values,  # across rows, each permuted differently
    lambda x: x.topk(8).values[:, :4].sum(-1),
    lambda x: x.topk(8).values[..., None, 2:].sum(-1),
    lambda x: x.topk(8).values[1:, ..., -1],
    lambda x: (lambda v, i: torch.zeros(2, 64).scatter(-1, i[:2], v[::2]))(*x.topk(8)),  # rows paired wrongly
    lambda x: (lambda v, i: torch.zeros(64).scatter(0, i[0], v[1]))(*x.topk(8)),
    lambda x: x.topk(8).values.t()[0],
    lambda x: x.topk(8).values.permute(1, 0).cumsum(0)[-2],
    written_by_place,
]


@pytest.mark.parametrize("fn, exact", UNOBSERVED, ids=[f.__name__ for f, _ in UNOBSERVED])
def test_where_the_order_is_unobserved_a_shuffled_topk_changes_nothing(fn, exact):
    verdicts, shuffled = verdicts_and_shuffled(fn, X)
    assert all(v is not None for v in verdicts) and verdicts
    assert all(v.exact == exact for v in verdicts)
    expected = fn(X)
    for got, want in zip(shuffled if isinstance(shuffled, tuple) else (shuffled,),
                         expected if isinstance(expected, tuple) else (expected,)):
        if exact:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", ORDER_DEPENDENT, ids=range(len(ORDER_DEPENDENT)))
def test_where_the_order_shows_the_analysis_says_so(fn):
    verdicts, shuffled = verdicts_and_shuffled(fn, X)
    assert verdicts == [None]
    assert not torch.allclose(shuffled.double(), fn(X).double())


def test_the_verdict_names_where_the_outputs_end():
    verdicts, _ = verdicts_and_shuffled(lambda x: (sae(x), gathered_rows_weighted(x)), X)
    assert [str(v) for v in verdicts] == ["scatter_", "sum"]
    verdicts, _ = verdicts_and_shuffled(lambda x: x.topk(8).values.sum() * x.topk(8).values.size(-1), X)
    assert [str(v) for v in verdicts] == ["sum", ""]  # a size observes no order


def test_a_write_whose_rows_may_share_a_target_observes_the_order():
    def rows_not_known_distinct(x):
        v, i = x.topk(8)
        buf = torch.zeros(1, 64)
        buf[torch.zeros(3, 1, dtype=torch.long), i] = v  # every row into row 0: the last write wins
        return buf

    def a_row_axis_without_its_rows(x):
        v, i = x.view(3, 4, 16).topk(4)
        buf = torch.zeros(3, 16)
        buf[torch.arange(3)[:, None, None], i] = v  # the 4 rows of each of the 3 share its targets
        return buf

    for fn in (rows_not_known_distinct, a_row_axis_without_its_rows):
        verdicts, _ = verdicts_and_shuffled(fn, X)
        assert verdicts == [None]


def test_a_use_the_analysis_does_not_know_counts_as_observing():
    # flip would only reverse the order, but any op not listed observes it.
    verdicts, _ = verdicts_and_shuffled(lambda x: x.topk(8).values.flip(-1).sum(-1), X)
    assert verdicts == [None]
    verdicts, _ = verdicts_and_shuffled(lambda x: torch.topk(x, 8), X)
    assert verdicts == [None]
