"""Measure the kernel variants the planner can pick, then fit the cost model's weights to them.

    # on the GPU (one device call; writes $OUT/calibration.json and prints the best variant per shape)
    python -m benchmarks.calibrate_cost_model measure [--quick] [--jobs 16]
    # here: fit the weights, write topk_compiler/lowering/calibration.py, report predicted vs measured
    python -m benchmarks.calibrate_cost_model fit benchmarks/results/calibration_h100_*.json

Each variant is launched directly (not through the op), timed with triton.testing.do_bench
(median of repetitions, L2 flushed between them), and checked: values equal the input at the
returned indices, exact variants return torch.topk's values, and the measured recall of the
approximate ones is within 0.03 of the recall model's.

Per shape the sweep holds, for the approximate kernels at recall 0.95, every way to finish stage 2
(select by bisection, radix histograms or a bitonic network; sort in the program or in a separate
launch) on up to three bucketings; launch parameters (warps, loads in flight, the sort launch's
warps) around the middle bucketing; the split kernel where rows are few; one bucketing at recall
0.9 and 0.99; the exact kernels (rows in registers, filtered, certified); torch.topk sorted and unsorted; and
stage 1 alone (survivors to memory) to see how close it streams to the HBM floor.
Kernels are compiled first by ``--jobs`` worker processes on two-row slices of the same length
(Triton specialises on the same argument properties), so the timing process finds them cached.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import math
import multiprocessing
import os
import platform
import sys
import time

import torch

from topk_compiler.lowering import bucketed_topk as op
from topk_compiler.kernels import next_pow2
from topk_compiler.lowering import cost_model, plan
from topk_compiler.lowering.recall_model import expected_recall, measured_recall, uncertified_probability

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
TARGET = 0.95
SPREAD_TARGETS = (0.9, 0.99)
QUANTILES = [0.5, 0.2, 0.8]


def _base_variant(kernel, **kw):
    v = dict(kernel=kernel, num_buckets=0, per_bucket_k=0, segments=1, select="bisect", sort_with="program",
             sort_warps=1, num_warps=8, unroll=op.UNROLL, sorted=True, recall_target=1.0, base=True)
    v.update(kw)
    return v


def _default_sort(k):
    return "program" if next_pow2(k) <= plan.MAX_BITONIC_K else "launch"


def _split_configs(rows, n, k, elem):
    """(b, kb, segments) for few rows: the fewest and the most buckets meeting the target, their
    lanes spread over enough programs to fill the GPU twice."""
    options = [(b, kb) for b, kb, _ in plan.bucketings(n, k, TARGET, "interleaved")
               if b >= 256 and b * next_pow2(kb) <= plan.MAX_REGISTER_SURVIVORS[2]]
    for b, kb in dict.fromkeys(options[:1] + options[-1:]):
        segments = 2
        while rows * segments < 264 and b // (2 * segments) >= plan.MIN_SEGMENT_LANES:
            segments *= 2
        yield b, kb, segments


def variants(rows, n, k, dtype, quick=False):
    """Configurations to measure for one shape (see the module docstring)."""
    elem = torch.empty((), dtype=dtype).element_size()
    sort_warps = plan.sort_warps_for(k, elem)
    sort = _default_sort(k)

    def _base(kernel, **kw):
        return _base_variant(kernel, **{"sort_warps": sort_warps, "sort_with": sort, **kw})

    out = [_base("torch"), _base("torch", sorted=False, base=False)]
    finishes = list(plan._finishes(rows, k, True))
    fused = [(b, kb) for b, kb, _ in plan.bucketings(n, k, TARGET, "interleaved")
             if b * next_pow2(kb) <= plan.MAX_REGISTER_SURVIVORS[elem]]
    fused = fused[max(0, len(fused) // 2 - 1): len(fused) // 2 + 2]
    for i, (b, kb) in enumerate(fused):
        middle = i == len(fused) // 2
        fin = finishes if middle else [("bisect", sort)]
        for select, sort_with in fin:
            out.append(_base("fused", num_buckets=b, per_bucket_k=kb, select=select, sort_with=sort_with,
                             num_warps=plan.warps_for(b, b * next_pow2(kb)), recall_target=TARGET))
        if middle:
            mid = {**out[-len(fin)], "select": "bisect", "sort_with": sort, "base": False}
            out += [{**mid, "num_warps": w} for w in (4, 8, 16) if w != mid["num_warps"] and w <= b // 32]
            out += [{**mid, "unroll": u} for u in (2, 8)]
            out.append({**mid, "sorted": False})
            out.append({**mid, "kernel": "survivors"})
            out += [{**mid, "sort_with": "launch", "sort_warps": w} for w in (sort_warps // 2, sort_warps * 2)
                    if 1 <= w <= 8]
    if rows < 256:
        for b, kb, segments in _split_configs(rows, n, k, elem):
            for sort_with in sorted({"program", sort}):
                out.append(_base("split", num_buckets=b, per_bucket_k=kb, segments=segments, sort_with=sort_with,
                                 num_warps=plan.warps_for(b // segments), recall_target=TARGET))
    if not quick:
        for target in SPREAD_TARGETS:
            options = [(b, kb) for b, kb, _ in plan.bucketings(n, k, target, "interleaved")
                       if b * next_pow2(kb) <= plan.MAX_REGISTER_SURVIVORS[elem]]
            if options:
                b, kb = options[len(options) // 2]
                out.append(_base("fused", num_buckets=b, per_bucket_k=kb,
                                 num_warps=plan.warps_for(b, b * next_pow2(kb)), recall_target=target))
    n_pow2 = next_pow2(n)
    if n_pow2 <= plan.MAX_REGISTER_SURVIVORS[elem]:
        for select, sort_with in [("bisect", "program"), ("radix", sort)] + (
                [("bitonic", "program")] if next_pow2(k) <= plan.MAX_BITONIC_K else []):
            out.append(_base("select", select=select, sort_with=sort_with, num_warps=plan.warps_for(n_pow2 // 8, n_pow2)))
    for i, (b, kb) in enumerate(list(plan.filtered_bucketings(n, k, elem))[:2]):
        for select, sort_with in sorted({("bisect", sort), ("radix", sort)}) if i == 0 else \
                [("bisect", sort)]:
            out.append(_base("filtered", num_buckets=b, per_bucket_k=kb, select=select, sort_with=sort_with,
                             num_warps=plan.warps_for(b, b * next_pow2(kb))))
    for b, kb, _ in list(plan.certified_bucketings(rows, n, k, elem))[:2]:
        out.append(_base("certified", num_buckets=b, per_bucket_k=kb, select="bisect", sort_with=sort,
                         num_warps=plan.fused_warps(rows, b, b * next_pow2(kb), 132)))
    # Measured and predicted, not fitted: its price borrows other kernels' terms, which its timings
    # would pull towards a formula not yet checked against it.
    for b, kb, _ in list(plan.wide_bucketings(rows, n, k, TARGET, "interleaved", 132))[:2]:
        for select in ("bisect", "bitonic") if next_pow2(kb) <= plan.MAX_BITONIC_K else ("bisect",):
            out.append(_base("wide", num_buckets=b, per_bucket_k=kb, select=select, recall_target=TARGET,
                             base=False, num_warps=plan.warps_for(next_pow2(-(-n // b)))))
    return out


def run_variant(x, k, v):
    """One call of variant ``v`` on ``x`` ([rows, n]): (values, indices), or survivors for stage 1 alone."""
    from topk_compiler.kernels import bucketed_topk as bucketed_kernels
    from topk_compiler.kernels import filtered_topk as filtered_kernels
    from topk_compiler.kernels import select_topk as select_kernels

    if v["kernel"] == "torch":
        return torch.topk(x, k, dim=1, sorted=v["sorted"])
    finish = dict(sorted=v["sorted"], select=v["select"], sort_with=v["sort_with"], sort_warps=v["sort_warps"])
    bucketing = dict(num_buckets=v["num_buckets"], per_bucket_k=v["per_bucket_k"], largest=True, unroll=v["unroll"])
    if v["kernel"] == "select":
        return select_kernels.exact_topk(x, k, largest=True, num_warps=v["num_warps"], **finish)
    if v["kernel"] == "filtered":
        return filtered_kernels.filtered_topk(x, k, num_warps=v["num_warps"], **bucketing, **finish)
    if v["kernel"] == "certified":
        from topk_compiler.kernels import certified_topk as certified_kernels

        return certified_kernels.certified_topk(x, k, num_warps=v["num_warps"], **bucketing, **finish)[:2]
    if v["kernel"] == "wide":
        from topk_compiler.kernels.wide_bucket_topk import wide_bucket_topk

        return wide_bucket_topk(x, k, num_buckets=v["num_buckets"], per_bucket_k=v["per_bucket_k"], largest=True,
                                num_warps=v["num_warps"], select=v["select"])
    if v["kernel"] == "fused":
        return bucketed_kernels.fused_bucketed_topk(x, k, num_warps=v["num_warps"], **bucketing, **finish)
    if v["kernel"] == "survivors":
        return bucketed_kernels.bucket_survivors(x, segments=1, num_warps=v["num_warps"], **bucketing)
    return bucketed_kernels.split_bucketed_topk(x, k, segments=v["segments"], num_warps=v["num_warps"],
                                                **bucketing, **finish)


def predicted_us(rows, n, k, elem, v, profile):
    """The cost model's time for variant ``v`` (None for variants it does not model)."""
    kernel = v["kernel"]
    common = (elem, v["sorted"], v["select"], v["sort_with"], profile)
    if kernel == "torch":
        t = cost_model.torch_topk_time(rows, n, k, elem, profile) if v["sorted"] else None
    elif kernel == "fused":
        t = cost_model.fused_time(rows, n, k, v["num_buckets"], v["per_bucket_k"], *common)
    elif kernel == "split":
        t = cost_model.split_time(rows, n, k, v["num_buckets"], v["per_bucket_k"], v["segments"], *common)
    elif kernel == "select":
        t = cost_model.select_time(rows, n, k, *common)
    elif kernel == "filtered":
        t = cost_model.filtered_time(rows, n, k, v["num_buckets"], v["per_bucket_k"], *common)
    elif kernel == "certified":
        row_fails = uncertified_probability(n, k, v["num_buckets"], v["per_bucket_k"])
        t = cost_model.certified_time(rows, n, k, v["num_buckets"], v["per_bucket_k"], elem, v["sorted"],
                                      v["select"], v["sort_with"], 1.0 - (1.0 - row_fails) ** rows, profile)
    elif kernel == "wide":
        t = cost_model.wide_time(rows, n, k, v["num_buckets"], v["per_bucket_k"], elem, v["select"], profile)
    else:
        t = None
    return None if t is None else float(t) * 1e6


