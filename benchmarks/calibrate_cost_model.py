"""Measure every kernel variant the planner can pick, then fit the cost model's weights to them.

    # on the GPU (one device call; writes $OUT/calibration.json and prints the best variant per shape)
    python benchmarks/calibrate_cost_model.py measure [--quick]
    # here: fit the weights, write topk_compiler/lowering/calibration.py, report predicted vs measured
    python benchmarks/calibrate_cost_model.py fit benchmarks/results/calibration_h100.json

Each variant is launched directly (not through the op), timed with triton.testing.do_bench
(median of repetitions, L2 flushed between them), and checked: values equal the input at the
returned indices and the measured recall is within 0.03 of the recall model's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import torch

from topk_compiler import measured_recall
from topk_compiler.lowering import cost_model, plan
from topk_compiler.lowering.recall_model import expected_recall

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (rows, n, k, dtype): the headline shapes of the benchmark, then shapes that spread the features
# (few and many rows, short and long rows, small and large k).
HEADLINE = [
    (1024, 32768, 2048, "bf16"), (64, 131072, 2048, "bf16"), (4096, 4096, 512, "bf16"), (256, 128256, 50, "fp32"),
    (1024, 65536, 100, "fp32"), (16384, 8192, 64, "fp16"), (16, 14336, 1434, "fp32"),
]
SPREAD = [
    (1, 65536, 256, "bf16"), (64, 16384, 16, "fp32"), (1024, 16384, 256, "bf16"), (8, 262144, 2048, "bf16"),
    (1, 1048576, 16, "fp32"), (4096, 1024, 16, "fp32"), (256, 8192, 2048, "fp16"), (64, 65536, 256, "fp32"),
]
RECALL_TARGETS = (0.9, 0.95, 0.99)


def _variants(rows, n, k, dtype, quick):
    """Configurations to measure: exact selection over whole rows where it fits in registers, and
    for each recall target every bucketing with 128 to 4096 buckets (the smallest per_bucket_k that
    meets the target): fused for many rows, split so that about 256+ programs run for few rows;
    stage 2 by threshold, and by a bitonic network where k is small."""
    elem = torch.empty((), dtype=dtype).element_size()
    out = []
    n_pow2 = 1 << (n - 1).bit_length()
    if n_pow2 <= plan.MAX_REGISTER_SURVIVORS[elem]:
        for threshold in (True, False):
            out.append(dict(kernel="select", num_buckets=n_pow2, per_bucket_k=1, segments=1, threshold=threshold,
                            num_warps=4 if n_pow2 <= 1024 else 8, unroll=1, recall_target=1.0))
    seen = set()
    for target in (0.95,) if quick else RECALL_TARGETS:
        for b, kb, _ in plan.bucketings(n, k, target, "interleaved"):
            kbp = 1 << (kb - 1).bit_length()
            if b < 128 or b * kbp > plan.MAX_REGISTER_SURVIVORS[2] or (b, kb) in seen:
                continue
            seen.add((b, kb))
            thresholds = (True, False) if k <= 256 else (True,)
            if rows >= 128 and b * kbp <= plan.MAX_REGISTER_SURVIVORS[elem]:
                for threshold in thresholds:
                    out.append(dict(kernel="fused", num_buckets=b, per_bucket_k=kb, segments=1, threshold=threshold,
                                    num_warps=4 if b * kbp <= 2048 else 8, unroll=2, recall_target=target))
            if rows < 512:
                segments = 2
                while rows * segments < 256 and b // (2 * segments) >= 64:
                    segments *= 2
                for threshold in thresholds:
                    out.append(dict(kernel="split", num_buckets=b, per_bucket_k=kb, segments=segments,
                                    threshold=threshold, num_warps=4, unroll=2, recall_target=target))
    # Launch parameters around one fused variant at 0.95 (its median bucket count).
    fused = [v for v in out if v["kernel"] == "fused" and v["recall_target"] == 0.95]
    for v in fused[len(fused) // 2: len(fused) // 2 + 1]:
        for warps, unroll in ((4, 2), (16, 2), (8, 1), (8, 4)):
            if (warps, unroll) != (v["num_warps"], v["unroll"]):
                out.append({**v, "num_warps": warps, "unroll": unroll})
    return out


def _run(x, k, v):
    from topk_compiler.kernels import bucketed_topk as bucketed_kernels
    from topk_compiler.kernels import select_topk as select_kernels

    if v["kernel"] == "select":
        return select_kernels.exact_topk(x, k, largest=True, sorted=True, threshold=v["threshold"],
                                         num_warps=v["num_warps"])
    common = dict(num_buckets=v["num_buckets"], per_bucket_k=v["per_bucket_k"], largest=True, sorted=True,
                  threshold=v["threshold"], unroll=v["unroll"])
    if v["kernel"] == "fused":
        return bucketed_kernels.fused_bucketed_topk(x, k, num_warps=v["num_warps"], **common)
    return bucketed_kernels.split_bucketed_topk(x, k, segments=v["segments"], num_warps=v["num_warps"], **common)


def _predicted_us(rows, n, k, elem, v, profile):
    if v["kernel"] == "split":
        t = cost_model.split_time(rows, n, k, v["num_buckets"], v["per_bucket_k"], v["segments"], elem, True,
                                  v["threshold"], profile)
    else:
        t = cost_model.fused_time(rows, n, k, v["num_buckets"], v["per_bucket_k"], elem, True, v["threshold"], profile)
    return float(t) * 1e6


def measure(args) -> None:
    import triton
    from triton.testing import do_bench

    out_dir = args.out or os.environ.get("OUT") or "benchmarks/results"
    os.makedirs(out_dir, exist_ok=True)
    profile = cost_model.device_profile("cuda")
    shapes = HEADLINE if args.quick else HEADLINE + SPREAD
    records = []
    start = time.time()
    for rows, n, k, dname in shapes:
        dtype = DTYPES[dname]
        elem = torch.empty((), dtype=dtype).element_size()
        x = torch.randn(rows, n, device="cuda", dtype=torch.float32).to(dtype)
        exact = torch.topk(x, k, dim=1)
        t_torch = do_bench(lambda: torch.topk(x, k, dim=1), quantiles=[0.5, 0.2, 0.8])
        base = dict(rows=rows, n=n, k=k, dtype=dname, floor_us=rows * n * elem / profile.bandwidth * 1e6)
        records.append({**base, "kernel": "torch", "time_us": t_torch[0] * 1e3, "q20_us": t_torch[1] * 1e3,
                        "q80_us": t_torch[2] * 1e3, "recall": 1.0,
                        "predicted_us": float(cost_model.torch_topk_time(rows, n, k, elem, profile)) * 1e6})
        for v in _variants(rows, n, k, dtype, args.quick):
            rec = {**base, **v}
            try:
                values, indices = _run(x, k, v)
                torch.cuda.synchronize()
                ok = torch.equal(x.gather(1, indices), values)
                recall = measured_recall(x, indices, k)
                model = 1.0 if v["kernel"] == "select" else expected_recall(n, k, v["num_buckets"], v["per_bucket_k"])
                t = do_bench(lambda: _run(x, k, v), quantiles=[0.5, 0.2, 0.8])
                rec.update(time_us=t[0] * 1e3, q20_us=t[1] * 1e3, q80_us=t[2] * 1e3, recall=recall, model_recall=model,
                           correct=bool(ok and abs(recall - model) < 0.03),
                           predicted_us=_predicted_us(rows, n, k, elem, v, profile))
            except Exception as e:  # a variant that fails to compile or run is recorded, not fatal
                rec.update(error=f"{type(e).__name__}: {str(e)[:300]}")
            records.append(rec)
            print(json.dumps(rec), flush=True)
        del x, exact
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), date=datetime.datetime.now().isoformat(timespec="seconds"),
                command=" ".join(sys.argv), seconds=round(time.time() - start, 1))
    path = os.path.join(out_dir, "calibration.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    _summary(records)
    print(f"wrote {path} ({meta})")


def _summary(records) -> None:
    print(f"\n{'shape':<30} {'floor':>7} {'torch':>8} {'best@0.95 (us, xfloor, recall)':>34}  variant")
    by_shape = {}
    for r in records:
        by_shape.setdefault((r["rows"], r["n"], r["k"], r["dtype"]), []).append(r)
    for shape, rs in by_shape.items():
        torch_us = next(r["time_us"] for r in rs if r["kernel"] == "torch")
        ok = [r for r in rs if r.get("correct") and r.get("recall", 0) >= 0.95 - 1e-9 and r["kernel"] != "torch"]
        if not ok:
            print(f"{str(shape):<30} {rs[0]['floor_us']:7.1f} {torch_us:8.1f}   no variant reached recall 0.95")
            continue
        best = min(ok, key=lambda r: r["time_us"])
        variant = (f"{best['kernel']} b={best['num_buckets']} kb={best['per_bucket_k']} seg={best['segments']} "
                   f"thr={best['threshold']} w={best['num_warps']} u={best['unroll']}")
        print(f"{str(shape):<30} {rs[0]['floor_us']:7.1f} {torch_us:8.1f} {best['time_us']:10.1f} "
              f"{best['time_us'] / best['floor_us']:6.2f}x {best['recall']:.3f}  {variant}")


def _nnls(a, b, iterations=5000):
    """Non-negative least squares by projected coordinate descent (numpy only)."""
    import numpy as np

    x = np.zeros(a.shape[1])
    col_norms = (a * a).sum(0)
    for _ in range(iterations):
        for j in range(a.shape[1]):
            if col_norms[j] == 0:
                continue
            r = b - a @ x + a[:, j] * x[j]
            x[j] = max(0.0, float(a[:, j] @ r) / col_norms[j])
    return x


def _features(record, terms, base_profile):
    """The prediction of ``record`` with all weights 0 (bandwidth only), and its change per unit of
    each weight (the formulas are linear in the weights)."""
    zero = cost_model.with_weights(base_profile, {t: 0.0 for t in base_profile.weights})
    rows, n, k = record["rows"], record["n"], record["k"]
    elem = torch.empty((), dtype=DTYPES[record["dtype"]]).element_size()

    def predict(profile):
        if record["kernel"] == "torch":
            return float(cost_model.torch_topk_time(rows, n, k, elem, profile))
        return _predicted_us(rows, n, k, elem, record, profile) * 1e-6

    base = predict(zero)
    return base, [predict(cost_model.with_weights(zero, {t: 1.0})) - base for t in terms]


def fit(args) -> None:
    import numpy as np

    with open(args.path) as f:
        data = json.load(f)
    records = [r for r in data["records"] if "error" not in r and (r["kernel"] == "torch" or r.get("correct"))]
    base_profile = cost_model.DeviceProfile("cuda", data["meta"]["device"], 132, 3.0e12,
                                            dict(cost_model._DEFAULT_CUDA_WEIGHTS))
    fitted = {}
    for group, terms in (("kernels", [t for t in cost_model.WORK_TERMS if not t.startswith("torch")]),
                         ("torch", [t for t in cost_model.WORK_TERMS if t.startswith("torch")])):
        rs = [r for r in records if (r["kernel"] == "torch") == (group == "torch")]
        rows_a, rows_b = [], []
        for r in rs:
            base, feats = _features(r, terms, base_profile)
            measured = r["time_us"] * 1e-6
            rows_a.append([f / measured for f in feats])
            rows_b.append((measured - base) / measured)
        w = _nnls(np.array(rows_a), np.array(rows_b))
        fitted.update(dict(zip(terms, (float(v) for v in w))))
    profile = cost_model.with_weights(base_profile, fitted)
    errors = []
    print(f"{'shape':<28} {'variant':<40} {'measured':>9} {'predicted':>9}")
    for r in records:
        base, feats = _features(r, list(fitted), profile)
        predicted = base + sum(f * fitted[t] for f, t in zip(feats, fitted))
        errors.append(abs(math.log(predicted / (r["time_us"] * 1e-6))))
        variant = f"{r['kernel']} b={r.get('num_buckets')} kb={r.get('per_bucket_k')} seg={r.get('segments')}"
        print(f"{str((r['rows'], r['n'], r['k'], r['dtype'])):<28} {variant:<40} {r['time_us']:9.1f} "
              f"{predicted * 1e6:9.1f}")
    print(f"median |log(pred/meas)| = {np.median(errors):.3f}, 90th percentile {np.percentile(errors, 90):.3f}")
    key = "H100" if "H100" in data["meta"]["device"] else data["meta"]["device"]
    with open(args.write, "w") as f:
        f.write(
            '"""Cost-model weights fitted to measurements (written by benchmarks/calibrate_cost_model.py).\n\n'
            "Keyed by a substring of the device name; ``cost_model.device_profile`` uses the first match and\n"
            "falls back to its uncalibrated defaults for other devices.\n"
            f'Fitted from {os.path.basename(args.path)}: {data["meta"]["device"]}, torch {data["meta"]["torch"]}, '
            f'triton {data["meta"]["triton"]}, {data["meta"]["date"]};\n'
            f"median |log(predicted / measured)| = {np.median(errors):.3f} over {len(records)} timings.\n"
            '"""\n\n'
            f"CUDA_WEIGHTS: dict[str, dict[str, float]] = {{\n    {key!r}: {{\n"
            + "".join(f"        {t!r}: {v:.6g},\n" for t, v in fitted.items())
            + "    },\n}\n"
        )
    print(f"wrote {args.write}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--quick", action="store_true")
    m.add_argument("--out")
    f = sub.add_parser("fit")
    f.add_argument("path")
    f.add_argument("--write", default="topk_compiler/lowering/calibration.py")
    args = parser.parse_args()
    measure(args) if args.mode == "measure" else fit(args)


if __name__ == "__main__":
    main()
