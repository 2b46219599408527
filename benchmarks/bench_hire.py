"""HiRE predict-then-compute against dense on one GPU: LM head top-k and ReLU FFN.

Cases (bf16): LM head d=4096, V=128256, k=50, batch 1, 8, 64; ReLU FFN d=4096, d_ff=16384,
batch 1, 8, 32, with 10% and 30% of the neurons active. Dense = cuBLAS (F.linear) + torch.topk,
or linear-ReLU-linear. HiRE = ``topk_compiler::hire_logits_topk`` / ``hire_ffn`` with the rank and
k' (logits) or threshold (FFN: a row computes the neurons predicted above it) that
``topk_compiler.calibrate`` picks for recall >= ``--recall`` on calibration inputs; recall is then
measured on other inputs, with the op's own predictor and selection. The tables' k' for the FFN is
the mean number of neurons a row computes.

Weights are synthetic, because random Gaussian weights have none of the structure HiRE relies
on: ``W = G diag(s) Q^T`` with Gaussian ``G``, a random orthogonal ``Q`` and the decaying spectrum
``s_i = 1 / (1 + i / 8)`` (the energy beyond rank r is about 8 / (r + 8) of the total, so a rank-64
predictor leaves ~11% of it); inputs are standard Gaussian. The FFN's W1 has the same structure;
its bias ``b1_j = -|W1_j| Phi^-1(1 - f)`` makes each neuron active with probability f. The recall
measured on these weights is reported next to each time; real weights are evaluated in
``eval_hire_minilm.py`` and ``eval_hire_relu_lm.py``.

Times: ``triton.testing.do_bench`` medians (L2 flushed before every run), of the eager call and
of a CUDA-graph replay of it (decode loops run under CUDA graphs; eager, the host's launch
latency for a dozen microsecond kernels can exceed their GPU time). The speed-up is read from the
CUDA-graph times. "auto" says what the op does with ``rewrite="auto"`` (on the GPU: dense and HiRE
timed at the shape's first call; the cost model's verdict is kept beside it as ``model_rewrites``):
where the op declines, it runs the dense form, so its speed-up there is 1 by construction; HiRE's
own time is still reported. Writes ``bench_hire.json`` and ``bench_hire.md`` under
``--out`` (default ``$OUT``, else benchmarks/results) and prints the table last.

    python benchmarks/bench_hire.py            # a GPU: about 2 minutes on an H200
    python benchmarks/bench_hire.py --smoke    # CPU, tiny sizes: checks that the script runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
import traceback
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import topk_compiler
from topk_compiler.lowering import hire_cost_model
from topk_compiler.lowering.hire_ffn import dense_ffn, restricted_ffn
from topk_compiler.lowering.hire_ffn import dense_is_cheaper as ffn_dense_is_cheaper
from topk_compiler.lowering.hire_ffn import runs_dense as ffn_runs_dense
from topk_compiler.lowering.hire_logits import dense_is_cheaper as logits_dense_is_cheaper
from topk_compiler.lowering.hire_logits import runs_dense as logits_runs_dense
from topk_compiler.lowering.hire_predictor import predictor_for

FULL = dict(d=4096, vocab=128256, k=50, head_batches=(1, 8, 64), d_ff=16384, ffn_batches=(1, 8, 32),
            active=(0.1, 0.3), ranks=(32, 64, 128, 256, 512), calibration_rows=1024, evaluation_rows=1024)
SMOKE = dict(d=64, vocab=3000, k=10, head_batches=(1, 4), d_ff=512, ffn_batches=(1, 4), active=(0.1, 0.3),
             ranks=(8, 16, 32), calibration_rows=64, evaluation_rows=64)
SPECTRUM_KNEE = 8  # s_i = 1 / (1 + i / SPECTRUM_KNEE)


def structured_weight(n: int, d: int, gen: torch.Generator, device, dtype) -> torch.Tensor:
    """[n, d] = G diag(s) Q^T, rows of unit expected norm (logits of N(0, I) inputs ~ N(0, 1))."""
    s = 1.0 / (1.0 + torch.arange(d, dtype=torch.float32) / SPECTRUM_KNEE)
    s = (s / s.norm()).to(device)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen).to(device))
    g = torch.randn(n, d, generator=gen).to(device)
    return ((g * s) @ q.T).to(dtype)


def inputs(rows: int, d: int, seed: int, device, dtype) -> torch.Tensor:
    return torch.randn(rows, d, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


def timer(device: str):
    """(time of fn in us: median, 20th, 80th percentile) eager, and under a CUDA graph (None on CPU)."""
    if device == "cuda":
        from triton.testing import do_bench

        def eager(fn):
            return [1e3 * t for t in do_bench(fn, quantiles=[0.5, 0.2, 0.8])]

        def graphed(fn):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            return [1e3 * t for t in do_bench(graph.replay, quantiles=[0.5, 0.2, 0.8])]

        return eager, graphed

    def eager_cpu(fn):
        fn()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e6)
        return [statistics.median(times), min(times), max(times)]

    return eager_cpu, None


class Head(nn.Module):
    def __init__(self, weight: torch.Tensor, k: int):
        super().__init__()
        self.weight, self.k = nn.Parameter(weight, requires_grad=False), k

    def forward(self, x):
        return torch.topk(F.linear(x, self.weight), self.k)


class Ffn(nn.Module):
    def __init__(self, w1, b1, w2, b2):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(w1.shape[1], w1.shape[0]), nn.Linear(w2.shape[1], w2.shape[0])
        for p, v in ((self.fc1.weight, w1), (self.fc1.bias, b1), (self.fc2.weight, w2), (self.fc2.bias, b2)):
            p.requires_grad_(False)
            p.data = v

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def calibrated(module, d, batch, cfg, device, dtype, recall, seed) -> dict:
    """The site's entry from topk_compiler.calibrate at this batch size."""
    rows = max(batch, cfg["calibration_rows"] // batch * batch)
    x = inputs(rows, d, seed, device, dtype)
    torch.compiler.reset()
    options = topk_compiler.calibrate(module, list(x.split(batch)), recall_target=recall, predictors=["lowrank"],
                                      ranks=cfg["ranks"], max_rows=rows)
    (entry,) = options["hire"]["calibration"].values()
    return entry


def bench_head(batch, weight, cfg, device, dtype, recall_target, measure):
    eager, graphed = measure
    d, n, k = weight.shape[1], weight.shape[0], cfg["k"]
    head = Head(weight, k)
    entry = calibrated(head, d, batch, cfg, device, dtype, recall_target, seed=1)
    rank, kc, calib_recall = entry["rank"], entry["candidates"], entry["recall"]

    def dense(x):
        return torch.topk(F.linear(x, weight), k)

    def hire(x):
        return torch.ops.topk_compiler.hire_logits_topk(x, weight, None, k, True, True, 1.0, "none", dtype,
                                                        "lowrank", rank, kc, "always")

    x_eval = inputs(cfg["evaluation_rows"] // batch * batch or batch, d, 2, device, dtype)
    hits = total = 0
    value_err = 0.0
    with torch.no_grad():
        for x in x_eval.split(batch):
            logits = F.linear(x, weight).float()
            exact = logits.topk(k).indices
            values, indices = hire(x)
            hits += (indices[:, :, None] == exact[:, None, :]).any(1).sum().item()
            total += exact.numel()
            value_err = max(value_err, ((values.float() - logits.gather(1, indices)).abs().max()
                                        / logits.abs().max()).item())
    x = inputs(batch, d, 3, device, dtype)
    model_rewrites = not logits_dense_is_cheaper(batch, d, n, k, kc, "lowrank", rank, dtype, str(weight.device), "none")
    rewrite = {captured: not logits_runs_dense(x, weight, None, k, True, True, 1.0, "none", dtype, "lowrank", rank, kc,
                                               captured=captured) for captured in (True, False)}
    dense_cost = hire_cost_model.dense_logits_cost(batch, d, n, k, dtype, str(weight.device))
    hire_cost = hire_cost_model.hire_logits_cost(batch, d, n, k, kc, "lowrank", rank, dtype, str(weight.device))
    times = {"dense_eager_us": eager(lambda: dense(x)), "hire_eager_us": eager(lambda: hire(x))}
    if graphed:
        times.update(dense_graph_us=graphed(lambda: dense(x)), hire_graph_us=graphed(lambda: hire(x)))
    return dict(case="lm_head", batch=batch, d=d, vocab=n, k=k, rank=rank, candidates=kc,
                calibration_recall=calib_recall, recall=hits / total, max_value_error_rel=value_err,
                auto_rewrites=rewrite[True], auto_rewrites_eager=rewrite[False], model_rewrites=model_rewrites,
                dense_bytes=dense_cost.bytes,
                hire_bytes=hire_cost.bytes, predicted_dense_us=dense_cost.us, predicted_hire_us=hire_cost.us, **times)


def bench_ffn(batch, active, w1, w2, b2, cfg, device, dtype, recall_target, measure):
    eager, graphed = measure
    d_ff, d = w1.shape
    threshold = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1.0 - active)).item()
    b1 = (-w1.float().norm(dim=1) * threshold).to(dtype)
    module = Ffn(w1, b1, w2, b2)
    entry = calibrated(module, d, batch, cfg, device, dtype, recall_target, seed=4)
    rank, threshold, neurons, calib_recall = entry["rank"], entry["threshold"], entry["candidates"], entry["recall"]

    def hire(x):
        return torch.ops.topk_compiler.hire_ffn(x, w1, b1, w2, b2, "relu", "lowrank", rank, threshold, neurons,
                                                "always")

    x_eval = inputs(cfg["evaluation_rows"] // batch * batch or batch, d, 5, device, dtype)
    mass_recall = out_err = restricted_err = active_measured = computed = 0.0
    chunks = 0
    with torch.no_grad():
        predictor = predictor_for(w1, "lowrank", rank)
        w1f, b1f, w2f, b2f = w1.float(), b1.float(), w2.float(), b2.float()
        for x in x_eval.split(batch):
            pre = F.linear(x, w1, b1).float()
            mass = pre.clamp(min=0)
            chosen = predictor.scores(x, b1) > threshold
            got, total = (mass * chosen).sum(1), mass.sum(1)
            mass_recall += torch.where(total > 0, got / total.clamp_min(1e-30), 1.0).mean().item()
            active_measured += (pre > 0).float().mean().item()
            computed += chosen.float().mean().item()
            ours, full = hire(x).float(), dense_ffn(x, w1, b1, w2, b2, "relu").float()
            out_err += ((ours - full).norm() / (full - b2.float()).norm()).item()
            slots = chosen.any(0).nonzero().flatten()
            reference = restricted_ffn(x.float(), w1f, b1f, w2f, b2f, "relu", slots, chosen[:, slots] if batch > 1 else None)
            restricted_err = max(restricted_err, ((ours - reference).norm() / reference.norm()).item())
            chunks += 1
    x = inputs(batch, d, 6, device, dtype)
    model_rewrites = not ffn_dense_is_cheaper(batch, d, d_ff, d, neurons, "lowrank", rank, dtype, str(w1.device))
    rewrite = {captured: not ffn_runs_dense(x, w1, b1, w2, b2, "relu", "lowrank", rank, threshold, neurons,
                                            captured=captured) for captured in (True, False)}
    dense_cost = hire_cost_model.dense_ffn_cost(batch, d, d_ff, d, dtype, str(w1.device))
    hire_cost = hire_cost_model.hire_ffn_cost(batch, d, d_ff, d, neurons, "lowrank", rank, dtype, str(w1.device))
    times = {"dense_eager_us": eager(lambda: dense_ffn(x, w1, b1, w2, b2, "relu")), "hire_eager_us": eager(lambda: hire(x))}
    if graphed:
        times.update(dense_graph_us=graphed(lambda: dense_ffn(x, w1, b1, w2, b2, "relu")),
                     hire_graph_us=graphed(lambda: hire(x)))
    return dict(case=f"ffn_{round(active * 100)}pct", batch=batch, d=d, d_ff=d_ff, active_target=active,
                active_measured=active_measured / chunks, rank=rank, threshold=threshold, candidates=neurons,
                computed_fraction=computed / chunks, calibration_recall=calib_recall,
                recall=mass_recall / chunks, relative_output_error=out_err / chunks,
                max_error_vs_restricted_dense=restricted_err, auto_rewrites=rewrite[True],
                auto_rewrites_eager=rewrite[False], model_rewrites=model_rewrites,
                dense_bytes=dense_cost.bytes, hire_bytes=hire_cost.bytes, predicted_dense_us=dense_cost.us, predicted_hire_us=hire_cost.us, **times)


def speedup(row, eager: bool = False) -> float | None:
    key = "graph_us" if "dense_graph_us" in row and not eager else "eager_us"
    if f"dense_{key}" not in row:
        return None
    return row[f"dense_{key}"][0] / row[f"hire_{key}"][0]


def markdown(payload) -> str:
    lines = [f"# HiRE vs dense, {payload['device']}, {payload['date']}", "",
             f"torch {payload['torch']}, triton {payload['triton']}, {payload['dtype']}, recall target "
             f"{payload['recall_target']} (calibrated for {payload['calibration_target']}). Synthetic structured weights (see bench_hire.py); recall measured on them. "
             "Times: do_bench median us, L2 flushed; speed-up from CUDA-graph times (eager where no GPU).", "",
             "| case | batch | rank | k' | recall | dense us (graph / eager) | HiRE us (graph / eager) | speed-up "
             "| bytes dense / HiRE | auto (graph / eager) | effective speed-up (graph / eager) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["results"]:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['batch']} | error: {r['error'][:80]} |||||||||")
            continue
        g = lambda name: f"{r[name][0]:.1f}" if name in r else "-"  # noqa: E731
        s = speedup(r)
        lines.append(
            f"| {r['case']} | {r['batch']} | {r['rank']} | {r['candidates']} | {r['recall']:.3f} | "
            f"{g('dense_graph_us')} / {g('dense_eager_us')} | {g('hire_graph_us')} / {g('hire_eager_us')} | {s:.2f}x | "
            f"{r['dense_bytes'] / 2**20:.0f} MiB / {r['hire_bytes'] / 2**20:.1f} MiB | "
            f"{auto(r, False)} / {auto(r, True)} | {effective(r, False):.2f}x / {effective(r, True):.2f}x |")
    lines += ["", "Targets:"] + [f"- {t}" for t in payload["targets"]]
    return "\n".join(lines) + "\n"


def auto(row, eager: bool) -> str:
    """What the op with rewrite="auto" runs, in CUDA graphs or eagerly."""
    return "HiRE" if row["auto_rewrites_eager" if eager else "auto_rewrites"] else "dense"


def effective(row, eager: bool) -> float:
    """Dense time over the time of what the op runs with rewrite="auto"."""
    return speedup(row, eager) if auto(row, eager) == "HiRE" else 1.0


def check_targets(results, recall) -> list[str]:
    out = []
    by = {(r["case"], r["batch"]): r for r in results if "error" not in r}
    for case, goal in (("lm_head", 4.0), ("ffn_10pct", 3.0)):
        r = by.get((case, 1))
        if r is not None:
            s = speedup(r)
            out.append(f"{case} batch 1 speed-up >= {goal:g}x: {'PASS' if s >= goal else 'FAIL'} ({s:.2f}x, recall "
                       f"{r['recall']:.3f}, auto={'HiRE' if r['auto_rewrites'] else 'dense'})")
    slower = [f"{r['case']} b{r['batch']} {'eager' if eager else 'graph'} ({effective(r, eager):.2f}x)"
              for r in by.values() for eager in (False, True) if effective(r, eager) < 1.0]
    out.append("never slower than dense where the op rewrites (rewrite='auto'), in CUDA graphs and eagerly: "
               + ("PASS" if not slower else "FAIL: " + ", ".join(slower)))
    low = [f"{r['case']} b{r['batch']} ({r['recall']:.3f})" for r in by.values() if r["recall"] < recall]
    out.append(f"measured recall >= {recall:g} on evaluation inputs: " + ("PASS" if not low else "below at " + ", ".join(low)))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: only checks the script runs")
    parser.add_argument("--recall", type=float, default=0.95, help="recall the HiRE cases must reach on evaluation inputs")
    parser.add_argument("--margin", type=float, default=0.01,
                        help="calibrate for recall + margin: calibration meets its target exactly on its own rows, "
                             "and fresh rows scatter around it")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    cfg = SMOKE if args.smoke else FULL
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke on a CPU")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    measure = timer(device)
    gen = torch.Generator().manual_seed(0)
    start = time.time()
    results = []
    target = min(1.0, args.recall + args.margin)

    def run(label, fn, *fn_args):
        try:
            row = fn(*fn_args)
        except Exception as e:  # one failing case must not lose the others' numbers
            traceback.print_exc()
            row = dict(case=label[0], batch=label[1], error=f"{type(e).__name__}: {e}")
        results.append(row)
        print(json.dumps(row), flush=True)

    with torch.no_grad():
        weight = structured_weight(cfg["vocab"], cfg["d"], gen, device, dtype)
        for batch in cfg["head_batches"]:
            run(("lm_head", batch), bench_head, batch, weight, cfg, device, dtype, target, measure)
        del weight
        w1 = structured_weight(cfg["d_ff"], cfg["d"], gen, device, dtype)
        w2 = (torch.randn(cfg["d"], cfg["d_ff"], generator=gen) / math.sqrt(cfg["d_ff"])).to(device, dtype)
        b2 = (0.1 * torch.randn(cfg["d"], generator=gen)).to(device, dtype)
        for active in cfg["active"]:
            for batch in cfg["ffn_batches"]:
                run((f"ffn_{round(active * 100)}pct", batch), bench_ffn, batch, active, w1, w2, b2, cfg, device,
                    dtype, target, measure)

    import triton

    payload = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(), dtype=str(dtype),
        recall_target=args.recall, calibration_target=target, smoke=args.smoke, sizes={k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        seconds=round(time.time() - start, 1), results=results, targets=check_targets(results, args.recall))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_hire.json").write_text(json.dumps(payload, indent=1) + "\n")
    (args.out / "bench_hire.md").write_text(markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
