"""What every pass shares: the decision record, the report, and the pass base class."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

logger = logging.getLogger("topk_compiler")

_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+)')


@dataclass(frozen=True)
class RewriteDecision:
    """One matched site and what a pass did with it (rewritten, or kept exact and why).

    ``shape`` and ``k`` are strings so that symbolic sizes (``s0``) read as such; ``details``
    holds what only one pass knows (a HiRE predictor's rank, say).
    """

    pass_name: str
    node: str
    location: str | None
    code: str | None
    op: str
    shape: tuple[str, ...]
    dtype: str
    device: str
    k: str
    dim: int | None
    recall_target: float
    rewritten: bool
    reason: str
    algorithm: str = "exact"
    num_buckets: int | None = None
    per_bucket_k: int | None = None
    expected_recall: float | None = None
    predicted_us: float | None = None
    exact_us: float | None = None
    override: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        where = self.location or self.node
        head = (f"{where}: {self.op}(shape=[{', '.join(self.shape)}], k={self.k}"
                + (f", dim={self.dim}" if self.dim is not None else "") + f", {self.dtype}, {self.device})")
        if self.rewritten:
            what = f"REWRITTEN -> {self.algorithm}"
            if self.num_buckets:
                what += f" (num_buckets={self.num_buckets}, per_bucket_k={self.per_bucket_k})"
        else:
            what = "kept exact"
        parts = [what, self.reason]
        if self.expected_recall is not None:
            parts.append(f"expected recall {self.expected_recall:.4f} (target {self.recall_target:g})")
        if self.predicted_us is not None and self.exact_us is not None:
            parts.append(f"predicted {self.predicted_us:.1f} us vs exact {self.exact_us:.1f} us")
        parts += [f"{key}={value}" for key, value in self.details.items()]
        if self.override:
            parts.append(f"override {self.override!r}")
        lines = [head, "    " + "; ".join(p for p in parts if p)]
        if self.code:
            lines.insert(1, f"    | {self.code}")
        return "\n".join(lines)


class RewriteReport(list):
    """The decisions of one or more compiles, in graph order."""

    def __str__(self) -> str:
        if not self:
            return "approx_topk: no top-k or matmul->top-k site found"
        rewritten = sum(d.rewritten for d in self)
        lines = [f"approx_topk: {len(self)} site(s), {rewritten} rewritten, {len(self) - rewritten} kept exact"]
        return "\n".join(lines + [str(d) for d in self])

    @property
    def rewritten(self) -> list[RewriteDecision]:
        return [d for d in self if d.rewritten]


def source_location(node: torch.fx.Node) -> tuple[str | None, str | None]:
    """("file.py:LINE", source line) of the user code that created ``node`` (innermost frame)."""
    trace = node.meta.get("stack_trace") or ""
    frames = list(_FRAME.finditer(trace))
    if not frames:
        return None, None
    last = frames[-1]
    rest = trace[last.end():].splitlines()
    code = rest[1].strip() if len(rest) > 1 else None
    return f"{last['file']}:{last['line']}", code


def shape_strings(value: torch.Tensor) -> tuple[str, ...]:
    return tuple(str(s) for s in value.shape)


def size_hint(value) -> int:
    """Concrete value of an int or SymInt (its hint: the example input's size)."""
    if isinstance(value, torch.SymInt):
        return value.node.hint if value.node.hint is not None else int(value.node.shape_env.size_hint(value.node.expr))
    return int(value)


def example_value(arg: Any) -> Any:
    """The fake value of a graph argument (a node's ``example_value``), or the argument itself."""
    if isinstance(arg, torch.fx.Node):
        return arg.meta.get("example_value", arg.meta.get("val"))
    return arg


class ApproxTopkPass:
    """A pass over the Dynamo FX graph. Subclasses implement ``apply`` and record every decision."""

    name = "pass"

    def __init__(self, report: RewriteReport):
        self.report = report

    def apply(self, gm: torch.fx.GraphModule, example_inputs: list) -> int:
        raise NotImplementedError

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> int:
        start, before = time.perf_counter(), len(self.report)
        rewritten = self.apply(gm, example_inputs)
        if rewritten:
            gm.graph.lint()
            gm.recompile()
        matched = len(self.report) - before
        logger.debug("%s: %d matched, %d rewritten, %d kept exact in %.1f ms", self.name, matched, rewritten,
                     matched - rewritten, (time.perf_counter() - start) * 1e3)
        return rewritten

    def record(self, decision: RewriteDecision) -> None:
        self.report.append(decision)
        logger.info("%s", decision)
