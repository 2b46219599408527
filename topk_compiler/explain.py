"""``explain()``: the rewrite report of a function or module, without running its graphs."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from topk_compiler.backend import run_passes
from topk_compiler.config import ApproxTopkConfig
from topk_compiler.passes.base import RewriteReport, example_value, size_hint


def _placeholder_output(value: Any) -> Any:
    """An uninitialised stand-in for one graph output (its fake value made real)."""
    if isinstance(value, torch.Tensor):
        return torch.empty([size_hint(s) for s in value.shape], dtype=value.dtype, device=value.device)
    if isinstance(value, torch.SymInt):
        return size_hint(value)
    return value


def explain(fn_or_module, *example_inputs, dynamic: bool | None = None, **options) -> RewriteReport:
    """What the ``approx_topk`` backend would do to ``fn_or_module`` called on ``example_inputs``.

    Dynamo traces the call (through every graph break) and our passes run on each graph, exactly as
    under ``torch.compile(..., backend="approx_topk", options=options)``; the graphs themselves are
    not run (their outputs are uninitialised tensors of the right shapes) and nothing is compiled by
    Inductor. Returns the decisions, one per site, printable with ``str()``.
    """
    config = ApproxTopkConfig.from_options(options)
    report = RewriteReport()

    def recording_backend(gm: torch.fx.GraphModule, example_inputs_):
        run_passes(gm, example_inputs_, config, report)
        (outputs,) = [node.args[0] for node in gm.graph.nodes if node.op == "output"]
        fakes = [example_value(arg) for arg in outputs]

        def placeholder(*args):
            return [_placeholder_output(fake) for fake in fakes]

        return placeholder

    compiled = torch.compile(fn_or_module, backend=recording_backend, dynamic=dynamic)
    compiled(*example_inputs)
    return report
