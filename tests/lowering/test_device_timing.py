import pytest
import torch

from topk_compiler.lowering import device_timing


@pytest.fixture
def fake_clock(monkeypatch):
    """Each form reports (replayed us, eager us); counts how often a form is timed each way."""
    timed = []

    def gpu_time_us(fn, cold):
        assert not cold  # HiRE is timed as it runs in a decode loop: replayed back to back
        timed.append(("graph", fn))
        return fn()[0]

    def eager_time_us(fn):
        timed.append(("eager", fn))
        return fn()[1]

    monkeypatch.setattr(device_timing, "gpu_time_us", gpu_time_us)
    monkeypatch.setattr(device_timing, "eager_time_us", eager_time_us)
    monkeypatch.setattr(device_timing, "_DENSE_VS_HIRE", {})
    return timed


def test_hire_must_be_measured_faster_by_the_margin(fake_clock, monkeypatch):
    monkeypatch.setattr(device_timing, "can_time", lambda: True)
    same = (lambda: (100.0, 100.0), lambda: (90.0, 90.0))
    assert device_timing.dense_wins(("a",), lambda: False, *same, 1.2, measure=True)  # 1.11x is not enough
    faster = (lambda: (100.0, 100.0), lambda: (50.0, 50.0))
    assert not device_timing.dense_wins(("b",), lambda: True, *faster, 1.2, measure=True)  # measured beats model
    assert device_timing._DENSE_VS_HIRE[("b",)] == (100.0, 50.0, 100.0, 50.0)


def test_a_shape_is_timed_once(fake_clock, monkeypatch):
    monkeypatch.setattr(device_timing, "can_time", lambda: True)
    for _ in range(3):
        assert not device_timing.dense_wins(("c",), lambda: True, lambda: (100.0, 100.0), lambda: (10.0, 10.0), 1.2,
                                            measure=True)
    assert sorted(way for way, _ in fake_clock) == ["eager", "eager", "graph", "graph"]


def test_calls_outside_a_graph_follow_the_eager_times(fake_clock, monkeypatch):
    """HiRE 3x faster replayed but slower eagerly (its launches' dispatch): dense outside a graph,
    HiRE in one, from the same first call's timings."""
    dense, hire = (lambda: (84.0, 85.0)), (lambda: (29.0, 266.0))
    monkeypatch.setattr(device_timing, "can_time", lambda: True)
    assert device_timing.dense_wins(("e",), lambda: False, dense, hire, 1.2, measure=True)
    monkeypatch.setattr(device_timing, "can_time", lambda: False)  # a graph is being captured
    assert not device_timing.dense_wins(("e",), lambda: True, dense, hire, 1.2, measure=True)
    assert len(fake_clock) == 4


def test_while_capturing_the_cost_model_decides_and_nothing_is_cached(fake_clock, monkeypatch):
    monkeypatch.setattr(device_timing, "can_time", lambda: False)
    assert device_timing.dense_wins(("d",), lambda: True, lambda: (100.0,) * 2, lambda: (10.0,) * 2, 1.2, measure=True)
    assert not device_timing.dense_wins(("d",), lambda: False, lambda: (100.0,) * 2, lambda: (1000.0,) * 2, 1.2,
                                        measure=True)
    assert fake_clock == [] and ("d",) not in device_timing._DENSE_VS_HIRE


def holds_once(check, tries=3) -> bool:
    """Timings on a GPU other test processes share (pytest -n): a correct timer meets ``check``
    in one of a few tries; a wrong one (timing the host, or nothing) in none."""
    return any(check() for _ in range(tries))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times CUDA graph replays")
@pytest.mark.parametrize("cold", [True, False])
def test_gpu_time_is_the_replayed_work(cold):
    x = torch.randn(4096, 4096, device="cuda")

    def four_times_the_work():
        one = device_timing.gpu_time_us(lambda: x @ x, cold)
        four = device_timing.gpu_time_us(lambda: [x @ x for _ in range(4)], cold)
        return 2.5 * one < four < 6 * one

    assert holds_once(four_times_the_work)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times CUDA graph replays")
def test_cold_timing_reads_memory_not_l2():
    """A 16 MB read fits in L2: back to back it is served from there, cold it comes from HBM."""
    x = torch.randn(4 * 2**20, device="cuda")
    assert holds_once(lambda: device_timing.gpu_time_us(lambda: x.sum(), cold=True)
                      > 1.2 * device_timing.gpu_time_us(lambda: x.sum(), cold=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times CUDA graph replays and calls")
def test_replays_exclude_and_eager_calls_include_the_host_dispatch():
    """A short kernel behind slow host code: replays time the kernel, an eager call the Python
    around it too."""
    x = torch.randn(2**20, device="cuda")

    def slow_host():
        sum(range(100_000))  # a few milliseconds of Python
        return x.sum()

    assert device_timing.gpu_time_us(slow_host, cold=True) < 500
    assert device_timing.eager_time_us(slow_host) > 1000


def test_eager_time_is_the_shortest_batch(monkeypatch):
    """A stall of the host in one batch of calls (another process, an interrupt) must not pass
    for the call's own cost: the shortest batch counts."""
    import time

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    calls = []

    def call():
        calls.append(None)
        if len(calls) == 1 + device_timing.REPLAYS + 3:  # within the second batch
            time.sleep(0.05)

    us = device_timing.eager_time_us(call)
    assert len(calls) == 1 + device_timing.REPLAYS * device_timing.EAGER_BATCHES
    assert us < 0.05e6 / device_timing.REPLAYS / 10  # far below the stall's share of its batch
