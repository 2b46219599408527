"""HiRE candidates at logits sites: the k' best rows of each input row by predicted score, and
the list of slots that a batch's exact computation gathers once for all its rows.

Row ``m``'s candidate set is ``C_m = {j : pred[m, j] >= t_m}`` (``<=`` for the smallest), where
``t_m`` is the worst predicted score among the k' selected for row ``m``. It holds the selected
k' (and any row tied with them, or skipped by an approximate selection yet scoring at least as
well), so a row's result does not depend on which other rows share its batch. The batch gathers
the union of the selected rows once: ``slots`` is that union, sorted, with each repeat replaced
by -1 (padding), so its length ``rows * k'`` is static and nothing waits on the device.
"""

from __future__ import annotations

import torch

from topk_compiler.lowering import bucketed_topk as _registers_the_op  # noqa: F401
from topk_compiler.lowering.hire_cost_model import CANDIDATE_RECALL

# The top-k op runs exact below this many predicted scores per row.
_SELECTION_MIN_ELEMENTS = 1024


def select_candidates(pred: torch.Tensor, candidates: int, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [rows, k'] of the k' best predicted scores of each row (unsorted), with
    recall ``CANDIDATE_RECALL`` where the bucketed top-k is faster than exact."""
    return torch.ops.topk_compiler.bucketed_topk(
        pred, candidates, -1, largest, False, CANDIDATE_RECALL, 0, 0, "interleaved", 0, "auto",
        _SELECTION_MIN_ELEMENTS)


def shared_slots(indices: torch.Tensor) -> torch.Tensor:
    """[rows * k'] int64: the union of the rows' selected indices (one row: as selected; several:
    sorted, repeats as -1)."""
    if indices.shape[0] == 1:
        return indices.reshape(-1)
    flat = indices.reshape(-1).sort().values
    repeat = torch.zeros_like(flat, dtype=torch.bool)
    repeat[1:] = flat[1:] == flat[:-1]
    return flat.masked_fill(repeat, -1)


def membership(pred: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, largest: bool = True) -> torch.Tensor:
    """[rows, S] bool: slot s holds a candidate of row m (see the module docstring)."""
    worst = values.amin(dim=1, keepdim=True) if largest else values.amax(dim=1, keepdim=True)
    at_slots = pred.gather(1, slots.clamp(min=0).expand(pred.shape[0], -1))
    ok = at_slots >= worst if largest else at_slots <= worst
    return ok & (slots >= 0)


def candidate_slots(pred: torch.Tensor, candidates: int, largest: bool = True, compact: bool = False):
    """(slots [S], member [rows, S] or None) for the predicted scores ``pred`` [rows, n].

    One row: its k' selected indices, all its own (member None). Several rows: the shared slots
    and the membership mask. ``compact`` drops the padding (a host sync: for the CPU path, where
    multiplying padding would cost real time).
    """
    n = pred.shape[1]
    if candidates >= n:
        slots = torch.arange(n, device=pred.device)
        return slots, None
    values, indices = select_candidates(pred, candidates, largest)
    slots = shared_slots(indices)
    if pred.shape[0] == 1:
        return slots, None
    if compact:
        slots = slots[slots >= 0]
    return slots, membership(pred, values, slots, largest)
