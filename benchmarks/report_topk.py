"""Tables and a plot from bench_topk's JSON: formatting only, every number comes from the run.

    python -m benchmarks.report_topk benchmarks/results/bench_topk.json [--out DIR]

Writes bench_topk.md (results per shape, plans with predicted against measured time, the peer's
settings, CUDA-graph replay times, failures) and bench_topk.png (speed-up over torch.topk
against measured recall, one marker per shape).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (provider key in the JSON, column title), in table order.
COLUMNS = (
    ("torch", "torch.topk"),
    ("compiled", "compiled torch.topk"),
    ("peer", "peer (recall ≥ 0.95)"),
    ("approx@0.9", "ours@0.9"),
    ("approx@0.95", "ours@0.95"),
    ("approx@0.99", "ours@0.99"),
    ("exact", "ours exact"),
)
OURS = ("approx@0.9", "approx@0.95", "approx@0.99", "exact")
GRAPH_COLUMNS = (("torch", "torch.topk"), *((p, t) for p, t in COLUMNS if p in OURS))
SHORT_COLUMNS = (("torch", "torch"), ("compiled", "compiled"), ("peer", "peer"), ("approx@0.9", "@0.9"),
                 ("approx@0.95", "@0.95"), ("approx@0.99", "@0.99"), ("exact", "exact"))


def us(value: float) -> str:
    """Microseconds rounded for a table; a sub-microsecond floor still shows."""
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def _sorted_records(report: dict) -> list[dict]:
    """Headline shapes in their own order, then the sweep by (rows, n, k)."""
    records = [r for r in report["shapes"] if "results" in r]
    sweep = sorted((r for r in records if r["shape"]["group"] == "sweep"),
                   key=lambda r: (r["shape"]["rows"], r["shape"]["n"], r["shape"]["k"]))
    return [r for r in records if r["shape"]["group"] != "sweep"] + sweep


def cell(provider: str, result: dict | None) -> str:
    """``µs · ×floor · speed-up · recall``: speed-up for all but torch.topk, recall where it can be < 1."""
    if not result:
        return "—"
    if "error" in result:
        if result["error"].startswith("peer unavailable"):
            return "n/a"
        return "skipped" if result["error"].startswith("skipped") else "failed"
    parts = [f"{us(result['median_us'])} µs", f"{result['x_floor']:.1f}×F"]
    if provider != "torch" and "speedup" in result:
        parts.append(f"**{result['speedup']:.2f}×**")
    if provider in ("peer", *OURS[:-1]) or result["recall"] < 1.0:
        parts.append(f"r {result['recall']:.3f}")
    return " · ".join(parts)


def plan_text(plan: dict) -> str:
    if plan["algorithm"] == "exact":
        return f"exact ({plan['kernel']})"
    warps = f" w={plan['num_warps']}" if "num_warps" in plan else ""
    cap = f" r={plan['max_registers']}" if plan.get("max_registers") else ""
    search = " bracket" if plan.get("select") == "bracket" else ""  # the share kernel's threshold
    return (f"{plan['kernel']} b={plan['num_buckets']} kb={plan['per_bucket_k']} seg={plan['segments']}{warps}{cap}"
            f"{search}")


def _one_line(text: str) -> str:
    """Text safe inside a table cell or a list item: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _header(report: dict) -> list[str]:
    env = report["environment"]
    lines = [
        "# Top-k benchmark",
        "",
        f"{env['device']} · torch {env['torch']} (CUDA {env['cuda']}) · triton {env['triton']} · "
        f"Python {env['python']} · {env['date']}",
        "",
        f"Command: `{env['command']}`",
        "",
        f"Timer: {env['timer']}, quantiles {env['quantiles']}. Inputs: standard normal, fresh per shape.",
        f"HBM floor = input bytes read once / {env['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s.",
    ]
    copy = report.get("copy")
    if copy:
        lines.append(f"Measured copy of {copy['bytes'] / 2**20:.0f} MiB on the device: {us(copy['median_us'])} µs, "
                     f"{copy['read_bytes_per_s'] / 1e9:.0f} GB/s read ({copy['read_write_bytes_per_s'] / 1e9:.0f} GB/s "
                     "read + write).")
    lines += ["", "Cells: median time · ×F = times the HBM floor · **speed-up over torch.topk** · "
              "r = recall measured on the same outputs.", ""]
    return lines


