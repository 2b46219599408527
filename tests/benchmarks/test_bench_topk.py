"""The top-k benchmark's CPU-testable pieces: shapes, the HBM floor, the peer's settings grid and
search (against a plain-torch stand-in with the peer's call signature), the report formatting, and
a --smoke run end to end. No GPU, no peer build."""

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks import bench_topk, report_topk
from benchmarks.bench_topk import PROVIDERS, Shape
from topk_compiler import expected_recall


def _bucketed_stand_in(x, k, dim, j, k_mult, interleaved, multithread_buckets):
    """Bucketed top-k with the peer's signature: k * k_mult / j interleaved buckets (element i in
    bucket i mod b), the top j of each, then the top k of those (unsorted, like the peer)."""
    b = k * k_mult // j
    n = x.shape[-1]
    padded = torch.nn.functional.pad(x, (0, -n % b), value=float("-inf"))
    values, slot = padded.view(x.shape[0], -1, b).topk(j, dim=1)
    indices = slot * b + torch.arange(b)
    values, position = values.flatten(1).topk(k, dim=1, sorted=False)
    return values, indices.flatten(1).gather(1, position)


def _result(median_us, recall=1.0, **extra):
    return {"median_us": median_us, "p20_us": median_us * 0.9, "p80_us": median_us * 1.1, "recall": recall, **extra}


def _plan(kernel, predicted_us, num_buckets=0, per_bucket_k=0):
    return {"algorithm": "exact" if kernel in ("torch", "select") else "bucketed", "kernel": kernel,
            "num_buckets": num_buckets, "per_bucket_k": per_bucket_k, "segments": 1, "expected_recall": 0.96,
            "predicted_us": predicted_us, "torch_topk_us": 380.0, "reason": "predicted 4.0x faster than exact"}


def _report():
    shape = Shape(1024, 32768, 2048, "bf16")
    record = {
        "shape": {"rows": 1024, "n": 32768, "k": 2048, "dtype": "bf16", "group": "headline", "name": shape.name},
        "input_bytes": shape.input_bytes,
        "floor_us": bench_topk.hbm_floor_us(shape, 3.0e12),
        "cuda_graphs": False,
        "results": {
            "torch": _result(400.0),
            "compiled": _result(410.0),
            "approx@0.9": _result(90.0, 0.92, plan=_plan("fused", 95.0, 1024, 2)),
            "approx@0.95": _result(100.0, 0.951, plan=_plan("fused", 95.0, 2048, 2)),
            "approx@0.99": {"error": "OutOfResources: out of resource:\n  shared memory | 232448"},
            "exact": _result(380.0, plan=_plan("torch", 380.0)),
            "peer": {"error": "peer unavailable (see the peer section)"},
        },
    }
    bench_topk.add_ratios(record)
    skipped = {"shape": {"rows": 1, "n": 1024, "k": 16, "dtype": "fp32", "group": "sweep", "name": "1x1024 k=16 fp32"},
               "skipped": "time budget"}
    environment = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "cuda": "13.0", "triton": "3.6.0",
                   "python": "3.12.3", "date": "2026-01-01T00:00:00+00:00", "command": "python -m benchmarks.bench_topk",
                   "bandwidth_bytes_per_s": 3.0e12, "quantiles": [0.5, 0.2, 0.8], "timer": "triton.testing.do_bench"}
    copy = {"bytes": 2**30, "median_us": 800.0, "read_bytes_per_s": 2**30 / 8e-4, "read_write_bytes_per_s": 2**31 / 8e-4}
    peer = {"checkout": ".peer", "error": "build failed (exit 1): nvcc fatal"}
    return {"environment": environment, "copy": copy, "shapes": [record, skipped], "peer": peer}


def test_hbm_floor_is_the_input_read_once():
    assert bench_topk.hbm_floor_us(Shape(1024, 32768, 2048, "bf16"), 3.0e12) == pytest.approx(22.369, rel=1e-4)
    assert bench_topk.hbm_floor_us(Shape(16, 14336, 1434, "fp32"), 3.0e12) == pytest.approx(0.30583, rel=1e-4)


def test_sweep_skips_k_at_least_n_and_inputs_over_2_gib():
    shapes = bench_topk.sweep_shapes()
    names = {s.name for s in shapes}
    assert all(s.k < s.n and s.input_bytes <= bench_topk.MAX_INPUT_BYTES for s in shapes)
    assert "1x1024 k=2048 fp32" not in names and "1024x1048576 k=16 fp32" not in names
    assert "1024x262144 k=2048 fp32" in names and "1x1048576 k=16 fp32" in names
    assert len(shapes) == 48 and len(names) == 48