def _compile_worker(n, k, dname, chunk):
    """Runs each variant once on two rows of length n: fills Triton's on-disk kernel cache."""
    x = torch.randn(2, n, device="cuda").to(DTYPES[dname])
    errors = {}
    for i, v in chunk:
        try:
            run_variant(x, min(k, n), v)
        except Exception as error:  # reported again, with context, by the timing pass
            errors[i] = f"{type(error).__name__}: {str(error)[:200]}"
    torch.cuda.synchronize()
    return errors


def _key(rows, n, k, dname, v):
    return (rows, n, k, dname, _describe(v))


def known_keys(paths) -> set:
    """Variants already measured in these calibration files (skipped by ``--known``)."""
    keys = set()
    for path in paths or ():
        with open(path) as f:
            for r in json.load(f)["records"]:
                if r["kernel"] != "torch":
                    keys.add(_key(r["rows"], r["n"], r["k"], r["dtype"], r))
    return keys


def to_measure(rows, n, k, dname, quick, known):
    return [v for v in variants(rows, n, k, DTYPES[dname], quick) if _key(rows, n, k, dname, v) not in known]


def precompile(shapes, quick, jobs, known):
    tasks = []
    for rows, n, k, dname in shapes:
        vs = [(i, v) for i, v in enumerate(to_measure(rows, n, k, dname, quick, known)) if v["kernel"] != "torch"]
        for j in range(0, len(vs), 4):
            tasks.append((n, k, dname, vs[j:j + 4]))
    start = time.time()
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        list(pool.map(_compile_worker, *zip(*tasks)))
    print(f"precompiled {sum(len(t[3]) for t in tasks)} variants in {time.time() - start:.0f} s with {jobs} jobs",
          flush=True)


