"""Top-k sites whose order nothing observes, compiled whole: Inductor alone, approx_topk keeping
torch.topk's sort, and approx_topk running the site unsorted (``passes/output_order.py``, option
``skip_unobserved_sort``).

Two models: the activation of a TopK sparse autoencoder or sparse FFN (the k largest of each row
scattered into zeros), and a sparse-attention index list (the k largest of each row's scores, their
positions sorted ascending). Each variant is compiled with ``mode="reduce-overhead"`` (CUDA graphs)
and timed by do_bench (L2 flushed) on calls of the compiled model, beside the HBM floor (the input
read once), torch.topk alone and our op alone (unsorted, replayed in a CUDA graph, where a GPU runs
it). The input is marked a static address, as a model's activations made inside the graph would be:
the CUDA graph reads it in place rather than copying it into a buffer of its own at every call (the
run of 1d7c454 did not mark it). Recall is the fraction of each row's true top k that the output
keeps (a nonzero in its place; its position in the list).

With ``--profile`` each variant's record also lists the device time of each kernel a call runs
(torch.profiler over graph replays): the top-k's own kernels beside the fill, the scatter and the sort.

    PYTHONPATH=. python3 -m benchmarks.bench_unobserved_order [--shapes 16x14336 ...] [--profile] [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

import topk_compiler
from benchmarks.bench_topk import DTYPES, Shape, environment, graph_replay, hbm_floor_us, measure_copy, time_us
from benchmarks.profile_stages import kernel_times

ACTIVATION, INDEX_LIST = "TopK activation", "index list"
# In the order they run: a run cut short keeps the cases done (each is written as it ends).
CASES = ((ACTIVATION, Shape(16, 14336, 1434, "fp32")), (ACTIVATION, Shape(1024, 32768, 2048, "bf16")),
         (INDEX_LIST, Shape(1024, 32768, 2048, "bf16")), (ACTIVATION, Shape(4096, 4096, 512, "bf16")),
         (INDEX_LIST, Shape(64, 131072, 2048, "bf16")), (ACTIVATION, Shape(64, 131072, 2048, "bf16")))
RECALL_TARGET = 0.95
VARIANTS = {
    "inductor": None,
    "approx, sorted": {"skip_unobserved_sort": False},
    "approx, order unobserved": {},
}


def topk_activation(h: torch.Tensor, k: int) -> torch.Tensor:
    values, indices = torch.topk(h, k)
    return torch.zeros_like(h).scatter(-1, indices, values)


def index_list(h: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(h, k).indices.sort(dim=-1).values


MODELS = {ACTIVATION: topk_activation, INDEX_LIST: index_list}


def compiled(model, variant: dict | None):
    torch.compiler.reset()
    if variant is None:
        return torch.compile(model, mode="reduce-overhead", dynamic=False)
    options = {"recall_target": RECALL_TARGET, "mode": "reduce-overhead", **variant}
    return torch.compile(model, backend="approx_topk", options=options, dynamic=False)


def recall_of(model_name: str, out: torch.Tensor, x: torch.Tensor, k: int) -> float:
    true = torch.topk(x, k).indices
    kept = out.ne(0) if model_name == ACTIVATION else torch.zeros_like(x, dtype=torch.bool).scatter(-1, out, True)
    return kept.gather(-1, true).float().mean().item()


def bench_case(model_name: str, shape: Shape, bandwidth: float, device: torch.device, profile: bool = False) -> dict:
    k = shape.k
    x = torch.randn(shape.rows, shape.n, device=device, dtype=DTYPES[shape.dtype])
    torch._dynamo.mark_static_address(x, guard=True)
    record = {"model": model_name, "shape": shape.name, "floor_us": hbm_floor_us(shape, bandwidth),
              "torch.topk": time_us(lambda: torch.topk(x, k), device)["median_us"],
              "torch.topk unsorted": time_us(lambda: torch.topk(x, k, sorted=False), device)["median_us"]}
    if device.type == "cuda":
        # The op alone, unsorted, replayed as the compiled model is: what the rest of the graph
        # adds to a call is the model's time beyond it.
        op = functools.partial(topk_compiler.approx_topk, x, k, sorted=False, recall_target=RECALL_TARGET)
        record["approx_topk unsorted, replayed"] = time_us(graph_replay(op), device)["median_us"]
    uncompiled = functools.partial(MODELS[model_name], k=k)
    for name, variant in VARIANTS.items():
        model = compiled(uncompiled, variant)
        report = None if variant is None else str(topk_compiler.explain(
            uncompiled, x, recall_target=RECALL_TARGET, mode="reduce-overhead", **variant))
        for _ in range(3):  # compile, record the CUDA graph, replay
            out = model(x)
        # Before the next replay overwrites it.
        recall = recall_of(model_name, out, x, k)
        record[name] = {**time_us(lambda: model(x), device), "recall": recall, "report": report}
        record[name]["x_floor"] = record[name]["median_us"] / record["floor_us"]
        if profile and device.type == "cuda":
            record[name]["kernels"] = kernel_times(lambda: model(x))
    print(json.dumps(record, default=str)[:600], flush=True)
    for name in VARIANTS:
        for kernel in record[name].get("kernels", []):
            print(f"  {name}: {kernel['us_per_op']:8.1f} us x{kernel['calls_per_op']:.0f} {kernel['name'][:90]}", flush=True)
    return record


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# Top-k sites whose order nothing observes, compiled whole ({env['device']}, torch {env['torch']}, "
             f"triton {env['triton']}, {env['date']})", "", f"Command: `{env['command']}`", "",
             f"{ACTIVATION}: `zeros_like(h).scatter(-1, i, v)` of `v, i = torch.topk(h, k)`; {INDEX_LIST}: "
             "`torch.topk(h, k).indices.sort(dim=-1).values`. Compiled with "
             f"`mode=\"reduce-overhead\"`; approx_topk at recall target {RECALL_TARGET}. Median of do_bench "
             "(L2 flushed) over calls of the compiled model; ×F = times the HBM floor; r = recall.", "",
             "| model | shape | floor | torch.topk (sorted / unsorted) | approx_topk alone (unsorted) | "
             + " | ".join(VARIANTS) + " |",
             "|---|---|---|---|---|" + "---|" * len(VARIANTS)]
    for r in report["cases"]:
        cells = [f"{r[v]['median_us']:.1f} µs · {r[v]['x_floor']:.1f}×F · r {r[v]['recall']:.3f}" for v in VARIANTS]
        alone = r.get("approx_topk unsorted, replayed")
        lines.append(f"| {r['model']} | {r['shape']} | {r['floor_us']:.2f} µs | {r['torch.topk']:.1f} / "
                     f"{r['torch.topk unsorted']:.1f} µs | {'-' if alone is None else f'{alone:.1f} µs'} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    parser.add_argument("--shapes", nargs="+", metavar="ROWSxN", help="shapes to run (default: all)")
    parser.add_argument("--profile", action="store_true", help="also record each kernel's device time a call")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bandwidth = measure_copy(device, 1024**3 if device.type == "cuda" else 2**26)["read_write_bytes_per_s"]
    start = time.time()
    cases = [(m, s) for m, s in CASES if not args.shapes or f"{s.rows}x{s.n}" in args.shapes]
    report = {"environment": {**environment(device, bandwidth), "command": shlex.join(
        ["python3", "-m", "benchmarks.bench_unobserved_order", *(sys.argv[1:] if argv is None else argv)])},
        "cases": []}
    args.out.mkdir(parents=True, exist_ok=True)
    for model_name, shape in cases:
        report["cases"].append(bench_case(model_name, shape, bandwidth, device, args.profile))
        report["seconds"] = round(time.time() - start, 1)
        (args.out / "bench_unobserved_order.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / "bench_unobserved_order.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