def test_shapes_headline_first_quick_and_filtered():
    headline = list(bench_topk.HEADLINE_SHAPES)
    assert bench_topk.select_shapes(quick=True, smoke=False, patterns=None) == headline
    full = bench_topk.select_shapes(quick=False, smoke=False, patterns=None)
    assert full[:7] == headline and len(full) == 55
    picked = bench_topk.select_shapes(quick=True, smoke=False, patterns=["k=2048 bf16", "16x14336"])
    assert [s.name for s in picked] == ["1024x32768 k=2048 bf16", "64x131072 k=2048 bf16", "16x14336 k=1434 fp32"]


@pytest.mark.parametrize("n, k", [(32768, 2048), (128256, 50), (1024, 16), (4096, 2048), (14336, 1434)])
def test_peer_candidates_respect_the_peers_limits_and_start_at_the_recall(n, k):
    groups = bench_topk.peer_candidates(n, k)
    assert len(groups) == 2 * len(bench_topk.PEER_J)
    assert any(groups)
    for group in groups:
        assert len(group) <= bench_topk.PEER_TRIES_PER_GROUP
        assert [s.k_mult for s in group] == sorted(s.k_mult for s in group)
        for setting in group:
            assert setting.k_mult * k <= n and (setting.k_mult * k) % setting.j == 0
        if group:
            first = group[0]
            assert expected_recall(n, k, first.num_buckets(k), first.j) >= bench_topk.PEER_RECALL
            half = first.k_mult // 2
            if half and (half * k) % first.j == 0:
                assert expected_recall(n, k, half * k // first.j, first.j) < bench_topk.PEER_RECALL


def test_peer_search_reports_its_fastest_setting_that_reaches_the_recall():
    shape = Shape(4, 4096, 64, "fp32")
    x = bench_topk.make_input(shape, torch.device("cpu"))
    result = bench_topk.bench_peer(_bucketed_stand_in, x, shape)
    assert result["recall"] >= bench_topk.PEER_RECALL
    passing = [t for t in result["tried"] if "screen" in t]
    assert passing and all(t["recall"] >= bench_topk.PEER_RECALL for t in passing)
    fastest = min(passing, key=lambda t: t["screen"]["median_us"])
    assert result["setting"] == fastest["setting"]
    assert result["params"]["num_buckets"] == result["params"]["k_mult"] * 64 // result["params"]["j"]


class _BuiltPeer:
    """Stands in for the peer's background build, finished."""

    def wait(self, timeout_s):
        return None

    def last_line(self):
        return "peer extension ready in 1.0 s"


def test_peer_pass_adds_the_peer_to_every_measured_shape(monkeypatch):
    monkeypatch.setitem(sys.modules, "benchmarks.peer_approx_topk", SimpleNamespace(load=lambda checkout: _bucketed_stand_in))
    shape = Shape(2, 2048, 32, "fp32", "smoke")
    report = _report()
    report["shapes"][0] = bench_topk.bench_shape(shape, torch.device("cpu"), 3.0e12)
    bench_topk.peer_pass(report, {shape.name: shape}, Path(".peer"), _BuiltPeer(), torch.device("cpu"),
                         deadline=time.perf_counter() + 60)
    assert report["peer"] == {"checkout": ".peer", "error": None, "build": "peer extension ready in 1.0 s"}
    peer = report["shapes"][0]["results"]["peer"]
    assert peer["recall"] >= bench_topk.PEER_RECALL and peer["median_us"] > 0
    assert "skipped" in report["shapes"][1]  # a shape the main pass skipped gets no peer column
    bench_topk.add_ratios(report["shapes"][0])
    assert f"| {shape.name} | {peer['setting']} |" in report_topk.markdown(report)


def test_peer_failure_is_reported_for_every_measured_shape():
    report = _report()
    shapes = {"1024x32768 k=2048 bf16": Shape(1024, 32768, 2048, "bf16")}
    bench_topk.peer_pass(report, shapes, Path(".peer"), "build failed (exit 1): nvcc fatal", torch.device("cpu"),
                         deadline=time.perf_counter() + 60)
    assert report["peer"]["error"].startswith("build failed")
    assert report["shapes"][0]["results"]["peer"]["error"].startswith("peer unavailable")
    assert "Not measured:\n\n```text\nbuild failed (exit 1): nvcc fatal\n```" in report_topk.markdown(report)


def test_ratios_are_against_the_floor_and_torch_topk():
    results = _report()["shapes"][0]["results"]
    assert results["approx@0.95"]["speedup"] == pytest.approx(4.0)
    assert results["approx@0.95"]["x_floor"] == pytest.approx(100.0 / 22.369, rel=1e-4)
    assert results["approx@0.95"]["measured_over_predicted"] == pytest.approx(100.0 / 95.0)
    assert results["torch"]["speedup"] == pytest.approx(1.0)
    assert "speedup" not in results["approx@0.99"]


def test_markdown_has_one_row_per_shape_with_time_floor_speedup_and_recall():
    md = report_topk.markdown(_report())
    row = next(line for line in md.splitlines() if line.startswith("| 1024x32768 k=2048 bf16 | 22.4 µs |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "400 µs · 17.9×F"
    assert cells[4] == "n/a"  # the peer did not build
    assert cells[6] == "100 µs · 4.5×F · **4.00×** · r 0.951"
    assert cells[7] == "failed"
    assert cells[8] == "380 µs · 17.0×F · **1.05×**"
    assert "| 1024x32768 k=2048 bf16 | approx@0.95 | fused b=2048 kb=2 seg=1 | 0.960 | 0.951 | 95.0 µs | 100 µs | 1.05 |" in md
    assert "- 1024x32768 k=2048 bf16 / approx@0.99: OutOfResources: out of resource: shared memory \\| 232448" in md
    assert "- 1x1024 k=16 fp32: not measured (time budget)" in md
    assert "NVIDIA H100 80GB HBM3 · torch 2.11.0 (CUDA 13.0) · triton 3.6.0" in md


def test_short_table_lists_each_measured_shape():
    lines = report_topk.short_table(_report()).splitlines()
    assert lines[0].startswith("NVIDIA H100 80GB HBM3 | torch 2.11.0 | triton 3.6.0")
    assert lines[2].split() == ["1024x32768", "k=2048", "bf16", "22.4", "400", "410", "n/a", "90.0", "100",
                                "err", "380", "4.00", "0.951"]
    assert lines[-1] == "not measured (time budget): 1 shapes"


def test_smoke_run_end_to_end(tmp_path, capsys):
    report = bench_topk.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_topk.json").read_text())
    assert saved["environment"]["torch"] == torch.__version__
    assert [r["shape"]["name"] for r in saved["shapes"]] == [s.name for s in bench_topk.SMOKE_SHAPES]
    for record in saved["shapes"]:
        results = record["results"]
        assert set(results) == set(PROVIDERS)
        assert all("error" not in r and r["median_us"] > 0 for r in results.values()), results
        assert results["torch"]["recall"] == 1.0 and results["exact"]["recall"] == 1.0
        assert {"kernel", "num_buckets", "per_bucket_k", "segments", "predicted_us"} <= set(results["approx@0.95"]["plan"])
    assert (tmp_path / "bench_topk.md").read_text() == report_topk.markdown(report)
    assert (tmp_path / "bench_topk.png").stat().st_size > 0
    assert capsys.readouterr().out.rstrip().endswith(report_topk.short_table(report).splitlines()[-1])


def test_shapes_past_the_time_budget_are_recorded_as_skipped(tmp_path):
    report = bench_topk.main(["--smoke", "--budget-s", "0", "--out", str(tmp_path)])
    assert [r["skipped"] for r in report["shapes"]] == ["time budget"] * len(bench_topk.SMOKE_SHAPES)
    assert "- 2x1024 k=16 fp32: not measured (time budget)" in (tmp_path / "bench_topk.md").read_text()


def test_precompile_deals_out_each_distinct_plan_of_every_shape(monkeypatch):
    """Plans, not shapes, are the unit of the precompile's work: each (shape, sorted, plan) once,
    every shortlisted plan of every provider there (a plan shared by two recall targets once),
    headline shapes also unsorted at 0.95."""
    from topk_compiler.lowering import cost_model, plan

    h100 = cost_model.DeviceProfile("cuda", "NVIDIA H100", 132, 3.0e12, dict(cost_model._DEFAULT_CUDA_WEIGHTS))
    monkeypatch.setattr(cost_model, "device_profile", lambda device: h100)
    monkeypatch.setattr(plan, "_triton_ok", lambda device, dtype: True)
    plan.shortlist.cache_clear()
    shapes = [Shape(16, 14336, 1434, "fp32"), Shape(16384, 8192, 64, "fp16")]
    try:
        tasks = bench_topk.compile_tasks(shapes)
        calls = [(target, True) for target in (0.9, 0.95, 0.99, 1.0)] + [(0.95, False)]
        expected = {(s.name, sorted_, repr(p)) for s in shapes for target, sorted_ in calls
                    for plans in plan.shortlist(s.rows, s.n, s.k, bench_topk.DTYPES[s.dtype], "cuda", target,
                                                sorted=sorted_)
                    for p in plans}
    finally:
        plan.shortlist.cache_clear()
    keys = [(s.name, sorted_, repr(p)) for s, sorted_, p in tasks]
    assert len(keys) == len(set(keys)) and set(keys) == expected
    assert {s.name for s, _, _ in tasks} == {s.name for s in shapes}
    assert any(not sorted_ for _, sorted_, _ in tasks)


def test_unsorted_calls_compare_with_torch_topks_unsorted_call():
    report = _report()
    record = report["shapes"][0]
    record["results"]["torch:unsorted"] = _result(300.0, graph=_result(290.0))
    record["results"]["approx@0.95:unsorted"] = _result(60.0, 0.952, plan=_plan("fused", 55.0, 2048, 2),
                                                        graph=_result(58.0))
    bench_topk.add_ratios(record)
    ours = record["results"]["approx@0.95:unsorted"]
    assert ours["speedup"] == pytest.approx(5.0) and ours["graph"]["speedup"] == pytest.approx(290.0 / 58.0)
    assert record["results"]["approx@0.95"]["speedup"] == pytest.approx(4.0)  # sorted: against torch.topk's sorted call
    md = report_topk.markdown(report)
    assert ("| 1024x32768 k=2048 bf16 | 22.4 µs | 300 / 290 µs | — | 60.0 / 58.0 µs | 2.59× | **5.00×** / **5.00×** "
            "| 0.952 | fused b=2048 kb=2 seg=1 |") in md
    assert bench_topk.target_of("approx@0.95:unsorted") == (0.95, False)
    assert bench_topk.target_of("exact") == (1.0, True)
    headline = Shape(1024, 32768, 2048, "bf16", "headline")
    assert bench_topk.providers_of(headline) == PROVIDERS + bench_topk.UNSORTED
    assert bench_topk.providers_of(Shape(2, 1024, 16, "fp32", "smoke")) == PROVIDERS


def test_outputs_are_counted_as_the_allocator_counts_them():
    """Outputs in whole 512-byte blocks, as max_memory_allocated counts them: the 640 bytes the
    wide kernel's 16 x 1434 outputs round up by are not intermediates."""
    values, indices = torch.empty(16, 1434), torch.empty(16, 1434, dtype=torch.int64)
    assert bench_topk.allocated_bytes(values) == 92160 and bench_topk.allocated_bytes(indices) == 183808
    assert bench_topk.allocated_bytes(values) + bench_topk.allocated_bytes(indices) - 16 * 1434 * 12 == 640
    assert bench_topk.allocated_bytes(torch.empty(128)) == 512


def test_replay_table_shows_back_to_back_calls_and_register_caps():
    """Where calls were also timed back to back on the host's clock, the replay table shows it
    beside do_bench's eager time; a plan's register cap shows in its text."""
    report = _report()
    record = report["shapes"][0]
    record["cuda_graphs"] = True
    for provider in bench_topk.GRAPH_PROVIDERS:
        if "median_us" in record["results"].get(provider, {}):
            record["results"][provider]["graph"] = _result(50.0)
    record["results"]["approx@0.95"]["back_to_back_us"] = 130.0
    bench_topk.add_ratios(record)
    md = report_topk.markdown(report)
    section = md.split("## Eager launch / CUDA-graph replay")[1]
    row = next(line for line in section.splitlines() if line.startswith("| 1024x32768 k=2048 bf16 |"))
    assert "100 (130) / 50.0 µs" in row
    assert report_topk.plan_text({**_plan("fused", 95.0, 1024, 4), "num_warps": 8, "max_registers": 64}) \
        == "fused b=1024 kb=4 seg=1 w=8 r=64"