def check(x, k, v, out):
    """(correct, measured recall, recall the model expects)."""
    if v["kernel"] == "survivors":
        return True, None, None
    values, indices = out
    ok = torch.equal(x.gather(1, indices), values)
    recall = measured_recall(x, indices, k)
    if v["kernel"] in ("torch", "select", "filtered", "certified"):
        exact = torch.topk(x, k, dim=1).values
        got = values if v["sorted"] else values.sort(dim=1, descending=True).values
        return bool(ok and torch.equal(got, exact)), recall, 1.0
    model = expected_recall(x.shape[1], k, v["num_buckets"], v["per_bucket_k"])
    if v["sorted"]:
        ok = ok and bool((values[:, 1:] <= values[:, :-1]).all())
    return bool(ok and abs(recall - model) < 0.03), recall, model


def measure(args) -> None:
    import triton
    from triton.testing import do_bench

    out_dir = args.out or os.environ.get("OUT") or "benchmarks/results"
    os.makedirs(out_dir, exist_ok=True)
    profile = cost_model.device_profile("cuda")
    shapes = HEADLINE if args.quick else HEADLINE + SPREAD
    if args.shapes:
        shapes = [s for s in shapes if any(p in f"{s[0]}x{s[1]} k={s[2]} {s[3]}" for p in args.shapes)]
    known = known_keys(args.known)
    if args.jobs > 1:
        precompile(shapes, args.quick, args.jobs, known)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), date=datetime.datetime.now().isoformat(timespec="seconds"),
                command=" ".join(sys.argv), defaults=dict(unroll=op.UNROLL))
    records = []
    start = time.time()
    partial = os.path.join(out_dir, "calibration.jsonl")
    with open(partial, "w") as log:
        for rows, n, k, dname in shapes:
            if time.time() - start > args.budget_s:
                print(f"time budget: skipped {rows}x{n} k={k} {dname} and after", flush=True)
                break
            dtype = DTYPES[dname]
            elem = torch.empty((), dtype=dtype).element_size()
            x = torch.randn(rows, n, device="cuda", dtype=torch.float32).to(dtype)
            base = dict(rows=rows, n=n, k=k, dtype=dname, floor_us=rows * n * elem / profile.bandwidth * 1e6)
            for v in to_measure(rows, n, k, dname, args.quick, known):
                rec = {**base, **v}
                try:
                    out = run_variant(x, k, v)
                    torch.cuda.synchronize()
                    rec["correct"], rec["recall"], rec["model_recall"] = check(x, k, v, out)
                    t = do_bench(lambda: run_variant(x, k, v), warmup=10, rep=50, quantiles=QUANTILES)
                    rec.update(time_us=t[0] * 1e3, q20_us=t[1] * 1e3, q80_us=t[2] * 1e3,
                               predicted_us=predicted_us(rows, n, k, elem, v, profile))
                except Exception as e:  # a variant that fails to compile or run is recorded, not fatal
                    rec.update(error=f"{type(e).__name__}: {str(e)[:300]}")
                records.append(rec)
                log.write(json.dumps(rec) + "\n")
                log.flush()
            del x
            torch.cuda.empty_cache()
            print(f"[{time.time() - start:4.0f} s] {rows}x{n} k={k} {dname}", flush=True)
    meta["seconds"] = round(time.time() - start, 1)
    path = os.path.join(out_dir, "calibration.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)
    summary(records)
    print(f"wrote {path}")


def _describe(r):
    if r["kernel"] == "torch":
        return f"torch sorted={r['sorted']}"
    return (f"{r['kernel']} b={r['num_buckets']} kb={r['per_bucket_k']} seg={r['segments']} {r['select']} "
            f"{r['sort_with']} w={r['num_warps']} u={r['unroll']} sw={r['sort_warps']} "
            f"sorted={int(r['sorted'])}")


def summary(records) -> None:
    """Best correct variant per shape: approximate at recall >= 0.95, exact, both sorted."""
    print(f"\n{'shape':<28} {'floor':>6} {'torch':>7} {'best@0.95':>10} {'xfloor':>6} {'recall':>6} "
          f"{'exact':>8} {'xtorch':>6}  variants")
    by_shape = {}
    for r in records:
        by_shape.setdefault((r["rows"], r["n"], r["k"], r["dtype"]), []).append(r)
    for shape, rs in by_shape.items():
        ok = [r for r in rs if r.get("correct") and r["sorted"] and "time_us" in r]
        torch_us = next((r["time_us"] for r in ok if r["kernel"] == "torch"), float("nan"))
        approx = [r for r in ok if r["kernel"] in ("fused", "split") and r["recall"] >= 0.95]
        exact = [r for r in ok if r["kernel"] in ("select", "filtered")]
        a = min(approx, key=lambda r: r["time_us"], default=None)
        e = min(exact, key=lambda r: r["time_us"], default=None)
        name = f"{shape[0]}x{shape[1]} k={shape[2]} {shape[3]}"
        print(f"{name:<28} {rs[0]['floor_us']:6.1f} {torch_us:7.1f} "
              f"{a['time_us'] if a else float('nan'):10.1f} {a['time_us'] / a['floor_us'] if a else float('nan'):6.2f} "
              f"{a['recall'] if a else float('nan'):6.3f} {e['time_us'] if e else float('nan'):8.1f} "
              f"{torch_us / e['time_us'] if e else float('nan'):6.2f}  {_describe(a) if a else '-'} | "
              f"{_describe(e) if e else '-'}")


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
    base = predicted_us(rows, n, k, elem, record, zero) * 1e-6
    return base, [predicted_us(rows, n, k, elem, record, cost_model.with_weights(zero, {t: 1.0})) * 1e-6 - base
                  for t in terms]


def fitted_records(data):
    """The timings the weights are fitted to: correct runs of what the planner can launch (its
    default launch parameters) that the cost model describes."""
    defaults = data["meta"].get("defaults", {})
    out = []
    for r in data["records"]:
        if "time_us" not in r or not r.get("correct") or r.get("predicted_us") is None or not r.get("base"):
            continue
        if r["kernel"] != "torch" and r["sort_with"] not in plan.SORT_WITH:
            continue  # a finish the product no longer has (torch.sort: measured, never won)
        elem = torch.empty((), dtype=DTYPES[r["dtype"]]).element_size()
        if r["kernel"] != "torch" and (r["unroll"], r["sort_warps"]) != (defaults.get("unroll", r["unroll"]),
                                                                          plan.sort_warps_for(r["k"], elem)):
            continue
        out.append(r)
    return out


def fit(args) -> None:
    import numpy as np

    records, metas = [], []
    for path in args.paths:
        with open(path) as f:
            data = json.load(f)
        records += fitted_records(data)
        metas.append(data["meta"])
    data = {"meta": metas[-1]}
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
            rows_a.append([f / measured for f in feats])  # relative error: short and long runs weigh alike
            rows_b.append((measured - base) / measured)
        w = _nnls(np.array(rows_a), np.array(rows_b))
        fitted.update(dict(zip(terms, (float(v) for v in w))))
    profile = cost_model.with_weights(base_profile, fitted)
    errors = []
    print(f"{'shape':<28} {'variant':<62} {'measured':>9} {'predicted':>9}")
    for r in records:
        elem = torch.empty((), dtype=DTYPES[r["dtype"]]).element_size()
        predicted = predicted_us(r["rows"], r["n"], r["k"], elem, r, profile)
        errors.append(abs(math.log(predicted / r["time_us"])))
        print(f"{str((r['rows'], r['n'], r['k'], r['dtype'])):<28} {_describe(r):<62} {r['time_us']:9.1f} "
              f"{predicted:9.1f}")
    print(f"median |log(pred/meas)| = {np.median(errors):.3f}, 90th percentile {np.percentile(errors, 90):.3f} "
          f"over {len(records)} timings")
    key = "H100" if "H100" in data["meta"]["device"] else data["meta"]["device"]
    with open(args.write, "w") as f:
        f.write(
            '"""Cost-model weights fitted to measurements (written by benchmarks/calibrate_cost_model.py).\n\n'
            "Keyed by a substring of the device name; ``cost_model.device_profile`` uses the first match and\n"
            "falls back to its uncalibrated defaults for other devices.\n"
            f'Fitted from {", ".join(os.path.basename(p) for p in args.paths)}: {data["meta"]["device"]}, torch {data["meta"]["torch"]}, '
            f'triton {data["meta"]["triton"]}, {data["meta"]["date"]};\n'
            f"median |log(predicted / measured)| = {np.median(errors):.3f} over {len(records)} timings.\n"
            '"""\n\n'
            f"CUDA_WEIGHTS: dict[str, dict[str, float]] = {{\n    {key!r}: {{\n"
            + "".join(f"        {t!r}: {v:.6g},\n" for t, v in fitted.items())
            + "    },\n}\n"
        )
    print(f"wrote {args.write}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--quick", action="store_true", help="headline shapes, recall 0.95 only")
    m.add_argument("--shapes", nargs="+", metavar="PATTERN", help='keep shapes whose name contains any PATTERN')
    m.add_argument("--jobs", type=int, default=1, help="processes compiling the kernels first")
    m.add_argument("--budget-s", type=float, default=480.0, help="stop starting shapes after this many seconds")
    m.add_argument("--known", nargs="+", metavar="JSON", help="skip variants these calibration files measured")
    m.add_argument("--out")
    f = sub.add_parser("fit")
    f.add_argument("paths", nargs="+")
    f.add_argument("--write", default="topk_compiler/lowering/calibration.py")
    args = parser.parse_args(argv)
    measure(args) if args.mode == "measure" else fit(args)


if __name__ == "__main__":
    main()
