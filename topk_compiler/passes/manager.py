"""PassManager: the ordered list of passes one compile runs, built from the config."""

from __future__ import annotations

import torch.fx

from topk_compiler.config import ApproxTopkConfig
from topk_compiler.passes.base import ApproxTopkPass, RewriteReport
from topk_compiler.passes.hire_ffn import HireFfnPass
from topk_compiler.passes.hire_logits import HireLogitsPass
from topk_compiler.passes.topk_rewrite import TopkRewritePass


class PassManager:
    """Runs the enabled passes in a fixed order and collects their decisions in ``report``."""

    def __init__(self, config: ApproxTopkConfig, report: RewriteReport | None = None):
        self.config = config
        self.report = RewriteReport() if report is None else report
        self.passes: list[ApproxTopkPass] = []
        # HiRE first: its logits pass claims linear -> topk before the top-k pass rewrites the topk.
        if config.hire.enabled:
            self.passes += [HireLogitsPass(config, self.report), HireFfnPass(config, self.report)]
        if config.topk.enabled:
            self.passes.append(TopkRewritePass(config, self.report))

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> RewriteReport:
        for graph_pass in self.passes:
            graph_pass(gm, example_inputs)
        return self.report