def _results_table(records: list[dict]) -> list[str]:
    header = ["shape", "floor", *(title for _, title in COLUMNS)]
    rows = [[r["shape"]["name"], f"{us(r['floor_us'])} µs", *(cell(p, r["results"].get(p)) for p, _ in COLUMNS)]
            for r in records]
    return _table(header, rows)


def _plans_table(records: list[dict]) -> list[str]:
    header = ["shape", "provider", "plan", "expected recall", "measured recall", "predicted", "measured",
              "measured / predicted", "why this plan"]
    rows = []
    for r in records:
        results = r["results"]
        torch_result = results["torch"]
        plan = next((results[p]["plan"] for p in OURS if "plan" in results[p]), None)
        if plan and "median_us" in torch_result:
            predicted = plan["torch_topk_us"]
            rows.append([r["shape"]["name"], "torch.topk", "torch.topk", "1", f"{torch_result['recall']:.3f}",
                         f"{us(predicted)} µs", f"{us(torch_result['median_us'])} µs",
                         f"{torch_result['median_us'] / predicted:.2f}", "baseline"])
        for provider in OURS:
            result = results[provider]
            if "plan" not in result:
                continue
            plan = result["plan"]
            rows.append([r["shape"]["name"], provider, plan_text(plan), f"{plan['expected_recall']:.3f}",
                         f"{result['recall']:.3f}", f"{us(plan['predicted_us'])} µs", f"{us(result['median_us'])} µs",
                         f"{result['measured_over_predicted']:.2f}", plan["reason"]])
    return _table(header, rows)


def _memory_table(records: list[dict]) -> list[str]:
    """Intermediates our op allocated at its peak, against the survivors of its bucketing
    (rows x num_buckets x per_bucket_k values and int32 indices): the issue's memory bound."""
    rows = []
    for r in records:
        if r["shape"].get("group") != "headline":
            continue
        for provider in OURS:
            result = r["results"].get(provider, {})
            if "memory" not in result:
                continue
            plan, mem = result["plan"], result["memory"]
            elem = r["input_bytes"] // (r["shape"]["rows"] * r["shape"]["n"])
            bound = r["shape"]["rows"] * plan["num_buckets"] * plan["per_bucket_k"] * (elem + 4)
            rows.append([r["shape"]["name"], provider, plan_text(plan), f"{mem['output_bytes'] / 2**20:.2f} MiB",
                         f"{mem['intermediate_bytes'] / 2**20:.2f} MiB",
                         f"{bound / 2**20:.2f} MiB" if bound else "—",
                         ("yes" if mem["intermediate_bytes"] <= bound else "no") if bound else "—"])
    return _table(["shape", "provider", "plan", "outputs", "intermediates", "survivors", "within"], rows)


def _peer_section(report: dict, records: list[dict]) -> list[str]:
    peer = report["peer"]
    lines = ["## Peer: graphcore-research/pytorch-approx-topk", "", f"Checkout `{peer['checkout']}`."]
    if peer["error"]:
        return lines + ["", "Not measured:", "", "```text", peer["error"], "```", ""]
    waited = peer.get("build_wait_s")
    built = "Built in the background from the start; the timings waited for it" + (
        f" {waited:.0f} s" if waited is not None else "") + (f" (its log ended `{peer['build']}`)" if peer.get("build") else "")
    lines += [built + ", so that no compiler ran beside them.",
              "Fastest of the settings tried whose measured recall is ≥ 0.95; its outputs are unsorted "
              "(stage 2 is torch.topk(sorted=False)), ours and torch.topk's are sorted.", ""]
    rows = []
    for r in records:
        result = r["results"].get("peer", {})
        if "median_us" in result:
            rows.append([r["shape"]["name"], result["setting"], f"{us(result['median_us'])} µs",
                         f"{result['recall']:.3f}", str(len(result["tried"]))])
        elif result:
            rows.append([r["shape"]["name"], _one_line(result["error"]), "—", "—", str(len(result.get("tried", [])))])
    return lines + _table(["shape", "setting", "median", "recall", "settings tried"], rows) + [""]


