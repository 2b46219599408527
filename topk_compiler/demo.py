"""A small model with a top-k, compiled with the approx_topk backend: the rewrite report, the
recall measured against exact top-k, and the time against eager. Runs on CPU by default.

    python -m topk_compiler.demo [--device cuda] [--recall-target 0.95] [--rewrite auto|always]

On a CPU, torch.topk is hard to beat and the cost model keeps it ("kept exact"); ``--rewrite
always`` shows the approximation anyway (useful to check what it does to a model's outputs).
"""

from __future__ import annotations

import argparse
import time

import torch

import topk_compiler


class SparseAttentionIndex(torch.nn.Module):
    """Scores every key for every query and keeps the top-k keys per query (a sparse-attention
    index), plus a tiny top-k over a handful of experts that is not worth approximating."""

    def __init__(self, dim: int = 64, experts: int = 8):
        super().__init__()
        self.query = torch.nn.Linear(dim, dim, bias=False)
        self.router = torch.nn.Linear(dim, experts)

    def forward(self, x: torch.Tensor, keys: torch.Tensor, k: int):
        scores = self.query(x) @ keys.transpose(-1, -2)
        top = torch.topk(scores, k, dim=-1)
        experts = self.router(x).topk(2, dim=-1)
        return top.values, top.indices, experts.indices


def _time(fn, *args, repeats: int) -> float:
    fn(*args)
    if args[0].is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn(*args)
    if args[0].is_cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--recall-target", type=float, default=0.95)
    parser.add_argument("--rewrite", choices=("auto", "always"), default="auto")
    parser.add_argument("--queries", type=int, default=256)
    parser.add_argument("--keys", type=int, default=16384)
    parser.add_argument("--k", type=int, default=512)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = SparseAttentionIndex().to(args.device).eval()
    x = torch.randn(args.queries, 64, device=args.device)
    keys = torch.randn(args.keys, 64, device=args.device)
    options = {"recall_target": args.recall_target, "rewrite": args.rewrite}

    print(f"device {args.device}: {args.queries} queries x {args.keys} keys, k={args.k}, options {options}\n")
    print(topk_compiler.explain(model, x, keys, args.k, **options), "\n")

    compiled = torch.compile(model, backend="approx_topk", options=options)
    with torch.no_grad():
        start = time.perf_counter()
        _, indices, _ = compiled(x, keys, args.k)
        print(f"compiled in {time.perf_counter() - start:.1f} s")
        scores = model.query(x) @ keys.T
        recall = topk_compiler.measured_recall(scores, indices, args.k)
        eager_s = _time(model, x, keys, args.k, repeats=20)
        compiled_s = _time(compiled, x, keys, args.k, repeats=20)
    print(f"measured recall {recall:.4f} (target {args.recall_target})")
    print(f"eager {eager_s * 1e3:.2f} ms, compiled {compiled_s * 1e3:.2f} ms per call "
          f"({eager_s / compiled_s:.2f}x; wall-clock, includes Python overhead)")


if __name__ == "__main__":
    main()
