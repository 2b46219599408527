"""HiRE candidates: shared slots cover every row's selection once; membership keeps rows apart."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from topk_compiler.lowering.hire_candidates import candidate_slots, membership, shared_slots


@given(st.integers(1, 6), st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_shared_slots_hold_the_union_once(rows, n, seed):
    gen = torch.Generator().manual_seed(seed)
    kc = int(torch.randint(1, n + 1, (), generator=gen))
    indices = torch.stack([torch.randperm(n, generator=gen)[:kc] for _ in range(rows)])
    slots = shared_slots(indices)
    assert slots.shape == (rows * kc,)
    real = slots[slots >= 0]
    assert sorted(real.tolist()) == sorted(set(indices.flatten().tolist()))


@given(st.integers(2, 5), st.integers(2, 40), st.booleans(), st.integers(0, 2**31 - 1))
def test_membership_is_each_rows_own_selection(rows, n, largest, seed):
    gen = torch.Generator().manual_seed(seed)
    kc = int(torch.randint(1, n, (), generator=gen))
    pred = torch.randn(rows, n, generator=gen)
    slots, member = candidate_slots(pred, kc, largest)
    own = pred.topk(kc, dim=1, largest=largest).indices
    for m in range(rows):
        assert sorted(slots[member[m]].tolist()) == sorted(own[m].tolist())


def test_one_row_needs_no_mask_and_all_candidates_are_every_row():
    pred = torch.randn(1, 50)
    slots, member = candidate_slots(pred, 5)
    assert member is None and sorted(slots.tolist()) == sorted(pred.topk(5).indices[0].tolist())
    slots, member = candidate_slots(torch.randn(3, 8), 8)
    assert member is None and slots.tolist() == list(range(8))


def test_compact_drops_padding():
    pred = torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 0.0, 2.0, 1.0]])
    slots, member = candidate_slots(pred, 2, compact=True)
    assert slots.tolist() == [0, 1, 2]
    assert member.tolist() == [[True, True, False], [True, False, True]]
    assert membership(pred, pred.topk(2).values, torch.tensor([0, -1, 2]), True).tolist() == [
        [True, False, False], [True, False, True]]