def _graph_table(records: list[dict]) -> list[str]:
    header = ["shape", *(title for _, title in GRAPH_COLUMNS)]
    rows = []
    for r in records:
        if not r["cuda_graphs"]:
            continue
        cells = []
        for provider, _ in GRAPH_COLUMNS:
            result = r["results"][provider]
            graph = result.get("graph", {})
            if "median_us" not in result:
                cells.append("failed")
            elif "median_us" not in graph:
                cells.append(f"{us(result['median_us'])} / capture failed")
            else:
                speedup = f" · **{graph['speedup']:.2f}×**" if provider != "torch" and "speedup" in graph else ""
                host = f" ({us(result['back_to_back_us'])})" if "back_to_back_us" in result else ""
                cells.append(f"{us(result['median_us'])}{host} / {us(graph['median_us'])} µs{speedup}")
        rows.append([r["shape"]["name"], *cells])
    return _table(header, rows)


def _eager_and_replayed(result: dict) -> str:
    graph = result.get("graph", {})
    return f"{us(result['median_us'])} / {us(graph['median_us'])} µs" if "median_us" in graph \
        else f"{us(result['median_us'])} µs"


def _unsorted_table(records: list[dict]) -> list[str]:
    """Headline shapes with sorted=False: torch.topk's, the peer's (unsorted too) and ours at 0.95."""
    header = ["shape", "floor", "torch.topk eager / graph", "peer (eager)", "ours@0.95 eager / graph",
              "× floor (graph)", "speed-up eager / graph", "recall", "plan"]
    rows = []
    for r in records:
        results = r["results"]
        base, ours = results.get("torch:unsorted"), results.get("approx@0.95:unsorted")
        if not base or not ours:
            continue
        if "median_us" not in base or "median_us" not in ours:
            rows.append([r["shape"]["name"], f"{us(r['floor_us'])} µs", "failed" if "median_us" not in base else
                         _eager_and_replayed(base), "—", "failed" if "median_us" not in ours else
                         _eager_and_replayed(ours), "—", "—", "—", "—"])
            continue
        peer = results.get("peer", {})
        graph = ours.get("graph", {})
        device_us = graph.get("median_us", ours["median_us"])
        speedups = f"**{ours['speedup']:.2f}×**" + (f" / **{graph['speedup']:.2f}×**" if "speedup" in graph else "")
        rows.append([r["shape"]["name"], f"{us(r['floor_us'])} µs", _eager_and_replayed(base),
                     f"{us(peer['median_us'])} µs" if "median_us" in peer else "—", _eager_and_replayed(ours),
                     f"{device_us / r['floor_us']:.2f}×", speedups, f"{ours['recall']:.3f}",
                     plan_text(ours["plan"]) if "plan" in ours else "—"])
    return _table(header, rows) if rows else []


def _failures(report: dict) -> list[str]:
    lines = []
    for r in report["shapes"]:
        if "skipped" in r:
            lines.append(f"- {r['shape']['name']}: not measured ({r['skipped']})")
            continue
        for provider, result in r["results"].items():
            if "error" in result and not result["error"].startswith(("skipped", "peer unavailable")):
                lines.append(f"- {r['shape']['name']} / {provider}: {_one_line(result['error'])}")
            if "error" in result.get("graph", {}):
                lines.append(f"- {r['shape']['name']} / {provider} (CUDA graph): {_one_line(result['graph']['error'])}")
    return lines


def markdown(report: dict) -> str:
    records = _sorted_records(report)
    lines = _header(report) + ["## Results", ""] + _results_table(records)
    lines += ["", "## Plans: cost model against measurement", ""] + _plans_table(records) + [""]
    if any("memory" in res for r in records for res in r["results"].values()):
        lines += ["## Memory at the peak of one call (headline shapes)", "",
                  "Allocated beyond the input: the outputs, and intermediates against the survivors of the "
                  "plan's bucketing (rows x num_buckets x per_bucket_k values + int32 indices).", ""]
        lines += _memory_table(records) + [""]
    unsorted = _unsorted_table(records)
    if unsorted:
        lines += ["## Unsorted output (headline shapes)", "",
                  "The same inputs with `sorted=False`: torch.topk's unsorted call, ours at recall 0.95 (speed-up "
                  "over torch.topk's unsorted call), and the peer, whose output is unsorted too.", ""] + unsorted + [""]
    if "peer" in report:
        lines += _peer_section(report, records)
    if any(r["cuda_graphs"] for r in records):
        lines += ["## Eager launch / CUDA-graph replay (headline and latency-bound shapes)", "",
                  "Eager (back to back) / replay, and the speed-up of a replay over torch.topk's replay. "
                  "The replay times the device's work alone. Eager is do_bench's: its events bracket each call "
                  "after an L2 flush that the host can run ahead of, so it leaves out much of a short call's "
                  "dispatch; back to back is the host's clock over calls made one after another (the shortest "
                  "of five batches), which pays it.", ""] + _graph_table(records) + [""]
    failures = _failures(report)
    if failures:
        lines += ["## Failures and skipped shapes", ""] + failures + [""]
    return "\n".join(lines) + "\n"


