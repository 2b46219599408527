"""HiRE on a trained ReLU model: the tiny character LM of ``train_relu_lm.py`` (two ReLU FFNs,
128 -> 1024 -> 128), CPU.

Per predictor (low-rank, int8, int4) and recall target: ``topk_compiler.calibrate`` on windows
of the training text, choices made cheapest for token-by-token decoding (``rows_per_call=1``; it
sets the threshold on the predicted pre-activation above which a row
computes a neuron), ``torch.compile(backend="approx_topk")``, then on windows of the held-out
text (the other half of the docstrings) against the dense model: next-character agreement (argmax),
bits per character, and per layer (on the dense model's own FFN inputs) the activation-mass recall
of the computed neurons, the share of neurons computed, the rows whose every active neuron was
computed (their FFN output is exact) and the relative error of the FFN output. ``rewrite="always"``: on a CPU
the question is the approximation's effect, not speed. Writes JSON and a markdown table.

    python benchmarks/train_relu_lm.py && python benchmarks/eval_hire_relu_lm.py --out benchmarks/results
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
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_relu_lm  # noqa: E402

import topk_compiler  # noqa: E402
from topk_compiler.lowering.hire_ffn import hire_ffn  # noqa: E402
from topk_compiler.lowering.hire_predictor import predictor_for  # noqa: E402

BATCH = 8  # windows per call


def batches(split: str, count: int, seed: int) -> list[torch.Tensor]:
    data = train_relu_lm.corpus(split)
    gen = torch.Generator().manual_seed(seed)
    return [train_relu_lm.windows(data, BATCH, gen)[0] for _ in range(count)]


def ffn_inputs(model, inputs) -> list[torch.Tensor]:
    rows = [[] for _ in model.blocks]
    hooks = [b.fc1.register_forward_hook(lambda mod, inp, out, i=i: rows[i].append(inp[0].reshape(-1, inp[0].shape[-1])))
             for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        for x in inputs:
            model(x)
    for h in hooks:
        h.remove()
    return [torch.cat(r) for r in rows]


def layer_metrics(model, entry, inputs_per_layer):
    out = []
    for i, (block, x) in enumerate(zip(model.blocks, inputs_per_layer)):
        w1, b1, w2, b2 = block.fc1.weight, block.fc1.bias, block.fc2.weight, block.fc2.bias
        with torch.no_grad():
            pre = F.linear(x, w1, b1)
            dense = F.linear(torch.relu(pre), w2, b2)
            ours = hire_ffn(x, w1, b1, w2, b2, "relu", entry["predictor"], entry["rank"], entry["threshold"],
                            entry["candidates"], "always")
            chosen = predictor_for(w1, entry["predictor"], entry["rank"]).scores(x, b1) > entry["threshold"]
            mass = torch.relu(pre)
            total, got = mass.sum(1), (mass * chosen).sum(1)
            recall = torch.where(total > 0, got / total.clamp_min(1e-30), 1.0).mean().item()
            # every truly active neuron chosen: the row's output is exact
            exact_rows = ((pre > 0) <= chosen).all(1).float().mean().item()
        out.append(dict(layer=i, active_fraction=(pre > 0).float().mean().item(), activation_mass_recall=recall,
                        computed_fraction=chosen.float().mean().item(), rows_with_every_active_neuron=exact_rows,
                        relative_error_of_ffn_term=((ours - dense).norm() / (dense - b2).norm()).item()))
    return out


def lm_metrics(model, compiled, inputs, targets):
    agree = total = 0
    nll_dense = nll_hire = 0.0
    with torch.no_grad():
        for x, y in zip(inputs, targets):
            dense, ours = model(x), compiled(x)
            agree += (dense.argmax(-1) == ours.argmax(-1)).sum().item()
            total += y.numel()
            nll_dense += F.cross_entropy(dense.flatten(0, 1), y.flatten(), reduction="sum").item()
            nll_hire += F.cross_entropy(ours.flatten(0, 1), y.flatten(), reduction="sum").item()
    return dict(next_char_agreement=agree / total, bits_per_char_dense=nll_dense / total / math.log(2),
                bits_per_char_hire=nll_hire / total / math.log(2), tokens=total)


def markdown(payload) -> str:
    facts = payload["machine"]
    lines = [f"# HiRE on a trained ReLU char LM (real text), {payload['date']}", "",
             f"{facts['cpu']}, {facts['threads']} threads, torch {facts['torch']}, Python {facts['python']}. "
             f"Model: {payload['model']}, trained by benchmarks/train_relu_lm.py "
             f"(held-out {payload['training'][-1]['held_out_bits_per_char']:.3f} bits/char). Calibrated on "
             f"{payload['calibration_tokens']} token rows of training text, measured on {payload['evaluation_tokens']} "
             f"of held-out text. Truly active neurons per token (dense): "
             + ", ".join(f"layer {m['layer']}: {m['active_fraction']:.1%}" for m in payload["ffn"][0]["layers"]) + ".",
             "", "| target | predictor | rank | threshold | neurons per row (calib.) | calib. recall "
             "| mean layer mass recall | neurons computed (eval) | rows exact | mean rel. FFN err | next-char agreement "
             "| bits/char dense -> HiRE |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["ffn"]:
        layers = r["layers"]
        lines.append(
            f"| {r['recall_target']} | {r['predictor']} | {r['rank']} | {r['threshold']:.3f} | {r['candidates']} "
            f"({r['neurons_fraction']:.0%}) | {r['calibration_recall']:.4f} | "
            f"{sum(m['activation_mass_recall'] for m in layers) / len(layers):.4f} | "
            f"{sum(m['computed_fraction'] for m in layers) / len(layers):.1%} | "
            f"{sum(m['rows_with_every_active_neuron'] for m in layers) / len(layers):.1%} | "
            f"{sum(m['relative_error_of_ffn_term'] for m in layers) / len(layers):.4f} | "
            f"{r['next_char_agreement']:.4f} | {r['bits_per_char_dense']:.4f} -> {r['bits_per_char_hire']:.4f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=train_relu_lm.DEFAULT_CHECKPOINT)
    parser.add_argument("--calibration-batches", type=int, default=32)
    parser.add_argument("--evaluation-batches", type=int, default=64)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.95, 0.99])
    parser.add_argument("--predictors", nargs="+", default=["lowrank", "int8", "int4"])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    if not args.checkpoint.exists():
        raise SystemExit(f"no checkpoint at {args.checkpoint}: run benchmarks/train_relu_lm.py first")
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    model = train_relu_lm.load(args.checkpoint)
    calib = batches("calibration", args.calibration_batches, seed=2)
    held_out = train_relu_lm.corpus("evaluation")
    gen = torch.Generator().manual_seed(3)
    pairs = [train_relu_lm.windows(held_out, BATCH, gen) for _ in range(args.evaluation_batches)]
    eval_x, eval_y = [p[0] for p in pairs], [p[1] for p in pairs]
    eval_ffn_inputs = ffn_inputs(model, eval_x)

    results = []
    for target in args.targets:
        for kind in args.predictors:
            torch.compiler.reset()
            start = time.time()
            options = topk_compiler.calibrate(model, calib, recall_target=target, predictors=[kind],
                                              rows_per_call=1, hire={"rewrite": "always"})
            (entry,) = options["hire"]["calibration"].values()  # both blocks' FFNs share one source line
            compiled = torch.compile(model, backend="approx_topk", options=options)
            results.append(dict(recall_target=target, predictor=kind, rank=entry["rank"],
                                threshold=entry["threshold"], candidates=entry["candidates"],
                                neurons_fraction=entry["candidates"] / model.config["d_ff"],
                                calibration_recall=entry["recall"], **lm_metrics(model, compiled, eval_x, eval_y),
                                layers=layer_metrics(model, entry, eval_ffn_inputs),
                                seconds=round(time.time() - start, 1)))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "layers"}), flush=True)
    payload = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=dict(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                     os=platform.platform(), torch=torch.__version__, python=platform.python_version()),
        command=" ".join([os.path.basename(sys.executable), *sys.argv]),
        model=model.config, training=checkpoint["log"], training_args=checkpoint["args"],
        calibration_tokens=args.calibration_batches * BATCH * train_relu_lm.CONTEXT,
        evaluation_tokens=args.evaluation_batches * BATCH * train_relu_lm.CONTEXT, ffn=results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hire_relu_lm.json").write_text(json.dumps(payload, indent=1) + "\n")
    (args.out / "hire_relu_lm.md").write_text(markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
