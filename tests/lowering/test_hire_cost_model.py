"""HiRE cost model: dense wins where the batch or the density makes HiRE read as much."""

import pytest
import torch

from topk_compiler.lowering import hire_cost_model as cm


def test_predictor_bytes():
    assert cm.predictor_bytes("lowrank", 1000, 100, 8, 2) == 8 * 1100 * 2
    assert cm.predictor_bytes("int8", 1000, 100, 0, 2) == 1000 * 100 + 4000
    assert cm.predictor_bytes("int4", 1000, 101, 0, 2) == 1000 * 51 + 4000
    with pytest.raises(ValueError, match="predictor"):
        cm.predictor_bytes("int2", 1, 1, 0, 2)


def test_expected_union():
    assert cm.expected_union(1, 50, 1000) == 50
    assert cm.expected_union(4, 2000, 1000) == 1000
    u = [cm.expected_union(r, 100, 1000) for r in (1, 2, 8, 64)]
    assert u == sorted(u) and u[-1] < 1000 and u[1] == pytest.approx(1000 * (1 - 0.9**2))


def test_logits_rewritten_at_batch_one_declined_at_large_batch():
    args = dict(d=384, n=30522, k=10, candidates=200, kind="lowrank", rank=64, dtype=torch.float32, device="cpu")
    small = cm.hire_logits_cost(1, **args), cm.dense_logits_cost(1, 384, 30522, 10, torch.float32, "cpu")
    large = cm.hire_logits_cost(1024, **args), cm.dense_logits_cost(1024, 384, 30522, 10, torch.float32, "cpu")
    assert cm.worth_rewriting(*small)
    assert not cm.worth_rewriting(*large)
    assert small[0].bytes < small[1].bytes / 4
    assert "faster" in cm.verdict(*small) and "dense predicted cheaper" in cm.verdict(*large)


def test_ffn_declined_when_dense():
    """Every neuron expected, or a batch whose rows together need most neurons: dense is cheaper."""
    dense = cm.dense_ffn_cost(1, 1024, 4096, 1024, torch.float32, "cpu")
    sparse = cm.hire_ffn_cost(1, 1024, 4096, 1024, 200, "lowrank", 64, torch.float32, "cpu")
    everything = cm.hire_ffn_cost(1, 1024, 4096, 1024, 4096, "lowrank", 64, torch.float32, "cpu")
    batch = cm.hire_ffn_cost(64, 1024, 4096, 1024, 200, "lowrank", 64, torch.float32, "cpu")
    assert cm.worth_rewriting(sparse, dense)
    assert not cm.worth_rewriting(everything, dense)
    assert not cm.worth_rewriting(batch, cm.dense_ffn_cost(64, 1024, 4096, 1024, torch.float32, "cpu"))


def test_hire_cost_grows_with_candidates_and_rank():
    costs = [cm.hire_logits_cost(1, 256, 20000, 10, kc, "lowrank", r, torch.float32, "cpu").seconds
             for kc, r in ((50, 16), (500, 16), (500, 128))]
    assert costs == sorted(costs)


def test_ffn_programs_bounded_by_partial_bytes():
    assert cm.ffn_programs(4000, 1, 4096, 132) == cm.FFN_ROW_PROGRAMS_PER_SM * 132
    assert cm.ffn_programs(4000, 2, 4096, 132) == cm.FFN_PROGRAMS_PER_SM * 132
    assert cm.ffn_programs(10, 1, 4096, 132) == 10
    for rows in (16, 64, 4096):
        programs = cm.ffn_programs(40000, rows, 4096, 132)
        # The partial sums of every row, one per program (the kernel's [programs, rows, d_out]).
        assert programs * rows * 4096 * 4 <= max(cm.FFN_PARTIAL_BYTES, rows * 4096 * 4)
    assert cm.ffn_programs(40000, 4096, 4096, 132) == 1


def test_one_row_lowrank_ffn_fuses_prediction_on_a_gpu(monkeypatch):
    """One row with a low-rank predictor: four launches and no scores through memory, so it is
    predicted cheaper than the same FFN with two rows' selection machinery."""
    from topk_compiler.lowering import cost_model

    gpu = cost_model.DeviceProfile("cuda", "NVIDIA H200", 132, 4.2e12, dict(cost_model._DEFAULT_CUDA_WEIGHTS))
    monkeypatch.setattr(cost_model, "device_profile", lambda device: gpu)
    args = (4096, 16384, 4096, 1638, "lowrank", 128, torch.bfloat16, "cuda")
    fused, two_rows = cm.hire_ffn_cost(1, *args), cm.hire_ffn_cost(2, *args)
    assert cm.fuses_prediction(1, 4096, 4096, "lowrank")
    assert not any((cm.fuses_prediction(2, 4096, 4096, "lowrank"), cm.fuses_prediction(1, 4096, 4096, "int8"),
                    cm.fuses_prediction(1, 16384, 4096, "lowrank")))
    assert fused.launches == 4 < two_rows.launches
    assert fused.seconds < two_rows.seconds
    # Weights read: the predictor and the chosen neurons' rows of W1 and W2^T, and no more than
    # the partial sums and x besides.
    weights = (128 * (4096 + 16384) + 1638 * 2 * 4096) * 2
    assert weights < fused.bytes < weights + 132 * 4096 * 8 + 4 * 4096 * 2 + 8 * 1638
    assert cm.fused_ffn_programs(16384, 4096, 132) == 132 * cm.FFN_ROW_PROGRAMS_PER_SM


@pytest.mark.parametrize("replays", [True, False])
def test_outside_cuda_graphs_decode_hire_pays_its_dispatch(monkeypatch, replays):
    """bench_hire's FFN and LM head at batch 1 on an H200: HiRE wins replayed (27 us against 83
    dense; 57 against 296) and loses eagerly (328 against 84; 663 against 306), and the model,
    with the host's dispatch priced in outside CUDA graphs, says so."""
    from topk_compiler.lowering import cost_model

    gpu = cost_model.DeviceProfile("cuda", "NVIDIA H200", 132, 4.2e12, dict(cost_model._DEFAULT_CUDA_WEIGHTS))
    monkeypatch.setattr(cost_model, "device_profile", lambda device: gpu)
    ffn = (cm.hire_ffn_cost(1, 4096, 16384, 4096, 1853, "lowrank", 128, torch.bfloat16, "cuda"),
           cm.dense_ffn_cost(1, 4096, 16384, 4096, torch.bfloat16, "cuda"))
    head = (cm.hire_logits_cost(1, 4096, 128256, 50, 472, "lowrank", 64, torch.bfloat16, "cuda"),
            cm.dense_logits_cost(1, 4096, 128256, 50, torch.bfloat16, "cuda"))
    for (hire, dense), dense_eager_us in ((ffn, 84.0), (head, 306.0)):
        priced_hire, priced_dense, verdict = cm.as_called(hire, dense, "cuda", replays)
        assert cm.worth_rewriting(priced_hire, priced_dense) is replays
        assert ("outside CUDA graphs" in verdict) is not replays
        assert priced_dense.us < 1.2 * dense_eager_us  # dense is not priced out of the race either