def _short(result: dict | None) -> str:
    if not result:
        return "-"
    if "error" in result:
        if result["error"].startswith("peer unavailable"):
            return "n/a"
        return "skip" if result["error"].startswith("skipped") else "err"
    return us(result["median_us"])


def short_table(report: dict) -> str:
    """Fixed-width table for a terminal: µs per provider, then ours@0.95's speed-up and recall."""
    env = report["environment"]
    head = f"{'shape':<24}{'floor':>8}" + "".join(f"{t:>9}" for _, t in SHORT_COLUMNS) + f"{'x@0.95':>8}{'r@0.95':>8}"
    lines = [f"{env['device']} | torch {env['torch']} | triton {env['triton']} | {env['date']} | times in us", head]
    for r in _sorted_records(report):
        ours = r["results"]["approx@0.95"]
        lines.append(
            f"{r['shape']['name']:<24}{us(r['floor_us']):>8}"
            + "".join(f"{_short(r['results'].get(p)):>9}" for p, _ in SHORT_COLUMNS)
            + (f"{ours['speedup']:>8.2f}{ours['recall']:>8.3f}" if "speedup" in ours else f"{'-':>8}{'-':>8}")
        )
    skipped = [r["shape"]["name"] for r in report["shapes"] if "skipped" in r]
    if skipped:
        lines.append(f"not measured (time budget): {len(skipped)} shapes")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Speed-up over torch.topk against measured recall: ours (filled, joined in target order) and
    the peer (hollow), one marker per shape; sweep shapes drawn small and grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = "osD^vP*Xhp<>"
    fig, ax = plt.subplots(figsize=(9, 6))
    for i, r in enumerate(_sorted_records(report)):
        headline = r["shape"]["group"] != "sweep"
        style = dict(marker=markers[i % len(markers)], markersize=7 if headline else 4,
                     color=f"C{i % 10}" if headline else "0.6", alpha=1.0 if headline else 0.6)
        ours = [r["results"][p] for p in OURS if "speedup" in r["results"][p]]
        if ours:
            ax.plot([o["recall"] for o in ours], [o["speedup"] for o in ours], linewidth=1,
                    label=r["shape"]["name"] if headline else None, **style)
        peer = r["results"].get("peer", {})
        if "speedup" in peer:
            ax.plot([peer["recall"]], [peer["speedup"]], linestyle="none", markerfacecolor="none", **style)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_yscale("log")
    ax.set_xlabel("measured recall")
    ax.set_ylabel("speed-up over torch.topk (median time)")
    env = report["environment"]
    ax.set_title(f"Top-k: ours (filled; targets 0.9, 0.95, 0.99, exact) and peer (hollow)\n"
                 f"{env['device']}, torch {env['torch']}, {env['date'][:10]}", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out_dir: Path) -> list[Path]:
    """bench_topk.md, and bench_topk.png where matplotlib is installed."""
    out_dir = Path(out_dir)
    md = out_dir / "bench_topk.md"
    md.write_text(markdown(report))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return [md]
    png = out_dir / "bench_topk.png"
    plot(report, png)
    return [md, png]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="bench_topk.json")
    parser.add_argument("--out", type=Path, help="folder for the .md and .png (default: the JSON's)")
    args = parser.parse_args(argv)
    report = json.loads(args.json.read_text())
    for path in write_report(report, args.out or args.json.parent):
        print(path)


if __name__ == "__main__":
    main()
